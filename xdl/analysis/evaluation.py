"""Can this explanation be trusted? Faithfulness, sanity checks and agreement for any attribution method.

The metrics know no method: they take a model, inputs, targets and attributions shaped
like the inputs, and — where an explanation must be recomputed — an :data:`Explainer`,
a callable ``(model, x, targets) -> attributions``. ``xdl explain --evaluate`` applies
them to one method (:func:`evaluate`); the ``trust`` report applies them to several
and ranks them.

- **Deletion / insertion** (Petsiuk et al., "RISE", 2018): the pixels (all channels of
  one position) or tabular features are ordered by *signed* attribution, most positive
  first — the evidence *for* the target class; for non-negative maps (saliency, Grad-CAM)
  that is the order of |attribution|. Deletion replaces them with a fill value step by
  step and follows the target-class probability (lower AUC is better); insertion starts
  from the fill and puts them back (higher is better). The same curves for random
  orders, averaged over a few seeds, are the baseline a method must beat.
- **Sanity check** (Adebayo et al., "Sanity checks for saliency maps", 2018): re-initialize
  the layers of a copy of the model from the output toward the input, one more at a
  time, and compare each new explanation with the original by the Spearman rank
  correlation of |attribution|. Maps that survive randomizing the whole model explain
  the input, not the model.
- **Infidelity and sensitivity** (Yeh et al., 2019) through ``captum.metrics``.

    >>> from xdl.analysis.evaluation import faithfulness, spearman               # doctest: +SKIP
    >>> curves = faithfulness(model, x, targets, attributions, torch.zeros_like(x))
    >>> curves.aucs()["deletion_auc"], curves.aucs()["random_deletion_auc"]
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from xdl.analysis.base import Analyzer, Context, Result, analyze, without_figures
from xdl.errors import XdlError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# (model, x, targets) -> attributions shaped like x, for the given target class per sample.
Explainer = Callable[[nn.Module, torch.Tensor, torch.Tensor], np.ndarray]

STEPS = 20  # points on a deletion/insertion curve after the start: 5% of the pixels per step
RANDOM_ORDERS = 3  # seeded random orders averaged into the baseline curve
# Adebayo et al. call a map that keeps its ranking on a randomized model a failure; a rank
# correlation above 0.5 with the trained model's map means most of it survived.
SANITY_THRESHOLD = 0.5
# Infidelity's Gaussian perturbation, in input units (10% of an image's [0, 1] range): large
# enough to move a small classifier's output measurably, which captum's tutorial's 0.003 is not.
INFIDELITY_NOISE = 0.1
SENSITIVITY_RADIUS = 0.02  # captum's default L∞ radius for sensitivity_max
PERTURBATIONS = 10  # captum's default n_perturb_samples for both metrics
BATCHES_PER_PASS = 4  # perturbed copies per forward pass, in multiples of --batch-size


# -----------------------------------------------------------------------------------------
# Faithfulness: deletion and insertion curves
# -----------------------------------------------------------------------------------------


def unit_scores(attributions: torch.Tensor | np.ndarray, order: Literal["signed", "abs"] = "signed") -> torch.Tensor:
    """Importance per removable unit (N×F): per pixel, channels summed, for images; per feature otherwise."""
    a = torch.as_tensor(np.asarray(attributions), dtype=torch.float32)
    if order == "abs":
        a = a.abs()
    return (a.sum(1) if a.dim() == 4 else a).flatten(1)


def removal_positions(scores: torch.Tensor) -> torch.Tensor:
    """Where each unit comes in the removal order (0: first), highest score first; ties keep index order."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices.argsort(dim=1)


@torch.no_grad()
def perturbation_curves(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor, fill: torch.Tensor,
    steps: int = STEPS, mode: Literal["deletion", "insertion"] = "deletion", budget: int = 1024,
) -> torch.Tensor:
    """Target-class probability after each step (N×(steps+1)), every step of a chunk in one forward pass.

    Step k has the first round(k·F/steps) units of each sample's order replaced by ``fill``
    (deletion) or kept while all others are (insertion). ``budget`` bounds the images per pass.
    """
    device = next(model.parameters(), torch.empty(0)).device
    units = positions.shape[1]
    counts = torch.linspace(0, units, steps + 1).round().long().to(device)
    unit_shape = (1, *x.shape[2:]) if x.dim() == 4 else tuple(x.shape[1:])  # a pixel is all its channels
    fill = fill.expand_as(x)
    chunk = max(1, budget // (steps + 1))
    curves = []
    for start in range(0, len(x), chunk):
        s = slice(start, start + chunk)
        xs, fs, pos = x[s].to(device), fill[s].to(device), positions[s].to(device)
        hidden = pos[None] < counts[:, None, None]  # (steps+1)×B×F: units replaced at each step
        if mode == "insertion":
            hidden = ~hidden
        mask = hidden.view(steps + 1, len(xs), *unit_shape)
        probs = torch.softmax(model(torch.where(mask, fs[None], xs[None]).flatten(0, 1)).float(), 1)
        probs = probs.view(steps + 1, len(xs), -1)
        curves.append(probs[:, torch.arange(len(xs), device=device), targets[s].to(device)].T.cpu())
    return torch.cat(curves)


@dataclass
class Curves:
    """Deletion/insertion curves (N×(steps+1) target probabilities) and their random-order baselines."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    random_deletion: np.ndarray
    random_insertion: np.ndarray

    def aucs(self) -> dict[str, float]:
        """Mean area under each curve over the fraction of units removed (trapezoid rule)."""
        return {
            f"{name}_auc": float(np.trapezoid(getattr(self, name), self.fractions, axis=1).mean())
            for name in ("deletion", "random_deletion", "insertion", "random_insertion")
        }


def faithfulness(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, attributions: torch.Tensor | np.ndarray,
    fill: torch.Tensor, steps: int = STEPS, orders: int = RANDOM_ORDERS, seed: int = 0,
    order: Literal["signed", "abs"] = "signed", budget: int = 1024,
) -> Curves:
    """Deletion and insertion curves for ``attributions`` and for ``orders`` seeded random orders."""
    if steps < 1 or orders < 1:
        raise XdlError(f"steps and random orders must be >= 1, got {steps} and {orders}")
    scores = unit_scores(attributions, order)
    positions = removal_positions(scores)
    g = torch.Generator().manual_seed(seed)
    shuffled = [removal_positions(torch.rand(scores.shape, generator=g)) for _ in range(orders)]

    def curve(pos: torch.Tensor, mode: str) -> np.ndarray:
        return perturbation_curves(model, x, targets, pos, fill, steps, mode, budget).numpy()

    return Curves(
        fractions=np.linspace(0, 1, steps + 1),
        deletion=curve(positions, "deletion"),
        insertion=curve(positions, "insertion"),
        random_deletion=np.mean([curve(p, "deletion") for p in shuffled], 0),
        random_insertion=np.mean([curve(p, "insertion") for p in shuffled], 0),
    )


def fill_value(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """What a removed unit becomes: black for images, the training mean for tables (the samples' without one)."""
    if x.dim() == 4:
        return torch.zeros_like(x[:1])
    source = ctx.data.train.x if ctx.data is not None else ctx.x
    return source.mean(0, keepdim=True).to(x)


# -----------------------------------------------------------------------------------------
# Rank correlation
# -----------------------------------------------------------------------------------------


def spearman(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Spearman's rho between ``a[i]`` and ``b[i]`` for each sample i (ties share their mean rank).

    The same value as ``scipy.stats.spearmanr(a[i].ravel(), b[i].ravel())``, for all rows at
    once; NaN where a row is constant (a rank correlation is undefined there).
    """
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise XdlError(f"cannot correlate attributions of shapes {a.shape} and {b.shape}")
    ra, rb = (rankdata(v.reshape(len(v), -1), axis=1) for v in (a, b))
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denominator = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(1) / denominator, np.nan)


def map_similarity(original: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """Spearman rho of |attribution| per sample, for the sanity checks.

    A changed map that is constant (a model whose output no longer depends on the input
    has zero gradients everywhere) keeps none of the original ranking: rho 0, not undefined.
    Only a constant *original* map leaves the comparison undefined (NaN).
    """
    original, changed = np.abs(np.asarray(original)), np.abs(np.asarray(changed))
    rho = spearman(original, changed)
    flat = changed.reshape(len(changed), -1)
    return np.where(np.isnan(rho) & (flat == flat[:, :1]).all(1) & ~np.isnan(spearman(original, original)), 0.0, rho)


def mean_or_none(values: np.ndarray) -> float | None:
    """The mean of the defined values; None (JSON null) when none is defined."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


# -----------------------------------------------------------------------------------------
# Sanity check: cascading model-parameter randomization
# -----------------------------------------------------------------------------------------


def parameterized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with parameters of their own, from the output toward the input (reverse registration order)."""
    return [(n, m) for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None][::-1]


def randomize(module: nn.Module, seed: int) -> None:
    """Re-initialize one layer as at construction, from ``seed``, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
        else:  # a custom layer without an initializer: small Gaussian weights, as nn.init would draw them
            for p in module.parameters(recurse=False):
                nn.init.normal_(p, std=0.02)


def randomized_copies(model: nn.Module, seed: int = 0, steps: int | None = None) -> Iterator[tuple[str, nn.Module]]:
    """One CPU copy of ``model`` with one more layer re-initialized at each step, top layer first.

    The same copy is yielded each time (the cascade is cumulative); ``model`` is never touched.
    Randomizing on the CPU makes a seed give the same weights on every device. With ``steps``
    below the layer count, the layers go in that many contiguous groups (as Adebayo et al.
    randomize Inception v3 by blocks): one explanation per step, not per layer, on a deep model.
    """
    randomized = copy.deepcopy(model).cpu()
    layers = parameterized_layers(randomized)
    count = len(layers) if steps is None else min(steps, len(layers))
    ends = {round((k + 1) * len(layers) / count) - 1 for k in range(count)} if count else set()
    for i, (name, module) in enumerate(layers):
        randomize(module, seed + i)
        if i in ends:
            yield name, randomized


def cascading_randomization(
    model: nn.Module, explain: Explainer, x: torch.Tensor, targets: torch.Tensor,
    original: np.ndarray | None = None, seed: int = 0, steps: int | None = None,
) -> list[dict[str, Any]]:
    """Per cascade step: the last layer randomized, how many are, and the mean :func:`map_similarity`
    with the original.

    The last row is the fully randomized model. ``original`` saves recomputing the trained
    model's attributions when the caller has them; ``steps`` groups the layers (see
    :func:`randomized_copies`).
    """
    original = explain(model, x, targets) if original is None else np.asarray(original)
    names = [name for name, _ in parameterized_layers(model)]
    rows = []
    for name, randomized in randomized_copies(model, seed, steps):
        rho = map_similarity(original, explain(randomized, x, targets))
        rows.append({"layer": name, "layers_randomized": names.index(name) + 1, "spearman": mean_or_none(rho)})
    return rows


def passes_sanity(rows: list[dict[str, Any]]) -> bool | None:
    """Whether the map changed on the fully randomized model; None when that could not be measured."""
    final = rows[-1]["spearman"] if rows else None
    return None if final is None else final < SANITY_THRESHOLD


# -----------------------------------------------------------------------------------------
# captum.metrics: infidelity and sensitivity
# -----------------------------------------------------------------------------------------


def infidelity(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, attributions: np.ndarray | torch.Tensor,
    noise: float = INFIDELITY_NOISE, perturbations: int = PERTURBATIONS, seed: int = 0, budget: int = 1024,
) -> np.ndarray:
    """captum's infidelity per sample, with Gaussian perturbations and attributions rescaled optimally.

    ``normalize=True`` makes it compare the *shape* of an explanation with the output's
    change, so methods on different scales (logits, probabilities, superpixel weights) compare.
    """
    from captum.metrics import infidelity as captum_infidelity

    device = next(model.parameters(), torch.empty(0)).device
    g = torch.Generator().manual_seed(seed)

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = (noise * torch.randn(inputs.shape, generator=g)).to(inputs)
        return delta, inputs - delta

    attr = torch.as_tensor(np.asarray(attributions), dtype=torch.float32).to(device)
    return captum_infidelity(
        model, perturb, x.to(device), attr, target=targets.to(device), n_perturb_samples=perturbations,
        max_examples_per_batch=min(max(1, budget // max(1, len(x))), perturbations) * len(x), normalize=True,
    ).cpu().numpy()


def sensitivity(
    model: nn.Module, explain: Explainer, x: torch.Tensor, targets: torch.Tensor,
    radius: float = SENSITIVITY_RADIUS, perturbations: int = PERTURBATIONS, seed: int = 0,
) -> np.ndarray:
    """captum's sensitivity_max per sample: the largest relative change of the explanation within ``radius``."""
    from captum.metrics import sensitivity_max

    g = torch.Generator().manual_seed(seed)

    def perturb(inputs: torch.Tensor, perturb_radius: float = radius) -> torch.Tensor:
        # A generator of our own: the explainer reseeds the global RNG on every call.
        noise = torch.rand(inputs.shape, generator=g).to(inputs) * 2 * perturb_radius - perturb_radius
        return inputs + noise

    def explanation(inputs: torch.Tensor | tuple[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor]:
        # captum passes the inputs as a tuple, the perturbed inputs as a tensor, and wants a tuple
        # back; it calls this under no_grad, and gradient methods need autograd.
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        with torch.enable_grad():
            return (torch.as_tensor(explain(model, x.detach().cpu(), target.cpu())),)

    return sensitivity_max(
        explanation, (x,), perturb_func=perturb, perturb_radius=radius, n_perturb_samples=perturbations,
        max_examples_per_batch=perturbations * len(x), target=targets,
    ).cpu().numpy()


# -----------------------------------------------------------------------------------------
# Running an explain analyzer as an Explainer
# -----------------------------------------------------------------------------------------

def attributions_of(analyzer: Analyzer, result: Result, x: torch.Tensor) -> np.ndarray:
    """A result's attributions as an array shaped like ``x`` (the analyzer knows where it keeps
    them: ``Analyzer.attributions``), or an XdlError when it has none."""
    found = type(analyzer).attributions(result, x)
    if found is not None:
        return np.asarray(found, dtype=np.float32)
    raise XdlError(
        f"{result.method!r} leaves no per-input attributions, so there is nothing to evaluate; "
        "--evaluate applies to attribution methods such as saliency, ig, shap and lime"
    )


class _Attributions(Analyzer):
    """Another analyzer's per-batch ``attribute`` hook under the base's chores, without its figures.

    Re-running an explanation many times (the sanity check, sensitivity) would otherwise
    draw and discard a figure per run.
    """

    def __init__(self, inner: Analyzer):
        self.inner = inner
        self.name, self.kind, self.Params = inner.name, inner.kind, inner.Params

    def run(self, ctx: Context, params: Any) -> Result:
        targets = ctx.targets()
        maps = []
        for s in ctx.batches():
            out = self.inner.attribute(ctx, ctx.x[s].to(ctx.device).requires_grad_(), targets[s].to(ctx.device), params)
            maps.append((out[0] if isinstance(out, tuple) else out).detach().float().cpu())
        return self.result(arrays={"attributions": torch.cat(maps).numpy()})


def explainer(analyzer: Analyzer, ctx: Context, params: Any) -> Explainer:
    """``analyzer`` with ``params`` as an Explainer: the same samples' settings, any model, inputs and targets."""
    runner = _Attributions(analyzer) if callable(getattr(analyzer, "attribute", None)) else analyzer

    def explain(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        # target "true" with y = the targets: the class explained stays fixed whatever the model predicts.
        sub = dataclasses.replace(ctx, model=model, x=x, y=targets, target="true", indices=None, groups={}, progress=False)
        with without_figures():  # only the attributions are compared; the figures would be thrown away
            return attributions_of(runner, analyze(runner, sub, params), x)

    return explain


# -----------------------------------------------------------------------------------------
# xdl explain --evaluate
# -----------------------------------------------------------------------------------------


@dataclass
class EvaluateParams:
    steps: int = STEPS
    orders: int = RANDOM_ORDERS
    sensitivity: bool = True


class Evaluation(Analyzer):
    """Faithfulness, infidelity, sensitivity and the randomization check of one explain result."""

    kind = "explain"
    Params = EvaluateParams

    def __init__(self, inner: Analyzer, inner_params: Any, result: Result):
        self.inner, self.inner_params, self.explained = inner, inner_params, result
        self.name = inner.name

    def run(self, ctx: Context, params: EvaluateParams) -> Result:
        targets = ctx.targets()
        attributions = attributions_of(self.inner, self.explained, ctx.x)
        explain = explainer(self.inner, ctx, self.inner_params)
        budget = min(BATCHES_PER_PASS * ctx.batch_size, ctx.rows())
        curves = faithfulness(ctx.model, ctx.x, targets, attributions, fill_value(ctx, ctx.x), params.steps,
                              params.orders, ctx.seed, budget=budget)
        cascade = cascading_randomization(ctx.model, explain, ctx.x, targets, attributions, ctx.seed)
        metrics: dict[str, Any] = {**curves.aucs(), "order": "signed attribution, most positive first"}
        metrics["infidelity"] = mean_or_none(infidelity(ctx.model, ctx.x, targets, attributions, seed=ctx.seed, budget=budget))
        if params.sensitivity:
            metrics["sensitivity_max"] = mean_or_none(sensitivity(ctx.model, explain, ctx.x, targets, seed=ctx.seed))
        metrics["randomized_spearman"] = cascade[-1]["spearman"] if cascade else None
        metrics["passes_randomization_check"] = passes_sanity(cascade)
        result = self.result(metrics=metrics, tables={"randomization": cascade})
        result.summary = verdict(self.inner.name, metrics)
        result.add_figure("evaluation", evaluation_figure({self.inner.name: curves}, {self.inner.name: cascade}))
        return result


def verdict(method: str, metrics: dict[str, Any]) -> str:
    """One plain-words line: faithful or not against random order, and the randomization check."""
    faithful = metrics["deletion_auc"] < metrics["random_deletion_auc"]
    line = (f"{method} is {'more' if faithful else 'no more'} faithful than a random order "
            f"(deletion AUC {metrics['deletion_auc']:.2f} vs random {metrics['random_deletion_auc']:.2f}; "
            f"insertion {metrics['insertion_auc']:.2f} vs {metrics['random_insertion_auc']:.2f})")
    rho, passed = metrics.get("randomized_spearman"), metrics.get("passes_randomization_check")
    if passed is None:
        return line + "; the randomization check was undefined (constant maps)"
    return line + f" and {'passes' if passed else 'fails'} the randomization check (rank correlation {rho:.2f} with the randomized model)"


def evaluate(analyzer: Analyzer, ctx: Context, params: Any, result: Result) -> None:
    """Add the evaluation of ``result`` to it: metrics["evaluation"], a figure, a randomization table."""
    evaluation = analyze(Evaluation(analyzer, params, result), ctx, EvaluateParams())
    result.metrics["evaluation"] = evaluation.metrics
    result.tables["randomization"] = evaluation.tables["randomization"]
    result.figures["evaluation"] = evaluation.figures["evaluation"]
    result.summary = f"{result.summary}\n{evaluation.summary}" if result.summary else evaluation.summary


# -----------------------------------------------------------------------------------------
# Figures
# -----------------------------------------------------------------------------------------


def evaluation_figure(curves: dict[str, Curves], cascades: dict[str, list[dict]]) -> "Figure":
    """Mean deletion and insertion curves per method beside random order, and the randomization cascade."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.4), layout="constrained")
    deletion, insertion, cascade = fig.subplots(1, 3)
    for ax, name, title in ((deletion, "deletion", "Deletion (lower is better)"), (insertion, "insertion", "Insertion (higher is better)")):
        for i, (method, c) in enumerate(curves.items()):
            ax.plot(c.fractions, getattr(c, name).mean(0), color=f"C{i}", label=method)
        first = next(iter(curves.values()))
        ax.plot(first.fractions, getattr(first, f"random_{name}").mean(0), "k--", label="random order")
        ax.set(title=title, xlabel="fraction of pixels/features", ylabel="target probability", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    for i, (method, rows) in enumerate(cascades.items()):
        rho = [np.nan if r["spearman"] is None else r["spearman"] for r in rows]
        cascade.plot(range(1, len(rows) + 1), rho, "o-", color=f"C{i}", label=method)
    labels = [r["layer"] for r in next(iter(cascades.values()), [])]
    cascade.set_xticks(range(1, len(labels) + 1), labels, rotation=45, ha="right", fontsize=7)
    cascade.axhline(SANITY_THRESHOLD, color="k", ls=":", label="pass below")
    cascade.set(title="Cascading randomization (top layer first)", ylabel="Spearman of |attribution|", ylim=(-0.2, 1.02))
    cascade.legend(fontsize=7)
    return fig
