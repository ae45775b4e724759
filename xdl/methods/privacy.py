"""Membership inference: how well an attacker tells a model's training records from outsiders.

Two families, both scored so that a higher score means "more likely a member":

- **Threshold attacks on the model alone** (Yeom et al. 2018, "Privacy Risk in Machine
  Learning"): a training record tends to have a lower loss, a higher true-class confidence
  and a lower prediction entropy than a record the model never saw.
- **LiRA** (Carlini et al. 2022, "Membership Inference Attacks From First Principles"):
  reference ("shadow") models trained the way the run was trained, on random halves of a
  population, show how confident a model is on each record when the record is *in* its
  training set and when it is *out*. The record's logit-scaled confidence
  φ = log(p_y / (1 − p_y)) under those models is close to Gaussian on each side.
  *Online* LiRA puts the target records in the population, so each is IN about half the
  reference models and OUT of the others, and scores the likelihood ratio
  log N(φ; μ_in, σ_in) − log N(φ; μ_out, σ_out) of the target model's φ. *Offline* LiRA has
  only OUT models, so the test is one-sided: the score is Φ((φ − μ_out) / σ_out), reported as
  the z-score inside it (the same order, and finite at the extremes).

Reference models are cached as safetensors beside a JSON that records what they were
trained from and the weights' digest, so a second report reuses them without retraining.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xdl.data.types import DataSplits, Split
from xdl.errors import XdlError
from xdl.io import write_json
from xdl.models.builders import build_model
from xdl.models.weights import load_weights, save_weights
from xdl.runs.provenance import file_digest

# False-positive rates at which the field reports attack success (Carlini et al. 2022, §III).
LOW_FPRS = (0.001, 0.01)


# -----------------------------------------------------------------------------------------
# Per-example signals of one model
# -----------------------------------------------------------------------------------------


@torch.no_grad()
def signals(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Loss, true-class confidence, entropy and logit-scaled confidence φ per example (eval mode)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"loss": [], "confidence": [], "entropy": [], "phi": []}
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size].to(device)).float().cpu()
        yb = y[start : start + batch_size].long()
        logp = torch.log_softmax(logits, 1)
        true = logits.gather(1, yb[:, None])[:, 0]
        # φ = log p_y − log(1 − p_y) = z_y − logsumexp_{j≠y} z_j: no 1 − p_y that rounds to 0.
        others = logits.scatter(1, yb[:, None], float("-inf")).logsumexp(1)
        parts["loss"].append(F.nll_loss(logp, yb, reduction="none"))
        parts["confidence"].append(logp.gather(1, yb[:, None])[:, 0].exp())
        parts["entropy"].append(-(logp.exp() * logp).sum(1))
        parts["phi"].append(true - others)
    model.train(was_training)
    return {k: torch.cat(v).numpy().astype(np.float64) if v else np.empty(0) for k, v in parts.items()}


def threshold_scores(target: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Yeom et al.'s attacks as scores (higher = member): −loss, confidence, −entropy."""
    return {"loss": -target["loss"], "confidence": target["confidence"], "entropy": -target["entropy"]}


# -----------------------------------------------------------------------------------------
# How well a score separates members from non-members
# -----------------------------------------------------------------------------------------


def attack_metrics(scores: np.ndarray, is_member: np.ndarray) -> dict[str, Any]:
    """ROC AUC, the best balanced accuracy over thresholds, and TPR at low FPRs, each with a
    95% bootstrap interval.

    At FPR f with n non-members at most ⌊f·n⌋ of them may be flagged. When that is 0 the rate
    cannot be resolved: 1/n is the lowest FPR this many non-members can show, and a TPR
    "at" a lower one would only count the members scored above every non-member, so it is
    reported as None (``meaningful`` False), not as a number.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    scores, is_member = np.asarray(scores, dtype=np.float64), np.asarray(is_member, dtype=bool)
    # Every threshold, as before: the best balanced accuracy is read off the same corners.
    fpr, tpr, _ = roc_curve(is_member, scores, drop_intermediate=False)
    negatives, positives = int((~is_member).sum()), int(is_member.sum())
    statistics: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"auc": lambda s, m: roc_auc_score(m, s)}
    low = {}
    for rate in LOW_FPRS:
        allowed = math.floor(rate * negatives + 1e-9)
        low[f"{rate:g}"] = {
            "tpr": tpr_at_fpr(scores, is_member, rate) if allowed else None,
            "false_positives_allowed": allowed,
            "non_members": negatives,
            "meaningful": allowed >= 1,
        }
        if allowed:
            statistics[f"{rate:g}"] = lambda s, m, rate=rate: tpr_at_fpr(s, m, rate)
    intervals = bootstrap_intervals(scores, is_member, statistics)
    return {
        "auc": float(roc_auc_score(is_member, scores)),
        "auc_ci95": intervals.pop("auc"),
        "balanced_accuracy": float(((tpr + 1 - fpr) / 2).max()),
        "tpr_at_fpr": low,
        # Beside tpr_at_fpr rather than inside it, so each rate's entry keeps its saved shape.
        "tpr_at_fpr_ci95": {f"{rate:g}": intervals.get(f"{rate:g}") for rate in LOW_FPRS},
        "lowest_fpr": 1 / negatives if negatives else None,
        "members": positives,
        "non_members": negatives,
    }


def tpr_at_fpr(scores: np.ndarray, is_member: np.ndarray, rate: float) -> float:
    """The highest TPR of a threshold that flags at most ⌊rate·n⌋ of the n non-members.

    With k allowed, any threshold above the (k+1)-th highest non-member score s qualifies,
    and the lowest such one flags exactly the members scored above s: the ROC curve's corner,
    read without building the curve (the bootstrap asks for it hundreds of times).
    """
    scores, is_member = np.asarray(scores, dtype=np.float64), np.asarray(is_member, dtype=bool)
    outside, inside = scores[~is_member], scores[is_member]
    allowed = math.floor(rate * len(outside) + 1e-9)
    if allowed >= len(outside):
        return 1.0
    bar = -np.partition(-outside, allowed)[allowed]
    return float((inside > bar).mean())


def bootstrap_intervals(
    scores: np.ndarray,
    is_member: np.ndarray,
    statistics: dict[str, Callable[[np.ndarray, np.ndarray], float]],
    resamples: int = 200,
    seed: int = 0,
) -> dict[str, list[float]]:
    """95% bootstrap intervals of ``statistic(scores, is_member)`` for each named statistic.

    Members and non-members are resampled separately, so every resample keeps the balance
    (and the count of non-members a low-FPR rate rests on); every statistic is computed on
    the same resamples. A percentile interval: the 2.5% and 97.5% quantiles.
    """
    scores, is_member = np.asarray(scores, dtype=np.float64), np.asarray(is_member, dtype=bool)
    inside, outside = np.flatnonzero(is_member), np.flatnonzero(~is_member)
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(len(inside), bool), np.zeros(len(outside), bool)]
    values: dict[str, list[float]] = {name: [] for name in statistics}
    for _ in range(resamples):
        drawn = scores[np.r_[rng.choice(inside, len(inside)), rng.choice(outside, len(outside))]]
        for name, statistic in statistics.items():
            values[name].append(statistic(drawn, labels))
    return {name: [float(q) for q in np.quantile(v, [0.025, 0.975])] for name, v in values.items()}


def auc_interval(scores: np.ndarray, is_member: np.ndarray, resamples: int = 200, seed: int = 0) -> list[float]:
    """A 95% bootstrap interval of the ROC AUC (:func:`bootstrap_intervals`). A few hundred
    records per side leave an AUC of 0.5 uncertain by about ±0.05, which a bar such as
    "AUC ≤ 0.55" must be read against."""
    from sklearn.metrics import roc_auc_score

    return bootstrap_intervals(scores, is_member, {"auc": lambda s, m: roc_auc_score(m, s)}, resamples, seed)["auc"]


def roc_points(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(is_member, dtype=bool), scores)
    return fpr, tpr


# -----------------------------------------------------------------------------------------
# LiRA, online and offline
# -----------------------------------------------------------------------------------------

# Online LiRA fits a Gaussian on each side of every record: two IN and two OUT models at least.
ONLINE_MIN_REFERENCES = 4


def half_assignment(k: int, n: int, seed: int) -> np.ndarray:
    """K×N booleans: which population records train which reference model.

    Every record is IN exactly ⌊K/2⌋ models (Carlini et al.'s balanced split), so every
    record has OUT models to fit its Gaussian on, and IN ones too from K = 2.
    """
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((k, n)), axis=0) < k // 2


def gaussians(shadow_phi: np.ndarray, side: np.ndarray, variance: str = "global", name: str = "OUT") -> tuple[np.ndarray, np.ndarray]:
    """Per example, the mean and standard deviation of φ over the reference models in ``side``.

    ``shadow_phi`` and ``side`` are K×N. σ is fitted per example too, or — with few reference
    models, where per-example variances are noisy — one σ pooled over every example's
    residuals (Carlini et al. 2022, §VI-A, "fixed variance", advised below ~64 models).
    """
    counts = side.sum(0)
    if (counts < 1).any():
        raise XdlError(f"LiRA needs at least one {name} reference model for each example")
    mu = np.where(side, shadow_phi, 0.0).sum(0) / counts
    squares = (np.where(side, shadow_phi - mu, 0.0) ** 2).sum(0)
    if variance == "per-example":
        if (counts < 2).any():
            raise XdlError(f"per-example variances need at least two {name} reference models per example; use variance=global")
        sigma = np.sqrt(squares / (counts - 1))
    else:
        dof = max(int(counts.sum() - len(counts)), 1)  # one mean fitted per example
        sigma = np.full(len(counts), math.sqrt(squares.sum() / dof))
    return mu, np.maximum(sigma, 1e-6)


def lira_offline(target_phi: np.ndarray, shadow_phi: np.ndarray, out: np.ndarray, variance: str = "global") -> np.ndarray:
    """The one-sided offline-LiRA z-score (φ − μ_out) / σ_out per example (higher = member).

    ``shadow_phi`` and ``out`` are K×N: each reference model's φ on each example and whether
    the example was outside that model's training half.
    """
    mu, sigma = gaussians(shadow_phi, out, variance, "OUT")
    return (target_phi - mu) / sigma


def lira_online(target_phi: np.ndarray, shadow_phi: np.ndarray, inside: np.ndarray, variance: str = "global") -> np.ndarray:
    """The online-LiRA log-likelihood ratio log N(φ; μ_in, σ_in) − log N(φ; μ_out, σ_out) per
    example (higher = member); ``inside`` (K×N) says which reference models trained on it.

    Each side has its own σ (a global one per side with ``variance="global"``, as the paper's
    fixed-variance variant): a memorized record's IN φ is tight, its OUT φ spread out, and
    that difference is evidence too. Written out rather than through scipy.stats.norm: the
    1/√(2π) of both densities cancels.
    """
    mu_in, sd_in = gaussians(shadow_phi, inside, variance, "IN")
    mu_out, sd_out = gaussians(shadow_phi, ~inside, variance, "OUT")
    log_in = -0.5 * ((target_phi - mu_in) / sd_in) ** 2 - np.log(sd_in)
    log_out = -0.5 * ((target_phi - mu_out) / sd_out) ** 2 - np.log(sd_out)
    return log_in - log_out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def reference_models(
    run_info: dict,
    data: DataSplits,
    population: Split,
    population_id: str,
    count: int,
    seed: int,
    cache: Path | None,
    device: torch.device,
    retrain: Callable[[dict, dict, DataSplits, int], nn.Module],
    progress: Callable[[int], Any] | None = None,
) -> tuple[list[nn.Module], np.ndarray, list[dict]]:
    """Train (or reload) ``count`` reference models on random halves of ``population``.

    Each is built from the run's model config and trained by ``retrain`` (the analyzer passes
    :func:`xdl.training.loop.retrain`) with the run's train config (seed varied per model). With ``cache`` each model is saved as
    ``<key>.safetensors`` with ``<key>.json`` naming its inputs and the weights' sha256; a
    model whose key and digest match is loaded instead of trained. Returns the models (eval
    mode, on ``device``), the K×N IN matrix and one record per model (its key, file, whether reused).
    """
    keep = half_assignment(count, len(population), seed)
    model_cfg, train_cfg = run_info["model"], run_info["train"]
    in_shape, classes = tuple(data.input_shape), data.num_classes
    models, records = [], []
    for k in range(count):
        key = _digest({"model": model_cfg, "train": train_cfg, "data": data.spec, "population": population_id,
                       "count": count, "index": k, "seed": seed})[:24]
        weights = cache / f"{key}.safetensors" if cache else None
        meta = cache / f"{key}.json" if cache else None
        if weights is not None and weights.is_file() and meta.is_file():
            try:
                record = json.loads(meta.read_text(encoding="utf-8"))
            except (ValueError, OSError):  # a damaged record only costs retraining this model
                record = {}
            if isinstance(record, dict) and record.get("key") == key and record.get("weights_sha256") == file_digest(weights):
                net = build_model(model_cfg, in_shape, classes)
                load_weights(net, weights)
                models.append(net.to(device).eval())
                records.append({"model": k, "key": key, "reused": True, "trained_on": int(keep[k].sum()), "file": str(weights)})
                if progress:
                    progress(1)
                continue
        members = np.flatnonzero(keep[k])
        outside = np.flatnonzero(~keep[k])
        half = DataSplits(population.subset(members), population.subset(outside), population.subset(outside),
                          data.kind, data.class_names, data.spec, data.feature_names, data.encoding)
        model_seed = int(train_cfg.get("seed", 0)) + 1000 * (seed + 1) + k
        started = time.perf_counter()
        net = retrain(model_cfg, {**train_cfg, "seed": model_seed, "device": str(device)}, half, model_seed).eval()
        seconds = time.perf_counter() - started
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            save_weights(net, weights)
            write_json(meta, {"key": key, "weights_sha256": file_digest(weights), "model": model_cfg,
                              "train": {**train_cfg, "seed": model_seed}, "data": data.spec,
                              "population": population_id, "index": k, "count": count, "seed": seed,
                              "trained_on": members.tolist()})
        models.append(net.to(device))
        # Seconds per model are what ``references`` is sized by: the cost of LiRA is N of them.
        records.append({"model": k, "key": key, "reused": False, "trained_on": int(keep[k].sum()),
                        "file": str(weights) if weights else None, "seconds": round(seconds, 2)})
        if progress:
            progress(1)
    return models, keep, records
