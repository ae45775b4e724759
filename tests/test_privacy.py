"""LiRA, online and offline (issue 28): the likelihood ratio by hand, TPR at low FPR with
bootstrap intervals, and two runs whose answer is known — one that memorized a planted
subset of its records, one whose model memorized none of them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

import xdl
from xdl.analysis import Result, load_analyzer
from xdl.analysis.base import parse_params
from xdl.data.types import DataSplits
from xdl.errors import XdlError
from xdl.methods.privacy import (
    attack_metrics,
    auc_interval,
    bootstrap_intervals,
    lira_online,
    tpr_at_fpr,
)
from xdl.training.loop import retrain

# -----------------------------------------------------------------------------------------
# The arithmetic
# -----------------------------------------------------------------------------------------


def test_online_lira_is_the_log_ratio_of_the_in_and_out_gaussians_by_hand():
    # 4 reference models × 3 examples; each example IN two of them.
    shadow = np.array([[4.0, 1.0, -2.0], [6.0, 0.0, 3.0], [1.0, 2.0, 1.0], [3.0, -1.0, 5.0]])
    inside = np.array([[True, True, False], [True, False, True], [False, True, False], [False, False, True]])
    target = np.array([5.0, 0.5, 2.0])
    # Per example: IN φ (4, 6), (1, 2), (3, 5); OUT φ (1, 3), (0, −1), (−2, 1).
    mu_in, mu_out = np.array([5.0, 1.5, 4.0]), np.array([2.0, -0.5, -0.5])
    sd_in = np.array([np.std([4, 6], ddof=1), np.std([1, 2], ddof=1), np.std([3, 5], ddof=1)])
    sd_out = np.array([np.std([1, 3], ddof=1), np.std([0, -1], ddof=1), np.std([-2, 1], ddof=1)])
    expected = norm.logpdf(target, mu_in, sd_in) - norm.logpdf(target, mu_out, sd_out)
    assert lira_online(target, shadow, inside, "per-example") == pytest.approx(expected, rel=1e-12)
    # Global: one σ per side, pooled over the residuals of all three examples (3 means fitted from 6 values).
    pooled_in = np.sqrt((1 + 1 + 0.25 + 0.25 + 1 + 1) / 3)
    pooled_out = np.sqrt((1 + 1 + 0.25 + 0.25 + 2.25 + 2.25) / 3)
    expected = norm.logpdf(target, mu_in, pooled_in) - norm.logpdf(target, mu_out, pooled_out)
    assert lira_online(target, shadow, inside, "global") == pytest.approx(expected, rel=1e-12)
    with pytest.raises(XdlError, match="at least one IN reference model"):
        lira_online(target, shadow, np.zeros_like(inside), "global")


def test_tpr_at_a_low_fpr_is_the_roc_curves_corner():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 40, 700).astype(float)  # many ties
    is_member = rng.random(700) < 0.4
    fpr, tpr, _ = roc_curve(is_member, scores, drop_intermediate=False)
    for rate in (0.001, 0.01, 0.05, 0.3):
        assert tpr_at_fpr(scores, is_member, rate) == pytest.approx(tpr[fpr <= rate].max()), rate


def test_intervals_come_from_one_bootstrap_and_an_unresolvable_rate_is_none():
    rng = np.random.default_rng(1)
    is_member = np.r_[np.ones(1500, bool), np.zeros(1500, bool)]
    scores = rng.normal(size=3000) + 0.8 * is_member
    # auc_interval is the generalised bootstrap asked for one statistic: the same resamples.
    assert auc_interval(scores, is_member) == bootstrap_intervals(
        scores, is_member, {"auc": lambda s, m: roc_auc_score(m, s)})["auc"]
    m = attack_metrics(scores, is_member)
    for rate in ("0.01", "0.001"):  # 1,500 non-members resolve both rates
        lo, hi = m["tpr_at_fpr_ci95"][rate]
        assert lo <= m["tpr_at_fpr"][rate]["tpr"] <= hi and hi - lo > 0
    assert m["auc_ci95"][0] < m["auc"] < m["auc_ci95"][1]
    # 300 non-members: 0.1% FPR would allow 0.3 false positives, so there is no such threshold.
    small = attack_metrics(scores[1200:1800], is_member[1200:1800])
    assert small["non_members"] == 300 and small["lowest_fpr"] == pytest.approx(1 / 300)
    assert small["tpr_at_fpr"]["0.001"]["tpr"] is None and small["tpr_at_fpr_ci95"]["0.001"] is None
    assert small["tpr_at_fpr"]["0.01"]["tpr"] is not None  # 3 false positives allowed


# -----------------------------------------------------------------------------------------
# Runs whose answer is known
# -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """An MLP that memorized a planted fifth of its records: sklearn's digits (as a table, each
    pixel jittered so that no column is near-constant) where 20% of the rows carry a wrong
    label. Only by remembering a row can a model fit its planted label."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    x, y = load_digits(return_X_y=True)
    x = x + rng.normal(size=x.shape)
    planted = rng.random(len(y)) < 0.2
    y = np.where(planted, (y + rng.integers(1, 10, len(y))) % 10, y)
    frame = pd.DataFrame(x.round(2), columns=[f"p{i}" for i in range(64)]).assign(label=[f"d{v}" for v in y])
    frame.to_csv(folder / "planted.csv", index=False)
    run = xdl.train(str(folder / "planted.csv"), "mlp", folder / "run", epochs=100, batch_size=32, weight_decay=0.0,
                    quiet=True, device="cpu", data_options={"target": "label", "limit": 200},
                    model_options={"hidden": [256]})
    return run, planted


def test_online_lira_finds_the_planted_members(planted_run):
    run, planted = planted_run
    result = xdl.report(run, "privacy", params={"references": 4}, save=False, device="cpu")
    assert result.metrics["references"] == {"count": 4, "mode": "online", "variance": "global", "population": 400}
    scores, is_member = result.arrays["score_lira"], result.arrays["is_member"]
    lira = result.metrics["attacks"]["lira"]
    assert lira["members"] == lira["non_members"] == 200
    # The planted members against every non-member: 2 false positives allowed at 1% of 200.
    mine = planted[run.data.train.source_index[result.arrays["train_index"]]]
    assert mine.sum() >= 30
    keep = np.r_[mine, np.ones(200, bool)]
    assert tpr_at_fpr(scores[keep], is_member[keep], 0.01) >= 0.9
    # Per-record Gaussians are what the loss threshold lacks: easy non-members also have ~0 loss.
    at1 = lira["tpr_at_fpr"]["0.01"]["tpr"]
    assert at1 > 2 * result.metrics["attacks"]["loss"]["tpr_at_fpr"]["0.01"]["tpr"]
    lo, hi = lira["tpr_at_fpr_ci95"]["0.01"]
    assert lo <= at1 <= hi and lira["auc"] > 0.9
    # 200 non-members cannot resolve 0.1%: said, with the lowest FPR they can.
    assert lira["tpr_at_fpr"]["0.001"]["tpr"] is None and lira["lowest_fpr"] == pytest.approx(1 / 200)
    assert any("TPR at 0.1% FPR is not resolvable" in w and "0.50%" in w for w in result.warnings)
    assert "online LiRA" in result.summary and set(result.figures) >= {"roc"}


def test_a_model_that_memorized_none_of_the_records_gives_an_auc_of_one_half(planted_run):
    from xdl_plugins.privacy import outside_records

    run, _ = planted_run
    fresh = xdl.load(run.path)
    data = fresh.data
    # The report's targets and online population: all 200 training rows and the first 200 of
    # the outside records in its seeded order. A model trained on the outside records after
    # them saw none of the targets, members or not.
    pool, order, _ = outside_records(fresh, data, np.random.default_rng(0))
    unseen = pool.subset(order[len(data.train):])
    splits = DataSplits(unseen, unseen, unseen, data.kind, data.class_names, data.spec, data.feature_names, data.encoding)
    fresh.model = retrain(fresh.info["model"], {**fresh.info["train"], "device": "cpu"}, splits, 7).eval()
    result = xdl.report(fresh, "privacy", params={"references": 4}, save=False, device="cpu")
    for name in ("lira", "loss"):
        attack = result.metrics["attacks"][name]
        lo, hi = attack["auc_ci95"]
        assert lo < 0.5 < hi and abs(attack["auc"] - 0.5) < 0.08, (name, attack["auc"], lo, hi)


def test_offline_lira_and_the_fallback_below_four_references(planted_run):
    run, _ = planted_run
    offline = xdl.report(run, "privacy", params={"references": 4, "mode": "offline"}, save=False, device="cpu")
    assert offline.metrics["references"]["mode"] == "offline" and "offline LiRA" in offline.summary
    assert offline.metrics["attacks"]["lira"]["auc"] > 0.75  # weaker than online, far from chance
    # Two references leave no IN Gaussian to fit: offline, and said so.
    two = xdl.report(run, "privacy", params={"shadows": 2, "members": 60}, save=False, device="cpu")
    assert two.metrics["references"]["mode"] == "offline"
    assert any("online LiRA fits IN and OUT Gaussians" in w for w in two.warnings)


# -----------------------------------------------------------------------------------------
# Parameters and results of the previous version
# -----------------------------------------------------------------------------------------


def test_shadows_is_still_accepted_as_the_old_name_of_references():
    params = load_analyzer("report", "privacy").Params
    old, new = parse_params(params, ["shadows=6"]), parse_params(params, {"references": 6})
    assert old == new and old.references == 6  # one set of parameters, whichever name was used
    assert parse_params(params, {"shadows": 6, "references": 6}) == new
    with pytest.raises(XdlError, match="give references or its old name shadows, not both"):
        parse_params(params, {"shadows": 6, "references": 4})
    with pytest.raises(XdlError, match="choose one of online, offline"):
        parse_params(params, ["mode=both"])


def test_a_result_saved_by_the_previous_version_loads_and_gives_its_finding(tmp_path):
    # The shape the previous version saved: "shadows" metrics, offline LiRA, a TPR (0.0) even
    # where too few non-members made it meaningless, no TPR intervals.
    low = {"0.001": {"tpr": 0.0, "false_positives_allowed": 0, "non_members": 216, "meaningful": False},
           "0.01": {"tpr": 0.0787, "false_positives_allowed": 2, "non_members": 216, "meaningful": True}}
    lira = {"auc": 0.664, "auc_ci95": [0.61, 0.71], "balanced_accuracy": 0.62, "tpr_at_fpr": low,
            "members": 216, "non_members": 216}
    saved = {"method": "privacy", "kind": "report", "summary": "offline LiRA: …",
             "metrics": {"attacks": {"lira": lira}, "headline": "lira", "auc": 0.664, "tpr_at_1pct_fpr": 0.0787,
                         "dp": None, "shadows": {"count": 8, "population": 432}},
             "params": {"shadows": 8, "members": 0, "variance": "global", "exposed": 16, "seed": 0},
             "warnings": [], "provenance": {}, "tables": {}, "figures": [], "arrays": []}
    (tmp_path / "result.json").write_text(json.dumps(saved), encoding="utf-8")
    result = Result.load(tmp_path)
    (line,) = load_analyzer("report", "privacy").findings(result)
    assert line.value == "7.9%" and "offline LiRA on 216 members" in line.detail and line.level == "warn"


def test_the_roc_is_drawn_log_log_with_the_lowest_resolvable_fpr():
    from xdl_plugins.privacy import _roc_figure

    rng = np.random.default_rng(2)
    is_member = np.r_[np.ones(400, bool), np.zeros(400, bool)]
    scores = {"loss": rng.normal(size=800) + is_member}
    best = attack_metrics(scores["loss"], is_member)
    (ax,) = _roc_figure(scores, is_member, "loss", "loss threshold", best).axes
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert ax.get_xlim()[0] == pytest.approx(1 / 800)  # half the lowest resolvable FPR, 1/400
    assert any("1/400" in t.get_text() for t in ax.get_legend().get_texts())
