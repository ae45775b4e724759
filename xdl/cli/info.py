"""``xdl info RUN``: the run's configuration, metrics and compute card in the terminal."""

from __future__ import annotations

import json

import click


@click.command("info")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print run.json as it is")
def command(run: str, as_json: bool) -> None:
    """Print a run's model, data, training configuration, final metrics and compute card."""
    from xdl.training.compute import format_card
    from xdl.runs.run import Run

    r = Run(run)
    if as_json:
        click.echo(json.dumps(r.info, indent=2))
        return
    info = r.info
    click.echo(f"run        {r.path}")
    click.echo(f"data       {info['data'].get('name')}  {(info.get('dataset') or {}).get('sizes', '')}")
    click.echo(f"model      {json.dumps({k: v for k, v in info['model'].items()})}")
    click.echo(f"training   {json.dumps(info['train'])}")
    if info["train"].get("dp_epsilon") is not None and "dp_epsilon" in info.get("metrics", {}):
        t = info["train"]
        click.echo(f"privacy    differentially private (DP-SGD): spent ε = {info['metrics']['dp_epsilon']:.3f} of "
                   f"{t['dp_epsilon']:g} at δ = {t['dp_delta']:g}, per-record gradient norm ≤ {t['dp_max_grad_norm']:g}")
    for key, value in info.get("metrics", {}).items():
        click.echo(f"{key:<22} {value:.4f}" if isinstance(value, float) else f"{key:<22} {value}")
    card = info.get("compute")
    try:
        lines = format_card(card) if card else []
    except (KeyError, TypeError, ValueError):  # an edited or foreign run.json: show the rest anyway
        lines = ["(the card in run.json is malformed)"]
    click.echo("compute card" if card else "compute card: not recorded (run trained before xdl kept one)")
    for line in lines:
        click.echo(f"  {line}")
