"""Training: the config, the loop, DP-SGD, the FGSM guard, several processes, the compute card,
``train()`` end to end and ``import_model()`` for a model xdl did not train: the two ways a run comes to be.

Imports: the ground modules and xdl.data, xdl.models, xdl.runs, xdl.methods.
"""

from __future__ import annotations

from xdl._lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": "xdl.training.config",
    "fit": "xdl.training.loop",
    "retrain": "xdl.training.loop",
    "evaluate": "xdl.training.metrics",
    "final_metrics": "xdl.training.metrics",
    "train": "xdl.training.pipeline",
    "import_model": "xdl.training.importing",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
