"""The Python API: each CLI action is one call here, and the CLI calls exactly these."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from xdl.analysis.registry import DEFAULT_METHOD
from xdl.analysis.runner import analyze
from xdl.auditing.audit import audit as run_audit
from xdl.auditing.compare import compare as run_compare
from xdl.errors import XdlError
from xdl.runs.run import Run
from xdl.training.importing import import_model
from xdl.training.pipeline import train

__all__ = ["analyze", "attack", "audit", "compare", "explain", "import_model", "load", "report", "train"]


def load(path: str | Path, trust_code: bool = False) -> Run:
    """Open a run: ``run.model`` (eval mode, CPU) and ``run.data`` (its splits) load on first use.

    A run whose model is a user's ``package.module:factory`` builds only with ``trust_code=True``
    (or XDL_TRUST_CODE=1): loading a downloaded run must not run code from it.
    """
    return Run(path, trust_code=trust_code)


def explain(source, method: str = DEFAULT_METHOD["explain"], **options):
    """Explain a run's (or a model's) predictions: ``xdl.explain(run, "ig", samples=8)``."""
    return analyze("explain", source, method, **options)


def attack(source, method: str = DEFAULT_METHOD["attack"], **options):
    """Attack a run or model: ``xdl.attack(run, "pgd", params={"eps": 0.1})``."""
    return analyze("attack", source, method, **options)


def report(source, method: str = DEFAULT_METHOD["report"], **options):
    """Report on a run's health: ``xdl.report(run, "overfit")``."""
    return analyze("report", source, method, **options)


def audit(source: "Run | str | Path | nn.Module", data=None, out: str | Path | None = None, **options):
    """Run every applicable analyzer and write RUN/audit.html and RUN/audit.json.

    >>> page = xdl.audit(run, only=["ig", "pgd", "calibration"])   # doctest: +SKIP
    >>> page.html_path                                             # doctest: +SKIP

    Options (only, skip, samples, recompute, eps, device, progress, trust_code) are those of
    :func:`xdl.auditing.audit`; the ``xdl audit`` command calls this. A live ``nn.Module``
    is first imported into a run at ``out`` with ``data`` (see :func:`xdl.import_model`;
    normalize, classes, input_size, force and seed go there):
    ``xdl.audit(model, data=(x, y), out="runs/mine")``.
    """
    if isinstance(source, nn.Module):
        source = _import_live(source, data, out, options)
    return run_audit(source, **options)


def compare(runs: list[Run | str | Path], out: str | Path, **options):
    """Compare two or more runs on the same data; write OUT/compare.html and OUT/compare.json.

    >>> side_by_side = xdl.compare(["runs/plain", "runs/robust"], out="compare")   # doctest: +SKIP
    >>> side_by_side.html_path                                                     # doctest: +SKIP

    Runs without an audit are audited first; options (only, skip, samples, eps, audit_attack,
    budget, recompute, device, progress, trust_code) are those of :func:`xdl.auditing.compare.compare`;
    the ``xdl compare`` command calls this.
    """
    return run_compare(runs, out, **options)


def _import_live(model: nn.Module, data, out, options: dict) -> Run:
    """A live model is audited as a run: imported (model and data saved) into ``out`` first."""
    if data is None or out is None:
        raise XdlError("auditing a live model needs data= (a spec, tensors or a Dataset) and out= (the run directory to write)")
    keys = ("normalize", "classes", "input_size", "force", "seed")
    settings = {k: options.pop(k) for k in keys if k in options}
    return import_model(model, data, out, device=options.get("device", "auto"), quiet=not options.get("progress", True), **settings)
