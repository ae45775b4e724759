"""``xdl compare RUN_A RUN_B [RUN_C …] --out DIR``: parse flags, call :func:`xdl.api.compare`, say where the page is."""

from __future__ import annotations

import click

from xdl.cli.options import csv_strs, trust_code_option


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=True, file_okay=False),
              help="folder to write compare.html, compare.json and the explanation figures into")
@click.option("--only", callback=csv_strs, help="audit runs with only these analyzers (as xdl audit --only)")
@click.option("--skip", callback=csv_strs, help="audit runs without these analyzers (as xdl audit --skip)")
@click.option("--samples", "-n", type=click.IntRange(min=1), help="audit with at most this many samples per analyzer")
@click.option("--eps", type=click.FloatRange(min=0, min_open=True), help="audit's attack eps (default: xdl audit's 0.1)")
@click.option("--audit-attack", metavar="ATTACK", help="the audits' headline attack (as xdl audit --audit-attack)")
@click.option("--recompute", is_flag=True, help="re-audit every run, recomputing saved results")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | mps")
@click.option("--quiet", "-q", is_flag=True, help="no progress display")
@trust_code_option
def command(runs, out, only, skip, samples, eps, audit_attack, recompute, device, quiet, trust_code) -> None:
    """Compare RUNS (two or more, on the same data): each run's audit side by side, with paired
    95% intervals and McNemar's test where the same samples were scored.

    A run without audit.json is audited first; with --only, --skip, --samples, --eps,
    --audit-attack or --recompute every run is (re)audited with them, reusing saved results
    whose provenance matches.
    """
    from xdl.api import compare

    result = compare(list(runs), out, only=only, skip=skip, samples=samples, eps=eps, audit_attack=audit_attack,
                     recompute=recompute, device=device, progress=not quiet, trust_code=trust_code)
    apart = sum(bool(r.why) for r in result.rows)
    click.echo(f"comparison of {len(result.sides)} runs ({len(result.rows)} findings, {apart} not comparable) written to "
               f"{result.html_path} (and {result.json_path.name}) in {result.seconds:.0f}s")
    click.echo(f"open it in a browser: {result.html_path.resolve().as_uri()}")
