"""Accuracy under common corruptions: noise, blur, weather-like, digital and geometric, 5 severities.

The corruptions are :mod:`xdl.methods.corruptions` (batched tensor code after CIFAR-10-C and
MNIST-C). The result is accuracy per type × severity (table and heat map) and the mean
corruption accuracy over all of them, the headline of Hendrycks & Dietterich 2019.

    >>> xdl.attack(run, "corruptions").metrics["mean_corruption_accuracy"]          # doctest: +SKIP
    >>> xdl.attack(run, "corruptions", params={"types": ["fog", "jpeg"], "severities": [5]})  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from xdl.methods import corruptions
from xdl.analysis.base import Analyzer, Context, Finding, Result


@dataclass
class CorruptionParams:
    types: list[str] = field(default_factory=lambda: list(corruptions.TYPES))  # CLI: fog,jpeg,rotate
    severities: list[int] = field(default_factory=lambda: list(corruptions.SEVERITIES))

    def __post_init__(self) -> None:
        if not self.types:
            raise ValueError("types needs at least one corruption")
        unknown = sorted(set(self.types) - set(corruptions.TYPES))
        if unknown:
            raise ValueError(f"unknown corruption {unknown[0]!r}: choose from {', '.join(corruptions.TYPES)}")
        if not self.severities or not set(self.severities) <= set(corruptions.SEVERITIES):
            raise ValueError(f"severities must be among 1–5, got {self.severities}")


class Corruptions(Analyzer):
    """Accuracy on the samples after each common corruption at each severity."""

    kind: ClassVar[str] = "attack"
    Params: ClassVar[type] = CorruptionParams
    samples: ClassVar[int | None] = None
    applies_to: ClassVar[frozenset[str]] = frozenset({"image"})
    description: ClassVar[str] = "Common corruptions: accuracy under 17 noise/blur/weather/digital/geometric types × 5 severities"
    check_params: ClassVar[dict] = {"types": ["brightness", "rotate"], "severities": [1, 5]}

    @classmethod
    def passes(cls, params, shape) -> float | None:
        return (len(params.types) * len(params.severities) + 1) / 3  # forward passes only
    sharding: ClassVar[str] = "samples"

    def run(self, ctx: Context, params: CorruptionParams) -> Result:
        result = self.result()
        clean = ctx.predict()
        if ctx.y is None:
            result.warnings.append("no labels: accuracy is measured against the model's own clean predictions")
        labels = ctx.y.long().cpu() if ctx.y is not None else clean.argmax(1)
        types = list(dict.fromkeys(params.types))
        severities = sorted(set(params.severities))
        right = torch.zeros(len(types), len(severities), dtype=torch.long)
        # Per sample, how many of the corrupted copies it survives: paired across runs by xdl compare.
        survived = torch.zeros(len(labels), dtype=torch.long)
        g = torch.Generator().manual_seed(ctx.seed)
        with torch.no_grad():
            for s in ctx.batches(desc="corruptions"):
                xb, yb = ctx.x[s].to(ctx.device), labels[s].to(ctx.device)
                for i, kind in enumerate(types):
                    for j, severity in enumerate(severities):
                        out = corruptions.corrupt(xb, kind, severity, g)
                        hit = (ctx.model(out).argmax(1) == yb).cpu()
                        right[i, j] += int(hit.sum())
                        survived[s] += hit.long()
        n = max(len(labels), 1)
        accuracy = right.double() / n
        rows = [{"corruption": kind, "severity": sev, "accuracy": float(accuracy[i, j])}
                for i, kind in enumerate(types) for j, sev in enumerate(severities)]
        per_type = {kind: float(accuracy[i].mean()) for i, kind in enumerate(types)}
        worst = min(per_type, key=per_type.get)
        clean_accuracy = float((clean.argmax(1) == labels).double().mean()) if len(labels) else float("nan")
        result.metrics = {
            "clean_accuracy": clean_accuracy,
            "mean_corruption_accuracy": float(accuracy.mean()),
            "worst_corruption": worst,
            "worst_corruption_accuracy": per_type[worst],
            "per_type": per_type,
            "samples": len(labels),
        }
        result.tables["corruptions"] = rows
        result.arrays["survived_share"] = (survived.double() / max(len(types) * len(severities), 1)).numpy()
        result.summary = (f"mean corruption accuracy {accuracy.mean():.1%} over {len(types)} types × {len(severities)} "
                          f"severities (clean {clean_accuracy:.1%}); worst: {worst} {per_type[worst]:.1%}")
        result.add_figure("heatmap", _heatmap(accuracy, types, severities))
        return result

    @classmethod
    def outcomes(cls, result: Result) -> dict:
        """Each sample's share of corrupted copies classified right: their mean is the mean corruption accuracy."""
        found, share = cls.findings(result), result.arrays.get("survived_share")
        return {found[0].label: share} if found and share is not None else {}

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        m = result.metrics
        value, clean = m.get("mean_corruption_accuracy"), m.get("clean_accuracy")
        if not isinstance(value, (int, float)):
            return []
        worst = m.get("worst_corruption")
        detail = f"clean {100 * clean:.1f}%; worst {worst} {100 * m.get('worst_corruption_accuracy', 0):.1f}%" if worst else ""
        # Losing more than a quarter of the clean accuracy to everyday distortions deserves attention.
        level = "warn" if isinstance(clean, (int, float)) and value < 0.75 * clean else "info"
        return [Finding(
            "Mean corruption accuracy", f"{100 * value:.1f}%", detail, f"{result.kind}/{result.method}", level,
            help="Accuracy averaged over noise, blur, weather-like, digital and geometric corruptions at 5 severities; "
                 "a large gap to the clean accuracy means the model is brittle to everyday distortions "
                 "(Hendrycks & Dietterich 2019; Mu & Gilmer 2019).",
        )]


def _heatmap(accuracy: torch.Tensor, types: list[str], severities: list[int]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 + 0.7 * len(severities), 0.8 + 0.32 * len(types)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(100 * accuracy.numpy(), vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(severities)), [str(s) for s in severities])
    ax.set_yticks(range(len(types)), types)
    ax.set_xlabel("severity")
    for i in range(len(types)):
        for j in range(len(severities)):
            ax.text(j, i, f"{100 * accuracy[i, j]:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return fig
