"""Run one analyzer on a run or a live model, and return its Result.

This is the single path every analysis takes — ``xdl explain/attack/report``, the Python
API and ``xdl audit`` alike — so it sits below both :mod:`xdl.api` and
:mod:`xdl.auditing.audit`, and imports neither.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xdl.analysis import validate
from xdl.analysis.base import Context, analyze as run_analyzer, parse_params
from xdl.analysis.evaluation import evaluate as evaluate_result
from xdl.analysis.registry import load_analyzer
from xdl.analysis.shards import analyze_shards
from xdl.data import DATASETS, load_data
from xdl.data.given import live_samples
from xdl.data.sampling import shuffle_split
from xdl.data.stream import select
from xdl.data.types import Split
from xdl.device import check_seed
from xdl.errors import XdlError
from xdl.models.imported import as_classifier
from xdl.models.inference import eval_mode
from xdl.models.weights import WEIGHTS
from xdl.runs import provenance
from xdl.runs.run import Run, check_result_target, save_result
from xdl.training import distributed


def _select(split_x, split_y, groups: dict, samples: int | None, indices, seed: int = 0, decode: bool = False) -> tuple:
    """The samples to analyze: explicit indices, else a seeded sample of ``samples``, else all.

    Of a streamed split they are decoded when ``decode`` (chosen samples of a method that
    uses them whole: explanations, the trust report) or when they fit in memory; otherwise
    (attacks, reports over a whole split) they stay a view, walked with ``ctx.stream``.
    """
    index = selection(len(split_x), None if split_y is None else split_y.numpy(), samples, indices, check_seed(seed))
    t = torch.as_tensor(index, dtype=torch.long)
    y = split_y[t] if split_y is not None else None
    xs = split_x[t] if decode else select(split_x, index)
    return xs, y, {k: v[index] for k, v in groups.items()}, index


def selection(n: int, labels, samples: int | None, indices, seed: int):
    """Positions within a split of ``n`` samples: ``indices`` as given, all, or a seeded sample.

    A sample of ``samples`` is class-stratified when labels are known, so that a split stored
    sorted by label (common for CSV files) does not yield samples of one class only.
    """
    if indices is not None:
        index = np.asarray(list(indices), dtype=int)
        bad = index[(index < 0) | (index >= n)]
        if bad.size:
            raise XdlError(f"index {int(bad[0])} is out of range: the split has {n} samples (0..{n - 1})")
        return index
    if samples is not None and samples <= 0:
        raise XdlError(f"--samples must be > 0, got {samples}")
    if samples is None or samples >= n:
        return np.arange(n)
    if labels is not None:
        try:
            return shuffle_split(np.arange(n), train_size=samples, seed=seed % 2**32, stratify=labels)[0]
        except ValueError:  # fewer samples than classes, or a class with one member: plain sample
            pass
    return np.random.default_rng(seed % 2**32).permutation(n)[:samples]


def analyze(
    kind: str,
    source: "Run | str | Path | nn.Module",
    method: str,
    *,
    x=None,
    y=None,
    data=None,
    class_names: list[str] | None = None,
    samples: int | None | str = "default",
    split: str = "test",
    indices=None,
    target: str | int = "predicted",
    params: dict | list[str] | None = None,
    device: str = "auto",
    seed: int | None = None,
    batch_size: int = 256,
    save: bool = True,
    force: bool = False,
    out: str | Path | None = None,
    progress: bool = False,
    evaluate: bool = False,
    other=None,
    trust_code: bool = False,
    reencode: bool = False,
):
    """Run one analyzer on a run directory, or on any ``nn.Module`` with tensors ``x``/``y``.

    Returns the :class:`xdl.analysis.Result`; for runs it is also saved under
    ``RUN/<kind>/<method>/`` (a new ``<method>-2`` … unless ``force``). Under torchrun each
    rank explains or attacks its share of the samples and rank 0 merges, saves and returns
    the result (:func:`xdl.analysis.base.merge` says what merging can and cannot do); the
    other ranks return None.
    ``reencode=True`` analyzes a run whose data file changed since training, encoded with the
    run's saved encoding, instead of refusing it.
    ``evaluate=True`` (explain only) adds how far the explanation can be trusted —
    deletion/insertion AUC against random order, infidelity, sensitivity and the
    randomization check of :mod:`xdl.analysis.evaluation` — as ``metrics["evaluation"]``.
    ``other`` is another input set for analyzers that score one (``takes_data``, e.g. ood):
    see :func:`other_data`.
    ``trust_code=True`` lets a run whose model is a ``package.module:factory`` import it.
    """
    cls = load_analyzer(kind, method)
    analyzer = cls()
    parsed = parse_params(cls.Params, params)
    indices = validate.check_indices(indices)
    if out is not None:
        check_result_target(out)
    count = cls.samples if samples == "default" else samples
    world = distributed.join(device)  # under torchrun, a "samples" analyzer's samples are shared out
    dev = distributed.local_device(device, world)
    if evaluate and (kind != "explain" or world.size > 1):
        raise XdlError("--evaluate applies to xdl explain in one process (it re-explains every sample on altered models)")
    chores = dict(device=dev, batch_size=batch_size, target=target, progress=progress and world.main)
    if isinstance(source, nn.Module):
        run = None
        ctx, split, fingerprint, notes = _live_context(source, x, y, data, class_names, count, split, indices, seed, chores)
    else:
        run = _open(source, kind, save and out is None, trust_code, reencode)
        ctx, fingerprint = _run_context(run, kind, count, split, indices, seed, chores)
        notes = []
    if other is not None:
        if not getattr(cls, "takes_data", False):
            raise XdlError(f"--data applies to methods that score another input set (ood), not {kind} method {method!r}")
        ctx.other, ctx.other_name = other_data(other, ctx)
    result = _compute(analyzer, ctx, parsed, world, evaluate)
    if not world.main:  # rank 0 holds the merged result and writes it
        distributed.leave(world)
        return None
    result.warnings += [n for n in notes if n not in result.warnings]
    if run is not None and run.data_warning:
        result.warnings.append(run.data_warning)
    result.provenance = _provenance(ctx, split, parsed, fingerprint, other is not None)
    if out is not None:
        save_result(result, out)
    elif run is not None and save:
        save_result(result, run.claim_result_dir(kind, method, force))
    distributed.leave(world)
    return result


def _provenance(ctx: Context, split: str, parsed, fingerprint: tuple[str, str], other: bool) -> dict:
    """What the result was computed on: split, samples, target, seed, parameters, digests."""
    recorded = provenance.record(
        split=split, index=ctx.indices, target=ctx.target, seed=ctx.seed, params=dataclasses.asdict(parsed),
        model=fingerprint[0], data=fingerprint[1],
    )
    if other:  # a score on another input set depends on that set too
        recorded["other"] = {"name": ctx.other_name, "data": provenance.data_digest(ctx.other.x, ctx.other.y)}
    return recorded


def _open(source: "Run | str | Path", kind: str, writes: bool, trust_code: bool, reencode: bool) -> Run:
    run = source if isinstance(source, Run) else Run(source, trust_code=trust_code, reencode=reencode)
    run.trust_code = run.trust_code or trust_code
    if writes:
        run.check_writable(kind)  # a read-only run fails now, not after the work
    return run


def _compute(analyzer, ctx: Context, parsed, world: distributed.World, evaluate: bool):
    """The Result on rank 0 (merged from every rank's share for a "samples" analyzer); None elsewhere."""
    if world.size > 1 and type(analyzer).sharding == "samples":
        result = analyze_shards(analyzer, ctx, parsed, world)
    elif world.main:  # a PCA, a report: it needs the whole split, so rank 0 computes it
        result = run_analyzer(analyzer, ctx, parsed)
    else:  # and the other ranks wait for it in leave()
        result = None
    if evaluate:
        evaluate_result(analyzer, ctx, parsed, result)
    return result


def _live_context(source: nn.Module, x, y, data, class_names, count, split: str, indices, seed, chores: dict) -> tuple:
    """The Context of a bare model: its samples, the split name provenance records, digests, notes."""
    splits = None
    if data is not None:  # a data spec, DataSplits, (x, y) or a torch Dataset/DataLoader
        x, y, splits = live_samples(data, split)
        class_names = class_names or (splits.class_names if splits is not None else None)
    if x is None:
        raise XdlError("analyzing a bare model needs the samples: pass x (and y for labels) or data=")
    validate.check_model(source)
    x = validate.as_samples(x, gray_hw=True)
    y = None if y is None else validate.as_labels(y, len(x))
    seed = 0 if seed is None else seed
    # Any output (tuple, dict, ModelOutput, probabilities) as class scores; N×H×W as images.
    model, x, notes = as_classifier(source, x)
    xs, ys, groups, index = _select(x, y, {}, count, indices, seed)
    with torch.no_grad(), eval_mode(model):
        n_out = model(xs[:1]).shape[-1] if len(xs) else len(class_names or [])
    validate.check_labels(ys, n_out)
    ctx = Context(
        model=model, x=xs, y=ys, kind=splits.kind if splits is not None else "image" if x.dim() == 4 else "tabular",
        class_names=list(class_names) if class_names is not None else [str(i) for i in range(n_out)],
        feature_names=splits.feature_names if splits is not None else [],
        encoding=splits.encoding if splits is not None else None, data=splits,
        seed=seed, split=split, indices=index, **chores,
    )
    recorded = split if splits is not None else "given"  # the caller's own tensors, not a split of a run
    return ctx, recorded, (provenance.model_digest(source), provenance.data_digest(x, y)), notes


def _run_context(run: Run, kind: str, count, split: str, indices, seed, chores: dict) -> tuple[Context, tuple[str, str]]:
    """The Context over a run's split, and the digests of its weights and that split."""
    data = run.data
    part = data.split(split)
    seed = run.seed if seed is None else seed
    xs, ys, groups, index = _select(part.x, part.y, part.groups, count, indices, seed,
                                    decode=kind != "attack" and (count is not None or indices is not None))
    ctx = Context(
        model=run.model, x=xs, y=ys, kind=data.kind, class_names=data.class_names,
        feature_names=data.feature_names, encoding=data.encoding, groups=groups, data=data,
        run=run, seed=seed, split=split, indices=index, **chores,
    )
    return ctx, _fingerprint(run, part)


def _fingerprint(run: Run, part) -> tuple[str, str]:
    """Digests of the run's weights file and of one split's tensors."""
    return provenance.file_digest(run.path / WEIGHTS), provenance.data_digest(part.x, part.y, part.groups)


def expected_provenance(
    run: Run, kind: str, method: str, *, samples: int | None, params: dict | list[str] | None = None,
    split: str = "test", indices=None, target: str | int = "predicted", seed: int | None = None,
) -> dict:
    """The provenance :func:`analyze` would record for these arguments, computed without running it.

    The audit compares it with a saved result's, and reuses that result only when they are equal.
    """
    cls = load_analyzer(kind, method)
    parsed = parse_params(cls.Params, params)
    part = run.data.split(split)
    seed = run.seed if seed is None else seed
    index = selection(len(part.x), part.y.numpy(), samples, indices, seed)
    model, data = _fingerprint(run, part)
    return provenance.record(split=split, index=index, target=target, seed=seed, params=dataclasses.asdict(parsed),
                             model=model, data=data)


def other_data(data, ctx) -> tuple:
    """Another input set as a Split and its name: tensors as given; a dataset name (its test
    split); a folder or .npz (all its samples); for tabular runs, a CSV with the run's columns
    encoded the run's way (the target column may be absent)."""
    if isinstance(data, Split):
        return data, "the given split"
    if isinstance(data, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(data).float()
        return Split(x, torch.zeros(len(x), dtype=torch.long)), "the given inputs"
    name = str(data.get("name", "")) if isinstance(data, dict) else str(data)
    if ctx.kind == "tabular":
        if not name.lower().endswith(".csv"):
            raise XdlError(f"--data for a tabular run must be a CSV file with the run's columns, got {name!r}")
        from xdl.data.csv import encode_frame, read_csv  # pandas: only for a tabular --data, not every analysis

        frame = read_csv(name)
        missing = [c.name for c in ctx.encoding.columns if c.name not in frame.columns]
        if missing:
            raise XdlError(f"--data {name} has no column {missing[0]!r}; this run's model reads {', '.join(ctx.encoding.original_names)}")
        x = torch.from_numpy(encode_frame(frame, ctx.encoding))
        return Split(x, torch.zeros(len(x), dtype=torch.long)), f"{name} ({len(x)} rows)"
    splits = load_data(data)
    if splits.kind != ctx.kind:
        raise XdlError(f"--data {name} holds {splits.kind} data but this run's model takes {ctx.kind} data")
    if name in DATASETS:
        return splits.test, f"{name} test split"
    parts = [splits.train, splits.val, splits.test]
    x = torch.cat([p.x for p in parts])
    return Split(x, torch.cat([p.y for p in parts])), f"{name} ({len(x)} samples)"
