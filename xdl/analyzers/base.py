"""The analyzer contract: Analyzer, Params, Context, Result.

An analyzer is one class with one verb, ``run(ctx, params) -> Result``. Everything that
every method needs — device placement, seeding, eval mode and its restoration, batching,
resolving the target class — lives here, so a method's own file holds only the method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from xdl.data.types import DataSplits, Encoding
from xdl.errors import XdlError
from xdl.io import atomic_write, write_json

# -----------------------------------------------------------------------------------------
# Params: a dataclass per analyzer; ``--param key=value`` strings are checked against it
# -----------------------------------------------------------------------------------------


@dataclass
class NoParams:
    pass


def parse_params(params_cls: type, values: dict[str, Any] | list[str] | None) -> Any:
    """Build ``params_cls`` from a dict or ``["key=value", …]``, converting by field type.

    An unknown key or a value of the wrong type is an XdlError naming the valid keys.
    Validation beyond types belongs in the dataclass's ``__post_init__``.
    """
    if isinstance(values, list):
        pairs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise XdlError(f"--param expects key=value, got {item!r}")
            pairs[key.strip().replace("-", "_")] = value.strip()
        values = pairs
    values = dict(values or {})
    hints = typing.get_type_hints(params_cls)
    known = {f.name: f for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        valid = ", ".join(known) or "none"
        raise XdlError(f"unknown parameter {unknown[0]!r} for this method; valid parameters: {valid}")
    converted = {k: _convert(k, v, hints[k]) for k, v in values.items()}
    try:
        return params_cls(**converted)
    except (TypeError, ValueError) as exc:
        raise XdlError(f"invalid parameters: {exc}") from None


def _convert(key: str, value: Any, hint: Any) -> Any:
    if not isinstance(value, str):
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null", "") and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                with contextlib.suppress(XdlError):
                    return _convert(key, value, arg)
        raise XdlError(f"parameter {key}={value!r} is not a valid {hint}")
    if origin is typing.Literal:
        for arg in args:
            if str(arg) == value:
                return arg
        raise XdlError(f"parameter {key}={value!r}: choose one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        inner = args[0] if args else str
        items = [_convert(key, v, inner) for v in value.split(",") if v.strip()]
        return tuple(items) if origin is tuple else items
    try:
        if hint is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint in (int, float, str):
            return hint(value)
    except ValueError:
        raise XdlError(f"parameter {key}={value!r} is not a valid {hint.__name__}") from None
    return value


# -----------------------------------------------------------------------------------------
# Context: what an analyzer gets — a model and tensors, never the trainer
# -----------------------------------------------------------------------------------------


@dataclass
class Context:
    """The model, the samples to analyze and what is known about the data.

    ``x``/``y`` are the selected samples in the data's natural range; ``data`` (when there
    is one) holds the full splits, e.g. a background set for SHAP or the whole test split
    for a report. ``run`` is set when the analysis runs on a run directory.
    """

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor | None = None
    kind: str = "image"
    class_names: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    encoding: Encoding | None = None
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    data: DataSplits | None = None
    run: Any = None  # xdl.run.Run; typed loosely to keep the analyzer layer free of run I/O
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    batch_size: int = 256
    target: str | int = "predicted"  # "predicted" | "true" | a class index
    split: str = "test"
    indices: np.ndarray | None = None  # positions of x within the split, when known
    progress: bool = False

    def __post_init__(self) -> None:
        # Checked once here, for every analyzer, whether or not it ever calls targets().
        if isinstance(self.target, (int, np.integer)) and not 0 <= self.target < self.num_classes:
            raise XdlError(
                f"target class {self.target} does not exist: this model has classes 0..{self.num_classes - 1}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_range(self) -> tuple[float, float] | None:
        return (0.0, 1.0) if self.kind == "image" else None

    def batches(self, n: int | None = None, batch_size: int | None = None, desc: str | None = None) -> Iterator[slice]:
        """Slices over the samples; with ``desc`` and ``progress`` on, a bar on stderr."""
        n = len(self.x) if n is None else n
        size = batch_size or self.batch_size
        slices = [slice(start, min(start + size, n)) for start in range(0, n, size)]
        if desc and self.progress and len(slices) > 1:
            import sys

            from tqdm.auto import tqdm

            yield from tqdm(slices, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
        else:
            yield from slices

    @torch.no_grad()
    def predict(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax probabilities for ``x`` (default: the samples), batched, on CPU."""
        x = self.x if x is None else x
        out = [torch.softmax(self.model(x[s].to(self.device)).float(), 1).cpu() for s in self.batches(len(x))]
        return torch.cat(out) if out else torch.empty(0, self.num_classes)

    def targets(self) -> torch.Tensor:
        """The class to explain for each sample: predicted, true, or a fixed index."""
        if self.target == "predicted":
            return self.predict().argmax(1)
        if self.target == "true":
            if self.y is None:
                raise XdlError("--target true needs labels, and these samples have none")
            return self.y.long().cpu()
        return torch.full((len(self.x),), int(self.target), dtype=torch.long)


# -----------------------------------------------------------------------------------------
# Result: metrics, arrays, figures, tables — and how they are saved
# -----------------------------------------------------------------------------------------


@dataclass
class Finding:
    """One line of the audit's summary: a headline number and the section it comes from.

    Each analyzer turns its own Result into findings (``Analyzer.findings``), so the audit
    names no plugin's metric keys.
    """

    label: str
    value: str
    detail: str = ""
    source: str = ""  # the section key ("attack/pgd") it was read from; empty for the run's own metrics
    level: str = "info"  # "info" | "warn": a warn finding is drawn attention to
    help: str = ""  # one plain sentence on how to read the number and what would be worrying


@dataclass
class Result:
    """What an analyzer returns. ``save(dir)`` writes result.json, PNGs, CSVs and arrays.npz.

    Figures are kept as PNG bytes, so a Result is plain data: the report renders any
    Result, including a third party's, without knowing the analyzer.
    """

    method: str
    kind: str
    summary: str = ""  # one plain-words line for the terminal and the audit
    metrics: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # What the numbers were computed on: split, indices digest, sample count, target, seed,
    # model and data digests, xdl version. Filled by the core, saved in result.json.
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def add_figure(self, name: str, fig: Any, dpi: int = 110) -> None:
        """Render a matplotlib figure to PNG and close it (figures never leak between runs)."""
        import sys

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        # Only pyplot keeps figures alive; xdl.plotting's bare Figures need no pyplot (nor its backend).
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close(fig)
        self.figures[name] = buffer.getvalue()

    def save(self, folder: str | Path) -> Path:
        """Write the result as a whole: an earlier result in ``folder`` is replaced, not mixed in.

        Files go into a hidden sibling folder first, which then takes ``folder``'s place, so
        a crash leaves the old complete result and no stale figure of it survives a --force.
        """
        import os
        import shutil
        import tempfile

        target = Path(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        os.chmod(folder, 0o755)  # mkdtemp's private 0700 would hide results from other users
        try:
            self._write(folder)
            if target.exists():
                # A result is flat files; a subfolder is an analyzer's cache (privacy's reference
                # models), keyed by what it was computed from, so it outlives the result it served.
                for cache in (c for c in target.iterdir() if c.is_dir()):
                    os.replace(cache, folder / cache.name)
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
                os.replace(target, old / "result")
                os.replace(folder, target)
                shutil.rmtree(old)
            else:
                os.replace(folder, target)
        finally:
            if folder.exists():
                shutil.rmtree(folder)
        self.path = target
        return target

    def _write(self, folder: Path) -> None:
        for name, png in self.figures.items():
            atomic_write(folder / f"{name}.png", png)
        for name, rows in self.tables.items():
            atomic_write(folder / f"{name}.csv", _csv(rows))
        if self.arrays:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in self.arrays.items()})
            atomic_write(folder / "arrays.npz", buffer.getvalue())
        write_json(
            folder / "result.json",
            {
                "method": self.method,
                "kind": self.kind,
                "summary": self.summary,
                "metrics": self.metrics,
                "params": self.params,
                "warnings": self.warnings,
                "provenance": self.provenance,
                "tables": self.tables,
                "figures": [f"{n}.png" for n in self.figures],
                "arrays": sorted(self.arrays),
            },
        )

    @classmethod
    def load(cls, folder: str | Path, arrays: bool = False) -> "Result":
        """Read a saved result; arrays are loaded only when asked (they can be large)."""
        from xdl.io import read_json

        folder = Path(folder)
        info = read_json(folder / "result.json")
        result = cls(
            method=info["method"],
            kind=info["kind"],
            summary=info.get("summary", ""),
            metrics=info.get("metrics", {}),
            tables=info.get("tables", {}),
            params=info.get("params", {}),
            warnings=info.get("warnings", []),
            provenance=info.get("provenance", {}),
            path=folder,
        )
        for name in info.get("figures", []):
            if (folder / name).is_file():
                result.figures[Path(name).stem] = (folder / name).read_bytes()
        if arrays and (folder / "arrays.npz").is_file():
            with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
                result.arrays = {k: npz[k] for k in npz.files}
        return result


def _csv(rows: list[dict]) -> str:
    import csv

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


# -----------------------------------------------------------------------------------------
# Analyzer and the chores around it
# -----------------------------------------------------------------------------------------


class Analyzer:
    """Subclass, set ``kind`` and ``Params``, implement ``run``. Register under an entry point.

    ``name`` is filled from the entry-point name when the registry loads the class.
    ``samples`` is how many samples the CLI selects by default (None: the whole split).
    ``applies_to`` lists the data kinds the method works on; ``xdl audit`` skips others.
    ``check_params`` are cheap parameters (fewer steps, samples …) that
    ``xdl.testing.check_analyzer`` uses: the contract, not the method's quality, is under test.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "explain"
    Params: ClassVar[type] = NoParams
    samples: ClassVar[int | None] = 16
    applies_to: ClassVar[frozenset[str]] = frozenset({"image", "tabular"})
    description: ClassVar[str] = ""
    check_params: ClassVar[dict[str, Any]] = {}
    # "samples": per-sample work that torchrun may split across ranks and ``merge`` joins;
    # "none": needs the whole split (a PCA, a report) and runs whole on rank 0.
    sharding: ClassVar[str] = "none"

    def run(self, ctx: Context, params: Any) -> Result:
        raise NotImplementedError

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        """The audit summary lines this result supports; an analyzer knows its own metric keys."""
        return []

    @classmethod
    def applies(cls, ctx: Context) -> bool:
        return ctx.kind in cls.applies_to

    def result(self, **fields: Any) -> Result:
        """A Result stamped with this analyzer's name and kind."""
        return Result(method=self.name, kind=self.kind, **fields)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode and restore each one's own flag afterwards.

    ``model.train(was_training)`` would not do: it would overwrite submodules that the
    caller had deliberately left in another mode (a frozen BatchNorm, say).
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode


def hook_count(model: nn.Module) -> int:
    """Forward/backward hooks registered on the model (analyzers must leave none behind)."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def analyze(analyzer: Analyzer, ctx: Context, params: Any = None) -> Result:
    """Run one analyzer with the chores done: seed, device, eval mode, restoration.

    The model goes back to its original device and mode afterwards, also on error.
    """
    from xdl.device import seed_everything

    if not isinstance(params, analyzer.Params):
        params = parse_params(analyzer.Params, params)
    if not analyzer.applies(ctx):
        raise XdlError(f"{analyzer.kind} method {analyzer.name!r} does not apply to {ctx.kind} data")
    model = ctx.model
    original = next(model.parameters(), torch.empty(0)).device
    seed_everything(ctx.seed)
    try:
        with eval_mode(model):
            model.to(ctx.device)
            result = analyzer.run(ctx, params)
    finally:
        model.to(original)
    if not isinstance(result, Result):  # a plugin bug, not user input: keep the traceback
        raise TypeError(f"{analyzer.kind} method {analyzer.name!r} returned {type(result).__name__}, not a Result")
    result.method, result.kind = analyzer.name, analyzer.kind
    result.params = {**dataclasses.asdict(params), **result.params}
    return result
