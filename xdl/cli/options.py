"""Option parsers shared by the commands."""

from __future__ import annotations

import click


def csv_ints(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not items or min(items) <= 0:
        raise click.BadParameter(f"expected positive sizes, got {value!r}")
    return items


def csv_strs(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


# The largest sample index or seed any command takes; beyond it numpy and torch overflow.
MAX_INDEX = 2**31 - 1
seed_type = click.IntRange(0, 2**32 - 1)

TRUST_CODE_DECLS = ["--trust-code"]
TRUST_CODE_OPTIONS = {
    "is_flag": True,
    "help": "allow a run whose model is a package.module:factory to import and call it "
            "(only for runs from a source you trust; also XDL_TRUST_CODE=1)",
}
trust_code_option = click.option(*TRUST_CODE_DECLS, **TRUST_CODE_OPTIONS)


def trust_code_param() -> click.Option:
    """The same --trust-code flag, for commands that build their parameter list by hand."""
    return click.Option(TRUST_CODE_DECLS, **TRUST_CODE_OPTIONS)


def csv_indices(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated sample indices, got {value!r}") from None
    if not items:
        raise click.BadParameter("expected at least one sample index")
    wild = next((i for i in items if not 0 <= i <= MAX_INDEX), None)
    if wild is not None:
        shown = wild if abs(wild) < 10**12 else "a huge number"
        raise click.BadParameter(f"sample indices are 0 or more and at most {MAX_INDEX}, got {shown}")
    return items
