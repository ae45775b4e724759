"""Analysis: the contract every explain/attack/report method fills (Analyzer, Context, Result),
the registry, running one analyzer on a run or live model, sharding across ranks, and the
metrics that say how far an explanation can be trusted.

Imports: every package below it (data, models, runs, methods, training, render).

Names load lazily so that the registry (metadata only) never imports torch: ``xdl
plugins`` and ``--method`` help answer without it.
"""

from __future__ import annotations

from xdl._lazy import lazy_exports

_EXPORTS = {
    "Analyzer": "xdl.analysis.base",
    "Context": "xdl.analysis.base",
    "Finding": "xdl.analysis.base",
    "NoParams": "xdl.analysis.base",
    "Result": "xdl.analysis.base",
    "analyze": "xdl.analysis.base",
    "eval_mode": "xdl.models.inference",
    "hook_count": "xdl.models.inference",
    "parse_params": "xdl.analysis.base",
    "KINDS": "xdl.analysis.registry",
    "PluginInfo": "xdl.analysis.registry",
    "discover": "xdl.analysis.registry",
    "load_analyzer": "xdl.analysis.registry",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
