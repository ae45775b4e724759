"""``xdl audit RUN``: parse flags, call :func:`xdl.api.audit`, say where the page is."""

from __future__ import annotations

import click

from xdl.cli.options import csv_strs, trust_code_option


@click.command("audit")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--only", callback=csv_strs, help="run only these analyzers: names, kind/name or a kind, comma-separated")
@click.option("--skip", callback=csv_strs, help="leave these analyzers out (same forms as --only)")
@click.option("--samples", "-n", type=click.IntRange(min=1), help="at most this many samples per analyzer (default: each analyzer's own)")
@click.option("--recompute", is_flag=True, help="recompute results already saved in RUN instead of reusing them")
@click.option("--eps", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True,
              help="PGD's eps, at which the summary quotes robust accuracy (input units; images are in [0, 1])")
@click.option("--audit-attack", metavar="ATTACK",
              help="the headline attack, one whose analyzer can head the audit: autoattack (the default: APGD-CE, "
                   "APGD-T, Square, with gradient-masking checks) or pgd alone")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | mps")
@click.option("--reencode", is_flag=True,
              help="audit even though the data file changed since training, encoded with the run's saved encoding")
@click.option("--budget", type=click.FloatRange(min=0, max=1e6), default=30, show_default=True,
              help="seconds of model passes per expensive method (LIME, SHAP, occlusion, IG…): on a large model "
                   "it explains fewer samples and says so; 0: no limit")
@click.option("--quiet", "-q", is_flag=True, help="no progress display")
@trust_code_option
def command(run, only, skip, samples, recompute, eps, audit_attack, device, reencode, budget, quiet, trust_code) -> None:
    """Run every analyzer that applies to RUN and write RUN/audit.html and RUN/audit.json."""
    from xdl.api import audit

    result = audit(run, only=only, skip=skip, samples=samples, recompute=recompute, eps=eps, device=device,
                   progress=not quiet, trust_code=trust_code, audit_attack=audit_attack, reencode=reencode,
                   budget=budget)
    for section in result.failed:
        click.echo(f"warning: {section.key} failed: {section.error}", err=True)
    done = len(result.sections) - len(result.failed)
    click.echo(f"audit of {done}/{len(result.sections)} analyzers written to {result.html_path} "
               f"(and {result.json_path.name}) in {result.seconds:.0f}s")
    click.echo(f"open it in a browser: {result.html_path.resolve().as_uri()}")
