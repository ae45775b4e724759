"""Rendering of audits: one self-contained HTML page from any set of Results."""

from xdl.render.html import render_audit

__all__ = ["render_audit"]
