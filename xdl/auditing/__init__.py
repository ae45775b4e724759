"""The audit: every analyzer that applies to a run, its findings, one page; and comparing audited runs.

Imports: everything below it (xdl.analysis, xdl.render, xdl.runs …). Not named ``audit``: a
subpackage ``xdl.audit`` would replace the function ``xdl.audit`` on the package once imported.
"""

from __future__ import annotations

from xdl._lazy import lazy_exports

_EXPORTS = {
    "audit": "xdl.auditing.audit",
    "Audit": "xdl.auditing.audit",
    "headline_attacks": "xdl.auditing.audit",
    "Comparison": "xdl.auditing.compare",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
