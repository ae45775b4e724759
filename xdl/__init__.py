"""xdl: explain, attack and audit PyTorch classifiers from one CLI and one Python API.

    import xdl
    run = xdl.train(data="digits", model="cnn", epochs=3)
    xdl.explain(run, "ig", samples=8)
    xdl.attack(run, "fgsm", params={"eps": 0.1})
    xdl.report(run, "bias")

Names load lazily: ``import xdl`` imports neither torch's friends (shap, lime,
matplotlib) nor any analyzer until they are used.
"""

from __future__ import annotations

from xdl._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "train": "xdl.api",
    "load": "xdl.api",
    "analyze": "xdl.api",
    "explain": "xdl.api",
    "attack": "xdl.api",
    "report": "xdl.api",
    "audit": "xdl.api",
    "compare": "xdl.api",
    "import_model": "xdl.api",
    "Run": "xdl.runs.run",
    "TrainConfig": "xdl.training.config",
    "DataSplits": "xdl.data.types",
    "Split": "xdl.data.types",
    "load_data": "xdl.data",
    "build_model": "xdl.models.builders",
    "Analyzer": "xdl.analysis.base",
    "Context": "xdl.analysis.base",
    "Result": "xdl.analysis.base",
    "XdlError": "xdl.errors",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
