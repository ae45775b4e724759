"""FGSM and PGD over a whole split, at one eps or a sweep of them.

The perturbation itself is :mod:`xdl.robust` (the same code adversarial training uses);
this module runs it batch by batch on the model's device and measures what it did.

    >>> xdl.attack(run, "fgsm", params={"eps": 0.1}).metrics["robust_accuracy"]   # doctest: +SKIP
    >>> xdl.attack(run, "pgd", params={"eps": [0, 0.05, 0.1], "steps": 20})        # doctest: +SKIP

eps is in the input's natural range: pixels in [0, 1] for images (adversarial images are
clamped to it), standardized units for tabular rows, where only numeric features move —
a one-hot column has no "slightly more female".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from xdl import robust
from xdl.analyzers.base import Analyzer, Context, Result
from xdl.data.stream import is_streamed
from xdl.errors import XdlError

GRID_SAMPLES = 8
KEEP_STREAMED = 32  # adversarial images kept (saved, drawn) for a streamed split: memory stays bounded


@dataclass
class FgsmParams:
    eps: float | list[float] = 0.1  # natural input units; a list (CLI: 0,0.05,0.1) sweeps

    def __post_init__(self) -> None:
        values = self.sweep
        if not values:
            raise ValueError("eps needs at least one value")
        if min(values) < 0:
            raise ValueError(f"eps must be ≥ 0, got {min(values):g}")

    @property
    def sweep(self) -> list[float]:
        """The eps values in increasing order; the last one is the headline result."""
        values = self.eps if isinstance(self.eps, (list, tuple)) else [self.eps]
        return sorted({float(v) for v in values})


@dataclass
class PgdParams(FgsmParams):
    steps: int = 10
    step_size: float | None = None  # default 2.5·eps/steps (Madry et al. 2018)
    random_start: bool = True
    norm: Literal["linf", "l2"] = "linf"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        if self.step_size is not None and self.step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size}")
        if self.norm not in robust.NORMS:
            raise ValueError(f"unknown norm {self.norm!r}: choose linf or l2")


class _Attack(Analyzer):
    """Attacks every selected sample at each eps; subclasses say how one batch is perturbed."""

    kind: ClassVar[str] = "attack"
    samples: ClassVar[int | None] = None

    def perturb(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, eps: float, params, mask) -> torch.Tensor:
        raise NotImplementedError

    def label(self, params) -> str:
        raise NotImplementedError

    def run(self, ctx: Context, params) -> Result:
        sweep = params.sweep
        if ctx.input_range is not None and sweep[-1] > ctx.input_range[1] - ctx.input_range[0]:
            lo, hi = ctx.input_range
            raise XdlError(f"eps {sweep[-1]:g} is larger than the whole input range [{lo:g}, {hi:g}] of {ctx.kind} data")
        mask = None
        if ctx.kind == "tabular" and ctx.encoding is not None:
            mask = torch.as_tensor(ctx.encoding.numeric_mask(), dtype=torch.float32)
            if not mask.any():
                raise XdlError("this table has no numeric features, and only numeric features can be perturbed")
        result = self.result()
        if ctx.y is None:
            result.warnings.append("no labels: accuracy is measured against the model's own clean predictions")
        rows = []
        for eps in sweep:
            clean, adv, probs, distances = self._attack_split(ctx, eps, params, mask)
            labels = ctx.y.long().cpu() if ctx.y is not None else clean.argmax(1)
            rows.append(_measure(eps, distances, clean, probs, labels))
        last = rows[-1]
        result.metrics = {"clean_accuracy": _accuracy(clean.argmax(1), labels), **last, "samples": len(labels)}
        result.metrics["perturbed"] = _perturbed(ctx, mask)
        result.arrays = {
            "adversarial": adv.numpy(),
            "predictions": probs.argmax(1).numpy(),
            "clean_predictions": clean.argmax(1).numpy(),
            "labels": labels.numpy(),
        }
        if len(adv) < len(labels):
            result.warnings.append(f"streamed split: adversarial images are kept for the first {len(adv)} of "
                                   f"{len(labels)} samples; the metrics cover all of them")
        result.summary = self._summary(params, result.metrics, rows, ctx)
        if len(sweep) > 1:
            result.tables["robustness"] = rows
            result.add_figure("robustness_curve", _curve(rows, result.metrics["clean_accuracy"], self.label(params)))
        if ctx.kind == "image" and len(labels):
            result.add_figure("examples", _grid(ctx, adv, clean, probs, labels))
        return result

    def _attack_split(self, ctx: Context, eps: float, params, mask) -> tuple:
        """One pass over the samples (a streamed split is decoded once per eps): clean
        probabilities, adversarial images (all, or the first KEEP_STREAMED of a streamed
        split), their probabilities, and each sample's L∞ and L2 distance from its original."""
        keep = KEEP_STREAMED if is_streamed(ctx.x) else len(ctx.x)
        clean, adv, probs, linf, l2 = [], [], [], [], []
        for s, xb in ctx.stream(desc=f"{self.label(params)} eps={eps:g}"):
            with torch.no_grad():
                clean.append(torch.softmax(ctx.model(xb).float(), 1).cpu())
            # Without labels, the attack pushes away from the model's own clean prediction.
            yb = ctx.y[s].long() if ctx.y is not None else clean[-1].argmax(1)
            out = self.perturb(ctx, xb, yb.to(ctx.device), eps, params, mask)
            with torch.no_grad():
                probs.append(torch.softmax(ctx.model(out).float(), 1).cpu())
            delta = (out - xb).flatten(1)
            linf.append(delta.abs().amax(1).cpu())
            l2.append(delta.norm(dim=1).cpu())
            kept = sum(len(a) for a in adv)
            if kept < keep:
                adv.append(out[: keep - kept].cpu())
        return torch.cat(clean), torch.cat(adv), torch.cat(probs), (torch.cat(linf), torch.cat(l2))

    def _summary(self, params, metrics: dict, rows: list[dict], ctx: Context) -> str:
        clean = f"(clean {metrics['clean_accuracy']:.1%})"
        if len(rows) > 1:
            curve = ", ".join(f"{r['robust_accuracy']:.1%} at {r['eps']:g}" for r in rows)
            text = f"{self.label(params)} eps sweep: robust accuracy {curve} {clean}"
        else:
            flipped = metrics["success_rate"]
            text = f"{self.label(params)} eps={rows[0]['eps']:g}: robust accuracy {metrics['robust_accuracy']:.1%} {clean}"
            if flipped is not None:
                text += f", {flipped:.0%} of correct samples flipped"
        if ctx.kind == "tabular":
            text += "; numeric features only, in standardized units"
        return text


class Fgsm(_Attack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of eps·sign(∇ₓ loss)."""

    Params: ClassVar[type] = FgsmParams
    description: ClassVar[str] = "FGSM: one signed-gradient step of size eps"

    def perturb(self, ctx, x, y, eps, params, mask):
        return robust.fgsm(ctx.model, x, y, eps, input_range=ctx.input_range, mask=mask)

    def label(self, params) -> str:
        return "FGSM"


class Pgd(_Attack):
    """Projected Gradient Descent (Madry et al. 2018): steps of ascent, projected to the eps-ball."""

    Params: ClassVar[type] = PgdParams
    description: ClassVar[str] = "PGD: iterated projected gradient steps in the L∞ or L2 eps-ball"

    def perturb(self, ctx, x, y, eps, params, mask):
        return robust.pgd(
            ctx.model, x, y, eps, params.steps, params.step_size, random_start=params.random_start,
            norm=params.norm, input_range=ctx.input_range, mask=mask,
        )

    def label(self, params) -> str:
        return f"PGD-{params.steps} {'L∞' if params.norm == 'linf' else 'L2'}"


# -----------------------------------------------------------------------------------------
# Measurements and figures
# -----------------------------------------------------------------------------------------


def _accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).double().mean()) if len(labels) else float("nan")


def _measure(eps: float, distances: tuple[torch.Tensor, torch.Tensor], clean: torch.Tensor, probs: torch.Tensor,
             labels: torch.Tensor) -> dict:
    correct = clean.argmax(1) == labels
    fooled = probs.argmax(1) != labels
    linf, l2 = distances
    # Confidence drop: how much probability the clean prediction's class lost.
    top = clean.argmax(1, keepdim=True)
    drop = clean.gather(1, top) - probs.gather(1, top)
    return {
        "eps": eps,
        "robust_accuracy": _accuracy(probs.argmax(1), labels),
        # Share of the originally correct samples that the attack turned wrong.
        "success_rate": float(fooled[correct].double().mean()) if correct.any() else None,
        "mean_linf": float(linf.mean()) if len(linf) else 0.0,
        "mean_l2": float(l2.mean()) if len(l2) else 0.0,
        "mean_confidence_drop": float(drop.mean()) if len(drop) else 0.0,
    }


def _perturbed(ctx: Context, mask: torch.Tensor | None) -> str:
    if ctx.kind != "tabular":
        lo, hi = ctx.input_range or (float("-inf"), float("inf"))
        return f"all inputs, clamped to [{lo:g}, {hi:g}]"
    if mask is None:
        return "all features (no encoding known), in the model's input units"
    names = [n for n, m in zip(ctx.feature_names, mask.tolist()) if m]
    return f"numeric features only, in standardized units: {', '.join(names)}"


def _grid(ctx: Context, adv: torch.Tensor, clean: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor):
    """Original, adversarial and amplified perturbation for a few samples, the flipped ones first."""
    from xdl.plotting import image_grid, sample_titles

    n = len(adv)  # of a streamed split, only the first samples' adversarial images are kept
    probs, clean, labels = probs[:n], clean[:n], labels[:n]
    fooled = (probs.argmax(1) != labels) & (clean.argmax(1) == labels)
    pick = torch.argsort((~fooled).int(), stable=True)[:GRID_SAMPLES]
    x, a = ctx.x[pick], adv[pick]
    delta = a - x
    scale = float(delta.abs().max()) or 1.0
    images = torch.stack([x, a, 0.5 + delta / (2 * scale)], 1).flatten(0, 1)  # gray = unchanged
    before = sample_titles(labels[pick], clean[pick].argmax(1), clean[pick].amax(1), ctx.class_names)
    after = sample_titles(labels[pick], probs[pick].argmax(1), probs[pick].amax(1), ctx.class_names)
    titles = [t for b, a_ in zip(before, after) for t in (b, f"adv: {a_}", f"perturbation ×{0.5 / scale:.3g}")]
    return image_grid(images.numpy(), titles, ncols=6)


def _curve(rows: list[dict], clean: float, label: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4), layout="constrained")
    ax = fig.subplots()
    eps = [r["eps"] for r in rows]
    ax.plot(eps, [100 * r["robust_accuracy"] for r in rows], marker="o", label=label)
    ax.axhline(100 * clean, color="gray", linestyle="--", linewidth=1, label="clean")
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    return fig
