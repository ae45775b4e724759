"""``xdl plugins``: what is registered, from entry-point metadata alone."""

from __future__ import annotations

import click


@click.command("plugins")
def command() -> None:
    """List registered analyzers: name, kind, package, version, built-in or not."""
    from xdl.analysis.registry import discover

    rows = [(p.name, p.kind, p.package, p.version, "built-in" if p.builtin else "third-party") for p in discover()]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("name", "kind", "package", "version", "origin"))]
    for row in [("name", "kind", "package", "version", "origin"), *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
