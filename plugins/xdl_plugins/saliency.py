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

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from xdl.analysis.base import Analyzer, Context, Result, figures_wanted
from xdl.errors import XdlError
from xdl.limits import at_most, require_memory
from xdl.models.inference import eval_mode

# Methods that multiply the batch (IG steps, SmoothGrad noise draws, occlusion windows) run
# at most this many batches' worth of examples per forward pass, so --batch-size bounds
# memory for every method and any number of samples.
BATCHES_PER_PASS = 4
# The "blur" baseline's Gaussian sigma as a fraction of the image side: blurred enough that
# digit strokes vanish (Sturmfels et al., "Visualizing the impact of feature attribution
# baselines", Distill 2020), yet still an image of the same brightness.
BLUR_SIGMA = 0.25
LISTED = 12  # gradcam layer=list: candidates named in the summary line

Baseline = Literal["zeros", "blur", "mean"]


def forward_budget(ctx: Context, n: int) -> int:
    return max(n, min(BATCHES_PER_PASS * ctx.batch_size, ctx.rows()))


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
    sharding = "samples"

    def cmap(self, params) -> str:
        """"bwr" for signed maps, "hot" for non-negative ones."""
        return "bwr"

    def attribute(self, ctx: Context, x: torch.Tensor, target: torch.Tensor, params) -> torch.Tensor | tuple:
        """Attributions shaped like ``x``, or ``(attributions, convergence delta per sample)``."""
        raise NotImplementedError

    @classmethod
    def passes(cls, params, shape) -> float | None:
        return 1.0  # one gradient per sample; the methods below that need more say so

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
        if ctx.kind == "image" and figures_wanted():  # the grid costs more than 100 digits' attributions
            confidence = probs[torch.arange(len(probs)), probs.argmax(1)].numpy()
            y = None if ctx.y is None else ctx.y.numpy()
            titles = sample_titles(y, predictions, confidence, ctx.class_names)
            result.add_figure("grid", attribution_grid(ctx.x.numpy(), attributions, titles, cmap=self.cmap(params)))
        elif ctx.kind != "image":
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
    guide = (
        "Bright pixels are those whose small change moves the class score most. Raw gradients are noisy and "
        "can highlight edges for any model; check the trust report's randomization test before reading "
        "meaning into a map (Adebayo et al. 2018)."
    )

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
        at_most("steps", self.steps, 10_000)


class IntegratedGradients(Attribution):
    """Gradients integrated along the straight path from a baseline (Sundararajan et al., 2017)."""

    Params = IGParams

    @classmethod
    def passes(cls, params, shape) -> float | None:
        return params.steps + 2 / 3  # the path, and two forward passes for the convergence delta
    description = "integrated gradients from a zeros, blurred or mean baseline"
    guide = (
        "Attributions add up to the score difference between the input and the baseline (Sundararajan et al. "
        "2017). A convergence delta that is large next to the attributions means too few steps; maps that "
        "change little on a randomized model are not explaining this model."
    )
    check_params = {"steps": 8}

    def attribute(self, ctx, x, target, params):
        from captum.attr import IntegratedGradients as CaptumIG

        rows = min(params.steps * len(x), forward_budget(ctx, len(x)))
        # Inputs, gradients and the path points of one internal batch, before any layer's activations.
        require_memory(4 * 3 * rows * x[0].numel(), f"ig with steps={params.steps} on {len(x)} samples",
                       "lower steps or --batch-size")
        return CaptumIG(ctx.fast_model()).attribute(
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
        at_most("samples", self.samples, 10_000)


class SmoothGrad(Attribution):
    """Saliency averaged over noisy copies of the input (Smilkov et al., 2017)."""

    Params = SmoothGradParams

    @classmethod
    def passes(cls, params, shape) -> float | None:
        return float(params.samples)
    description = "saliency averaged over Gaussian-noised copies of the input"
    guide = (
        "Averaging gradients over noisy copies removes speckle (Smilkov et al. 2017); what stays bright is "
        "evidence robust to small noise. Blurry maps that look the same for every class mean the noise level "
        "is too high."
    )
    check_params = {"samples": 3}

    def cmap(self, params) -> str:
        return "hot" if params.abs else "bwr"

    def attribute(self, ctx, x, target, params):
        from captum.attr import NoiseTunnel, Saliency as CaptumSaliency

        return NoiseTunnel(CaptumSaliency(ctx.model)).attribute(
            x, nt_type="smoothgrad", nt_samples=params.samples, stdevs=params.stdev, target=target,
            nt_samples_batch_size=max(1, forward_budget(ctx, len(x)) // len(x)), abs=params.abs,
        )


NO_SPATIAL_LAYER = "a model with no spatial layer (a conv map or ViT patch tokens) its class score depends on"


@dataclass
class GradCamParams:
    # A module name as in model.named_modules(); empty: found by a forward pass (the last
    # spatial map before global pooling); "list": the candidates, nothing computed.
    layer: str = ""
    relu: bool = True  # keep only evidence for the class, as in the paper

    def __post_init__(self) -> None:
        self.layer = self.layer.strip()


class GradCam(Attribution):
    """Class activation map of a spatial layer, upsampled to the input (Selvaraju et al., 2017).

    Works on any architecture: a conv net's last N×C×H×W map before global pooling, or a
    vision transformer's patch tokens N×(1+h·w)×D viewed as an N×D×h×w grid (the
    reshape pytorch-grad-cam's README prescribes for ViT). The map is captum's
    LayerGradCam's (tested equal), computed here so that the one forward pass also gives
    the predictions: on a ResNet-50 at 224 px a separate prediction pass doubled the cost.
    """

    Params = GradCamParams
    applies_to = frozenset({"image"})
    description = "Grad-CAM on the last spatial layer (conv map or ViT patch tokens), upsampled to the input"
    guide = (
        "Coarse regions that raised the class score, from the last convolutional layer (Selvaraju et al. "
        "2017). Heat on the background rather than the object is the classic sign of a shortcut; the map's "
        "resolution is the layer's, not the image's."
    )

    def cmap(self, params) -> str:
        return "hot" if params.relu else "bwr"

    @classmethod
    def why_not(cls, ctx: Context) -> str:
        # An MLP has no map to weigh: that is the architecture, not an error, so the audit lists
        # Grad-CAM as not applicable rather than failed.
        why = super().why_not(ctx)
        if why or ctx.x is None or not len(ctx.x):
            return why
        device = next(ctx.model.parameters(), torch.empty(0)).device
        with eval_mode(ctx.model):  # asked before running: no BatchNorm statistics may move
            if any(f.has_gradient for f in spatial_layers(ctx.model, ctx.x[:1].to(device))):
                return ""
        return NO_SPATIAL_LAYER

    def run(self, ctx: Context, params) -> Result:
        found = spatial_layers(ctx.model, ctx.x[:1].to(ctx.device))
        if params.layer == "list":
            return self.listing(found)
        self.layer = pick_layer(ctx.model, found, params.layer)
        module = dict(ctx.model.named_modules())[self.layer.name]
        # The predicted class is read off the pass itself; a true or fixed target needs no pass.
        given = None if ctx.target == "predicted" else ctx.targets()
        maps, logits = [], []
        for s in ctx.batches(desc=self.name):
            with self.layer.view(module) as layer:
                cam, out = grad_cam(ctx.model, layer, ctx.x[s].to(ctx.device), None if given is None else given[s],
                                    params.relu)
            maps.append(cam.float().cpu())
            logits.append(out.float().cpu())
        probs = torch.softmax(torch.cat(logits), 1)
        ctx.remember_predictions(probs)
        targets = probs.argmax(1) if given is None else given
        result = self.summarize(ctx, params, torch.cat(maps).numpy(), targets, None)
        result.params["layer"] = self.layer.name
        result.summary += f"; layer {self.layer.name}"
        return result

    def listing(self, found: list["SpatialLayer"]) -> Result:
        auto = pick_layer(None, found, "").name if found else None
        rows = [{"layer": f.name, "output": "×".join(map(str, f.shape)), "tokens": f.tokens, "auto": f.name == auto} for f in found]
        names = ", ".join(f"{f.name}{' (auto)' if f.name == auto else ''}" for f in found[-LISTED:]) or "none"
        more = f"the last {LISTED} of {len(found)} (all in the layers table): " if len(found) > LISTED else ""
        return self.result(summary=f"gradcam layers, deepest last; {more}{names}", tables={"layers": rows},
                           metrics={"candidates": len(found)})



def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None,
             relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(Grad-CAM maps upsampled to x, the model's outputs) from one forward pass and a backward
    pass from the target scores (default: the predicted ones) down to ``layer`` only.

    The map is Σ_c mean_ij(∂score/∂A_cij)·A_c over the layer's channels (Selvaraju et al.
    2017), bilinearly upsampled as captum's LayerAttribution.interpolate does.
    """
    import torch.nn.functional as F

    found: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _, __, out: found.append(out))
    try:
        with torch.enable_grad():
            out = model(x.detach().requires_grad_())
    finally:
        handle.remove()
    target = out.argmax(1) if target is None else target.to(out.device)
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), found[0])
    cam = (grad.mean(tuple(range(2, grad.dim())), keepdim=True) * found[0]).sum(1, keepdim=True)
    cam = F.interpolate(cam.relu() if relu else cam, size=tuple(x.shape[-2:]), mode="bilinear")
    return cam.detach(), out.detach()


@dataclass
class SpatialLayer:
    """A module whose output is a spatial map: N×C×H×W, or N×T×D patch tokens (``tokens``)."""

    name: str
    shape: tuple[int, ...]  # one sample's output
    tokens: bool = False
    has_gradient: bool = True  # does the top class score depend on this map's spatial part?
    is_norm: bool = False

    @property
    def grid(self) -> tuple[int, int, int]:
        """(tokens left aside — a class token —, h, w) for a token layer."""
        t = self.shape[0]
        for skip in (1, 0):
            side = math.isqrt(t - skip)
            if side > 1 and side * side == t - skip:
                return skip, side, side
        raise ValueError(t)

    @contextlib.contextmanager
    def view(self, module: nn.Module):
        """The module itself for a conv map; for tokens, a grid module fed from a hook on it."""
        if not self.tokens:
            yield module
            return
        grid = TokenGrid(*self.grid)

        def through_grid(_, __, out):
            mapped = grid(out)  # captum hooks ``grid``; the tokens go on unchanged in value
            back = mapped.flatten(2).transpose(1, 2)
            return torch.cat([out[:, : grid.skip], back], 1)

        handle = module.register_forward_hook(through_grid)
        try:
            yield grid
        finally:
            handle.remove()


class TokenGrid(nn.Module):
    """Patch tokens N×(skip+h·w)×D as an N×D×h×w map (the class token left aside)."""

    def __init__(self, skip: int, h: int, w: int):
        super().__init__()
        self.skip, self.h, self.w = skip, h, w

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.skip :]
        return patches.transpose(1, 2).reshape(len(tokens), -1, self.h, self.w)


def spatial_layers(model: nn.Module, x: torch.Tensor) -> list[SpatialLayer]:
    """Modules with a spatial output, in the order they finish in one forward pass on ``x``.

    Global pooling (H = W = 1), the input passed through unchanged in shape (a normalization
    layer) and modules called more than once (their map is ambiguous) are left out. One
    backward pass from the top class score says which maps it depends on: a transformer's
    patch tokens after the last attention only feed themselves, not the class token.
    """
    found: dict[str, list] = {}
    order: list[str] = []

    def keep(name):
        def hook(module, inputs, out):
            if name in found:
                found[name][0] = None  # called twice
                return
            order.append(name)
            found[name] = [out if torch.is_tensor(out) else None, isinstance(module, nn.LayerNorm)]
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n]
    try:
        with torch.enable_grad():
            scores = model(x.detach().clone().requires_grad_())
            # Gradients of the maps only: a backward() would also compute every weight's gradient.
            maps = {n: v[0] for n, v in found.items() if v[0] is not None and v[0].requires_grad}
            score = scores[torch.arange(len(x)), scores.argmax(1)].sum()
            grads = dict(zip(maps, torch.autograd.grad(score, list(maps.values()), allow_unused=True)))
    finally:
        for h in handles:
            h.remove()
    layers = []
    for name in order:
        out, is_norm = found[name]
        if out is None or out.shape[1:] == x.shape[1:]:
            continue
        grad = grads.get(name)
        if out.dim() == 4 and min(out.shape[-2:]) > 1:
            layer = SpatialLayer(name, tuple(out.shape[1:]), is_norm=is_norm)
        elif out.dim() == 3 and out.shape[1] > 4:
            layer = SpatialLayer(name, tuple(out.shape[1:]), tokens=True, is_norm=is_norm)
            try:
                skip = layer.grid[0]
            except ValueError:
                continue
            grad = None if grad is None else grad[:, skip:]
        else:
            continue
        layer.has_gradient = grad is not None and bool(grad.abs().sum() > 0)
        layers.append(layer)
    return layers


def pick_layer(model: nn.Module | None, found: list[SpatialLayer], name: str) -> SpatialLayer:
    """The named layer, else the last map the score depends on (for tokens: the last norm layer)."""
    if name:
        # An imported run's model sits inside xdl's wrapper as ``model``; its own names work too.
        match = [f for f in found if name in (f.name, f"model.{f.name}") or f.name == f"model.{name}"]
        if not match:
            names = ", ".join(f.name for f in found) or "none"
            raise XdlError(f"this model has no spatial layer named {name!r}; its candidates are: {names}")
        return match[0]
    live = [f for f in found if f.has_gradient]
    if not live:
        raise XdlError(f"gradcam does not apply to {NO_SPATIAL_LAYER}")
    if live[-1].tokens:
        # pytorch-grad-cam's choice for ViT/DeiT/Swin: the last block's first norm (blocks[-1].norm1).
        norms = [f for f in live if f.tokens and f.is_norm]
        return norms[-1] if norms else live[-1]
    return live[-1]


@dataclass
class OcclusionParams:
    window: int | None = None  # side of the occluding patch; default: see occlusion_window
    stride: int | None = None  # default 1 up to 32-pixel images, else half the window
    fill: float = 0.0  # the value the patch is filled with, in input units

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        at_most("window", self.window, 4096)
        at_most("stride", self.stride, 4096)


def occlusion_window(x: torch.Tensor, window: int | None, stride: int | None) -> tuple[int, int]:
    """The patch side and stride, defaults filled in for ``x``'s size.

    Up to 32×32 a 3-pixel patch moved one pixel at a time (a digit stroke's width). Beyond,
    a fixed 3-pixel patch would mean (side−2)² forward passes per image — 49,284 at 224 px —
    and hide nothing a real-size model notices, so the patch grows with the image (a 14×14
    grid of patches: 16 px at 224, as in captum's ImageNet tutorial) and moves half its side.
    """
    if x.dim() != 4:
        return window or 1, stride or 1
    side = min(x.shape[-2:])
    if side <= 32:
        return window or 3, stride or 1
    window = window or math.ceil(side / 14)
    return window, stride or max(1, window // 2)


class Occlusion(Attribution):
    """Score drop when a sliding patch hides part of the input (Zeiler & Fergus, 2014)."""

    Params = OcclusionParams

    @classmethod
    def passes(cls, params, shape) -> float | None:
        """Forward passes only: one per patch position, and the unoccluded one."""
        if len(shape) != 3:
            return (shape[0] + 1) / 3
        window, stride = occlusion_window(torch.empty(1, *shape), params.window, params.stride)
        positions = [(side - window) // stride + 1 for side in shape[-2:]]
        return (positions[0] * positions[1] + 1) / 3
    description = "score drop when a sliding patch of the input is hidden"
    guide = (
        "How much the score drops when each patch is covered (Zeiler & Fergus 2014): a direct, model-agnostic"
        " test. Large drops off the object, or none anywhere, are worrying; results depend on the patch size "
        "and fill value."
    )
    check_params = {"window": 2, "stride": 2}

    def attribute(self, ctx, x, target, params):
        from captum.attr import Occlusion as CaptumOcclusion

        window, stride = occlusion_window(x, params.window, params.stride)
        if x.dim() == 4:
            if window > min(x.shape[-2:]):
                raise XdlError(f"occlusion window {window} is larger than the {x.shape[-2]}×{x.shape[-1]} image")
            shape, strides = (x.shape[1], window, window), (x.shape[1], stride, stride)
        else:
            if window > x.shape[1]:
                raise XdlError(f"occlusion window {window} is larger than the {x.shape[1]} features")
            shape, strides = (window,), (stride,)
        if stride > window:
            raise XdlError(f"occlusion stride {stride} is larger than the window {window}: some inputs would never be hidden")
        return CaptumOcclusion(ctx.model).attribute(
            x, sliding_window_shapes=shape, strides=strides, baselines=params.fill, target=target,
            perturbations_per_eval=max(1, forward_budget(ctx, len(x)) // len(x)),
        )


@dataclass
class DeepLiftParams:
    baseline: Baseline = "zeros"


class DeepLift(Attribution):
    """Contributions relative to a baseline, propagated by the rescale rule (Shrikumar et al., 2017).

    DeepLIFT's rules hook every nonlinearity, which common architectures defeat: an
    in-place ReLU is rewritten (made out-of-place for the call); a module used twice per
    pass, or an in-place residual ``+=`` that captum's hooks cannot follow, makes xdl fall
    back to integrated gradients from the same baseline, with a warning.
    """

    Params = DeepLiftParams
    description = "DeepLIFT (rescale rule) relative to a zeros, blurred or mean baseline"
    guide = (
        "Contributions of each input relative to the baseline (Shrikumar et al. 2017); they should sum to the"
        " score difference. A convergence gap as large as the attributions themselves means the rule does not"
        " hold for this architecture: trust IG instead."
    )

    def run(self, ctx: Context, params) -> Result:
        self.why = deeplift_obstacle(ctx.model, ctx.x[:1].to(ctx.device))
        before = self.why
        result = super().run(ctx, params)
        if self.why != before:  # DeepLIFT failed on some batch: every sample falls back alike
            result = super().run(ctx, params)
        if self.why:
            result.warnings.append(
                f"DeepLIFT cannot handle this model ({self.why}); used integrated gradients "
                f"({FALLBACK_STEPS} steps) from the same baseline instead"
            )
            result.params["fallback"] = "ig"
        return result

    def attribute(self, ctx, x, target, params):
        from captum.attr import DeepLift as CaptumDeepLift, IntegratedGradients as CaptumIG

        reference = baseline(ctx, x, params.baseline)
        if not hasattr(self, "why"):  # called on its own, batch by batch (the trust report does)
            self.why = deeplift_obstacle(ctx.model, x[:1].detach())
        if self.why:
            return CaptumIG(ctx.model).attribute(
                x, baselines=reference, target=target, n_steps=FALLBACK_STEPS,
                internal_batch_size=forward_budget(ctx, len(x)), return_convergence_delta=True,
            )
        with warnings.catch_warnings(), out_of_place(ctx.model), hooks_restored(ctx.model):
            # captum announces, on every call, that it hooks the activations and removes the hooks again.
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks", category=UserWarning)
            try:
                return CaptumDeepLift(ctx.model).attribute(
                    x, baselines=reference, target=target, return_convergence_delta=True
                )
            except RuntimeError as exc:  # e.g. an in-place ``+=`` on a hooked output
                self.why = first_sentence(exc)
        return self.attribute(ctx, x, target, params)


FALLBACK_STEPS = 50  # integrated gradients' steps when DeepLIFT cannot run (captum's default)


def first_sentence(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(". ")[0][:200]


def deeplift_obstacle(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why DeepLIFT's per-module rules cannot follow this model, found in one forward pass; None if they can.

    A module with no submodules called more than once per pass (one ReLU reused, as in
    torchvision's ResNet blocks) keeps only its last input and output, so its rule would
    use the wrong ones: captum refuses, and shap silently misattributes.
    """
    calls: dict[str, int] = {}
    leaves = [(n, m) for n, m in model.named_modules() if n and not any(m.children())]

    def count(name):
        def hook(*_):
            calls[name] = calls.get(name, 0) + 1
        return hook

    handles = [m.register_forward_hook(count(n)) for n, m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    reused = [(n, c) for n, c in calls.items() if c > 1]
    return f"module {reused[0][0]!r} is called {reused[0][1]} times per forward pass" if reused else None


@contextlib.contextmanager
def out_of_place(model: nn.Module):
    """In-place activations made out-of-place for the call (DeepLIFT's hooks need their inputs intact)."""
    flipped = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in flipped:
        m.inplace = False
    try:
        yield model
    finally:
        for m in flipped:
            m.inplace = True


@contextlib.contextmanager
def hooks_restored(model: nn.Module):
    """Remove any hook a library left on the model when it failed half-way (shap, captum)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    before = {(id(m), k): set(getattr(m, k, {})) for m in model.modules() for k in kinds}
    try:
        yield model
    finally:
        for m in model.modules():
            for k in kinds:
                hooks = getattr(m, k, None)
                for key in [key for key in (hooks or {}) if key not in before.get((id(m), k), set())]:
                    del hooks[key]
