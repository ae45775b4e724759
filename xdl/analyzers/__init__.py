"""Analyzers: the contract every explain/attack/report method fills, and their registry.

Names load lazily so that the registry (metadata only) never imports torch: ``xdl
plugins`` and ``--method`` help answer without it.
"""

from __future__ import annotations

from xdl._lazy import lazy_exports

_EXPORTS = {
    "Analyzer": "xdl.analyzers.base",
    "Context": "xdl.analyzers.base",
    "Finding": "xdl.analyzers.base",
    "NoParams": "xdl.analyzers.base",
    "Result": "xdl.analyzers.base",
    "analyze": "xdl.analyzers.base",
    "eval_mode": "xdl.analyzers.base",
    "hook_count": "xdl.analyzers.base",
    "parse_params": "xdl.analyzers.base",
    "KINDS": "xdl.analyzers.registry",
    "PluginInfo": "xdl.analyzers.registry",
    "discover": "xdl.analyzers.registry",
    "load_analyzer": "xdl.analyzers.registry",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
