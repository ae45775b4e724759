"""The saliency family: which input features pushed the model towards the target class.

Each method is a thin adapter over captum; they differ only in their captum call, so they
share one base, ``Attribution``, which batches the samples, resolves the targets and turns
the attributions into a Result: a heat-map grid for images, a per-column bar chart for
tabular rows.

    >>> import xdl                                                    # doctest: +SKIP
    >>> result = xdl.explain("runs/run-001", "ig", samples=8)         # doctest: +SKIP
    >>> result.arrays["attributions"].shape                           # doctest: +SKIP
    (8, 1, 8, 8)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from xdl.analyzers.base import Analyzer, Context, Result
from xdl.errors import XdlError
from xdl.models import last_conv

# Methods that multiply the batch (IG steps, SmoothGrad noise draws, occlusion windows) run
# at most this many batches' worth of examples per forward pass, so --batch-size bounds
# memory for every method and any number of samples.
BATCHES_PER_PASS = 4
# The "blur" baseline's Gaussian sigma as a fraction of the image side: blurred enough that
# digit strokes vanish (Sturmfels et al., "Visualizing the impact of feature attribution
# baselines", Distill 2020), yet still an image of the same brightness.
BLUR_SIGMA = 0.25

Baseline = Literal["zeros", "blur", "mean"]


def forward_budget(ctx: Context, n: int) -> int:
    return max(n, BATCHES_PER_PASS * ctx.batch_size)


def baseline(ctx: Context, x: torch.Tensor, kind: Baseline) -> torch.Tensor:
    """The reference input that attributions are measured against."""
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "mean":
        # The training mean when there is a run; a bare model's own samples otherwise.
        source = ctx.data.train.x if ctx.data is not None else ctx.x
        return source.mean(0, keepdim=True).to(x).expand_as(x)
    if x.dim() != 4:
        raise XdlError("baseline=blur applies to images only; use zeros or mean for tabular data")
    from skimage.filters import gaussian

    sigma = BLUR_SIGMA * max(x.shape[-2:])
    blurred = gaussian(x.cpu().numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", preserve_range=True)
    return torch.as_tensor(blurred, dtype=x.dtype, device=x.device)


class Attribution(Analyzer):
    """Shared by the family: subclasses implement ``attribute`` for one batch."""

    kind = "explain"
    samples = 16

    def cmap(self, params) -> str:
        """"bwr" for signed maps, "hot" for non-negative ones."""
        return "bwr"

    def attribute(self, ctx: Context, x: torch.Tensor, target: torch.Tensor, params) -> torch.Tensor | tuple:
        """Attributions shaped like ``x``, or ``(attributions, convergence delta per sample)``."""
        raise NotImplementedError

    def run(self, ctx: Context, params) -> Result:
        targets = ctx.targets()
        maps, deltas = [], []
        for s in ctx.batches(desc=self.name):
            # Asking for gradients up front spares captum's "did not require gradients" warning.
            x = ctx.x[s].to(ctx.device).requires_grad_()
            out = self.attribute(ctx, x, targets[s].to(ctx.device), params)
            attr, delta = out if isinstance(out, tuple) else (out, None)
            maps.append(attr.detach().float().cpu())
            if delta is not None:
                deltas.append(delta.detach().float().cpu())
        delta = torch.cat(deltas).numpy() if deltas else None
        return self.summarize(ctx, params, torch.cat(maps).numpy(), targets, delta)

    def summarize(self, ctx: Context, params, attributions: np.ndarray, targets: torch.Tensor, delta: np.ndarray | None) -> Result:
        from xdl.plotting import attribution_grid, bar_chart, sample_titles

        probs = ctx.predict()
        predictions = probs.argmax(1).numpy()
        magnitude = np.abs(attributions)
        result = self.result(
            metrics={"samples": len(attributions), "mean_abs_attribution": float(magnitude.mean())},
            arrays={
                "attributions": attributions.astype(np.float32),
                "indices": np.arange(len(attributions)) if ctx.indices is None else np.asarray(ctx.indices),
                "targets": targets.numpy(),
                "predictions": predictions,
            },
        )
        if delta is not None:
            # Completeness: attributions should sum to f(x) − f(baseline); |delta| is the gap.
            result.arrays["delta"] = delta
            result.metrics["convergence_delta_mean_abs"] = float(np.abs(delta).mean())
            result.metrics["convergence_delta_max_abs"] = float(np.abs(delta).max())
        what = f"{len(attributions)} {ctx.split} samples" if ctx.run is not None else f"{len(attributions)} samples"
        result.summary = (
            f"{self.name}: attributions for {what} (target: {ctx.target}); "
            f"mean |attribution| {result.metrics['mean_abs_attribution']:.4g}"
        )
        if ctx.kind == "image":
            confidence = probs[torch.arange(len(probs)), probs.argmax(1)].numpy()
            y = None if ctx.y is None else ctx.y.numpy()
            titles = sample_titles(y, predictions, confidence, ctx.class_names)
            result.add_figure("grid", attribution_grid(ctx.x.numpy(), attributions, titles, cmap=self.cmap(params)))
        else:
            per_column = ctx.encoding.sum_to_columns(attributions) if ctx.encoding else attributions
            names = ctx.encoding.original_names if ctx.encoding else (ctx.feature_names or [f"x{i}" for i in range(per_column.shape[1])])
            importance = np.abs(per_column).mean(0)
            result.arrays["column_attributions"] = per_column.astype(np.float32)
            result.tables["columns"] = [
                {"column": n, "mean_abs_attribution": float(v)} for n, v in sorted(zip(names, importance), key=lambda t: -t[1])
            ]
            result.add_figure("columns", bar_chart(names, importance, f"{self.name}: mean |attribution| per column", "mean |attribution|"))
        return result


# -----------------------------------------------------------------------------------------
# The methods
# -----------------------------------------------------------------------------------------


@dataclass
class SaliencyParams:
    abs: bool = True  # |gradient|, as in Simonyan et al. 2013; false keeps the sign


class Saliency(Attribution):
    """Gradient of the target score with respect to the input (Simonyan et al., 2013)."""

    Params = SaliencyParams
    description = "gradient of the target class score w.r.t. the input"

    def cmap(self, params) -> str:
        return "hot" if params.abs else "bwr"

    def attribute(self, ctx, x, target, params):
        from captum.attr import Saliency as CaptumSaliency

        return CaptumSaliency(ctx.model).attribute(x, target=target, abs=params.abs)


@dataclass
class IGParams:
    steps: int = 50  # points on the path from baseline to input (Gauss–Legendre)
    baseline: Baseline = "zeros"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


class IntegratedGradients(Attribution):
    """Gradients integrated along the straight path from a baseline (Sundararajan et al., 2017)."""

    Params = IGParams
    description = "integrated gradients from a zeros, blurred or mean baseline"
    check_params = {"steps": 8}

    def attribute(self, ctx, x, target, params):
        from captum.attr import IntegratedGradients as CaptumIG

        from xdl.inference import fast_model

        return CaptumIG(fast_model(ctx.model, x[:2].detach())).attribute(
            x, baselines=baseline(ctx, x, params.baseline), target=target, n_steps=params.steps,
            internal_batch_size=forward_budget(ctx, len(x)), return_convergence_delta=True,
        )


@dataclass
class SmoothGradParams:
    samples: int = 25  # noisy copies per input
    stdev: float = 0.15  # noise std in input units: 15% of the [0, 1] image range (Smilkov et al. use 10–20%)
    abs: bool = True

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.stdev < 0:
            raise ValueError(f"stdev must be >= 0, got {self.stdev}")


class SmoothGrad(Attribution):
    """Saliency averaged over noisy copies of the input (Smilkov et al., 2017)."""

    Params = SmoothGradParams
    description = "saliency averaged over Gaussian-noised copies of the input"
    check_params = {"samples": 3}

    def cmap(self, params) -> str:
        return "hot" if params.abs else "bwr"

    def attribute(self, ctx, x, target, params):
        from captum.attr import NoiseTunnel, Saliency as CaptumSaliency

        return NoiseTunnel(CaptumSaliency(ctx.model)).attribute(
            x, nt_type="smoothgrad", nt_samples=params.samples, stdevs=params.stdev, target=target,
            nt_samples_batch_size=max(1, forward_budget(ctx, len(x)) // len(x)), abs=params.abs,
        )


@dataclass
class GradCamParams:
    layer: str = ""  # a module name as in model.named_modules(); empty: the last Conv2d
    relu: bool = True  # keep only evidence for the class, as in the paper

    def __post_init__(self) -> None:
        self.layer = self.layer.strip()


class GradCam(Attribution):
    """Class activation map of a conv layer, upsampled to the input (Selvaraju et al., 2017)."""

    Params = GradCamParams
    applies_to = frozenset({"image"})
    description = "Grad-CAM on the last conv layer, upsampled to the input"

    def cmap(self, params) -> str:
        return "hot" if params.relu else "bwr"

    def attribute(self, ctx, x, target, params):
        from captum.attr import LayerAttribution, LayerGradCam

        cam = LayerGradCam(ctx.model, conv_layer(ctx.model, params.layer))
        maps = cam.attribute(x, target=target, relu_attributions=params.relu)
        return LayerAttribution.interpolate(maps, tuple(x.shape[-2:]), interpolate_mode="bilinear")


def conv_layer(model: nn.Module, name: str) -> nn.Module:
    if not name:
        found = last_conv(model)
        if found is None:
            raise XdlError("gradcam needs a conv layer; this model has none")
        return found[1]
    layers = dict(model.named_modules())
    if name not in layers:
        convs = ", ".join(n for n, m in layers.items() if isinstance(m, nn.Conv2d)) or "none"
        raise XdlError(f"this model has no layer named {name!r}; its conv layers are: {convs}")
    return layers[name]


@dataclass
class OcclusionParams:
    window: int | None = None  # side of the occluding patch; default 3 pixels, or 1 tabular feature
    stride: int = 1
    fill: float = 0.0  # the value the patch is filled with, in input units

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")


class Occlusion(Attribution):
    """Score drop when a sliding patch hides part of the input (Zeiler & Fergus, 2014)."""

    Params = OcclusionParams
    description = "score drop when a sliding patch of the input is hidden"
    check_params = {"window": 2, "stride": 2}

    def attribute(self, ctx, x, target, params):
        from captum.attr import Occlusion as CaptumOcclusion

        if x.dim() == 4:
            window = params.window or 3
            if window > min(x.shape[-2:]):
                raise XdlError(f"occlusion window {window} is larger than the {x.shape[-2]}×{x.shape[-1]} image")
            shape, strides = (x.shape[1], window, window), (x.shape[1], params.stride, params.stride)
        else:
            window = params.window or 1
            if window > x.shape[1]:
                raise XdlError(f"occlusion window {window} is larger than the {x.shape[1]} features")
            shape, strides = (window,), (params.stride,)
        if params.stride > window:
            raise XdlError(f"occlusion stride {params.stride} is larger than the window {window}: some inputs would never be hidden")
        return CaptumOcclusion(ctx.model).attribute(
            x, sliding_window_shapes=shape, strides=strides, baselines=params.fill, target=target,
            perturbations_per_eval=max(1, forward_budget(ctx, len(x)) // len(x)),
        )


@dataclass
class DeepLiftParams:
    baseline: Baseline = "zeros"


class DeepLift(Attribution):
    """Contributions relative to a baseline, propagated by the rescale rule (Shrikumar et al., 2017)."""

    Params = DeepLiftParams
    description = "DeepLIFT (rescale rule) relative to a zeros, blurred or mean baseline"

    def attribute(self, ctx, x, target, params):
        from captum.attr import DeepLift as CaptumDeepLift

        with warnings.catch_warnings():
            # captum announces, on every call, that it hooks the activations and removes the hooks again.
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks", category=UserWarning)
            return CaptumDeepLift(ctx.model).attribute(
                x, baselines=baseline(ctx, x, params.baseline), target=target, return_convergence_delta=True
            )
