"""Models: builders (mlp, cnn, dpcnn) and user factories, imported models behind their wrapper,
weights on disk, and the fused copy explanations evaluate.

Imports: the ground modules and xdl.data only. Names load lazily: torch comes with the first use.
"""

from __future__ import annotations

from xdl._lazy import lazy_exports

_EXPORTS = {
    "build_model": "xdl.models.builders",
    "model_config": "xdl.models.builders",
    "set_normalization": "xdl.models.builders",
    "Normalize": "xdl.models.builders",
    "BUILDERS": "xdl.models.builders",
    "Imported": "xdl.models.imported",
    "is_imported": "xdl.models.imported",
    "eval_mode": "xdl.models.inference",
    "fast_model": "xdl.models.inference",
    "WEIGHTS": "xdl.models.weights",
    "load_weights": "xdl.models.weights",
    "save_weights": "xdl.models.weights",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
