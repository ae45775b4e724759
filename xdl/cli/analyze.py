"""``xdl explain``, ``xdl attack``, ``xdl report``: one handler, three kinds of analyzer.

The ``--method`` choices and help come from the plugin registry (entry-point metadata),
never from a hand-kept list; a third-party analyzer appears here once installed.
"""

from __future__ import annotations

import click

from xdl.analysis.registry import DEFAULT_METHOD
from xdl.cli.options import csv_indices, seed_type, trust_code_param

# Kind-specific flags that are shortcuts for --param NAME=VALUE.
SHORTCUTS = {
    "attack": [click.Option(["--eps"], help="perturbation size in the input's natural range; a comma list sweeps")],
    "report": [click.Option(["--sensitive"], help="tabular runs: group columns to analyze, comma-separated")],
    "explain": [],
}
# Kind-specific flags passed to xdl.api.analyze as themselves.
FLAGS = {
    "explain": [click.Option(["--evaluate"], is_flag=True,
                             help="also measure faithfulness (deletion/insertion vs random order), infidelity, "
                                  "sensitivity and the randomization sanity check")],
    "attack": [],
    "report": [click.Option(["--data"], help="another input set to score (ood): a dataset name, a folder, .npz, "
                                              "or a CSV with the run's columns")],
}


def _target(value: str) -> str | int:
    if value in ("predicted", "true"):
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected predicted, true or a class index, got {value!r}") from None


class MethodHelp(click.Command):
    """Fills the --method help from the registry only when help is shown."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from xdl.analysis.registry import discover

        methods = ", ".join(p.name for p in discover(self.name))
        for param in self.params:
            if param.name == "method":
                param.help = f"one of: {methods or 'none installed'}"
        super().format_help(ctx, formatter)


def make_command(kind: str) -> click.Command:
    def handler(run, method, samples, split, indices, target, param, device, seed, batch_size, force, quiet,
                trust_code, reencode, no_figures, evaluate=False, data=None, **shortcuts):
        import contextlib

        from xdl.analysis.base import without_figures
        from xdl.api import analyze

        params = list(param)
        params += [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
        with without_figures() if no_figures else contextlib.nullcontext():
            result = analyze(
                kind, run, method, samples="default" if samples is None else samples, split=split,
                indices=indices, target=_target(target), params=params, device=device, seed=seed,
                batch_size=batch_size, force=force, progress=not quiet, evaluate=evaluate, trust_code=trust_code,
                reencode=reencode,
                **({"other": data} if data is not None else {}),
            )
        if result is None:  # a torchrun rank other than 0: rank 0 merged and saved the result
            return
        if result.summary:
            click.echo(result.summary)
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(f"{kind} results saved to {result.path}")

    params = [
        click.Argument(["run"], type=click.Path(file_okay=False)),
        click.Option(["--method", "-m"], default=DEFAULT_METHOD[kind], show_default=True),
        click.Option(["--samples", "-n"], type=int, help="how many samples of the split (default: the method's)"),
        click.Option(["--split"], type=click.Choice(["train", "val", "test"]), default="test", show_default=True),
        click.Option(["--indices"], callback=csv_indices, help="comma-separated sample indices within the split"),
        click.Option(["--target"], default="predicted", show_default=True, help="predicted | true | CLASS_INDEX"),
        click.Option(["--param", "-p"], multiple=True, help="method parameter KEY=VALUE (repeatable)"),
        click.Option(["--device"], default="auto", show_default=True, help="auto | cpu | cuda | mps"),
        click.Option(["--seed"], type=seed_type, help="default: the run's training seed"),
        click.Option(["--batch-size"], type=click.IntRange(min=1), default=256, show_default=True),
        click.Option(["--force"], is_flag=True, help="replace an earlier result of this method instead of adding METHOD-2"),
        click.Option(["--reencode"], is_flag=True,
                     help="analyze even though the data file changed since training, encoded with the run's saved encoding"),
        click.Option(["--quiet", "-q"], is_flag=True),
        click.Option(["--no-figures"], is_flag=True,
                     help="write the numbers and arrays only, no PNG figures (for pipelines; saves the plotting time)"),
        trust_code_param(),
        *SHORTCUTS[kind],
        *FLAGS[kind],
    ]
    return MethodHelp(kind, callback=handler, params=params,
                      help=f"Run a {kind} analyzer on a run directory; results go to RUN/{kind}/METHOD/.")


explain = make_command("explain")
attack = make_command("attack")
report = make_command("report")
