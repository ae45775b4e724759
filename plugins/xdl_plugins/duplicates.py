"""Duplicates: exact and near copies within and across splits, and the leakage they cause.

Exact copies share every byte of the loaded sample (grouped by sorting, not hashing). Near
copies have penultimate features (the input of the layer that produces the class scores, centred on the training
mean) with cosine similarity at or above ``feature_threshold`` and, for images, DCT perceptual
hashes (Zauner 2010) at most ``hash_distance`` of 195 bits apart: both must agree, so a lightly
noised or shifted copy is found while two different digits of one class are not. Tabular rows
have no hash, so their feature threshold defaults higher. All pairs come from chunked
matrix products over every split at once, never a Python loop over pairs. A test sample
with a copy in train or validation is leaked: the test accuracy is recomputed without them.

>>> result = xdl.report(run, "duplicates", params={"feature_threshold": 0.98})   # doctest: +SKIP
>>> result.metrics["leaked_test"], result.metrics["test_accuracy_without_leaked"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from xdl.analysis import Analyzer, Context, Finding, Result
from xdl.errors import XdlError
from xdl.methods.quality import duplicates as dup
from xdl.methods.quality.features import logits_and_features
from xdl.models.layers import Head, score_head

SPLITS = ("train", "val", "test")


@dataclass
class DuplicatesParams:
    # Cosine similarity of centred penultimate features; default 0.8 for images, where the hash
    # must agree too, 0.99 for tabular rows, where the features decide alone.
    feature_threshold: float | None = None
    hash_distance: int = 16  # max differing bits of the 195-bit perceptual hash (images)
    chunk: int = 1024  # rows per matrix product: memory is chunk × all samples × 4 bytes
    max_rows: int = 5000  # rows kept in each table; arrays.npz holds every pair

    def __post_init__(self) -> None:
        if self.feature_threshold is not None and not -1 <= self.feature_threshold <= 1:
            raise ValueError(f"feature_threshold is a cosine similarity in [-1, 1], got {self.feature_threshold}")
        if not 0 <= self.hash_distance <= 195:
            raise ValueError(f"hash_distance must be 0..195 bits, got {self.hash_distance}")
        if not 1 <= self.chunk <= 65536:
            raise ValueError(f"chunk must be 1..65536, got {self.chunk}")
        if not 1 <= self.max_rows <= 1_000_000:
            raise ValueError(f"max_rows must be 1..1000000, got {self.max_rows}")


class Duplicates(Analyzer):
    kind = "report"
    Params = DuplicatesParams
    samples = None
    sharding = "none"  # pairs span every split
    description = "exact and near duplicates within and across splits, train↔test leakage, conflicting labels"
    check_params = {"chunk": 7}

    def run(self, ctx: Context, params: DuplicatesParams) -> Result:
        if ctx.data is None:
            raise XdlError("the duplicates report needs a run directory: it compares every split with every other")
        parts = [ctx.data.split(s) for s in SPLITS]
        y = torch.cat([p.y for p in parts]).numpy()
        split = np.repeat(np.arange(3), [len(p) for p in parts])
        source = np.concatenate([p.source_index for p in parts])
        logits, features, digests, hashes, head = _walk(ctx, parts)
        predicted = logits.argmax(1).numpy()
        n = len(y)

        exact = dup.exact_groups(digests)
        first = np.unique(exact, return_index=True)[1][exact]  # every exact copy joins its group's first member
        exact_edges = np.flatnonzero(first != np.arange(n))
        # Centred: ReLU features are all non-negative, so raw cosines of unrelated samples sit near 1.
        features = features - features[torch.as_tensor(split == 0)].mean(0)
        i, j, cos, bits = self._near(ctx, params, hashes, features)
        near = exact[i] != exact[j]  # copies with identical bytes are already exact
        i, j, cos = i[near], j[near], cos[near]
        bits = bits[near] if bits is not None else None
        group = dup.components(n, np.r_[exact_edges, i], np.r_[first[exact_edges], j])
        sizes = np.bincount(group)
        members = np.flatnonzero(sizes[group] > 1)
        groups = np.unique(group[members])

        # Per group: how many distinct labels, and whether it reaches into train or validation.
        pairs = np.unique(np.c_[group[members], y[members]], axis=0)
        labels_per_group = np.bincount(pairs[:, 0], minlength=len(sizes))
        conflict = labels_per_group > 1
        splits_per_group = np.bincount(np.unique(np.c_[group[members], split[members]], axis=0)[:, 0], minlength=len(sizes))
        fitted = np.bincount(group[members], weights=split[members] < 2, minlength=len(sizes)) > 0
        leaked_mask = (split == 2) & fitted[group] & (sizes[group] > 1)
        leaked = np.flatnonzero(leaked_mask)
        test = split == 2
        clean = test & ~leaked_mask
        copies = np.bincount(exact)[exact] - 1

        names = ctx.class_names
        result = self.result(arrays={"pair_a": i, "pair_b": j, "similarity": cos, "group": group, "split": split,
                                     "source_index": source, "leaked_test": leaked})
        result.tables["duplicates"] = [
            {"group": int(group[m]), "split": SPLITS[split[m]], "source_index": int(source[m]),
             "label": names[y[m]], "predicted": names[predicted[m]], "exact_copies": int(copies[m]),
             "group_size": int(sizes[group[m]]), "conflicting_labels": bool(conflict[group[m]]),
             "leaked_test": bool(leaked_mask[m])}
            for m in members[np.argsort(group[members], kind="stable")][: params.max_rows]
        ]
        top = np.argsort(-cos, kind="stable")[: params.max_rows]
        result.tables["near_pairs"] = [
            {"split_a": SPLITS[split[a]], "source_index_a": int(source[a]), "split_b": SPLITS[split[b]],
             "source_index_b": int(source[b]), "cosine": round(float(c), 5),
             **({"hash_distance": int(bits[k])} if bits is not None else {}),
             "label_a": names[y[a]], "label_b": names[y[b]], "conflicting_labels": bool(y[a] != y[b])}
            for k, a, b, c in zip(top, i[top], j[top], cos[top])
        ]
        accuracy = float((predicted[test] == y[test]).mean()) if test.any() else float("nan")
        accuracy_clean = float((predicted[clean] == y[clean]).mean()) if clean.any() else float("nan")
        cross = int((splits_per_group > 1).sum())
        result.metrics.update(
            samples=n, exact_duplicates=int((copies > 0).sum()),
            near_pairs=int(len(i)), duplicate_groups=int(len(groups)), cross_split_groups=cross,
            conflicting_groups=int(conflict.sum()), leaked_test=int(len(leaked)), test_samples=int(test.sum()),
            test_accuracy=accuracy, test_accuracy_without_leaked=accuracy_clean,
            truncated=bool(len(members) > params.max_rows or len(i) > params.max_rows), features_from=head.described,
        )
        if head.module is None:
            result.warnings.append("near copies compared on the logits: no layer of this model produces the class "
                                   "scores alone, so its penultimate features are not reachable")
        if result.metrics["truncated"]:
            result.warnings.append(f"tables keep the first {params.max_rows} rows; arrays.npz holds every pair and group")
        result.summary = (
            f"{len(groups)} duplicate groups over {n} samples ({result.metrics['exact_duplicates']} samples with an "
            f"exact copy, {len(i)} near pairs), {cross} spanning splits; {len(leaked)} test samples leak from train/val "
            f"(test accuracy {accuracy:.4f}, {accuracy_clean:.4f} without them); {int(conflict.sum())} groups with conflicting labels"
        )
        if len(i) and ctx.kind == "image":
            shown = np.unique(np.r_[i[top[:8]], j[top[:8]]])
            offsets = np.cumsum([0] + [len(p) for p in parts])
            images = {int(m): parts[split[m]].x[int(m - offsets[split[m]])] for m in shown}  # 16 images, decoded alone
            result.add_figure("near_pairs", _pairs(images, i[top[:8]], j[top[:8]], split, source, cos[top[:8]]))
        return result

    @staticmethod
    def _near(ctx: Context, params: DuplicatesParams, bits: torch.Tensor | None, features: torch.Tensor):
        """Near pairs (i < j) with cosine ≥ threshold and, for images, hash distance (of ``bits``) ≤ limit."""
        unit = F.normalize(features, dim=1)
        threshold = params.feature_threshold
        if ctx.kind != "image":
            threshold = 0.99 if threshold is None else threshold
            i, j, cos = dup.similar_pairs(unit, threshold, chunk=params.chunk, progress=ctx.progress)
            return i, j, cos, None
        threshold = 0.8 if threshold is None else threshold
        # One pass over [features, hash] / √2: the mean of both similarities bounds each from below,
        # so every pair meeting both thresholds is a candidate; each threshold is checked exactly after.
        hash_floor = 1 - 2 * params.hash_distance / bits.shape[1]
        both = torch.cat([unit, dup.signs(bits)], 1) / np.sqrt(2)
        i, j, _ = dup.similar_pairs(both, (threshold + hash_floor) / 2 - 1e-6, chunk=params.chunk,
                                    progress=ctx.progress)
        cos = (unit[torch.as_tensor(i)] * unit[torch.as_tensor(j)]).sum(1).numpy()
        distance = dup.hamming(bits, i, j)
        keep = (cos >= threshold) & (distance <= params.hash_distance)
        return i[keep], j[keep], cos[keep], distance[keep]

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        m = result.metrics
        if "leaked_test" not in m:
            return []
        return [Finding(
            "test samples leaked from training", f"{m['leaked_test']} of {m['test_samples']}",
            detail=(f"test accuracy {m['test_accuracy']:.4f} → {m['test_accuracy_without_leaked']:.4f} without them; "
                    f"{m['conflicting_groups']} duplicate groups with conflicting labels"),
            source=f"report/{result.method}", level="warn" if m["leaked_test"] or m["conflicting_groups"] else "info",
            help="Test samples that also sit, exactly or nearly (same penultimate features and perceptual hash), in "
                 "the training or validation data measure memory, not generalization (Barz & Denzler 2020, 'Do we "
                 "train on test data?'); any leak inflates test accuracy, and duplicates with different labels are "
                 "label errors.",
        )]


def _walk(ctx: Context, parts: list) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor | None, Head]:
    """Logits, penultimate features, a 16-byte digest of each row's values (exact copies share
    it), for images the perceptual hash, and the head the features are read at: one pass over
    every split in batches, so a streamed split is decoded once and never held whole."""
    logits, features, digests, hashes = [], [], [], []
    head = None
    for part in parts:
        for _, xb in ctx.stream(part.x, desc="features" if ctx.progress else None):
            head = head or score_head(ctx.model, xb[:2].to(ctx.device))
            lo, fe = logits_and_features(ctx.model, xb, ctx.device, len(xb), head=head)
            logits.append(lo)
            features.append(fe)
            cpu = xb.cpu()
            rows = np.ascontiguousarray(cpu.numpy().reshape(len(cpu), -1))
            digests += [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]
            if ctx.kind == "image":
                hashes.append(dup.phash(cpu))
    digest = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 16)
    return torch.cat(logits), torch.cat(features), digest, torch.cat(hashes) if hashes else None, head or Head("", None)


def _pairs(x: dict[int, torch.Tensor], a: np.ndarray, b: np.ndarray, split: np.ndarray, source: np.ndarray, cos: np.ndarray):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.5 * len(a), 3.4), layout="constrained")
    axes = fig.subplots(2, len(a), squeeze=False)
    for k in range(len(a)):
        for row, m in enumerate((a[k], b[k])):
            img = x[m].numpy().transpose(1, 2, 0)
            ax = axes[row, k]
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{SPLITS[split[m]]} #{source[m]}" + (f"\ncos {cos[k]:.3f}" if row else ""), fontsize=7)
            ax.axis("off")
    fig.suptitle("closest near-duplicate pairs", fontsize=9)
    return fig
