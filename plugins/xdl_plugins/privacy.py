"""Privacy: can an attacker tell the run's training records from records it never saw?

Members are a seeded subset of the training split, non-members as many records the run
never trained on, drawn like the members: the validation split and the training rows
``--limit`` left out, and the test split too when it was cut from the same rows. An
official test file (MNIST's t10k) may differ in distribution, and an attack would read that
difference as membership, so its records fill in only where the held-out rows run short,
with a warning. Three threshold attacks on the model alone (Yeom et al. 2018: loss,
confidence, entropy) and offline LiRA (Carlini et al. 2022) with ``shadows`` reference
models trained with the run's own config (DP-SGD too, for a DP run) on random halves of a
population of those outside records, held-out rows first; the algorithms live in
:mod:`xdl.methods.privacy`. Reference models are cached in ``RUN/report/privacy/shadows/`` and reused.

>>> result = xdl.report(run, "privacy", params={"shadows": 8})      # doctest: +SKIP
>>> result.metrics["attacks"]["lira"]["tpr_at_fpr"]["0.01"]["tpr"]   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from xdl.analysis import Analyzer, Context, Finding, Result
from xdl.data.types import DataSplits, Split
from xdl.errors import XdlError
from xdl.training.loop import retrain
from xdl.methods.privacy import attack_metrics, lira_offline, reference_models, roc_points, signals, threshold_scores

CACHE = ("report", "privacy", "shadows")


@dataclass
class PrivacyParams:
    shadows: int = 8  # reference models for LiRA; 0 runs the threshold attacks only
    members: int = 0  # records per side (members, non-members); 0 = as many as the smaller split allows
    variance: Literal["global", "per-example"] = "global"  # LiRA's σ: pooled suits few shadows
    exposed: int = 16  # most exposed training records to show
    seed: int = 0

    def __post_init__(self) -> None:
        if self.shadows < 0 or self.shadows == 1 or self.shadows > 256:
            raise ValueError(f"shadows must be 0 (LiRA off) or 2..256, got {self.shadows}")
        if not 0 <= self.members <= 1_000_000:
            raise ValueError(f"members must be in 0..1000000, got {self.members}")
        if not 0 <= self.exposed <= 64:
            raise ValueError(f"exposed must be in 0..64, got {self.exposed}")


class Privacy(Analyzer):
    """Membership inference: threshold attacks and offline LiRA, TPR at low FPR, the most exposed records."""

    kind = "report"
    Params = PrivacyParams
    samples = None
    sharding = "none"
    description = "membership inference (loss/confidence threshold, offline LiRA): TPR at 0.1% and 1% FPR"
    check_params = {"shadows": 2, "members": 24, "exposed": 4}

    # Its split was never the model's training set, and LiRA's reference models would need the
    # model's own (unknown) training recipe: at 224 px, eight ResNet retrainings besides.
    inapplicable = ("an imported model: its training records are unknown, so membership cannot be tested "
                    "against this run's split")
    needs_xdl_training = True

    def run(self, ctx: Context, params: PrivacyParams) -> Result:
        if ctx.run is None or ctx.data is None:
            raise XdlError("the privacy report needs a run directory: members are its training records")
        data = ctx.data
        if len(data.test) < 2 or len(data.train) < 2:
            raise XdlError("the privacy report needs at least 2 training and 2 test records")
        rng = np.random.default_rng(params.seed)
        result = self.result()
        pool, order, alike = outside_records(ctx.run, data, rng)
        # Non-members come from the records drawn like the training split; a separate test
        # file's only when fewer than 100 of those exist (then said in a warning).
        candidates = order[:alike] if alike >= min(100, len(data.train)) else order
        if len(candidates) > alike:
            result.warnings.append(
                f"only {alike} held-out training records exist, so non-members include {len(candidates) - alike} records "
                "of the separate test file: if it differs in distribution from the training data, the attacks read that "
                "difference as membership"
            )
        # Balanced: as many members as non-members, so a 50% guess is chance and AUC reads plainly.
        n_in = n_out = min(params.members or len(candidates), len(data.train), len(candidates))
        member_index = np.sort(rng.choice(len(data.train), n_in, replace=False))
        outside_index = candidates[:n_out]
        x = torch.cat([data.train.x[member_index], pool.x[outside_index]])
        y = torch.cat([data.train.y[member_index], pool.y[outside_index]])
        is_member = np.r_[np.ones(n_in, bool), np.zeros(n_out, bool)]
        target = signals(ctx.model, x, y, ctx.device)
        scores = threshold_scores(target)
        if params.shadows:
            # LiRA's population is twice the training set, so each half is as large as the
            # run's own training set; the non-training data may hold fewer records than that.
            # It is taken in ``order``: the non-members and the records drawn like them first.
            size = min(len(pool), 2 * len(data.train))
            chosen = np.sort(order[:size])
            if size < 2 * len(data.train):
                result.warnings.append(
                    f"the reference models train on halves of {size} records the run never trained on, {size // 2} each, "
                    f"fewer than the run's {len(data.train)} training records: LiRA is weaker than it could be"
                )
            cache = ctx.run.path.joinpath(*CACHE) if getattr(ctx.run, "path", None) else None
            bar = _bar(params.shadows, ctx.progress)
            population_id = hashlib.sha256(pool.source_index[chosen].tobytes() + chosen.tobytes()).hexdigest()[:16]
            models, keep, records = reference_models(
                ctx.run.info, data, pool.subset(chosen), f"outside:{len(pool)}:{population_id}",
                params.shadows, params.seed, cache, ctx.device, retrain, bar.update if bar else None,
            )
            if bar:
                bar.close()
            shadow_phi = np.stack([signals(m, x, y, ctx.device)["phi"] for m in models])
            # Members are training records: no reference model saw them. A non-member is OUT
            # for the models whose half did not hold it.
            pool_out = np.ones((params.shadows, len(pool)), bool)
            pool_out[:, chosen] = ~keep
            out = np.concatenate([np.ones((params.shadows, n_in), bool), pool_out[:, outside_index]], 1)
            scores["lira"] = lira_offline(target["phi"], shadow_phi, out, params.variance)
            result.metrics["shadows"] = {"count": params.shadows, "population": size}
            # Whether a model was reused depends on the cache, not on the run: a table, not a metric.
            result.tables["reference_models"] = records
        headline = "lira" if "lira" in scores else "loss"
        attacks = {name: attack_metrics(s, is_member) for name, s in scores.items()}
        best = attacks[headline]
        at1, at01 = best["tpr_at_fpr"]["0.01"], best["tpr_at_fpr"]["0.001"]
        result.metrics.update(attacks=attacks, headline=headline, auc=best["auc"], tpr_at_1pct_fpr=at1["tpr"],
                              dp=_dp(ctx.run))
        if not at01["meaningful"]:
            result.warnings.append(
                f"TPR at 0.1% FPR rests on {at01['non_members']} non-members, fewer than the 1,000 that allow even "
                "one false positive: it only counts members scored above every non-member"
            )
        if not at1["meaningful"]:
            result.warnings.append(f"TPR at 1% FPR rests on {at1['non_members']} non-members, fewer than 100: not meaningful")
        labels = y.numpy()
        result.tables["attacks"] = [
            {"attack": name, "auc": a["auc"], "balanced_accuracy": a["balanced_accuracy"],
             "tpr_at_0.1%_fpr": a["tpr_at_fpr"]["0.001"]["tpr"], "tpr_at_1%_fpr": a["tpr_at_fpr"]["0.01"]["tpr"]}
            for name, a in attacks.items()
        ]
        result.tables["per_class"] = _per_class(scores[headline], is_member, labels, data.class_names)
        order = np.argsort(-scores[headline][:n_in], kind="stable")[: params.exposed]
        result.tables["most_exposed"] = [
            {"train_index": int(member_index[i]), "label": data.class_names[int(labels[i])],
             "score": float(scores[headline][i]), "loss": float(target["loss"][i])} for i in order
        ]
        result.arrays.update({f"score_{k}": v.astype(np.float32) for k, v in scores.items()})
        result.arrays.update(is_member=is_member, train_index=member_index, outside_index=outside_index)
        result.add_figure("roc", _roc_figure(scores, is_member, headline))
        if ctx.kind == "image" and len(order):
            from xdl.plotting import image_grid

            titles = [f"train #{member_index[i]} ({data.class_names[int(labels[i])]})\nscore {scores[headline][i]:.1f}"
                      for i in order]
            result.add_figure("most_exposed", image_grid(x[order].numpy(), titles))
        dp = result.metrics["dp"]
        result.summary = (
            f"{_name(headline)}: an attacker identifies {at1['tpr']:.1%} of training records at 1% false positives "
            f"(AUC {best['auc']:.3f}, {n_in} members vs {n_out} non-members)"
            + (f"; trained with DP ε={dp['epsilon']:.2f}, δ={dp['delta']:g}" if dp else "")
        )
        return result

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        m = result.metrics
        attacks = m.get("attacks") or {}
        best = attacks.get(m.get("headline"))
        if not best:
            return []
        at1 = best["tpr_at_fpr"]["0.01"]
        dp = m.get("dp")
        detail = f"AUC {best['auc']:.3f}, balanced accuracy {best['balanced_accuracy']:.3f}; {_name(m['headline'])}"
        detail += f" on {best['members']} members vs {best['non_members']} non-members"
        if dp:
            detail += f"; trained with differential privacy, ε = {dp['epsilon']:.2f} (δ = {dp['delta']:g})"
        # Chance is TPR = FPR: 1%. Three times chance, or an AUC of 0.6, is a model that remembers records.
        worrying = at1["tpr"] >= 0.03 or best["auc"] >= 0.6
        return [Finding(
            label="Membership inference: records identified at 1% FPR" + (f" (DP ε = {dp['epsilon']:.2f})" if dp else ""),
            value=f"{at1['tpr']:.1%}",
            detail=f"an attacker can identify {at1['tpr']:.1%} of training records at 1% false positives; " + detail, source=f"report/{result.method or 'privacy'}", level="warn" if worrying else "info",
            help="The share of training records a membership-inference attack picks out while wrongly accusing 1% of "
                 "outsiders; chance is 1%, and several times that means the model memorizes individual records "
                 "(LiRA, Carlini et al. 2022) — train with --dp-epsilon to bound it.",
        )]


def _name(attack: str) -> str:
    return {"lira": "offline LiRA", "loss": "loss threshold", "confidence": "confidence threshold",
            "entropy": "entropy threshold"}[attack]


def _concat(*splits: Split) -> Split:
    return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]), {},
                 np.concatenate([s.source_index for s in splits]))


def outside_records(run, data: DataSplits, rng: np.random.Generator) -> tuple[Split, np.ndarray, int]:
    """Records the run never trained on: (pool, a seeded order of it, how many lead the order
    drawn like the training split).

    Drawn like the training split: the validation split, the rows of the full training
    split that ``--limit`` left out (reloaded from the run's data spec), and the test split
    when it was cut from the same rows. A test split whose row numbers repeat training row
    numbers comes from a file of its own (an official test set): it follows, last.
    """
    from xdl.data import load_data

    held = [data.val]
    spec = (run.info["data"] if run is not None else None) or data.spec or {}
    if spec.get("limit") and not data.train.streamed:
        try:
            full = load_data({**spec, "limit": None})
        except (XdlError, OSError):  # the data moved: the validation split is still held out
            full = None
        if full is not None and not full.train.streamed:
            rest = _concat(full.train, full.val)
            # Neither trained on nor already in the (limited) validation split.
            used = np.concatenate([data.train.source_index, data.val.source_index])
            held.append(rest.subset(np.flatnonzero(~np.isin(rest.source_index, used))))
    held_pool = _concat(*held)
    separate = bool(np.isin(data.test.source_index, np.concatenate([data.train.source_index, held_pool.source_index])).any())
    pool = _concat(held_pool, data.test)
    if separate:
        order = np.r_[rng.permutation(len(held_pool)), len(held_pool) + rng.permutation(len(data.test))]
        return pool, order, len(held_pool)
    return pool, rng.permutation(len(pool)), len(pool)


def _dp(run) -> dict | None:
    """The run's differential-privacy guarantee, when it was trained with one."""
    metrics = run.metrics if run is not None else {}
    if "dp_epsilon" not in metrics:
        return None
    return {"epsilon": float(metrics["dp_epsilon"]), "delta": float(run.info["train"].get("dp_delta", 0.0)),
            "target_epsilon": run.info["train"].get("dp_epsilon")}


def _per_class(scores: np.ndarray, is_member: np.ndarray, labels: np.ndarray, names: list[str]) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    rows = []
    for c, name in enumerate(names):
        mask = labels == c
        both = mask.any() and is_member[mask].any() and (~is_member[mask]).any()
        rows.append({"class": name, "members": int((mask & is_member).sum()), "non_members": int((mask & ~is_member).sum()),
                     "auc": float(roc_auc_score(is_member[mask], scores[mask])) if both else None})
    return rows


def _roc_figure(scores: dict[str, np.ndarray], is_member: np.ndarray, headline: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 4))
    ax = fig.subplots()
    negatives = int((~is_member).sum())
    floor = 1 / max(negatives, 1)  # the smallest non-zero FPR this many non-members can show
    for name, s in scores.items():
        fpr, tpr = roc_points(s, is_member)
        ax.plot(np.maximum(fpr, floor / 2), np.maximum(tpr, floor / 2), lw=2 if name == headline else 1,
                label=_name(name))
    ax.plot([floor / 2, 1], [floor / 2, 1], color="grey", ls="--", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor / 2, 1)
    ax.set_ylim(floor / 2, 1)
    ax.set_xlabel(f"false positive rate ({negatives} non-members)")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc="reference models", unit="model", leave=False, file=sys.stderr, dynamic_ncols=True)
