"""Helpers for plugin authors: tiny models and data, and the contract every analyzer passes.

The built-in analyzers are tested with exactly this check, so a third-party analyzer that
passes it behaves like them in ``xdl explain``, ``xdl audit`` and the report::

    from xdl.testing import check_analyzer
    from my_package import MyAnalyzer

    def test_my_analyzer():
        check_analyzer(MyAnalyzer)

Everything here is small enough to run in well under a second per analyzer on a CPU.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xdl.analysis.base import Analyzer, Context, Finding, Result, analyze
from xdl.data import DEFAULT_SPEC, load_data, random_splits
from xdl.data.csv import encode_frame, fit_encoding
from xdl.data.types import DataSplits
from xdl.models.builders import build_model, model_config, set_normalization
from xdl.models.inference import hook_count
from xdl.runs.run import Run, save_run
from xdl.training.config import TrainConfig, config_dict
from xdl.training.loop import fit
from xdl.training.metrics import final_metrics

# Rows of the tiny image data (sklearn's 8×8 digits) and of the tiny table: enough for a
# few epochs to learn something, few enough to train in a fraction of a second.
IMAGE_LIMIT = 240
TABULAR_ROWS = 240


@functools.lru_cache(maxsize=None)
def _image_data() -> DataSplits:
    return load_data("digits", limit=IMAGE_LIMIT)


@functools.lru_cache(maxsize=None)
def _tabular_data() -> DataSplits:
    """An Adult-census-like table: numeric and categorical columns, a sensitive group."""
    import pandas as pd

    rng = np.random.default_rng(0)
    n = TABULAR_ROWS
    frame = pd.DataFrame({
        "age": rng.integers(18, 70, n),
        "hours": rng.normal(40, 10, n).round(1),
        "job": rng.choice(["clerk", "sales", "tech", "manager"], n),
    })
    sex = rng.choice(["female", "male"], n)
    score = 0.05 * (frame.age - 40) + 0.08 * (frame.hours - 40) + np.where(frame.job == "manager", 1.5, 0)
    y = (score + rng.normal(0, 0.7, n) > 0.3).to_numpy().astype(np.int64)
    encoding = fit_encoding(frame, list(frame.columns))
    spec = {"name": "tiny-tabular", **DEFAULT_SPEC}  # not loadable by name: it exists only here
    train, val, test = random_splits(encode_frame(frame, encoding), y, spec, groups={"sex": sex})
    return DataSplits(
        train, val, test, "tabular", ["<=50K", ">50K"], spec,
        feature_names=encoding.feature_names, encoding=encoding,
    )


def tiny_data(kind: str = "image") -> DataSplits:
    """The tiny data behind :func:`tiny_context` (shared; do not modify it in place)."""
    if kind not in ("image", "tabular"):
        raise ValueError(f"kind must be 'image' or 'tabular', got {kind!r}")
    return _image_data() if kind == "image" else _tabular_data()


@functools.lru_cache(maxsize=None)
def tiny_run(kind: str = "image", seed: int = 0) -> Run:
    """A tiny trained run directory (in a temporary folder, removed when Python exits).

    A few epochs of real training, so predictions (and so targets) are not all one class,
    and a real history.csv and metrics for the reports that read them. Shared between
    calls: analyze copies of ``run.model`` (as :func:`tiny_context` does), not the model itself.
    """
    data = tiny_data(kind)
    # BatchNorm and dropout make train and eval mode differ, which the contract checks.
    options = {"channels": [4, 8], "hidden": 16} if kind == "image" else {"hidden": [16]}
    config = model_config("auto", kind, dropout=0.25, batch_norm=True, **options)
    train = TrainConfig(epochs=3, batch_size=32, device="cpu", seed=seed)
    torch.manual_seed(seed)
    model = build_model(config, data.input_shape, data.num_classes)
    set_normalization(model, data.train.x)
    history = fit(model, data, train, log=lambda line: None, progress=False)
    folder = Path(tempfile.mkdtemp(prefix=f"xdl-tiny-{kind}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    run = save_run(folder, model, data, config, config_dict(train), history, final_metrics(model, data, torch.device("cpu")))
    run.data = data  # the tiny table exists only in memory: hand the run its splits
    return run


def tiny_image_model(seed: int = 0) -> nn.Module:
    """A small trained CNN (conv, BatchNorm, dropout) for 1×8×8 digits, 10 classes, in eval mode."""
    return copy.deepcopy(tiny_run("image", seed).model)


def tiny_tabular_model(seed: int = 0) -> nn.Module:
    """A small trained MLP (BatchNorm, dropout) for the tiny table's encoded rows, 2 classes."""
    return copy.deepcopy(tiny_run("tabular", seed).model)


def tiny_context(kind: str = "image", samples: int = 4, seed: int = 0) -> Context:
    """A fresh Context: a copy of a tiny trained model, ``samples`` test samples, the run and its splits.

    The batch size is 2, so an analyzer that batches is checked across batch boundaries.
    """
    run = tiny_run(kind, seed)
    data = run.data
    test = data.test.subset(np.arange(samples))
    return Context(
        model=copy.deepcopy(run.model), x=test.x, y=test.y, kind=kind, class_names=data.class_names,
        feature_names=data.feature_names, encoding=data.encoding, groups=test.groups, data=data, run=run,
        seed=seed, batch_size=2, indices=np.arange(samples),
    )


# -----------------------------------------------------------------------------------------
# The contract
# -----------------------------------------------------------------------------------------


def _fail(cls: type, kind: str, message: str) -> None:
    raise AssertionError(f"{cls.__name__} on {kind} data: {message}")


def check_analyzer(cls: type[Analyzer], params: Any = None, kinds: list[str] | None = None) -> dict[str, Result]:
    """Run the analyzer contract on each data kind the analyzer applies to; raise AssertionError.

    ``params`` default to the analyzer's ``check_params`` (cheap settings it declares).

    The contract: ``run`` returns a Result with JSON-able metrics; the result saves and loads
    back unchanged; the model's train/eval flags (per module), device, weights and hooks are
    as before; two runs with the same seed give the same metrics and arrays; ``sharding`` is
    "samples" or "none", and ``findings`` turns the result into Finding objects.
    Returns the results by kind, for further checks of the caller's own.
    """
    params = cls.check_params if params is None else params
    if cls.sharding not in ("samples", "none"):
        raise AssertionError(f"{cls.__name__}: sharding must be 'samples' or 'none', not {cls.sharding!r}")
    results = {}
    for kind in kinds or sorted(cls.applies_to & {"image", "tabular"}):
        ctx = tiny_context(kind)
        model = ctx.model
        # A mixed mode: analyze() must restore each module's own flag, not call model.train().
        model.train()
        first = next(m for m in model.modules() if m is not model)
        first.eval()
        modes = [m.training for m in model.modules()]
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        devices = {k: v.device for k, v in model.state_dict().items()}
        hooks = hook_count(model)

        result = _run(cls, ctx, params)
        if [m.training for m in model.modules()] != modes:
            _fail(cls, kind, "the model's train/eval mode was not restored")
        if hook_count(model) != hooks:
            _fail(cls, kind, f"{hook_count(model) - hooks} hook(s) left behind on the model")
        moved = [k for k, v in model.state_dict().items() if v.device != devices[k]]
        if moved:
            _fail(cls, kind, f"the model was left on another device: {', '.join(moved[:3])}")
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
        if changed:
            _fail(cls, kind, f"the model's weights changed: {', '.join(changed[:3])}")
        try:
            json.dumps({"metrics": result.metrics, "params": result.params, "tables": result.tables})
        except TypeError as exc:
            _fail(cls, kind, f"metrics, params or tables are not JSON-able: {exc}")

        with tempfile.TemporaryDirectory() as folder:
            result.save(folder)
            loaded = Result.load(folder, arrays=True)
            if (loaded.method, loaded.kind, loaded.summary) != (result.method, result.kind, result.summary):
                _fail(cls, kind, "method, kind or summary did not survive save/load")
            if json.loads(json.dumps(result.metrics)) != loaded.metrics:
                _fail(cls, kind, "metrics did not survive save/load")
            _same_arrays(cls, kind, result.arrays, loaded.arrays, "after save/load")
            if set(loaded.figures) != set(result.figures):
                _fail(cls, kind, "figures did not survive save/load")

        findings = cls.findings(result)
        if not isinstance(findings, list) or not all(isinstance(f, Finding) for f in findings):
            _fail(cls, kind, f"findings() must return a list of Finding, got {findings!r}")

        again = _run(cls, tiny_context(kind), params)
        if json.dumps(again.metrics, sort_keys=True) != json.dumps(result.metrics, sort_keys=True):
            _fail(cls, kind, "two runs with the same seed gave different metrics")
        _same_arrays(cls, kind, result.arrays, again.arrays, "on a second run with the same seed")
        results[kind] = result
    return results


def _run(cls: type[Analyzer], ctx: Context, params: Any) -> Result:
    analyzer = cls()
    if not analyzer.name:  # set by the registry; a class tested directly gets its own name
        analyzer.name = cls.__name__.lower()
    return analyze(analyzer, ctx, params)


def _same_arrays(cls: type, kind: str, a: dict, b: dict, when: str) -> None:
    if set(a) != set(b):
        _fail(cls, kind, f"arrays differ {when}: {sorted(a)} vs {sorted(b)}")
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.shape != y.shape or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            _fail(cls, kind, f"array {name!r} differs {when}")
