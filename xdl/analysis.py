"""Run one analyzer on a run or a live model, and return its Result.

This is the single path every analysis takes — ``xdl explain/attack/report``, the Python
API and ``xdl audit`` alike — so it sits below both :mod:`xdl.api` and
:mod:`xdl.auditing`, and imports neither.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from xdl import distributed
from xdl.errors import XdlError
from xdl.run import Run


def _select(split_x, split_y, groups: dict, samples: int | None, indices, decode: bool = False) -> tuple:
    """The samples to analyze: explicit indices, else the first ``samples``, else all.

    Of a streamed split they are decoded when ``decode`` (chosen samples of a method that
    uses them whole: explanations, the trust report) or when they fit in memory; otherwise
    (attacks, reports over a whole split) they stay a view, walked with ``ctx.stream``.
    """
    import numpy as np
    import torch

    n = len(split_x)
    if indices is not None:
        index = np.asarray(list(indices), dtype=int)
        bad = index[(index < 0) | (index >= n)]
        if bad.size:
            raise XdlError(f"index {int(bad[0])} is out of range: the split has {n} samples (0..{n - 1})")
    elif samples is not None:
        if samples <= 0:
            raise XdlError(f"--samples must be > 0, got {samples}")
        index = np.arange(min(samples, n))
    else:
        index = np.arange(n)
    from xdl.data.stream import select

    t = torch.as_tensor(index, dtype=torch.long)
    y = split_y[t] if split_y is not None else None
    xs = split_x[t] if decode else select(split_x, index)
    return xs, y, {k: v[index] for k, v in groups.items()}, index


def analyze(
    kind: str,
    source: "Run | str | Path | nn.Module",
    method: str,
    *,
    x=None,
    y=None,
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
):
    """Run one analyzer on a run directory, or on any ``nn.Module`` with tensors ``x``/``y``.

    Returns the :class:`xdl.analyzers.Result`; for runs it is also saved under
    ``RUN/<kind>/<method>/`` (a new ``<method>-2`` … unless ``force``). Under torchrun each
    rank explains or attacks its share of the samples and rank 0 merges, saves and returns
    the result (:func:`xdl.distributed.merge` says what merging can and cannot do); the
    other ranks return None.
    ``evaluate=True`` (explain only) adds how far the explanation can be trusted —
    deletion/insertion AUC against random order, infidelity, sensitivity and the
    randomization check of :mod:`xdl.evaluation` — as ``metrics["evaluation"]``.
    """
    import torch

    from xdl.analyzers import Context, analyze as run_analyzer, load_analyzer, parse_params

    cls = load_analyzer(kind, method)
    analyzer = cls()
    parsed = parse_params(cls.Params, params)
    count = cls.samples if samples == "default" else samples
    world = distributed.join(device)  # under torchrun, explain/attack samples are shared out
    dev = distributed.local_device(device, world)
    if evaluate and (kind != "explain" or world.size > 1):
        raise XdlError("--evaluate applies to xdl explain in one process (it re-explains every sample on altered models)")
    progress = progress and world.main
    if isinstance(source, nn.Module):
        if x is None:
            raise XdlError("analyzing a bare model needs the samples: pass x (and y for labels)")
        x = torch.as_tensor(x).float()
        y = None if y is None else torch.as_tensor(y).long()
        xs, ys, groups, index = _select(x, y, {}, count, indices)
        with torch.no_grad():
            n_out = source(xs[:1]).shape[-1] if len(xs) else len(class_names or [])
        ctx = Context(
            model=source, x=xs, y=ys, kind="image" if x.dim() == 4 else "tabular",
            class_names=class_names or [str(i) for i in range(n_out)], device=dev,
            seed=0 if seed is None else seed, batch_size=batch_size, target=target,
            indices=index, progress=progress,
        )
        run = None
    else:
        run = source if isinstance(source, Run) else Run(source)
        data = run.data
        part = data.split(split)
        xs, ys, groups, index = _select(part.x, part.y, part.groups, count, indices, decode=kind != "attack" and (count is not None or indices is not None))
        ctx = Context(
            model=run.model, x=xs, y=ys, kind=data.kind, class_names=data.class_names,
            feature_names=data.feature_names, encoding=data.encoding, groups=groups, data=data,
            run=run, device=dev, seed=run.seed if seed is None else seed, batch_size=batch_size,
            target=target, split=split, indices=index, progress=progress,
        )
    if world.size > 1 and kind != "report":
        result = distributed.analyze_shards(analyzer, ctx, parsed, world)
    else:  # a report describes a whole split or the model: each rank computes it whole
        result = run_analyzer(analyzer, ctx, parsed)
    if evaluate:
        from xdl.evaluation import evaluate as evaluate_result

        evaluate_result(analyzer, ctx, parsed, result)
    if not world.main:  # rank 0 holds the merged result and writes it
        distributed.leave(world)
        return None
    if out is not None:
        result.save(out)
    elif run is not None and save:
        result.save(run.result_dir(kind, method, force))
    distributed.leave(world)
    return result
