"""FGSM and PGD over a whole split, at one eps or a sweep of them.

The perturbation itself is :mod:`xdl.methods.robust` (the same code adversarial training uses);
this module runs it batch by batch on the model's device and measures what it did.

    >>> xdl.attack(run, "fgsm", params={"eps": 0.1}).metrics["robust_accuracy"]   # doctest: +SKIP
    >>> xdl.attack(run, "pgd", params={"eps": [0, 0.05, 0.1], "steps": 20})        # doctest: +SKIP

eps is in the input's natural range: pixels in [0, 1] for images (adversarial images are
clamped to it), standardized units for CSV tables and raw units for npz tables (which xdl
does not standardize), where only numeric features move —
a one-hot column has no "slightly more female".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from xdl.methods import robust
from xdl.analysis.base import Analyzer, Context, Finding, Result, is_number
from xdl.data.stream import is_streamed
from xdl.errors import XdlError
from xdl.limits import at_most

GRID_SAMPLES = 8
ROW_KEYS = ("eps", "robust_accuracy", "success_rate", "mean_linf", "mean_l2", "mean_confidence_drop")  # _measure's
KEEP_STREAMED = 32  # adversarial images kept (saved, drawn) for a streamed split: memory stays bounded
AUDIT_SWEEP = (0.0, 0.05, 0.1, 0.2, 0.3)  # FGSM's eps sweep in xdl audit (Fgsm.audit_params)


@dataclass
class FgsmParams:
    eps: float | list[float] = 0.1  # natural input units; a list (CLI: 0,0.05,0.1) sweeps

    def __post_init__(self) -> None:
        values = self.sweep
        if not values:
            raise ValueError("eps needs at least one value")
        if min(values) < 0:
            raise ValueError(f"eps must be ≥ 0, got {min(values):g}")
        at_most("the number of eps values", len(values), 100)
        at_most("eps", max(values), 1e6)

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
    sharding: ClassVar[str] = "samples"
    help: ClassVar[str] = ""  # how to read this attack's robust accuracy, for the audit's finding

    def perturb(self, ctx: Context, x: torch.Tensor, y: torch.Tensor, eps: float, params, mask,
                first_grad: torch.Tensor | None = None) -> torch.Tensor:
        """The adversarial batch; ``first_grad`` (the loss gradient at x) comes only when
        :meth:`starts_at_x` says the attack's first step is taken from x itself."""
        raise NotImplementedError

    def starts_at_x(self, params) -> bool:
        """Whether the first step is a gradient at the clean input, which the clean pass then computes."""
        return False

    @classmethod
    def steps(cls, params) -> float:
        """Forward+backward passes per sample at one eps, beyond the clean and the final forward."""
        return 1.0

    @classmethod
    def passes(cls, params, shape) -> float | None:
        return len(params.sweep) * (cls.steps(params) + 2 / 3)

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
        result.summary = _summary(self.label(params), result.metrics, rows, ctx.kind == "tabular")
        if len(sweep) > 1:
            result.tables["robustness"] = rows
            result.add_figure("robustness_curve", _curve(rows, result.metrics["clean_accuracy"], self.label(params)))
        if ctx.kind == "image" and len(labels):
            result.add_figure("examples", _grid(ctx, adv, clean, probs, labels))
        return result

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        """Robust accuracy at the eps this result was computed with (the last of a sweep)."""
        metrics = result.metrics
        value, clean, eps = metrics.get("robust_accuracy"), metrics.get("clean_accuracy"), metrics.get("eps")
        if not (is_number(value) and is_number(eps)):
            return []
        rows = result.tables.get("robustness", [])
        detail = f"{result.method.upper()} on {metrics.get('samples', '?')} samples"
        if is_number(clean):
            detail += f"; clean {clean:.1%} on the same samples"
        if len(rows) > 1:
            detail += "; sweep " + ", ".join(f"{r['robust_accuracy']:.0%} at {r['eps']:g}" for r in rows)
        # Losing more than half the accuracy at the eps asked for is what a reader must not miss.
        level = "warn" if is_number(clean) and value < clean / 2 else "info"
        return [Finding(f"Robust accuracy ({result.method.upper()}, eps {eps:g})", f"{value:.1%}", detail,
                        f"{result.kind}/{result.method}", level, cls.help)]

    @classmethod
    def outcomes(cls, result: Result) -> dict[str, np.ndarray]:
        """Each sample right (1) or wrong (0) under the attack, behind the robust-accuracy finding (the first)."""
        found, arrays = cls.findings(result), result.arrays
        if not found or "predictions" not in arrays or "labels" not in arrays:
            return {}
        return {found[0].label: (arrays["predictions"] == arrays["labels"]).astype(np.float64)}

    @classmethod
    def merge(cls, parts: list[Result], sizes: list[int]) -> Result:
        """The shares' results as one, from counts: success_rate is a ratio over the originally
        correct samples, so each share weighs by its correct count, not by its sample count."""
        import dataclasses

        from xdl.analysis.base import parse_params
        from xdl.analysis.base import merge as concatenate

        merged = concatenate(parts, sizes)  # per-sample arrays, in sample order
        correct = [int((p.arrays["clean_predictions"] == p.arrays["labels"]).sum()) for p in parts]
        sweeps = [p.tables.get("robustness") or [{k: p.metrics[k] for k in ROW_KEYS}] for p in parts]
        rows = [_pooled(list(same_eps), sizes, correct) for same_eps in zip(*sweeps)]
        metrics = {**parts[0].metrics, **rows[-1], "clean_accuracy": sum(correct) / sum(sizes), "samples": sum(sizes)}
        params = parse_params(cls.Params, {f.name: merged.params[f.name] for f in dataclasses.fields(cls.Params)})
        label = cls().label(params)
        tabular = not metrics["perturbed"].startswith("all inputs")
        result = dataclasses.replace(merged, metrics=metrics, summary=_summary(label, metrics, rows, tabular))
        # The generic merge's caveat (its last warning) about averaged metrics does not apply here.
        result.warnings = merged.warnings[:-1] + [
            f"computed by {len(parts)} processes on shares of {sum(sizes)} samples and merged from their counts; "
            "the examples figure shows the first share's samples"
        ]
        if len(rows) > 1:
            result.tables["robustness"] = rows
            result.add_figure("robustness_curve", _curve(rows, metrics["clean_accuracy"], label))
        return result

    def _attack_split(self, ctx: Context, eps: float, params, mask) -> tuple:
        """One pass over the samples (a streamed split is decoded once per eps): clean
        probabilities, adversarial images (all, or the first KEEP_STREAMED of a streamed
        split), their probabilities, and each sample's L∞ and L2 distance from its original."""
        keep = KEEP_STREAMED if is_streamed(ctx.x) else len(ctx.x)
        clean, adv, probs, linf, l2 = [], [], [], [], []
        from_x = self.starts_at_x(params)
        for s, xb in ctx.stream(desc=f"{self.label(params)} eps={eps:g}"):
            # An attack whose first step starts at x gets its gradient from the clean pass: one
            # forward pass fewer per batch (FGSM: two model calls, as in a hand-written loop).
            xg = xb.detach().requires_grad_(from_x)
            with torch.set_grad_enabled(from_x):
                logits = ctx.model(xg)
            clean.append(torch.softmax(logits.detach().float(), 1).cpu())
            # Without labels, the attack pushes away from the model's own clean prediction.
            yb = (ctx.y[s].long() if ctx.y is not None else clean[-1].argmax(1)).to(ctx.device)
            first = robust.input_gradient(ctx.model, xg, yb, logits) if from_x else None
            out = self.perturb(ctx, xb, yb, eps, params, mask, first)
            with torch.no_grad():
                probs.append(torch.softmax(ctx.model(out).float(), 1).cpu())
            delta = (out - xb).flatten(1)
            linf.append(delta.abs().amax(1).cpu())
            l2.append(delta.norm(dim=1).cpu())
            kept = sum(len(a) for a in adv)
            if kept < keep:
                adv.append(out[: keep - kept].cpu())
        return torch.cat(clean), torch.cat(adv), torch.cat(probs), (torch.cat(linf), torch.cat(l2))


class Fgsm(_Attack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of eps·sign(∇ₓ loss)."""

    Params: ClassVar[type] = FgsmParams
    description: ClassVar[str] = "FGSM: one signed-gradient step of size eps"
    guide: ClassVar[str] = (
        "Accuracy after each input is pushed by eps (in pixel units of [0, 1]) in the direction that most increases the "
        "loss, in one step (Goodfellow et al. 2015). A single step is a weak attack: a high number here proves little "
        "until PGD and AutoAttack agree with it."
    )
    help: ClassVar[str] = (
        "Accuracy when every input is pushed one signed-gradient step of size eps (Goodfellow et al. 2015); "
        "FGSM is a weak attack, so a high value does not show robustness, while a value far below the clean "
        "accuracy at a small eps means invisible changes flip predictions."
    )

    @classmethod
    def audit_params(cls, data_kind: str, eps: float) -> dict[str, str]:
        # On images the audit sweeps FGSM, in pixel units of [0, 1]: from no attack (the clean
        # accuracy, for reference) to 0.3, where small digit models are usually broken.
        return {"eps": ",".join(map(str, AUDIT_SWEEP))} if data_kind == "image" else {}

    def perturb(self, ctx, x, y, eps, params, mask, first_grad=None):
        return robust.fgsm(ctx.model, x, y, eps, input_range=ctx.input_range, mask=mask, first_grad=first_grad)

    def starts_at_x(self, params) -> bool:
        return True

    def label(self, params) -> str:
        return "FGSM"


class Pgd(_Attack):
    """Projected Gradient Descent (Madry et al. 2018): steps of ascent, projected to the eps-ball."""

    Params: ClassVar[type] = PgdParams
    headline: ClassVar[int] = 1  # the audit's headline when AutoAttack is not run (--audit-attack pgd)

    @classmethod
    def audit_params(cls, data_kind: str, eps: float) -> dict[str, str]:
        return {"eps": str(eps)}
    description: ClassVar[str] = "PGD: iterated projected gradient steps in the L∞ or L2 eps-ball"
    guide: ClassVar[str] = (
        "Accuracy under many small gradient steps kept within eps of the input (Madry et al. 2018): the standard "
        "first-order attack. Robust accuracy far below clean accuracy means small, invisible changes flip predictions; "
        "a number that stays high while FGSM or black-box attacks do better hints at masked gradients."
    )
    help: ClassVar[str] = (
        "Accuracy when each input may be changed by at most eps to fool the model, searched by projected "
        "gradient descent (Madry et al. 2018); it bounds robustness from above (a stronger attack can only "
        "lower it), and a value far below the clean accuracy means small changes flip predictions."
    )

    def perturb(self, ctx, x, y, eps, params, mask, first_grad=None):
        return robust.pgd(
            ctx.model, x, y, eps, params.steps, params.step_size, random_start=params.random_start,
            norm=params.norm, input_range=ctx.input_range, mask=mask, first_grad=first_grad,
        )

    def starts_at_x(self, params) -> bool:
        return not params.random_start

    @classmethod
    def steps(cls, params) -> float:
        return float(params.steps)

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


def _summary(label: str, metrics: dict, rows: list[dict], tabular: bool) -> str:
    clean = f"(clean {metrics['clean_accuracy']:.1%})"
    if len(rows) > 1:
        curve = ", ".join(f"{r['robust_accuracy']:.1%} at {r['eps']:g}" for r in rows)
        text = f"{label} eps sweep: robust accuracy {curve} {clean}"
    else:
        flipped = metrics["success_rate"]
        text = f"{label} eps={rows[0]['eps']:g}: robust accuracy {metrics['robust_accuracy']:.1%} {clean}"
        if flipped is not None:
            text += f", {flipped:.0%} of correct samples flipped"
    if tabular:  # what moved and in which units: standardized only when xdl encoded the table
        text += "; " + metrics["perturbed"].partition(":")[0]
    return text


def _pooled(rows: list[dict], sizes: list[int], correct: list[int]) -> dict:
    """One eps's row over all shares: means weigh by samples, the success rate by correct samples."""
    total = sum(sizes)
    pooled = {"eps": rows[0]["eps"]}
    for key in ("robust_accuracy", "mean_linf", "mean_l2", "mean_confidence_drop"):
        pooled[key] = sum(r[key] * n for r, n in zip(rows, sizes)) / total
    fooled = sum(r["success_rate"] * c for r, c in zip(rows, correct) if c)
    pooled["success_rate"] = fooled / sum(correct) if sum(correct) else None
    return {k: pooled[k] for k in ROW_KEYS}


def _perturbed(ctx: Context, mask: torch.Tensor | None) -> str:
    if ctx.kind != "tabular":
        lo, hi = ctx.input_range or (float("-inf"), float("inf"))
        return f"all inputs, clamped to [{lo:g}, {hi:g}]"
    if mask is None:
        return "all features (no encoding known), in the model's input units"
    names = [n for n, m in zip(ctx.feature_names, mask.tolist()) if m]
    # A CSV's encoding standardizes numeric columns; an npz table's is the identity (mean 0, std 1).
    standardized = any(c.type == "numeric" and (c.mean, c.std) != (0.0, 1.0) for c in ctx.encoding.columns)
    units = "standardized units" if standardized else "the data's own raw units"
    return f"numeric features only, in {units}: {', '.join(names)}"


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
