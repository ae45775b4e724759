"""Calibration: does a confidence of 0.9 mean right 9 times in 10?

Expected calibration error (Naeini et al. 2015; 15 equal-width confidence bins as in Guo
et al. 2017) with a reliability diagram, then temperature scaling (Guo et al. 2017): one
scalar T fitted on the validation split by minimizing the negative log-likelihood of
softmax(logits / T), and the test ECE before and after.

>>> result = xdl.report(run, "calibration")                           # doctest: +SKIP
>>> result.metrics["ece"], result.metrics["ece_scaled"], result.metrics["temperature"]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from xdl.analysis import Analyzer, Context, Result
from xdl.analysis.base import Finding, is_number
from xdl.errors import XdlError
from xdl.limits import at_most


@dataclass
class CalibrationParams:
    bins: int = 15

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ValueError(f"bins must be ≥ 2, got {self.bins}")
        at_most("bins", self.bins, 10_000)


class Calibration(Analyzer):
    """Expected calibration error, reliability diagram and temperature scaling."""

    kind = "report"
    Params = CalibrationParams
    samples = None
    description = "expected calibration error, reliability diagram, temperature scaling"
    guide = (
        "Whether a predicted 90% confidence is right 90% of the time. ECE above about 0.05 means confidences "
        "should not be taken at face value; temperature scaling often fixes it (Guo et al. 2017)."
    )

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        ece, after = result.metrics.get("ece"), result.metrics.get("ece_scaled")
        if not is_number(ece):
            return []
        detail = "expected calibration error" + (f"; {after:.3f} after temperature scaling" if is_number(after) else "")
        return [Finding(
            "Calibration (ECE)", f"{ece:.3f}", detail, f"{result.kind}/{result.method}", "warn" if ece > 0.1 else "info",
            "The average gap between the model's confidence and its accuracy over confidence bins (Guo et al. 2017, "
            "On Calibration of Modern Neural Networks); above about 0.1 its probabilities should not be read as "
            "chances, and a much lower value after temperature scaling says one fitted temperature fixes it.",
        )]

    def run(self, ctx: Context, params: CalibrationParams) -> Result:
        if ctx.y is None:
            raise XdlError("the calibration report needs true labels for the samples")
        result = self.result()
        logits, y = log_probs(ctx, ctx.x), ctx.y.long().cpu()
        before = reliability(logits, y, params.bins)
        result.metrics.update(ece=before["ece"], accuracy=float((logits.argmax(1) == y).float().mean()),
                              mean_confidence=float(logits.exp().max(1).values.mean()))
        curves = {"before": before}
        if ctx.data is None:
            result.warnings.append("temperature scaling needs a validation split: analyze a run directory to fit it")
            result.summary = f"ECE {before['ece']:.4f} on {len(y)} samples ({params.bins} bins)"
        else:
            val = ctx.data.val
            temperature = fit_temperature(log_probs(ctx, val.x), val.y.long())
            after = reliability(logits / temperature, y, params.bins)
            curves["after"] = after
            result.metrics.update(temperature=temperature, ece_scaled=after["ece"],
                                  nll=float(F.cross_entropy(logits, y)),
                                  nll_scaled=float(F.cross_entropy(logits / temperature, y)))
            direction = "overconfident" if temperature > 1 else "underconfident"
            result.summary = (f"ECE {before['ece']:.4f} → {after['ece']:.4f} on {ctx.split} after temperature scaling "
                              f"(T = {temperature:.3f} fitted on validation; the model was {direction})")
        result.tables["bins"] = [
            {"bin": i, "lower": lo, "upper": hi, **{f"{k}_{m}": float(c[m][i]) for k, c in curves.items()
                                                    for m in ("count", "confidence", "accuracy")}}
            for i, (lo, hi) in enumerate(zip(before["edges"][:-1], before["edges"][1:]))
        ]
        result.add_figure("reliability", _plot(curves, params.bins))
        return result


@torch.no_grad()
def log_probs(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Log-softmax outputs, batched, on CPU: usable as logits (softmax(log p / T) = softmax(z / T))
    without the underflow that log of ``ctx.predict``'s probabilities would hit."""
    out = [F.log_softmax(ctx.model(xb).float(), 1).cpu() for _, xb in ctx.stream(x)]
    return torch.cat(out) if out else torch.empty(0, ctx.num_classes)


def reliability(logits: torch.Tensor, y: torch.Tensor, bins: int) -> dict:
    """Per-bin count, mean confidence and accuracy of the top class, and the ECE they give.

    ECE = Σ_b (n_b / n) · |accuracy_b − confidence_b| over equal-width bins of (0, 1].
    """
    probs = torch.softmax(logits.double(), 1)
    confidence, predicted = probs.max(1)
    correct = (predicted == y).double()
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lo, hi]: a confidence of exactly 1 falls in the last bin, 1/k in the bin it tops.
    index = torch.bucketize(confidence, torch.as_tensor(edges[1:-1]), right=False)
    count = torch.bincount(index, minlength=bins).double()
    total_conf = torch.bincount(index, confidence, minlength=bins)
    total_acc = torch.bincount(index, correct, minlength=bins)
    filled = count.clamp(min=1)
    ece = float(((total_acc - total_conf).abs().sum() / max(len(y), 1)))
    return {"ece": ece, "edges": edges, "count": count.numpy(), "confidence": (total_conf / filled).numpy(),
            "accuracy": (total_acc / filled).numpy()}


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The T > 0 minimizing the NLL of softmax(logits / T); optimized over log T so T stays positive."""
    if len(y) == 0:
        raise XdlError("temperature scaling needs a non-empty validation split")
    logits, y = logits.double(), y.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def _plot(curves: dict, bins: int):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4))
    width = 1.0 / bins
    centers = (np.arange(bins) + 0.5) * width
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    styles = {"before": dict(color="tab:blue", alpha=0.55), "after": dict(color="tab:orange", alpha=0.55)}
    for name, c in curves.items():
        shown = c["count"] > 0
        ax.bar(centers[shown], c["accuracy"][shown], width=width * (0.9 if name == "before" else 0.5),
               label=f"{name} scaling (ECE {c['ece']:.3f})" if len(curves) > 1 else f"ECE {c['ece']:.3f}",
               edgecolor="black", lw=0.5, **styles[name])
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title="reliability diagram")
    ax.legend(fontsize=7, loc="upper left")
    return fig
