"""Runs: the run directory (Run, save/load), the run.json schema, provenance, epoch checkpoints.

Imports: the ground modules, xdl.data and xdl.models. A run's format is what training writes
and every later step reads, so it sits below both.
"""

from __future__ import annotations

from xdl._lazy import lazy_exports

_EXPORTS = {
    "Run": "xdl.runs.run",
    "save_run": "xdl.runs.run",
    "load": "xdl.runs.run",
    "FORMAT_VERSION": "xdl.runs.run",
    "check_run_info": "xdl.runs.schema",
    "record": "xdl.runs.provenance",
    "same": "xdl.runs.provenance",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
