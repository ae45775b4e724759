"""The analyzer contract: Analyzer, Params, Context, Result.

An analyzer is one class with one verb, ``run(ctx, params) -> Result``. Everything that
every method needs — device placement, seeding, eval mode and its restoration, batching,
resolving the target class — lives here, so a method's own file holds only the method.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import io
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from xdl.data.stream import batches
from xdl.data.types import DataSplits, Encoding, Split
from xdl.device import seed_everything
from xdl.errors import XdlError
from xdl.io import CLAIM, CSV_LINE_END, atomic_write, csv_safe, read_json, write_json
from xdl.models.imported import is_imported
from xdl.models.inference import eval_mode, fast_model, rows_per_pass

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
    if values is not None and not isinstance(values, dict):
        raise XdlError(f"params must be a dict or a list of 'key=value' strings, not {type(values).__name__}")
    values = dict(values or {})
    hints = typing.get_type_hints(params_cls)
    known = {f.name: f for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        valid = ", ".join(known) or "none"
        raise XdlError(f"unknown parameter {unknown[0]!r} for this method; valid parameters: {valid}")
    converted = {k: _convert(k, v, hints[k]) for k, v in values.items()}
    for key, value in converted.items():
        _check_number(key, value)
    try:
        return params_cls(**converted)
    except (TypeError, ValueError) as exc:
        raise XdlError(f"invalid parameters: {exc}") from None


# No size-like parameter needs more; anything beyond is a typo or an attack on memory.
MAX_INT_PARAM = 10**9


def _check_number(key: str, value: Any) -> None:
    """NaN slips through every bound check a Params class writes, so refuse it once for all."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, float) and not math.isfinite(item):
            raise XdlError(f"parameter {key}={item} is not a finite number")
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INT_PARAM:
            raise XdlError(f"parameter {key}={item if abs(item) < 10**30 else 'huge'} is out of range (at most {MAX_INT_PARAM:,})")


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
    x: torch.Tensor  # or a streamed split's LazyImages: walk it with stream()
    y: torch.Tensor | None = None
    kind: str = "image"
    class_names: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)
    encoding: Encoding | None = None
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    data: DataSplits | None = None
    run: Any = None  # xdl.runs.run.Run; typed loosely to keep the analyzer layer free of run I/O
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    batch_size: int = 256
    target: str | int = "predicted"  # "predicted" | "true" | a class index
    split: str = "test"
    indices: np.ndarray | None = None  # positions of x within the split, when known
    progress: bool = False
    # Another input set (``xdl report --data``), e.g. for out-of-distribution scores, and what it is.
    other: Split | None = None
    other_name: str = ""
    _rows: int | None = field(default=None, init=False, repr=False)
    _probs: torch.Tensor | None = field(default=None, init=False, repr=False)
    _fast: tuple | None = field(default=None, init=False, repr=False)

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

    def rows(self) -> int:
        """The most inputs one model call may take: ``--batch-size`` multiples as the callers ask,
        capped where a forward+backward pass over that many would hold more activations than
        :data:`xdl.models.inference.ACTIVATION_BUDGET` (real-size images on a large model)."""
        if self._rows is None:
            self._rows = rows_per_pass(self.model, self.x[:1].to(self.device)) if len(self.x) else 1
        return self._rows

    def fast_model(self) -> nn.Module:
        """:func:`xdl.models.inference.fast_model` of the model, built once: tracing, fusing and checking
        it costs ~45 ms, which LIME paid once per image (a third of explaining 100 digits).
        Rebuilt if the model or its weights change (parameters' in-place version counters)."""
        key = (id(self.model), tuple(p._version for p in self.model.parameters()))
        if self._fast is None or self._fast[0] != key:
            self._fast = (key, fast_model(self.model, self.x[:2].to(self.device)))
        return self._fast[1]

    def samples_per_call(self, copies: int, batches: int = 1) -> int:
        """Samples per model call when each becomes ``copies`` rows (path points, perturbations):
        ``batches`` × ``--batch-size`` rows, within :meth:`rows`."""
        return max(1, min(batches * self.batch_size, self.rows()) // copies)

    def batches(self, n: int | None = None, batch_size: int | None = None, desc: str | None = None) -> Iterator[slice]:
        """Slices over the samples; with ``desc`` and ``progress`` on, a bar on stderr."""
        n = len(self.x) if n is None else n
        size = min(batch_size or self.batch_size, self.rows())
        slices = [slice(start, min(start + size, n)) for start in range(0, n, size)]
        if desc and self.progress and len(slices) > 1:
            import sys

            from tqdm.auto import tqdm

            yield from tqdm(slices, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
        else:
            yield from slices

    def stream(self, x=None, batch_size: int | None = None, desc: str | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """(positions, inputs on the device) over ``x`` (default: the samples), in order.

        The one way to walk many samples: slices of a tensor, or, for a streamed split
        (:mod:`xdl.data.stream`), images decoded by worker processes a batch at a time, so
        memory is bounded by the batch size. Explain methods that index ``ctx.x`` directly
        get real tensors either way.
        """
        x = self.x if x is None else x
        size = min(batch_size or self.batch_size, self.rows())
        parts = batches(x, size, self.device)
        if desc and self.progress and len(x) > size:
            import sys

            from tqdm.auto import tqdm

            total = -(-len(x) // size)
            yield from tqdm(parts, desc=desc, total=total, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
        else:
            yield from parts

    @torch.no_grad()
    def predict(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax probabilities for ``x`` (default: the samples, computed once), batched, on CPU."""
        if x is None and self._probs is not None:
            return self._probs
        out = [torch.softmax(self.model(xb).float(), 1).cpu() for _, xb in self.stream(self.x if x is None else x)]
        probs = torch.cat(out) if out else torch.empty(0, self.num_classes)
        if x is None:  # an explanation asks twice: for its targets, then for the figure's titles
            self._probs = probs
        return probs

    def remember_predictions(self, probs: torch.Tensor) -> None:
        """Probabilities of the samples an analyzer computed in its own pass: later
        :meth:`predict` calls (targets, figure titles) read them instead of a new pass."""
        self._probs = probs

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


# Off while an analyzer is re-run only for its numbers (the trust report's randomization
# checks re-explain the same samples once per layer): drawing figures nobody sees was a
# third of that work.
_FIGURES: contextvars.ContextVar[bool] = contextvars.ContextVar("xdl_figures", default=True)


@contextlib.contextmanager
def without_figures() -> Iterator[None]:
    """Within this block, ``Result.add_figure`` discards figures instead of rendering them."""
    token = _FIGURES.set(False)
    try:
        yield
    finally:
        _FIGURES.reset(token)


def figures_wanted() -> bool:
    """False inside :func:`without_figures`: an analyzer may skip building a costly figure."""
    return _FIGURES.get()


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


def is_number(value: Any) -> bool:
    """A metric a finding can quote: int or float, not bool (metrics read back from JSON may be anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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

    def _repr_html_(self) -> str:
        """Jupyter shows a Result inline as the audit page draws its section."""
        from xdl.render.html import render_result  # Jinja2 and the templates: only when a notebook draws one

        return render_result(self)

    def add_figure(self, name: str, fig: Any, dpi: int = 110) -> None:
        """Render a matplotlib figure to PNG and close it (figures never leak between runs)."""
        import sys

        if figures_wanted():
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
            self.figures[name] = buffer.getvalue()
        # Only pyplot keeps figures alive; xdl.plotting's bare Figures need no pyplot (nor its backend).
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close(fig)

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
            if target.is_dir() and not any(target.iterdir()):
                # A claimed, empty folder (Run.claim_result_dir): renaming onto it is atomic, and
                # it never stops existing, so no concurrent claim can take its name meanwhile.
                os.replace(folder, target)
            elif target.exists():
                # A result is flat files; a subfolder is an analyzer's cache (privacy's reference
                # models), keyed by what it was computed from, so it outlives the result it served.
                for cache in (c for c in target.iterdir() if c.is_dir() and c.name != CLAIM):
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
    """CSV text whose every cell, header included, is neutralized against formula injection."""
    import csv

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=CSV_LINE_END)
    writer.writerow([csv_safe(str(c)) for c in columns])
    writer.writerows([csv_safe(row.get(c, "")) for c in columns] for row in rows)
    return out.getvalue()


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
    # Why ``needs_xdl_training`` refuses an imported model, for the error ("... does not apply to <this>").
    inapplicable: ClassVar[str] = ""
    # Needs what only xdl's own training knows (its history, its recipe to retrain, which rows
    # trained the model): an imported model has none of it, so such an analyzer does not apply.
    needs_xdl_training: ClassVar[bool] = False
    description: ClassVar[str] = ""
    # One or two plain sentences for the audit page: how to read this section and what
    # would be worrying (with the literature reference where there is one).
    guide: ClassVar[str] = ""
    check_params: ClassVar[dict[str, Any]] = {}
    # "samples": per-sample work that torchrun may split across ranks and ``merge`` joins;
    # "none": needs the whole split (a PCA, a report) and runs whole on rank 0.
    sharding: ClassVar[str] = "none"
    # Methods of the same kind this analyzer runs itself (AutoAttack runs APGD and Square):
    # ``xdl audit`` does not run them again beside it.
    includes: ClassVar[tuple[str, ...]] = ()
    # An attack that can be the audit's headline robust accuracy (``--audit-attack``): the
    # audit runs one of them, by default the highest rank, and leaves the others out.
    headline: ClassVar[int] = 0

    def run(self, ctx: Context, params: Any) -> Result:
        raise NotImplementedError

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        """The audit summary lines this result supports; an analyzer knows its own metric keys."""
        return []

    @classmethod
    def attributions(cls, result: Result, x: torch.Tensor) -> np.ndarray | None:
        """Per-input attributions shaped like ``x`` (for ``--evaluate`` and the trust report), or None.

        The default reads ``arrays["attributions"]``; a method keeping them elsewhere overrides this.
        """
        found = result.arrays.get("attributions")
        return found if found is not None and tuple(found.shape) == tuple(x.shape) else None

    @classmethod
    def outcomes(cls, result: Result) -> dict[str, np.ndarray]:
        """Per-sample outcomes behind this result's findings, by finding label: one value per sample of
        ``result.provenance["indices"]``, in that order, whose mean is the finding's number (1/0 for
        right/wrong). ``xdl compare`` pairs them across runs for intervals and McNemar's test; a
        finding without one is compared without an interval. Read from ``result.arrays`` (load
        the result with ``arrays=True``); none by default."""
        return {}

    @classmethod
    def merge(cls, parts: list[Result], sizes: list[int]) -> Result:
        """One Result from the per-share Results of a "samples" analyzer (``sizes[r]`` samples each,
        rank order). The default concatenates per-sample arrays and averages metrics by sample
        count (:func:`xdl.analysis.base.merge`); override it when a metric is a ratio over a subset."""
        return merge(parts, sizes)

    @classmethod
    def why_not(cls, ctx: Context) -> str:
        """Why this method cannot apply to ``ctx`` (its data kind, its model's architecture, a
        model xdl did not train), or "" when it can. Decided before running, so ``xdl audit``
        lists the method as not applicable, with this reason, rather than as failed. An
        analyzer with an architectural precondition overrides this and calls ``super()``."""
        if ctx.kind not in cls.applies_to:
            return f"{ctx.kind} data"
        if cls.needs_xdl_training and is_imported(ctx.run):
            return cls.inapplicable or "an imported model: xdl did not train it"
        return ""

    @classmethod
    def applies(cls, ctx: Context) -> bool:
        return not cls.why_not(ctx)

    @classmethod
    def audit_params(cls, data_kind: str, eps: float) -> dict[str, str]:
        """``xdl audit``'s own choices on top of this method's defaults (strings, as --param gives
        them), for ``data_kind`` data and the audit's ``--eps``; none by default."""
        return {}

    @classmethod
    def passes(cls, params: Any, shape: tuple[int, ...]) -> float | None:
        """Model passes per sample, in forward+backward equivalents (a forward pass alone is
        about a third), for inputs of ``shape`` (one sample's); None: not known. ``xdl audit``
        sizes an expensive method's sample count to its time budget with it."""
        return None

    @classmethod
    def seconds_beside_model(cls, params: Any, sample: torch.Tensor) -> float:
        """Seconds per sample of work outside the model (e.g. LIME's segmentation), timed on
        ``sample`` (one input); added to :meth:`passes`' cost when the audit sizes a method."""
        return 0.0

    def result(self, **fields: Any) -> Result:
        """A Result stamped with this analyzer's name and kind."""
        return Result(method=self.name, kind=self.kind, **fields)


def refusal(analyzer: Analyzer | type[Analyzer], ctx: Context) -> str:
    """Why ``analyzer`` does not apply to ``ctx``, "" when it does: its ``why_not``, or for a
    plugin written against the older contract that overrides ``applies`` alone, that refusal."""
    why = analyzer.why_not(ctx)
    if not why and getattr(analyzer.applies, "__func__", None) is not Analyzer.applies.__func__ and not analyzer.applies(ctx):
        why = analyzer.inapplicable or "this run"
    return why


def analyze(analyzer: Analyzer, ctx: Context, params: Any = None) -> Result:
    """Run one analyzer with the chores done: seed, device, eval mode, restoration.

    The model goes back to its original device and mode afterwards, also on error.
    """
    if not isinstance(params, analyzer.Params):
        params = parse_params(analyzer.Params, params)
    why = refusal(analyzer, ctx)
    if why:
        raise XdlError(f"{analyzer.kind} method {analyzer.name!r} does not apply to {why}")
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


def merge(parts: list[Any], sizes: list[int]) -> Any:
    """One Result from the per-share Results of ``sizes[r]`` samples each, in rank order.

    Generic, so it knows no method's meaning: an array or table whose length equals each
    share's sample count is per-sample and is concatenated (one that merely happens to
    have that length would be too); other arrays and tables are rank 0's. A metric equal
    to each share's sample count becomes the total; other numeric metrics that differ
    between shares become sample-weighted means: exact for rates and means over all
    samples, not for other counts, conditional rates, maxima or quantiles. Summary and
    figures are rank 0's.
    """
    def per_sample(values: list[Any]) -> bool:
        return all(v is not None and np.ndim(v) > 0 and len(v) == s for v, s in zip(values, sizes))

    first = parts[0]
    arrays = {}
    for name, value in first.arrays.items():
        values = [p.arrays.get(name) for p in parts]
        arrays[name] = np.concatenate([np.asarray(v) for v in values]) if per_sample(values) else value
    tables = {}
    for name, rows in first.tables.items():
        values = [p.tables.get(name) for p in parts]
        tables[name] = [row for v in values for row in v] if per_sample(values) else rows
    warnings = list(dict.fromkeys(w for p in parts for w in p.warnings))
    warnings.append(
        f"computed by {len(parts)} processes on shares of {sum(sizes)} samples: per-sample arrays are "
        "concatenated, metrics that differ between shares are sample-weighted means (exact for rates "
        "and means over all samples, not for conditional rates, maxima or quantiles), summary and figures describe the first share"
    )
    metrics = _weighted([p.metrics for p in parts], sizes)
    return dataclasses.replace(first, arrays=arrays, tables=tables, metrics=metrics, warnings=warnings, path=None)


def _weighted(values: list[Any], sizes: list[int]) -> Any:
    first = values[0]
    if values == sizes:  # each share's sample count: the merge counts them all
        return sum(sizes)
    if all(v == first for v in values):
        return first
    if isinstance(first, dict) and all(isinstance(v, dict) and v.keys() == first.keys() for v in values):
        return {k: _weighted([v[k] for v in values], sizes) for k in first}
    if isinstance(first, list) and all(isinstance(v, list) and len(v) == len(first) for v in values):
        return [_weighted(list(items), sizes) for items in zip(*values)]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sum(v * s for v, s in zip(values, sizes)) / sum(sizes)
    return first
