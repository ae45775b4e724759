"""Analyzers over shares of the samples: under torchrun each rank runs its share, rank 0 merges."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from xdl.analysis.base import analyze
from xdl.data.stream import select
from xdl.training.distributed import World, gather, shard_range


def analyze_shards(analyzer: Any, ctx: Any, params: Any, world: World) -> Any:
    """Run ``analyzer`` on this rank's share of ``ctx``'s samples; rank 0 returns the merge.

    Only for analyzers that declare ``sharding = "samples"``: their work is per sample, and
    their own ``merge`` joins the shares. Ranks seed alike, so a
    randomized method draws differently than one process would (an equally valid draw).
    With fewer samples than ranks, every rank runs them all and rank 0's result stands.
    """
    if len(ctx.x) < world.size:
        result = analyze(analyzer, ctx, params)
        return result if world.main else None
    part = shard_range(len(ctx.x), world)
    shard = dataclasses.replace(
        ctx,
        x=select(ctx.x, np.arange(len(ctx.x))[part]),  # a streamed split's share stays undecoded
        y=None if ctx.y is None else ctx.y[part],
        groups={k: v[part] for k, v in ctx.groups.items()},
        indices=None if ctx.indices is None else ctx.indices[part],
    )
    parts = gather(analyze(analyzer, shard, params), world)
    if parts is None:
        return None
    base, extra = divmod(len(ctx.x), world.size)
    return type(analyzer).merge(parts, [base + (r < extra) for r in range(world.size)])
