"""SHAP values: expected gradients (default for images), DeepSHAP, or KernelSHAP (tabular).

Expected gradients follow ``shap.GradientExplainer``: for each sample draw background
references r and points t ~ U(0, 1); the attribution is the mean of
``(x - r) * ∂f_target/∂x`` at ``r + t (x - r)``. shap loops over samples and explains
every class; here all draws of a batch of samples go through the model at once and only
the target class's output is differentiated. The draws are also stratified (below), so 50
of them match shap's 200 independent ones: fewer model evaluations at the same fidelity.

    >>> result = xdl.explain(run, "shap", samples=8, params={"background": 50})  # doctest: +SKIP
    >>> result.arrays["shap"].shape, result.metrics["additivity_relative_gap"]   # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from xdl.analysis.base import Analyzer, Context, Result, figures_wanted
from xdl.errors import XdlError
from xdl.limits import at_most

# Points per gradient batch, as a multiple of --batch-size: large enough to keep a device
# busy, small enough that a small CNN's activations for MNIST-sized inputs fit in memory.
POINTS_PER_BATCH = 4
# Stratified draws per sample by default. On the default CNN and real MNIST digits
# (benchmarks/bench_explain.py, 20 images), 50 stratified draws correlate with shap's
# 200-draw result at median 0.97, min 0.94 per image (a rerun of shap itself: 0.98, 0.97;
# shap with 50 i.i.d. draws: 0.96, 0.92) at a quarter of the model evaluations.
STRATIFIED_DRAWS = 50


@dataclass
class ShapParams:
    method: Literal["auto", "gradient", "deep", "kernel"] = "auto"  # auto: gradient for images, kernel for tables
    background: int = 100  # training samples drawn as references (gradient, deep)
    clusters: int = 10  # k-means centres summarizing the training split (kernel)
    nsamples: int | None = None  # draws per sample (gradient: 50 stratified, or 200 iid as shap) or coalitions (kernel: shap's "auto")
    sampling: Literal["stratified", "iid"] = "stratified"  # gradient: how references and path points are drawn
    all_classes: bool = False  # explain every class instead of only the target

    def __post_init__(self) -> None:
        for name in ("background", "clusters", "nsamples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        at_most("background", self.background, 100_000)
        at_most("clusters", self.clusters, 10_000)
        at_most("nsamples", self.nsamples, 1_000_000)


def require_classifier(ctx: Context) -> int:
    """The model's output count; SHAP and LIME explain one class score among several."""
    with torch.no_grad():
        outputs = ctx.model(ctx.x[:1].to(ctx.device)).shape[-1]
    if outputs < 2:
        raise XdlError(f"this method explains one class among several, but the model has {outputs} output")
    return outputs


class Shap(Analyzer):
    """SHAP attributions of the target class, per input feature (per original column for tables)."""

    kind = "explain"
    Params = ShapParams
    samples = 16
    sharding = "samples"
    description = "SHAP values: expected gradients or DeepSHAP (images), KernelSHAP (tables)"
    guide = (
        "Each value is a feature's share of the gap between this prediction and the average one (Lundberg & "
        "Lee 2017). Shares that do not add up (the additivity gap) or that concentrate on features a person "
        "knows to be irrelevant are worrying."
    )
    check_params = {"background": 8, "clusters": 4, "nsamples": 16}

    @classmethod
    def attributions(cls, result: Result, x: torch.Tensor) -> np.ndarray | None:
        found, target = result.arrays.get("shap"), result.arrays.get("target")
        if found is not None and target is not None and found.ndim == x.dim() + 1:  # all_classes: N×K×<input>
            found = found[np.arange(len(found)), target]
        return found if found is not None and tuple(found.shape) == tuple(x.shape) else None

    @classmethod
    def passes(cls, params: ShapParams, shape) -> float | None:
        if len(shape) != 3 or params.method == "kernel":
            return None  # KernelSHAP on tables: shap's own sampling, and tables are cheap
        return float(params.nsamples or (STRATIFIED_DRAWS if params.sampling == "stratified" else 200))

    def run(self, ctx: Context, params: ShapParams) -> Result:
        outputs = require_classifier(ctx)
        method = params.method if params.method != "auto" else ("gradient" if ctx.kind == "image" else "kernel")
        if method == "kernel" and ctx.kind != "tabular":
            raise XdlError("method=kernel is for tabular runs; use method=gradient or method=deep for images")
        result = self.result()
        target = ctx.targets()
        classes = torch.arange(outputs)[:, None].expand(-1, len(ctx.x)) if params.all_classes else target[None]
        if method == "kernel":
            background = kernel_background(ctx, params.clusters)
            values, expected = kernel_shap(ctx, background, params.nsamples, classes)
            reference = torch.as_tensor(background.data, dtype=torch.float32)
        else:
            reference = draw_background(ctx, params.background, result)
            values = deep_shap(ctx, reference, classes) if method == "deep" else None
            if isinstance(values, str):
                result.warnings.append(f"DeepSHAP cannot handle this model ({values}); used expected gradients instead")
                method = "gradient"
            if method == "gradient":
                draws = params.nsamples or (STRATIFIED_DRAWS if params.sampling == "stratified" else 200)
                found = [expected_gradients(ctx, reference, c, draws, params.sampling) for c in classes]
                values = torch.stack([v for v, _ in found])
                result.metrics.update(draws=draws, **reliability_metrics(torch.stack([h for _, h in found])))
            expected = mean_output(ctx, reference)
        gap, relative = additivity(ctx, values, classes, expected)
        result.params["method"] = method
        result.metrics.update(
            additivity_mean_abs_gap=gap, additivity_relative_gap=relative, background=len(reference),
            mean_abs_attribution=float(values.abs().mean()),
        )
        # The target class's values: what the figure and tables show, also when every class was explained.
        explained = values[target, torch.arange(len(target))] if params.all_classes else values[0]
        # shap: N×<input> for the target class, N×K×<input> with all_classes
        result.arrays.update(shap=values.movedim(0, 1).numpy() if params.all_classes else explained.numpy(),
                             target=target.numpy())
        result.summary = (
            f"SHAP ({method}) for {len(ctx.x)} samples; attributions sum to f(x) - E[f(background)] "
            f"within {relative:.1%} on average"
        )
        if ctx.kind == "tabular":
            tabular_outputs(ctx, explained.numpy(), expected[target].numpy(), result)
        elif figures_wanted():
            from xdl.plotting import attribution_grid

            titles = [f"class {ctx.class_names[t] if ctx.class_names else t}" for t in target.tolist()]
            result.add_figure("shap", attribution_grid(ctx.x.numpy(), explained.numpy(), titles))
        return result


def draw_background(ctx: Context, size: int, result: Result) -> torch.Tensor:
    """``size`` training samples drawn with the run's seed (the samples themselves for a bare model)."""
    pool = ctx.data.train.x if ctx.data is not None else ctx.x
    if ctx.data is None:
        result.warnings.append("no training split (bare model): the explained samples serve as background")
    if size > len(pool):
        # The default must not fail a small data set (an audit of 24 photos); a size asked for must fit.
        if size != ShapParams.background:
            raise XdlError(f"background={size} is larger than the training split ({len(pool)} samples)")
        result.warnings.append(f"background: all {len(pool)} training samples (fewer than the default {size})")
        size = len(pool)
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(ctx.seed))[:size]
    return pool[pick]


def expected_gradients(ctx: Context, background: torch.Tensor, target: torch.Tensor, draws: int,
                       sampling: str = "stratified") -> tuple[torch.Tensor, torch.Tensor]:
    """shap.GradientExplainer's estimate, batched over samples and draws, for one class per sample.

    Returns the attributions and, per sample, the correlation between the estimates from the
    even and the odd draws (split-half), which says how far from converged the estimate is.
    ``stratified`` draws the references without replacement (every background sample once
    per cycle through the background) and the path points t one per stratum [k/K, (k+1)/K),
    paired at random: each draw is still a uniform reference and a uniform t, so the mean is
    unbiased, but the sampling noise of both shrinks — most of it, on image models, comes
    from which references were drawn.
    """
    out, halves = [], []
    size = len(background)
    model = ctx.fast_model()
    for s in ctx.batches(batch_size=ctx.samples_per_call(draws, POINTS_PER_BATCH)):
        x = ctx.x[s].to(ctx.device)
        n = len(x)
        drawn = [_draws(ctx.seed, i, draws, size, sampling) for i in range(s.start, s.stop)]
        pick, alpha = torch.stack([d[0] for d in drawn]), torch.stack([d[1] for d in drawn])
        alpha = alpha.view((n, draws) + (1,) * (x.dim() - 1))
        classes = target[s].to(ctx.device)
        # Draws in chunks that keep each model call within ctx.rows(): one 224 px sample's 200
        # draws in a single ResNet-50 call held 17 GB of activations.
        even, odd = torch.zeros_like(x), torch.zeros_like(x)
        chunk = max(1, ctx.rows() // n)
        for first in range(0, draws, chunk):
            ref = background[pick[:, first:first + chunk]].to(ctx.device)
            k = ref.shape[1]
            delta = x[:, None] - ref
            points = (ref + alpha[:, first:first + k].to(ctx.device) * delta).flatten(0, 1).requires_grad_(True)
            picked = model(points).gather(1, classes.repeat_interleave(k)[:, None])
            (grad,) = torch.autograd.grad(picked.sum(), points)
            terms = (grad.view_as(delta) * delta).detach()
            is_even = (torch.arange(first, first + k) % 2 == 0).to(ctx.device)
            even += terms[:, is_even].sum(1)
            odd += terms[:, ~is_even].sum(1)
        out.append(((even + odd) / draws).cpu())
        # Split half: the even and the odd draws' estimates (sums: the correlation ignores scale).
        halves.append(row_correlation(even, odd).cpu())
    return torch.cat(out), torch.cat(halves)


def _draws(seed: int, position: int, draws: int, size: int, sampling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``position``'s references (indices into the background) and path points t.

    Each sample has its own CPU generator, seeded by the seed and its position: its draws
    do not depend on the device, the batch size or how memory splits the work.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + position) % 2**63)
    if sampling == "stratified":
        cycles = -(-draws // size)
        pick = torch.argsort(torch.rand(cycles, size, generator=g), -1).flatten()[:draws]
        return pick, (torch.argsort(torch.rand(draws, generator=g)) + torch.rand(draws, generator=g)) / draws
    return torch.randint(size, (draws,), generator=g), torch.rand(draws, generator=g)


def row_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each sample's flattened a with its b (nan-free: 0 for a constant)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)).float()


def reliability_metrics(split_half: torch.Tensor) -> dict[str, float]:
    """Split-half correlations and, by the Spearman–Brown formula, the estimated correlation
    of the full estimate with its converged value (sqrt of the full-length reliability)."""
    r = split_half.flatten().clamp(-1, 1)
    converged = torch.sqrt((2 * r / (1 + r)).clamp(0, 1))
    return {
        "split_half_correlation_median": float(r.median()), "split_half_correlation_min": float(r.min()),
        "estimated_correlation_with_converged_median": float(converged.median()),
        "estimated_correlation_with_converged_min": float(converged.min()),
    }


def deep_shap(ctx: Context, background: torch.Tensor, classes: torch.Tensor) -> torch.Tensor | str:
    """shap.DeepExplainer's values for the given classes, or why its rules do not fit the model.

    In-place activations are made out-of-place for the call. A module called twice per pass
    is refused up front (shap would silently misattribute it); an in-place residual ``+=``
    or a functional activation shows up as an error or as values no longer summing to
    f(x) - E[f(b)] (shap's additivity check). Either way the caller falls back to expected
    gradients rather than fail, and shap's hooks are removed even when it stopped half-way.
    """
    import shap

    from xdl_plugins.saliency import deeplift_obstacle, first_sentence, hooks_restored, out_of_place

    why = deeplift_obstacle(ctx.model, ctx.x[:1].to(ctx.device))
    if why:
        return why
    try:
        with warnings.catch_warnings(), out_of_place(ctx.model), hooks_restored(ctx.model):
            warnings.filterwarnings("ignore", category=UserWarning)  # shap's notes on unrecognized modules
            values = shap.DeepExplainer(ctx.model, background.to(ctx.device)).shap_values(ctx.x.to(ctx.device))
    except (RuntimeError, AssertionError) as exc:  # AssertionError is shap's additivity check
        return first_sentence(exc).split("!")[0]
    values = torch.as_tensor(np.asarray(values), dtype=torch.float32)  # N×…×K
    return values.movedim(-1, 0)[classes, torch.arange(values.shape[0])]


def kernel_background(ctx: Context, clusters: int):
    """shap.kmeans of the training split (values rounded to real ones, so one-hots stay one-hot)."""
    import shap

    train = ctx.data.train.x if ctx.data is not None else ctx.x
    if clusters > len(train):
        raise XdlError(f"clusters={clusters} is larger than the training split ({len(train)} samples)")
    return shap.kmeans(train.numpy().astype(np.float64), clusters)


def kernel_shap(ctx: Context, background, nsamples: int | None, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """shap.KernelExplainer on the model's logits; returns values per class row and E[f(background)]."""
    import shap

    @torch.no_grad()
    def logits(a: np.ndarray) -> np.ndarray:
        a = torch.as_tensor(a, dtype=torch.float32)
        return torch.cat([ctx.model(a[s].to(ctx.device)).cpu() for s in ctx.batches(len(a), 16 * ctx.batch_size)]).numpy()

    explainer = shap.KernelExplainer(logits, background)
    values = explainer.shap_values(ctx.x.numpy(), nsamples=nsamples or "auto", silent=True)  # N×F×K
    values = torch.as_tensor(np.asarray(values), dtype=torch.float32).permute(2, 0, 1)
    picked = values.gather(0, classes[:, :, None].expand(-1, -1, values.shape[-1]))
    return picked, torch.as_tensor(np.asarray(explainer.expected_value), dtype=torch.float32)


@torch.no_grad()
def mean_output(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """E[f(x)] over a set of inputs: the model's logits averaged, one per class."""
    return torch.cat([ctx.model(x[s].to(ctx.device)).cpu() for s in ctx.batches(len(x))]).mean(0)


@torch.no_grad()
def additivity(ctx: Context, values: torch.Tensor, classes: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Mean |sum φ - (f(x) - E[f(b)])| and that gap relative to mean |f(x) - E[f(b)]|.

    Exact for KernelSHAP and DeepSHAP; expected gradients meet it only in expectation.
    """
    fx = torch.cat([ctx.model(ctx.x[s].to(ctx.device)).cpu() for s in ctx.batches()])
    change = fx.T.gather(0, classes) - expected[classes]
    gap = (values.flatten(2).sum(-1) - change).abs().mean()
    return float(gap), float(gap / change.abs().mean().clamp_min(1e-12))


def tabular_outputs(ctx: Context, values: np.ndarray, base: np.ndarray, result: Result) -> None:
    """Values per original column, a table, and shap's own bar summary and waterfall."""
    import matplotlib

    matplotlib.use("Agg")  # shap's plots draw through pyplot; a headless CLI must never open a window
    import matplotlib.pyplot as plt
    import shap

    columns = ctx.encoding.sum_to_columns(values) if ctx.encoding else values
    names = ctx.encoding.original_names if ctx.encoding else ctx.feature_names or [f"x{i}" for i in range(values.shape[1])]
    result.arrays["shap_columns"] = columns
    result.tables["shap_columns"] = [
        {"column": n, "mean_abs_shap": float(v)} for n, v in zip(names, np.abs(columns).mean(0))
    ]
    explanation = shap.Explanation(values=columns, base_values=base, feature_names=list(names))
    shap.plots.bar(explanation, show=False)
    result.add_figure("shap_bar", plt.gcf())
    shap.plots.waterfall(explanation[0], show=False)
    result.add_figure("shap_waterfall", plt.gcf())
