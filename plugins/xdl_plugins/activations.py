"""What each layer computes: feature maps, activation statistics, dead units, first filters.

Forward hooks on every Conv2d, dense (``nn.Linear``, a Keras ``Dense``: any origin, see
:func:`xdl.models.layers.layer_tree`) and activation layer (or the ``layers`` named)
capture the outputs. Statistics stream over the whole test split batch by batch, reduced
inside the hook, so memory stays bounded by one batch; the feature maps are drawn for the
selected samples only.

A unit is dead when it is never positive on any test sample: a ReLU's output unit (or a
Keras layer's with ``activation="relu"``) for dense layers, a whole channel (at every position) for convolutions. Dead units pass no
gradient, so they never recover — many of them is a sign of a too-high learning rate.

On a bare model there is no test split: the statistics cover the samples analyzed, so
pass ``samples=None`` to use all of ``x`` (the default picks the first 4, for the maps).

    >>> result = xdl.explain(model, "activations", x=x_test, samples=None)   # doctest: +SKIP
    >>> result.tables["layers"][1]["dead_fraction"]                          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from xdl.analysis.base import Analyzer, Context, Result
from xdl.errors import XdlError
from xdl.limits import at_most
from xdl.models.layers import is_dense, layer_tree, rectified
from xdl.plotting import image_grid

# At most this many samples' feature maps per figure: rows beyond it would be unreadable.
MAX_ROWS = 8


@dataclass
class Params:
    layers: list[str] = field(default_factory=list)  # layer names; empty: every conv/dense/activation layer
    channels: int = 16  # strongest channels drawn per conv layer
    drawn: int = 6  # conv layers whose maps are drawn, evenly spaced through the depth (every layer's are saved)
    dead_warning: float = 0.5  # flag layers with more dead units than this fraction

    def __post_init__(self) -> None:
        if self.channels <= 0 or self.drawn <= 0:
            raise ValueError(f"channels and drawn must be > 0, got {self.channels} and {self.drawn}")
        if not 0 <= self.dead_warning <= 1:
            raise ValueError(f"dead_warning must be in [0, 1], got {self.dead_warning}")
        at_most("channels", self.channels, 1024)
        at_most("drawn", self.drawn, 1024)


def watched(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The named layers, or by default every Conv2d, dense layer and torch activation module."""
    modules = layer_tree(model)
    if names:
        missing = [n for n in names if n not in modules or n == ""]
        if missing:
            valid = ", ".join(n for n in modules if n)
            raise XdlError(f"layer {missing[0]!r} does not exist in this model; valid layer names: {valid}")
        return {n: modules[n] for n in names}
    return {
        n: m for n, m in modules.items()
        if n and (isinstance(m, nn.Conv2d) or is_dense(m))
        or (type(m).__module__ == "torch.nn.modules.activation" and not isinstance(m, nn.MultiheadAttention))
    }


@contextlib.contextmanager
def hooked(layers: dict[str, nn.Module], on_output: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``on_output(name, output)`` after each layer's forward; the hooks go away on exit."""
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: on_output(name, out) if torch.is_tensor(out) else None)
        for name, m in layers.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Stats:
    """Running mean/std of a layer's outputs and, per unit, whether it was ever positive."""

    def __init__(self) -> None:
        # Per batch: element count, mean and variance, kept on the device (no sync per batch)
        # and combined at the end in float64 (MPS has no float64; this needs none there).
        self.counts: list[int] = []
        self.moments: list[torch.Tensor] = []
        self.alive: torch.Tensor | None = None
        self.shape: list[int] = []

    def update(self, out: torch.Tensor) -> None:
        out = out.detach().float()
        self.shape = list(out.shape[1:])
        self.counts.append(out.numel())
        self.moments.append(torch.stack(torch.var_mean(out, correction=0)[::-1]))
        # Units: channels of an N×C×H×W map, else the last (feature) axis.
        units = out.movedim(1, -1) if out.dim() == 4 else out
        alive = (units.reshape(-1, units.shape[-1]) > 0).any(0)
        self.alive = alive if self.alive is None else self.alive | alive

    def row(self, name: str, module: nn.Module) -> dict:
        n = torch.tensor(self.counts, dtype=torch.float64)
        means, variances = torch.stack(self.moments).cpu().double().T
        mean = float((n * means).sum() / n.sum())
        # Chan et al.'s pooled variance: within-batch variance plus the spread of batch means.
        var = float((n * (variances + (means - mean) ** 2)).sum() / n.sum())
        # Units are "dead" only where the nonlinearity zeroes negatives; a Tanh unit is never dead.
        rectifier = rectified(module)
        return {
            "layer": name,
            "type": type(module).__name__,
            "shape": self.shape,
            "mean": mean,
            "std": var**0.5,
            "units": int(self.alive.numel()),
            "dead_fraction": float((~self.alive).float().mean()) if rectifier else None,
        }


class Activations(Analyzer):
    kind = "explain"
    Params = Params
    samples = 4
    description = "feature maps, per-layer activation statistics, dead ReLU units, first-layer filters"
    guide = (
        "What each layer responds to. A large share of dead ReLU units (never positive) wastes capacity and "
        "often follows too high a learning rate; first-layer filters that look like noise suggest under-"
        "training."
    )

    def run(self, ctx: Context, params: Params) -> Result:
        layers = watched(ctx.model, params.layers)
        convs = {n for n, m in layers.items() if isinstance(m, nn.Conv2d)}
        result = self.result()

        # Feature maps of the selected samples.
        maps: dict[str, torch.Tensor] = {}

        def keep(name: str, out: torch.Tensor) -> None:
            maps[name] = out.detach().cpu().clone()  # a copy: an in-place ReLU would overwrite it

        with hooked({n: layers[n] for n in convs}, keep), torch.no_grad():
            ctx.model(ctx.x[:MAX_ROWS].to(ctx.device))
        # A ResNet-18 has 20 conv layers: drawing each one's 64 panels took 90 s of a 2-minute section.
        order = list(maps)
        count = min(params.drawn, len(order))
        drawn = {order[round(i * (len(order) - 1) / max(1, count - 1))] for i in range(count)}
        for name, fmap in maps.items():
            strongest = fmap.mean((0, 2, 3)).argsort(descending=True)[: params.channels]
            chosen = fmap[:, strongest]
            result.arrays[f"maps/{name}"] = chosen.numpy()
            result.arrays[f"channels/{name}"] = strongest.numpy()
            if name in drawn:
                titles = [f"channel {int(c)}" for c in strongest]  # the first row names each column
                result.add_figure(f"maps_{name}", image_grid(_unit_range(chosen.flatten(0, 1)), titles, ncols=len(strongest)))
        if len(drawn) < len(maps):
            result.warnings.append(f"feature maps drawn for {len(drawn)} of the {len(maps)} conv layers, evenly spaced "
                                   "(-p drawn=N for more); arrays.npz holds every layer's")
        if len(ctx.x) > MAX_ROWS and maps:
            result.warnings.append(f"feature maps show the first {MAX_ROWS} of {len(ctx.x)} samples")

        # Statistics over the whole test split (the samples themselves when there is no split).
        x = ctx.data.test.x if ctx.data is not None else ctx.x
        stats = {name: Stats() for name in layers}
        with hooked(layers, lambda name, out: stats[name].update(out)), torch.no_grad():
            for _, xb in ctx.stream(x):
                ctx.model(xb)
        rows = [stats[name].row(name, module) for name, module in layers.items() if stats[name].counts]
        result.tables["layers"] = rows
        silent = [name for name in layers if not stats[name].counts]
        if silent:
            result.warnings.append(f"no statistics for layers {', '.join(silent)}: they gave no tensor output in a forward pass")
        for row in rows:
            if row["dead_fraction"] is not None and row["dead_fraction"] > params.dead_warning:
                result.warnings.append(
                    f"layer {row['layer']} ({row['type']}): {row['dead_fraction']:.0%} of its {row['units']} units "
                    f"are never positive on {len(x)} samples (dead)"
                )

        first = next((m for m in ctx.model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None:
            filters = first.weight.detach().cpu()
            result.arrays["filters"] = filters.numpy()
            result.add_figure("filters", image_grid(_unit_range(filters), ncols=8))
        dead = [r["dead_fraction"] for r in rows if r["dead_fraction"] is not None]
        result.metrics = {
            "layers": len(rows),
            "conv_layers": len(maps),
            "samples_for_statistics": len(x),
            "max_dead_fraction": max(dead) if dead else None,
            "filters": "first conv layer" if first is not None else "none: the model has no Conv2d layer",
        }
        no_conv = "" if first is not None else "; no feature maps or filters, as the model has no conv layer"
        result.summary = (
            f"activation statistics of {len(rows)} layers over {len(x)} samples"
            + (f", worst dead-unit fraction {max(dead):.0%}" if dead else "")
            + no_conv
        )
        return result


def _unit_range(images: torch.Tensor) -> np.ndarray:
    """Scale each image (map or filter) to [0, 1] on its own, so weak channels stay visible."""
    flat = images.flatten(1).float()
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(images.shape).numpy()
