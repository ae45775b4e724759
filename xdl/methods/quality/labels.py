"""Confident learning (Northcutt, Jiang & Chuang 2021, JAIR 70) on out-of-fold probabilities.

``out_of_fold`` retrains the run's own model config with its own train config K times,
each time predicting the fold it did not see, and caches the probabilities in the run.
``confident_joint`` counts, per given label i, the samples confidently in class j (p_j at or
above class j's threshold t_j = mean p_j over samples labelled j), calibrated to the label
counts. ``find_issues`` then prunes by noise rate: for every off-diagonal cell (i, j) it flags
the C[i, j] samples labelled i with the largest margin p_j − p_i, keeping samples the model
still predicts as their given label (as cleanlab's default ``prune_by_noise_rate`` does).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xdl.data.types import DataSplits, Split
from xdl.errors import XdlError
from xdl.io import atomic_write, write_json

# Probabilities this close count as "at the threshold" and as ties with the given label.
EPS = 1e-6


def thresholds(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-class threshold t_j: the mean self-confidence p_j of the samples labelled j."""
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k)
    sums = np.bincount(labels, probs[np.arange(len(labels)), labels], minlength=k)
    return np.divide(sums, counts, out=np.full(k, np.inf), where=counts > 0)  # an absent class is never confident


def confident_joint(labels: np.ndarray, probs: np.ndarray, calibrate: bool = True) -> np.ndarray:
    """K×K counts C[given, likely true]; calibrated so row i sums to the count of label i."""
    k = probs.shape[1]
    above = probs >= thresholds(labels, probs) - EPS
    confident = above.sum(1)
    # Several classes above their thresholds: the likeliest of those; exactly one: that one.
    guess = np.where(confident > 1, np.argmax(np.where(above, probs, -1.0), 1), probs.argmax(1))
    keep = confident > 0
    # Counted as [true, given] and transposed (a column-major view): cleanlab's layout, see below.
    joint = np.bincount(guess[keep] * k + labels[keep], minlength=k * k).reshape(k, k).T.astype(float, order="K")
    if not calibrate:
        return joint.astype(int)
    counts = np.bincount(labels, minlength=k)
    # Scaled through the transpose and summed in that memory layout: the same float operations,
    # in the same order, as cleanlab's calibration, so ties in its rounding tip the same way.
    joint = (joint.T / np.clip(joint.sum(1), 1e-12, None) * counts).T
    joint = joint / max(np.sum(joint), 1e-12) * int(counts.sum())
    return np.stack([_round_keeping_sum(row) for row in joint])


def _round_keeping_sum(row: np.ndarray) -> np.ndarray:
    """Integers summing to round(sum(row)): round each, then move the ones rounded furthest the other way.

    The same rule (and tie order) as cleanlab's ``round_preserving_sum``, so counts match it exactly.
    """
    ints = row.round()
    short = int(round(row.sum()) - ints.sum())
    order = np.argsort(row - ints)
    if short > 0:
        ints[order[::-1][:short]] += 1
    elif short < 0:
        ints[order[:-short]] -= 1
    return ints.astype(int)


def noise_matrix(joint: np.ndarray) -> np.ndarray:
    """P(true = j | given = i) estimated from the confident joint (rows sum to 1, empty rows 0)."""
    rows = joint.sum(1, keepdims=True)
    return np.divide(joint, rows, out=np.zeros(joint.shape), where=rows > 0)


def find_issues(labels: np.ndarray, probs: np.ndarray, joint: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of likely label errors (prune by noise rate, Northcutt et al. 2021 §3)."""
    labels = np.asarray(labels)
    joint = confident_joint(labels, probs) if joint is None else joint
    prune = _keep_one_per_class(joint)
    mask = np.zeros(len(labels), dtype=bool)
    for given in range(probs.shape[1]):
        members = np.flatnonzero(labels == given)
        if len(members) <= 1:
            continue
        for true in np.flatnonzero(prune[given]):
            if true != given:
                margin = probs[members, true] - probs[members, given]
                mask[members[np.argsort(-margin, kind="stable")[: prune[given, true]]]] = True
    # A sample the model still predicts as its given label (ties go to the label) is kept.
    lifted = probs.copy()
    lifted[np.arange(len(labels)), labels] += EPS
    return mask & (lifted.argmax(1) != labels)


def _keep_one_per_class(joint: np.ndarray) -> np.ndarray:
    """Move counts onto an empty diagonal so that pruning never empties a class."""
    out = joint.astype(float).copy()
    diagonal = np.diagonal(joint).astype(float)
    lift = np.maximum(diagonal, 1) - diagonal
    others = np.maximum(np.count_nonzero(joint, axis=1) - 1, 1)
    out -= (lift / others)[:, None]
    out[out < 0] = 0
    np.fill_diagonal(out, np.maximum(diagonal, 1))
    return np.stack([_round_keeping_sum(row) for row in out])


def quality_scores(labels: np.ndarray, probs: np.ndarray, method: str = "self_confidence") -> np.ndarray:
    """Label quality in [0, 1], low = likely wrong: p_given, or the normalized margin (p_given − max other + 1) / 2."""
    own = probs[np.arange(len(labels)), labels]
    if method == "self_confidence":
        return own
    if method == "normalized_margin":
        other = probs.copy()
        other[np.arange(len(labels)), labels] = -np.inf
        return (own - other.max(1) + 1) / 2
    raise XdlError(f"unknown ranking {method!r}: choose self_confidence or normalized_margin")


# -----------------------------------------------------------------------------------------
# Out-of-fold probabilities by K-fold retraining, cached in the run
# -----------------------------------------------------------------------------------------


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def out_of_fold(run, data: DataSplits, split: Split, folds: int, epochs: int | None, seed: int,
                device: torch.device, retrain: Callable[[dict, dict, DataSplits, int], nn.Module],
                progress: bool = False) -> tuple[np.ndarray, str]:
    """Probabilities for every sample of ``split`` from a model that never trained on it.

    Each fold trains a fresh model with ``retrain`` (the analyzer passes
    :func:`xdl.training.loop.retrain`: the run's model and train config; ``epochs`` overrides the run's) on the other K−1 folds, with the run's validation split for early stopping.
    Cached under RUN/cache/labels-oof/KEY.npz, KEY a digest of everything the numbers depend
    on (configs, seed, folds, the split's inputs and labels, the validation split); returns
    the probabilities and KEY.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    y = split.y.numpy()
    model_cfg, train_cfg = dict(run.info["model"]), dict(run.info["train"])
    if epochs is not None:
        train_cfg["epochs"] = epochs
    train_cfg.update(seed=seed, device=str(device))
    key_info = {"model": model_cfg, "train": train_cfg, "folds": folds, "seed": seed,
                "x_sha256": _digest(split.x.numpy().tobytes()), "y_sha256": _digest(y.astype(np.int64).tobytes()),
                "val_sha256": _digest(data.val.x.numpy().tobytes(), data.val.y.numpy().astype(np.int64).tobytes())}
    key = _digest(json.dumps(key_info, sort_keys=True, default=str))[:16]
    folder = Path(run.path) / "cache" / "labels-oof"
    cached = _read_cache(folder / f"{key}.npz", len(y), run.info["model"]["num_classes"])
    if cached is not None:
        return cached, key

    counts = np.bincount(y)
    if len(y) < 2 * folds:
        raise XdlError(f"{folds}-fold retraining needs at least {2 * folds} samples; the split has {len(y)}")
    # Stratify when every class can appear in every fold; otherwise a plain seeded shuffle.
    splitter = (StratifiedKFold if counts[counts > 0].min() >= folds else KFold)(folds, shuffle=True, random_state=seed)
    probs = np.zeros((len(y), run.info["model"]["num_classes"]), dtype=np.float32)
    parts = list(splitter.split(np.zeros(len(y)), y))
    if progress:
        from tqdm.auto import tqdm

        parts = tqdm(parts, desc=f"{folds}-fold retraining", unit="fold", leave=False, file=sys.stderr, dynamic_ncols=True)
    for fold, (fit_idx, held_idx) in enumerate(parts):
        fold_data = DataSplits(split.subset(fit_idx), data.val, data.val, data.kind, data.class_names, data.spec,
                               data.feature_names, data.encoding)
        model = retrain(model_cfg, train_cfg, fold_data, seed + fold)
        with torch.no_grad():
            held = split.x[torch.as_tensor(held_idx)]
            out = [torch.softmax(model(held[s:s + 512].to(device)).float(), 1).cpu() for s in range(0, len(held), 512)]
        probs[held_idx] = torch.cat(out).numpy()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probs=probs)
    atomic_write(folder / f"{key}.npz", buffer.getvalue())
    write_json(folder / f"{key}.json", {**key_info, "probs_sha256": _digest(probs.tobytes())})
    return probs, key


def _read_cache(path: Path, n: int, k: int) -> np.ndarray | None:
    """The cached probabilities if present, of the right shape and matching their recorded digest."""
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            probs = npz["probs"]
        recorded = json.loads(meta.read_text(encoding="utf-8")).get("probs_sha256")
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache only costs recomputation
    if probs.shape != (n, k) or recorded != _digest(probs.tobytes()):
        return None
    return probs
