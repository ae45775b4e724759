"""Rendering: one self-contained HTML page from any set of Results, sections and run cards.

Imports: the ground modules and xdl.runs (provenance). It knows no analyzer and imports no
xdl.analysis: a Result draws itself through it in a notebook.
"""

from xdl.render.html import render_audit

__all__ = ["render_audit"]
