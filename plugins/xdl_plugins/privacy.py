"""Privacy: can an attacker tell the run's training records from records it never saw?

Members are a seeded subset of the training split, non-members as many records the run
never trained on, drawn like the members: the validation split and the training rows
``--limit`` left out, and the test split too when it was cut from the same rows. An
official test file (MNIST's t10k) may differ in distribution, and an attack would read that
difference as membership, so its records fill in only where the held-out rows run short,
with a warning. Three threshold attacks on the model alone (Yeom et al. 2018: loss,
confidence, entropy) and LiRA (Carlini et al. 2022) with ``references`` reference models
trained with the run's own config (DP-SGD too, for a DP run) on random halves of a
population: online (the default), the training split and as many outside records, so each
target record is IN about half of them; offline, outside records only, held-out rows first.
The algorithms live in :mod:`xdl.methods.privacy`. Reference models are cached in
``RUN/report/privacy/shadows/`` and reused.

>>> result = xdl.report(run, "privacy", params={"references": 8, "mode": "online"})   # doctest: +SKIP
>>> result.metrics["attacks"]["lira"]["tpr_at_fpr"]["0.01"]["tpr"]                  # doctest: +SKIP
>>> result.metrics["attacks"]["lira"]["tpr_at_fpr_ci95"]["0.01"]                    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from xdl.analysis import Analyzer, Context, Finding, Result
from xdl.data.types import DataSplits, Split
from xdl.errors import XdlError
from xdl.methods.privacy import (
    LOW_FPRS,
    ONLINE_MIN_REFERENCES,
    attack_metrics,
    lira_offline,
    lira_online,
    reference_models,
    roc_points,
    signals,
    threshold_scores,
)
from xdl.training.loop import retrain

CACHE = ("report", "privacy", "shadows")


@dataclass
class PrivacyParams:
    references: int = 8  # LiRA's reference models, one training of the run's recipe each; 0: thresholds only
    mode: Literal["online", "offline"] = "online"  # online: each record IN half the references (more power)
    members: int = 0  # records per side (members, non-members); 0 = as many as the smaller split allows
    variance: Literal["global", "per-example"] = "global"  # LiRA's σ: pooled suits fewer than ~64 references
    exposed: int = 16  # most exposed training records to show
    seed: int = 0
    shadows: int | None = None  # the previous name of ``references``, so saved commands keep working

    def __post_init__(self) -> None:
        if self.shadows is not None:
            if self.references not in (PrivacyParams.references, self.shadows):
                raise ValueError("give references or its old name shadows, not both")
            # Folded into references, so both spellings record the same parameters.
            self.references, self.shadows = self.shadows, None
        if self.references < 0 or self.references == 1 or self.references > 256:
            raise ValueError(f"references must be 0 (LiRA off) or 2..256, got {self.references}")
        if not 0 <= self.members <= 1_000_000:
            raise ValueError(f"members must be in 0..1000000, got {self.members}")
        if not 0 <= self.exposed <= 64:
            raise ValueError(f"exposed must be in 0..64, got {self.exposed}")


@dataclass
class _Targets:
    """The records the attacks score: members first, then as many non-members."""

    pool: Split  # every record the run never trained on
    order: np.ndarray  # a seeded order of the pool, records drawn like the training split first
    member_index: np.ndarray  # into the training split
    outside_index: np.ndarray  # into the pool
    x: torch.Tensor
    y: torch.Tensor
    is_member: np.ndarray


class Privacy(Analyzer):
    """Membership inference: threshold attacks and LiRA (online or offline), TPR at low FPR, the most exposed records."""

    kind = "report"
    Params = PrivacyParams
    samples = None
    sharding = "none"
    description = "membership inference (loss/confidence threshold, online/offline LiRA): TPR at 0.1% and 1% FPR"
    check_params = {"references": 4, "members": 24, "exposed": 4}  # 4: the fewest online LiRA takes

    # Its split was never the model's training set, and LiRA's reference models would need the
    # model's own (unknown) training recipe: at 224 px, eight ResNet retrainings besides.
    inapplicable = ("an imported model: its training records are unknown, so membership cannot be tested "
                    "against this run's split")
    needs_xdl_training = True

    def run(self, ctx: Context, params: PrivacyParams) -> Result:
        if ctx.run is None or ctx.data is None:
            raise XdlError("the privacy report needs a run directory: members are its training records")
        if len(ctx.data.test) < 2 or len(ctx.data.train) < 2:
            raise XdlError("the privacy report needs at least 2 training and 2 test records")
        result = self.result()
        targets = _targets(ctx.run, ctx.data, params, np.random.default_rng(params.seed), result.warnings)
        target = signals(ctx.model, targets.x, targets.y, ctx.device)
        scores = threshold_scores(target)
        if params.references:
            scores["lira"] = _lira(ctx, params, targets, target["phi"], result)
        _report(ctx, params, targets, target, scores, result)
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
        name = _name(m["headline"], _mode(m))
        detail = f"AUC {best['auc']:.3f}, balanced accuracy {best['balanced_accuracy']:.3f}; {name}"
        detail += f" on {best['members']} members vs {best['non_members']} non-members"
        if dp:
            detail += f"; trained with differential privacy, ε = {dp['epsilon']:.2f} (δ = {dp['delta']:g})"
        tpr = at1["tpr"]
        if tpr is None:  # too few non-members to resolve 1% FPR: the AUC speaks alone
            value = "not resolvable"
            said = f"{best['non_members']} non-members cannot resolve a 1% false-positive rate; "
        else:
            value = f"{tpr:.1%}"
            said = f"an attacker can identify {tpr:.1%} of training records at 1% false positives; "
        # Chance is TPR = FPR: 1%. Three times chance, or an AUC of 0.6, is a model that remembers records —
        # unless the TPR's interval (saved since online LiRA) still reaches down to chance.
        interval = (best.get("tpr_at_fpr_ci95") or {}).get("0.01")
        worrying = ((tpr or 0.0) >= 0.03 and (interval is None or interval[0] > 0.01)) or best["auc"] >= 0.6
        return [Finding(
            label="Membership inference: records identified at 1% FPR" + (f" (DP ε = {dp['epsilon']:.2f})" if dp else ""),
            value=value, detail=said + detail, source=f"report/{result.method or 'privacy'}",
            level="warn" if worrying else "info",
            help="The share of training records a membership-inference attack picks out while wrongly accusing 1% of "
                 "outsiders; chance is 1%, and several times that means the model memorizes individual records "
                 "(LiRA, Carlini et al. 2022) — train with --dp-epsilon to bound it.",
        )]


def _mode(metrics: dict) -> str:
    # A result saved before online LiRA has no "references" entry: its LiRA was offline.
    return (metrics.get("references") or {}).get("mode", "offline")


def _name(attack: str, mode: str = "offline") -> str:
    return {"lira": f"{mode} LiRA", "loss": "loss threshold", "confidence": "confidence threshold",
            "entropy": "entropy threshold"}[attack]


def _targets(run, data: DataSplits, params: PrivacyParams, rng: np.random.Generator, warnings: list[str]) -> _Targets:
    """Members (a seeded subset of the training split) and as many non-members."""
    pool, order, alike = outside_records(run, data, rng)
    # Non-members come from the records drawn like the training split; a separate test
    # file's only when fewer than 100 of those exist (then said in a warning).
    candidates = order[:alike] if alike >= min(100, len(data.train)) else order
    if len(candidates) > alike:
        warnings.append(
            f"only {alike} held-out training records exist, so non-members include {len(candidates) - alike} records "
            "of the separate test file: if it differs in distribution from the training data, the attacks read that "
            "difference as membership"
        )
    # Balanced: as many members as non-members, so a 50% guess is chance and AUC reads plainly.
    n = min(params.members or len(candidates), len(data.train), len(candidates))
    member_index = np.sort(rng.choice(len(data.train), n, replace=False))
    outside_index = candidates[:n]
    return _Targets(pool, order, member_index, outside_index,
                    torch.cat([data.train.x[member_index], pool.x[outside_index]]),
                    torch.cat([data.train.y[member_index], pool.y[outside_index]]), np.r_[np.ones(n, bool), np.zeros(n, bool)])


def _lira(ctx: Context, params: PrivacyParams, t: _Targets, phi: np.ndarray, result: Result) -> np.ndarray:
    """LiRA's score per target record, from ``params.references`` reference models (trained or reloaded)."""
    data, count = ctx.data, params.references
    mode = params.mode
    if mode == "online" and count < ONLINE_MIN_REFERENCES:
        mode = "offline"
        result.warnings.append(f"online LiRA fits IN and OUT Gaussians, which takes {ONLINE_MIN_REFERENCES} reference "
                               f"models or more: with {count}, this is offline LiRA")
    population, population_id, columns = (_online_population if mode == "online" else _offline_population)(data, t)
    if len(population) < 2 * len(data.train):
        result.warnings.append(
            f"the reference models train on halves of {len(population)} records, {len(population) // 2} each, fewer "
            f"than the run's {len(data.train)} training records: LiRA is weaker than it could be"
        )
    cache = ctx.run.path.joinpath(*CACHE) if getattr(ctx.run, "path", None) else None
    bar = _bar(count, ctx.progress)
    models, keep, records = reference_models(ctx.run.info, data, population, population_id, count, params.seed,
                                             cache, ctx.device, retrain, bar.update if bar else None)
    if bar:
        bar.close()
    shadow_phi = np.stack([signals(m, t.x, t.y, ctx.device)["phi"] for m in models])
    # A target outside the population (column −1) is OUT of every reference model.
    inside = np.zeros((count, len(columns)), bool)
    placed = columns >= 0
    inside[:, placed] = keep[:, columns[placed]]
    result.metrics["references"] = {"count": count, "mode": mode, "variance": params.variance,
                                    "population": len(population)}
    # Whether a model was reused depends on the cache, not on the run: a table, not a metric.
    result.tables["reference_models"] = records
    if mode == "online":
        return lira_online(phi, shadow_phi, inside, params.variance)
    return lira_offline(phi, shadow_phi, ~inside, params.variance)


def _offline_population(data: DataSplits, t: _Targets) -> tuple[Split, str, np.ndarray]:
    """Records the run never trained on, twice the training set where there are that many, taken
    in ``t.order`` (the non-members and the records drawn like them first): no member is in it.
    Returns the population, its cache name and each target's column in it (−1: not in it)."""
    size = min(len(t.pool), 2 * len(data.train))
    chosen = np.sort(t.order[:size])
    digest = hashlib.sha256(t.pool.source_index[chosen].tobytes() + chosen.tobytes()).hexdigest()[:16]
    at = np.searchsorted(chosen, t.outside_index)
    found = chosen[np.minimum(at, len(chosen) - 1)] == t.outside_index
    columns = np.r_[np.full(len(t.member_index), -1), np.where(found, at, -1)]
    return t.pool.subset(chosen), f"outside:{len(t.pool)}:{digest}", columns


def _online_population(data: DataSplits, t: _Targets) -> tuple[Split, str, np.ndarray]:
    """The whole training split and as many records it never trained on (the non-members first),
    so each target is IN about half the reference models (Carlini et al. 2022, §IV-B)."""
    n = len(data.train)
    extra = np.sort(t.order[: min(len(t.pool), n)])  # holds every non-member: they lead the order
    digest = hashlib.sha256(data.train.source_index.tobytes() + t.pool.source_index[extra].tobytes()
                            + extra.tobytes()).hexdigest()[:16]
    columns = np.r_[t.member_index, n + np.searchsorted(extra, t.outside_index)]
    return _concat(data.train, t.pool.subset(extra)), f"online:{n}+{len(extra)}:{digest}", columns


def _report(ctx: Context, params: PrivacyParams, t: _Targets, target: dict, scores: dict, result: Result) -> None:
    """Metrics, warnings, tables, figures and the one-line summary."""
    data, n_in = ctx.data, len(t.member_index)
    headline = "lira" if "lira" in scores else "loss"
    attacks = {name: attack_metrics(s, t.is_member) for name, s in scores.items()}
    best = attacks[headline]
    at1, at01 = best["tpr_at_fpr"]["0.01"], best["tpr_at_fpr"]["0.001"]
    result.metrics.update(attacks=attacks, headline=headline, auc=best["auc"], tpr_at_1pct_fpr=at1["tpr"], dp=_dp(ctx.run))
    lowest = best["lowest_fpr"]
    for rate, at in ((0.001, at01), (0.01, at1)):
        if not at["meaningful"]:
            result.warnings.append(
                f"TPR at {rate:.1%} FPR is not resolvable: {at['non_members']} non-members resolve false-positive "
                f"rates down to 1/{at['non_members']} = {lowest:.2%}, and {math.ceil(1 / rate):,} would allow one "
                "false positive"
            )
    result.tables["attacks"] = [_attack_row(name, a) for name, a in attacks.items()]
    labels = t.y.numpy()
    result.tables["per_class"] = _per_class(scores[headline], t.is_member, labels, data.class_names)
    order = np.argsort(-scores[headline][:n_in], kind="stable")[: params.exposed]
    result.tables["most_exposed"] = [
        {"train_index": int(t.member_index[i]), "label": data.class_names[int(labels[i])],
         "score": float(scores[headline][i]), "loss": float(target["loss"][i])} for i in order
    ]
    result.arrays.update({f"score_{k}": v.astype(np.float32) for k, v in scores.items()})
    result.arrays.update(is_member=t.is_member, train_index=t.member_index, outside_index=t.outside_index)
    name = _name(headline, _mode(result.metrics))
    result.add_figure("roc", _roc_figure(scores, t.is_member, headline, name, best))
    if ctx.kind == "image" and len(order):
        from xdl.plotting import image_grid

        titles = [f"train #{t.member_index[i]} ({data.class_names[int(labels[i])]})\nscore {scores[headline][i]:.1f}"
                  for i in order]
        result.add_figure("most_exposed", image_grid(t.x[order].numpy(), titles))
    result.summary = _summary(name, best, result.metrics["dp"])


def _summary(name: str, best: dict, dp: dict | None) -> str:
    at1, (lo, hi) = best["tpr_at_fpr"]["0.01"], best["auc_ci95"]
    auc = f"AUC {best['auc']:.3f} [{lo:.3f}, {hi:.3f}], {best['members']} members vs {best['non_members']} non-members"
    if at1["tpr"] is None:
        said = f"{name}: {best['non_members']} non-members cannot resolve 1% false positives ({auc})"
    else:
        tlo, thi = best["tpr_at_fpr_ci95"]["0.01"]
        said = (f"{name}: an attacker identifies {at1['tpr']:.1%} [{tlo:.1%}, {thi:.1%}] of training records at 1% "
                f"false positives ({auc})")
    return said + (f"; trained with DP ε={dp['epsilon']:.2f}, δ={dp['delta']:g}" if dp else "")


def _attack_row(name: str, a: dict) -> dict:
    row = {"attack": name, "auc": a["auc"], "auc_low": a["auc_ci95"][0], "auc_high": a["auc_ci95"][1],
           "balanced_accuracy": a["balanced_accuracy"]}
    for rate in LOW_FPRS:
        key, interval = f"{rate:g}", a["tpr_at_fpr_ci95"][f"{rate:g}"] or [None, None]
        row.update({f"tpr_at_{rate:.1%}_fpr": a["tpr_at_fpr"][key]["tpr"], f"tpr_at_{rate:.1%}_fpr_low": interval[0],
                    f"tpr_at_{rate:.1%}_fpr_high": interval[1]})
    return row


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


def _roc_figure(scores: dict[str, np.ndarray], is_member: np.ndarray, headline: str, headline_name: str, best: dict):
    """Log-log ROC curves (low FPRs are where membership inference matters), the headline
    attack's TPR at each resolvable low FPR with its 95% interval, and the lowest resolvable FPR."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 4))
    ax = fig.subplots()
    negatives = int((~is_member).sum())
    floor = 1 / max(negatives, 1)  # the smallest non-zero FPR this many non-members can show
    for name, s in scores.items():
        fpr, tpr = roc_points(s, is_member)
        ax.plot(np.maximum(fpr, floor / 2), np.maximum(tpr, floor / 2), lw=2 if name == headline else 1,
                label=headline_name if name == headline else _name(name))
    for rate in LOW_FPRS:
        tpr, interval = best["tpr_at_fpr"][f"{rate:g}"]["tpr"], best["tpr_at_fpr_ci95"][f"{rate:g}"]
        if tpr is not None:
            low, high = max(tpr, floor / 2), max(interval[1], floor / 2)
            ax.errorbar([rate], [low], yerr=[[low - max(interval[0], floor / 2)], [high - low]], fmt="o", ms=3,
                        color="black", capsize=2, lw=1)
    ax.plot([floor / 2, 1], [floor / 2, 1], color="grey", ls="--", lw=1, label="chance")
    ax.axvline(floor, color="grey", ls=":", lw=1, label=f"lowest resolvable FPR (1/{negatives})")
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
