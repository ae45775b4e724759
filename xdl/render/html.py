"""The audit page: Jinja2 templates with autoescape, images inlined as data: URIs.

The renderer knows no analyzer by name. Every section is drawn from the generic parts of
a Result — summary, metrics, tables, figures, warnings — so a third party's analyzer
looks like a built-in one. Nothing on the page is fetched: CSS is inlined, fonts are
the system's, there is no script.
"""

from __future__ import annotations

import base64
import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xdl.render.cards import run_cards
from xdl.render.section import Section

if TYPE_CHECKING:
    from jinja2 import Environment

    from xdl.auditing.audit import Audit

TEMPLATES = Path(__file__).parent / "templates"
TABLE_ROWS = 12  # rows shown per table; the row count says how many the CSV beside the result holds
LIST_ITEMS = 8  # a longer list shows its first items and its length
LISTED = 20  # sample indices a comparison lists per set of samples one run gets right and another wrong


def render_audit(audit: "Audit") -> str:
    """The whole page as one string of HTML."""
    return _environment().get_template("audit.html").render(audit=audit, header=audit.header(), table_rows=TABLE_ROWS)


def render_blocks(blocks: list[tuple[str, dict]], page: str = "audit.html") -> str:
    """Named blocks of a page (the audit's by default), each with its own variables: the same HTML, no page around it.

    Notebooks show a Result, an Audit or a comparison inline this way (``_repr_html_``), so a
    section reads the same in Jupyter as in audit.html.
    """
    template = _environment().get_template(page)
    parts = []
    for name, values in blocks:
        context = template.new_context({"table_rows": TABLE_ROWS, **values})
        parts.append("".join(template.blocks[name](context)))
    return '<div class="xdl">' + "".join(parts) + "</div>"


def render_result(result: Any) -> str:
    """One Result as the audit page draws its section."""
    return render_blocks([("section", {"s": Section(result.kind, result.method, "computed", result)})])


def render_inline(audit: "Audit") -> str:
    """An audit's findings and sections, without the page's header and styles (for notebooks)."""
    from html import escape

    head = f'<p class="meta">Audit of <code>{escape(audit.run.name)}</code> · the page: {escape(str(audit.html_path))}</p>'
    blocks = [("findings", {"audit": audit})] + [("section", {"s": s}) for s in audit.sections]
    return head + render_blocks(blocks)


def render_compare(comparison: Any) -> str:
    """The comparison page (``xdl compare``) as one string of HTML, in the audit page's look."""
    return _environment().get_template("compare.html").render(c=comparison, listed=LISTED, table_rows=TABLE_ROWS)


def render_compare_inline(comparison: Any) -> str:
    """A comparison's tables without the page's header and styles (for notebooks)."""
    from html import escape

    head = (f'<p class="meta">Comparison of {escape(", ".join(comparison.names))} · the page: '
            f'{escape(str(comparison.html_path))}</p>')
    names = ["summary", "classes", "attacks"]
    return head + render_blocks([(name, {"c": comparison, "listed": LISTED}) for name in names], "compare.html")


@lru_cache(maxsize=1)
def _environment() -> "Environment":
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(datauri=datauri, num=num, flat=flat, columns=columns, label=label, cards=run_cards)
    return env


def datauri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def num(value: Any) -> str:
    """Numbers to four significant digits; everything else as text."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6) else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, dict)) for v in value):
            return f"[{len(value)} values]"
        shown = ", ".join(num(v) for v in value[:LIST_ITEMS])
        return f"{shown}, … ({len(value)} values)" if len(value) > LIST_ITEMS else shown
    return str(value)


def flat(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested metrics as (dotted.key, value) rows, in their original order."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flat(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def columns(rows: list[dict]) -> list[str]:
    found: list[str] = []
    for row in rows:
        found += [k for k in row if k not in found]
    return found


def label(name: str) -> str:
    """A figure's or table's file name as a caption: ``eps_sweep`` → ``eps sweep``."""
    return name.replace("_", " ").replace("-", " ")
