"""Bias: how prediction quality is shared out over classes, groups and image segments.

Per class, scikit-learn's precision/recall/F1 and confusion matrix; per sensitive group,
fairlearn's MetricFrame and its demographic-parity and equalized-odds measures, with
bootstrap confidence intervals; for image runs without group labels, accuracy per
quantile segment of brightness, contrast and foreground area. Multiclass group metrics
are one-vs-rest: for class c, "selected" means "predicted c".

>>> result = xdl.report(run, "bias", params={"sensitive": ["sex"]})     # doctest: +SKIP
>>> result.metrics["groups"]["sex"]["worst"]["disparate_impact"]        # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from xdl.analysis import Analyzer, Context, Result
from xdl.analysis.base import Finding, is_number
from xdl.errors import XdlError
from xdl.limits import at_most

FOUR_FIFTHS = 0.8  # EEOC's four-fifths rule: a selection-rate ratio below it indicates adverse impact
SMALL_GROUP = 10  # rates from fewer rows than this swing by ≥ 10 points on one prediction


@dataclass
class BiasParams:
    sensitive: list[str] = field(default_factory=list)  # group columns; tabular runs may name any CSV column
    bootstrap: int = 200  # resamples for the confidence intervals; 0 turns them off
    confidence: float = 0.95
    segments: int = 4  # quantile bins per image property

    def __post_init__(self) -> None:
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be ≥ 0, got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.segments < 2:
            raise ValueError(f"segments must be ≥ 2, got {self.segments}")
        at_most("bootstrap", self.bootstrap, 10_000)
        at_most("segments", self.segments, 1_000)


MIN_SAMPLES = 4  # fewer rows give no quantile segments and no bootstrap


class Bias(Analyzer):
    """Per-class quality, per-group fairness and per-segment accuracy of the predictions."""

    kind = "report"
    Params = BiasParams
    samples = None
    description = "per-class F1, group fairness (fairlearn), image segments"
    guide = (
        "How evenly the model serves each class and group. A worst class far below the best, or a disparate "
        "impact below 0.8 (the four-fifths rule of the US EEOC), is worth investigating; wide bootstrap "
        "intervals mean too few samples to tell."
    )

    def run(self, ctx: Context, params: BiasParams) -> Result:
        if ctx.y is None:
            raise XdlError("the bias report needs true labels for the samples")
        if len(ctx.y) < MIN_SAMPLES:
            # Rates, quantile segments and bootstrap intervals are meaningless on a handful of rows.
            raise XdlError(f"the bias report needs at least {MIN_SAMPLES} samples, got {len(ctx.y)}")
        groups = _groups(ctx, params.sensitive)
        probs, properties = _scan(ctx, segments=not groups and ctx.kind == "image")
        y_true, y_pred = ctx.y.numpy().astype(int), probs.argmax(1).numpy()
        result = self.result()
        predictions = {"y_true": y_true, "y_pred": y_pred, "confidence": probs.max(1).values.numpy()}
        parts = [_per_class(ctx, y_true, y_pred, result)]

        groups = _groups(ctx, params.sensitive)
        for column, labels in groups.items():
            # A generator per column, seeded by its name: one column's intervals do not depend on
            # which other columns were asked for, nor in what order.
            rng = np.random.default_rng([ctx.seed, zlib.crc32(column.encode())])
            parts.append(_per_group(ctx, column, labels, y_true, y_pred, params, rng, result))
        if not groups and ctx.kind == "image":
            segments = _segments(properties, params.segments)
            parts.append(_per_segment(segments, y_true, y_pred, result))
            groups = segments
        elif not groups:
            result.warnings.append("no group columns: pass --sensitive COLUMN to measure fairness between groups")
        predictions.update(groups)
        result.tables["predictions"] = [dict(zip(predictions, row)) for row in zip(*(_plain(v) for v in predictions.values()))]
        result.summary = "; ".join(parts)
        return result

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        """The worst class's F1 gap; per sensitive column the worst group gap, else the weakest image segment."""
        metrics, source, found = result.metrics, f"{result.kind}/{result.method}", []
        gap, worst, f1 = metrics.get("worst_class_gap"), metrics.get("worst_class"), metrics.get("worst_class_f1")
        if is_number(gap):
            detail = "best − worst per-class F1" + (f"; worst: class {worst} (F1 {f1:.2f})" if is_number(f1) else "")
            found.append(Finding(
                "Worst-class gap", f"{gap:.2f}", detail, source, "warn" if gap > 0.1 else "info",
                "The spread between the best and the worst class's F1 score on the same split; above 0.1 the "
                "model serves some classes markedly worse, check the worst class's support and confusions.",
            ))
        groups = 0
        for column, stats in (metrics.get("groups") or {}).items():
            stats = stats.get("worst", {}) if isinstance(stats, dict) else {}
            difference, impact = stats.get("demographic_parity_difference"), stats.get("disparate_impact")
            if not is_number(difference):
                continue
            detail = f"demographic parity difference, class {stats.get('class')}"
            if is_number(impact):
                detail += f"; disparate impact {impact:.2f}" + (" (below 4/5)" if impact < FOUR_FIFTHS else "")
            groups += 1
            found.append(Finding(
                f"Worst-group gap ({column})", f"{difference:.2f}", detail, source,
                "warn" if stats.get("flagged") else "info",
                "The largest difference between groups in how often a class is predicted (demographic parity, "
                "fairlearn); a selection-rate ratio below 0.8 fails the four-fifths rule of US employment "
                "law (EEOC 1978), the common threshold for adverse impact.",
            ))
        segment = metrics.get("weakest_segment")
        if not groups and isinstance(segment, dict) and is_number(segment.get("accuracy")):
            detail = f"{segment.get('property')} {segment.get('segment')}, {segment.get('count')} images"
            found.append(Finding(
                "Weakest image segment", f"{segment['accuracy']:.1%}", detail, source, "info",
                "Accuracy on the quantile of images (by brightness, contrast or foreground area) where the model "
                "does worst; far below the overall accuracy it points at inputs the training data under-covers.",
            ))
        return found


# -----------------------------------------------------------------------------------------
# Per class
# -----------------------------------------------------------------------------------------


def _per_class(ctx: Context, y_true: np.ndarray, y_pred: np.ndarray, result: Result) -> str:
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, precision_recall_fscore_support

    k, names = ctx.num_classes, ctx.class_names
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(k), zero_division=0
    )
    present = support > 0  # a class absent from the split has no F1 to compare
    worst = int(np.flatnonzero(present)[f1[present].argmin()])
    # The spread best − worst, as fairlearn's "difference" is max − min over groups.
    gap = float(f1[present].max() - f1[worst])
    result.tables["classes"] = [
        {"class": names[c], "precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
         "support": int(support[c])}
        for c in range(k)
    ]
    split_share = np.bincount(y_true, minlength=k) / max(len(y_true), 1)
    balance = {"class": names, f"{ctx.split}_fraction": split_share}
    if ctx.data is not None:
        train_y = ctx.data.train.y.numpy()
        balance = {"class": names, "train_fraction": np.bincount(train_y, minlength=k) / len(train_y), **balance}
        result.metrics["class_balance_max_shift"] = float(np.abs(balance["train_fraction"] - split_share).max())
    result.tables["class_balance"] = [dict(zip(balance, row)) for row in zip(*(_plain(v) for v in balance.values()))]
    result.metrics.update(
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1[present].mean()),
        worst_class=names[worst],
        worst_class_f1=float(f1[worst]),
        worst_class_gap=gap,
    )
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * k, 0.8 + 0.45 * k) if k > 6 else (4, 3.5))
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=np.arange(k), display_labels=names, ax=ax, colorbar=False,
        include_values=k <= 20, cmap="Blues",
    )
    ax.set_title(f"confusion matrix ({ctx.split}, {len(y_true)} samples)")
    result.add_figure("confusion_matrix", fig)
    return f"worst class {names[worst]} (F1 {f1[worst]:.2f}, gap {gap:.2f})"


# -----------------------------------------------------------------------------------------
# Per group: fairlearn's numbers, bootstrap intervals around them
# -----------------------------------------------------------------------------------------


def _groups(ctx: Context, names: list[str]) -> dict[str, np.ndarray]:
    """The group labels of the analyzed samples: the run's, or CSV columns named now."""
    if not names:
        return dict(ctx.groups)
    if ctx.kind != "tabular" or ctx.data is None:
        raise XdlError("--sensitive applies to runs on tabular (CSV) data; this analysis has none")
    missing = [n for n in names if n not in ctx.groups]
    if not missing:
        return {n: ctx.groups[n] for n in names}
    if ctx.data.spec.get("name") != "csv":
        raise XdlError(f"--sensitive {missing[0]} needs a run trained on a CSV file; this run's groups are: "
                       f"{', '.join(ctx.groups) or 'none'}")
    from xdl.data import load_data

    # Same spec, so the same rows in the same splits; the columns stay features, so the
    # model's inputs are unchanged — only their raw values are kept as group labels.
    rebuilt = load_data({**ctx.data.spec, "extra_groups": missing}).split(ctx.split).groups
    index = np.arange(len(ctx.x)) if ctx.indices is None else ctx.indices
    return {n: ctx.groups[n] if n in ctx.groups else rebuilt[n][index] for n in names}


def _per_group(
    ctx: Context, column: str, labels: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray,
    params: BiasParams, rng: np.random.Generator, result: Result,
) -> str:
    from fairlearn.metrics import (
        MetricFrame, count, demographic_parity_difference, demographic_parity_ratio,
        equalized_odds_difference, false_positive_rate, selection_rate, true_positive_rate,
    )
    from sklearn.metrics import accuracy_score

    labels = np.asarray(labels).astype(str)
    overall = MetricFrame(metrics={"count": count, "accuracy": accuracy_score}, y_true=y_true, y_pred=y_pred,
                          sensitive_features=labels).by_group
    small = overall[overall["count"] < SMALL_GROUP]
    for group, size in small["count"].astype(int).items():
        members = "1 member" if size == 1 else f"{size} members"
        result.warnings.append(f"group {group!r} of {column!r} has {members}: its rates are unreliable")
    # Binary: the positive class (index 1); multiclass: every class one-vs-rest.
    classes = [1] if ctx.num_classes == 2 else list(range(ctx.num_classes))
    rates = {"selection_rate": partial(selection_rate, pos_label=1), "tpr": partial(true_positive_rate, pos_label=1),
             "fpr": partial(false_positive_rate, pos_label=1)}
    per_class, rows = {}, []
    for c in classes:
        yb, pb = (y_true == c).astype(int), (y_pred == c).astype(int)
        frame = MetricFrame(metrics=rates, y_true=yb, y_pred=pb, sensitive_features=labels).by_group
        ratio = float(demographic_parity_ratio(yb, pb, sensitive_features=labels))
        per_class[ctx.class_names[c]] = {
            "demographic_parity_difference": float(demographic_parity_difference(yb, pb, sensitive_features=labels)),
            "demographic_parity_ratio": ratio,
            "equalized_odds_difference": float(equalized_odds_difference(yb, pb, sensitive_features=labels)),
            # Without a declared privileged group, disparate impact is the lowest selection
            # rate over the highest: the demographic-parity ratio.
            "disparate_impact": ratio,
            "flagged": bool(ratio < FOUR_FIFTHS),
        }
        rows += [
            {"column": column, "class": ctx.class_names[c], "group": group, "count": int(overall.loc[group, "count"]),
             "accuracy": float(overall.loc[group, "accuracy"]), **{k: float(v) for k, v in frame.loc[group].items()}}
            for group in frame.index
        ]
    if params.bootstrap:
        intervals = _bootstrap_intervals(labels, y_true, y_pred, classes, params, rng)
        for c, ci in zip(classes, intervals):
            per_class[ctx.class_names[c]]["ci"] = ci
    result.tables.setdefault("groups", []).extend(rows)
    # Worst class: the lowest disparate impact; a class nobody is predicted as has no ratio.
    scored = {k: v for k, v in per_class.items() if math.isfinite(v["disparate_impact"])}
    worst_name = min(scored, key=lambda k: scored[k]["disparate_impact"]) if scored else next(iter(per_class))
    worst = per_class[worst_name]
    result.metrics.setdefault("groups", {})[column] = {
        "groups": len(overall), "classes": _finite(per_class), "worst": {"class": worst_name, **_finite(worst)},
    }
    which = f" (class {worst_name})" if len(classes) > 1 else ""
    flag = f" < {FOUR_FIFTHS} (flagged)" if worst["flagged"] else ""
    return (f"{column}{which}: demographic parity difference {worst['demographic_parity_difference']:.2f}, "
            f"disparate impact {worst['disparate_impact']:.2f}{flag}")


def group_rates(weights: np.ndarray, codes: np.ndarray, n_groups: int, yb: np.ndarray, pb: np.ndarray) -> dict:
    """Selection rate, TPR and FPR per group (B×G×C) for B weightings of the n rows at once.

    ``weights`` is B×n (bootstrap counts; all ones gives the plain rates), ``codes`` the
    group index of each row, ``yb``/``pb`` n×C 0/1 one-vs-rest truths and predictions.
    Conventions follow fairlearn: an absent group has no rate (NaN, left out); a group
    without positives (negatives) has TPR (FPR) 0, as scikit-learn's normalized confusion
    matrix gives.
    """
    onehot = np.eye(n_groups)[codes]  # n×G
    members = weights @ onehot  # B×G
    stacked = np.stack([yb, pb, yb * pb], 1)[:, :, None, :] * onehot[:, None, :, None]  # n×3×G×C
    pos, sel, tp = (weights @ stacked.reshape(len(codes), -1)).reshape(len(weights), 3, n_groups, -1).transpose(1, 0, 2, 3)
    neg, fp = members[..., None] - pos, sel - tp
    present = members[..., None] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "selection_rate": np.where(present, sel / members[..., None], np.nan),
            "tpr": np.where(present, np.where(pos > 0, tp / pos, 0.0), np.nan),
            "fpr": np.where(present, np.where(neg > 0, fp / neg, 0.0), np.nan),
        }


def fairness_measures(rates: dict) -> dict:
    """Demographic parity difference/ratio and equalized odds difference (worst case) over groups."""
    spread = {k: np.nanmax(v, 1) - np.nanmin(v, 1) for k, v in rates.items()}
    top = np.nanmax(rates["selection_rate"], 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.nanmin(rates["selection_rate"], 1) / top
    return {
        "demographic_parity_difference": spread["selection_rate"],
        "demographic_parity_ratio": ratio,
        "equalized_odds_difference": np.maximum(spread["tpr"], spread["fpr"]),
    }


def _bootstrap_intervals(
    labels: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, classes: list[int], params: BiasParams,
    rng: np.random.Generator,
) -> list[dict]:
    """Percentile intervals of the fairness measures over ``params.bootstrap`` resamples."""
    names, codes = np.unique(labels, return_inverse=True)
    n, cls = len(codes), np.asarray(classes)
    yb, pb = (y_true[:, None] == cls).astype(float), (y_pred[:, None] == cls).astype(float)
    # Resample as multinomial counts per row: B×n weights, a few million cells at a time.
    block = max(1, 4_000_000 // max(n, 1))
    found: dict[str, list[np.ndarray]] = {}
    for start in range(0, params.bootstrap, block):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(block, params.bootstrap - start)).astype(float)
        for key, value in fairness_measures(group_rates(weights, codes, len(names), yb, pb)).items():
            found.setdefault(key, []).append(value)
    tail = 100 * (1 - params.confidence) / 2
    with warnings.catch_warnings():  # a class no one is predicted as has no ratio in any resample: null
        warnings.simplefilter("ignore", RuntimeWarning)
        bounds = {k: np.nanpercentile(np.concatenate(v), [tail, 100 - tail], axis=0) for k, v in found.items()}
    return [{k: [_num(b[0, i]), _num(b[1, i])] for k, b in bounds.items()} for i in range(len(classes))]


# -----------------------------------------------------------------------------------------
# Image segments: where no group labels exist, the images' own properties define groups
# -----------------------------------------------------------------------------------------


@torch.no_grad()
def _scan(ctx: Context, segments: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Probabilities and, for image segments, each image's properties: one pass over the samples
    (a streamed split is decoded once, a batch at a time)."""
    probs, found = [], []
    for _, xb in ctx.stream(desc="bias"):
        probs.append(torch.softmax(ctx.model(xb).float(), 1).cpu())
        if segments:
            found.append(_properties(xb))
    properties = {name: torch.cat([f[name] for f in found]) for name in found[0]} if found else {}
    return torch.cat(probs), properties


def _segments(properties: dict[str, torch.Tensor], q: int) -> dict[str, np.ndarray]:
    """Quantile bins of brightness, contrast and foreground area for each image."""
    import pandas as pd

    out = {}
    for name, values in properties.items():
        bins = pd.qcut(values.numpy().astype(np.float64), q, duplicates="drop", precision=3)
        out[name] = np.asarray(bins.astype(str))
    return out


def _properties(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Brightness, contrast and foreground area of each image of a batch, on CPU."""
    gray = x.float().mean(1)  # N×H×W in [0, 1]
    flat = gray.flatten(1)
    # The background is what the border shows (dark for digits/MNIST, light for scans), so
    # foreground = pixels far from the border's median, whichever way the image is lit.
    border = torch.cat([gray[:, 0], gray[:, -1], gray[:, :, 0], gray[:, :, -1]], 1)
    background = border.median(1).values
    return {
        "brightness": flat.mean(1).cpu(),
        "contrast": flat.std(1).cpu(),
        "foreground_area": ((flat - background[:, None]).abs() > 0.25).float().mean(1).cpu(),
    }


def _per_segment(segments: dict[str, np.ndarray], y_true: np.ndarray, y_pred: np.ndarray, result: Result) -> str:
    from fairlearn.metrics import MetricFrame, count
    from sklearn.metrics import accuracy_score

    rows = []
    for name, labels in segments.items():
        frame = MetricFrame(metrics={"count": count, "accuracy": accuracy_score}, y_true=y_true, y_pred=y_pred,
                            sensitive_features=labels).by_group
        rows += [{"property": name, "segment": seg, "count": int(r["count"]), "accuracy": float(r["accuracy"])}
                 for seg, r in frame.iterrows()]
    result.tables["segments"] = rows
    weakest = min(rows, key=lambda r: r["accuracy"])
    result.metrics["weakest_segment"] = weakest
    return f"weakest segment {weakest['property']} {weakest['segment']} (accuracy {weakest['accuracy']:.2f}, {weakest['count']} images)"


def _plain(values: np.ndarray | list) -> list:
    """Python scalars for CSV/JSON cells."""
    return np.asarray(values).tolist()


def _num(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _finite(measures: dict) -> dict:
    """JSON has no NaN: undefined measures (no one selected anywhere) become null."""
    return {k: _finite(v) if isinstance(v, dict) else _num(v) if isinstance(v, float) else v for k, v in measures.items()}
