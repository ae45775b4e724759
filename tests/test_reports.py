"""Report analyzers: bias (fairlearn's numbers), overfitting diagnosis, calibration."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import xdl
from xdl.analysis import Context, analyze, load_analyzer
from xdl.data import load_data
from xdl.data.types import DataSplits, Split
from xdl.errors import XdlError
from xdl_plugins.bias import fairness_measures, group_rates
from xdl_plugins.calibration import fit_temperature, reliability


def cli_error(capsys, *args) -> str:
    """Run the CLI in-process; it must exit 2 with one stderr line, which is returned."""
    from xdl.cli.main import main

    with pytest.raises(SystemExit) as exit:
        main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1, err
    return err


class Threshold(nn.Module):
    """Tabular rows (x,) → logits (0, x): predicts class 1 exactly when x > 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1]], 1)


def bare_context(model, x, y, groups=None, data=None, kind="tabular", classes=("0", "1")):
    return Context(model=model, x=x, y=y, kind=kind, class_names=list(classes), groups=groups or {}, data=data)


# -----------------------------------------------------------------------------------------
# Bias
# -----------------------------------------------------------------------------------------


def test_group_metrics_equal_fairlearn_on_saved_predictions(tabular_run, tmp_path):
    from fairlearn.metrics import (
        MetricFrame, demographic_parity_difference, demographic_parity_ratio, equalized_odds_difference,
        false_positive_rate, selection_rate, true_positive_rate,
    )

    result = xdl.report(tabular_run, "bias", out=tmp_path / "bias", params={"bootstrap": 50})
    saved = pd.read_csv(tmp_path / "bias" / "predictions.csv")
    test = tabular_run.data.test
    with torch.no_grad():
        logits = tabular_run.model(test.x)
    # The CSV holds the model's real predictions and the split's real labels and groups.
    assert (saved["y_pred"].to_numpy() == logits.argmax(1).numpy()).all()
    assert (saved["y_true"].to_numpy() == test.y.numpy()).all()
    assert (saved["sex"].astype(str).to_numpy() == test.groups["sex"]).all()
    np.testing.assert_allclose(saved["confidence"], torch.softmax(logits, 1).max(1).values.numpy(), atol=1e-6)

    y, p, g = saved["y_true"], saved["y_pred"], saved["sex"].astype(str)
    ours = result.metrics["groups"]["sex"]["classes"][">50K"]
    assert ours["demographic_parity_difference"] == pytest.approx(demographic_parity_difference(y, p, sensitive_features=g), abs=1e-9)
    assert ours["demographic_parity_ratio"] == pytest.approx(demographic_parity_ratio(y, p, sensitive_features=g), abs=1e-9)
    assert ours["disparate_impact"] == ours["demographic_parity_ratio"]
    assert ours["equalized_odds_difference"] == pytest.approx(equalized_odds_difference(y, p, sensitive_features=g), abs=1e-9)
    frame = MetricFrame(metrics={"selection_rate": selection_rate, "tpr": true_positive_rate, "fpr": false_positive_rate},
                        y_true=y, y_pred=p, sensitive_features=g).by_group
    rows = {r["group"]: r for r in result.tables["groups"]}
    assert set(rows) == set(frame.index)
    for group, expected in frame.iterrows():
        for key in ("selection_rate", "tpr", "fpr"):
            assert rows[group][key] == pytest.approx(expected[key], abs=1e-9)
        assert rows[group]["accuracy"] == pytest.approx(((y == p)[g == group]).mean(), abs=1e-9)
    # The interval, rebuilt with fairlearn on the same 50 resamples (the column's own generator).
    import zlib

    rng = np.random.default_rng([tabular_run.seed, zlib.crc32(b"sex")])
    counts = rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=50)
    resampled = [demographic_parity_difference(np.repeat(y, c), np.repeat(p, c), sensitive_features=np.repeat(g, c))
                 for c in counts]
    assert ours["ci"]["demographic_parity_difference"] == pytest.approx(np.percentile(resampled, [2.5, 97.5]), abs=1e-9)
    assert (tmp_path / "bias" / "confusion_matrix.png").stat().st_size > 1000
    assert "sex: demographic parity difference" in result.summary


def test_vectorized_group_rates_are_fairlearns():
    """The bootstrap's batched formulas, with every row weighted once, are fairlearn's metrics."""
    from fairlearn.metrics import MetricFrame, equalized_odds_difference, false_positive_rate, true_positive_rate

    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    g = rng.choice(["a", "b", "c"], 60)
    y[g == "c"] = 0  # group c has no positives for classes 1 and 2: TPR is 0 by convention
    names, codes = np.unique(g, return_inverse=True)
    cls = np.arange(3)
    rates = group_rates(np.ones((1, 60)), codes, 3, (y[:, None] == cls) * 1.0, (p[:, None] == cls) * 1.0)
    measures = fairness_measures(rates)
    for c in cls:
        yb, pb = (y == c).astype(int), (p == c).astype(int)
        frame = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate}, y_true=yb, y_pred=pb,
                            sensitive_features=g).by_group
        np.testing.assert_allclose(rates["tpr"][0, :, c], frame["tpr"].loc[names], atol=1e-12)
        np.testing.assert_allclose(rates["fpr"][0, :, c], frame["fpr"].loc[names], atol=1e-12)
        assert measures["equalized_odds_difference"][0, c] == pytest.approx(equalized_odds_difference(yb, pb, sensitive_features=g), abs=1e-12)


def test_known_selection_rates_flag_four_fifths_and_a_one_member_group():
    # Group a: 3 of 4 selected; b: 1 of 4; c: one member, selected. Known answer: DP
    # difference 1 − 1/4 = 0.75, ratio (disparate impact) 0.25, flagged.
    x = torch.tensor([[1.0], [1.0], [1.0], [-1.0], [1.0], [-1.0], [-1.0], [-1.0], [1.0]])
    y = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0, 1])
    groups = {"g": np.array(["a"] * 4 + ["b"] * 4 + ["c"])}
    result = analyze(load_analyzer("report", "bias")(), bare_context(Threshold(), x, y, groups), {"bootstrap": 30})
    measures = result.metrics["groups"]["g"]["classes"]["1"]
    assert measures["demographic_parity_difference"] == pytest.approx(0.75)
    assert measures["disparate_impact"] == pytest.approx(0.25) and measures["flagged"]
    rows = {r["group"]: r for r in result.tables["groups"]}
    assert rows["c"]["count"] == 1 and rows["a"]["selection_rate"] == 0.75 and rows["b"]["selection_rate"] == 0.25
    assert any("'c'" in w and "1 member:" in w for w in result.warnings)
    assert "disparate impact 0.25 < 0.8 (flagged)" in result.summary


def test_sensitive_names_a_feature_column_without_changing_the_inputs(tabular_run, tmp_path):
    result = xdl.report(tabular_run, "bias", out=tmp_path / "bias", params=["sensitive=job,sex", "bootstrap=0"])
    assert set(result.metrics["groups"]) == {"job", "sex"}
    rebuilt = load_data({**tabular_run.data.spec, "extra_groups": ["job"]})
    assert torch.equal(rebuilt.test.x, tabular_run.data.test.x)  # the model's inputs are untouched
    # Each row's job label is the category its own one-hot features encode.
    encoding = tabular_run.data.encoding
    job = next(c for c in encoding.columns if c.name == "job")
    start = [n for n in encoding.feature_names].index(f"job={job.categories[0]}")
    decoded = np.array(job.categories)[tabular_run.data.test.x[:, start : start + len(job.categories)].argmax(1).numpy()]
    saved = pd.read_csv(tmp_path / "bias" / "predictions.csv")
    assert (saved["job"].to_numpy() == decoded).all()
    assert "job: demographic parity difference" in result.summary


def test_a_columns_bootstrap_interval_does_not_depend_on_the_other_columns_asked(tabular_run):
    options = {"save": False, "samples": 80}
    alone = xdl.report(tabular_run, "bias", params=["sensitive=sex", "bootstrap=30"], **options)
    both = xdl.report(tabular_run, "bias", params=["sensitive=job,sex", "bootstrap=30"], **options)
    assert alone.metrics["groups"]["sex"] == both.metrics["groups"]["sex"]
    assert "ci" in next(iter(alone.metrics["groups"]["sex"]["classes"].values()))


def test_sensitive_missing_column_is_one_line_exit_2(tabular_run, capsys):
    err = cli_error(capsys, "report", tabular_run.path, "--method", "bias", "--sensitive", "zipcode")
    assert "no column 'zipcode'; columns are: age, hours, sex, job, income" in err


def test_image_bias_names_the_weakest_segment(digits_run, tmp_path):
    from sklearn.metrics import f1_score

    result = xdl.report(digits_run, "bias", out=tmp_path / "bias")
    saved = pd.read_csv(tmp_path / "bias" / "predictions.csv")
    assert len(saved) == len(digits_run.data.test)
    f1 = f1_score(saved["y_true"], saved["y_pred"], labels=range(10), average=None, zero_division=0)
    assert result.metrics["worst_class"] == str(int(f1.argmin()))
    assert result.metrics["worst_class_f1"] == pytest.approx(f1.min())
    weakest = result.metrics["weakest_segment"]
    column = saved[weakest["property"]]
    correct = (saved["y_true"] == saved["y_pred"])[column == weakest["segment"]]
    assert weakest["accuracy"] == pytest.approx(correct.mean()) and weakest["count"] == len(correct)
    for prop in ("brightness", "contrast", "foreground_area"):
        accuracy = (saved["y_true"] == saved["y_pred"]).groupby(saved[prop]).mean()
        assert weakest["accuracy"] <= accuracy.min() + 1e-12
    balance = result.tables["class_balance"]
    assert sum(r["train_fraction"] for r in balance) == pytest.approx(1.0)
    assert "weakest segment" in result.summary


# -----------------------------------------------------------------------------------------
# Overfitting
# -----------------------------------------------------------------------------------------

# 180 training digits, a quarter of the non-test rows held out for validation (60 of them
# after --limit shrinks it alike); a constant, high learning rate and no decay let the
# unregularized net keep sharpening past its optimum.
SMALL = dict(epochs=200, batch_size=64, lr=1e-2, schedule="none", quiet=True,
             data_options={"limit": 180, "val_fraction": 0.25})


@pytest.fixture(scope="module")
def overfit_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("overfit")
    torch.set_num_threads(1)  # two tiny matrices per step: more threads only add overhead
    try:
        plain = xdl.train("digits", "mlp", folder / "plain", weight_decay=0.0, **SMALL)
        regularized = xdl.train("digits", "mlp", folder / "reg", weight_decay=0.05, early_stopping=10,
                                model_options={"dropout": 0.5}, **SMALL)
    finally:
        torch.set_num_threads(2)
    return plain, regularized


def test_unregularized_small_data_run_is_overfitting(overfit_runs, tmp_path):
    result = xdl.report(overfit_runs[0], "overfit", out=tmp_path / "plain", params={"rise": 0.2})
    m = result.metrics
    assert m["diagnosis"] == "overfitting", result.summary
    assert m["val_loss_rise"] >= 0.2 and m["best_epoch"] < 200 and "validation loss rose" in result.summary
    assert "dropout is 0" in result.summary and f"early stopping would have kept epoch {m['best_epoch']}" in result.summary
    assert (tmp_path / "plain" / "learning_curves.png").stat().st_size > 1000
    splits = {r["split"]: r for r in result.tables["gap"]}
    assert splits["test"]["accuracy"] == overfit_runs[0].metrics["test_accuracy"]


def test_early_stopping_keeps_the_validation_minimum(overfit_runs):
    # On 180 digits even the regularized net leaves a train − validation accuracy gap, which the
    # report may flag; what early stopping removes is the rise of the validation loss.
    result = xdl.report(overfit_runs[1], "overfit", save=False)
    assert result.metrics["val_loss_rise"] == 0 and "validation loss rose" not in result.summary
    assert result.metrics["kept_epoch"] == result.metrics["best_epoch"] < result.metrics["epochs_run"]


def curves_run(digits_run, folder, history: dict[str, list[float]]):
    """A copy of a run with the given learning curves and a small final train − validation gap."""
    import json

    from xdl.runs.run import write_history

    shutil.copytree(digits_run.path, folder, ignore=shutil.ignore_patterns("explain", "attack", "report"))
    rows = [dict(epoch=i + 1, **{k: v[i] for k, v in history.items()}) for i in range(len(history["val_loss"]))]
    write_history(folder / "history.csv", rows)
    info = json.loads((folder / "run.json").read_text())
    info["metrics"].update(train_accuracy=0.99, val_accuracy=0.97, test_accuracy=0.96)
    (folder / "run.json").write_text(json.dumps(info))
    return folder


def test_overfit_compares_the_clean_training_pass_with_validation(digits_run, tmp_path):
    # Logged (mixup) training loss rises; the clean eval-mode pass falls while validation loss
    # climbs 40 % above its minimum: overfitting, which the logged loss alone would hide.
    history = dict(train_loss=[1.2, 1.1, 1.15, 1.2, 1.22, 1.25], train_accuracy=[0.7] * 6,
                   val_loss=[0.5, 0.3, 0.32, 0.36, 0.39, 0.42], val_accuracy=[0.97] * 6,
                   train_eval_loss=[0.45, 0.25, 0.2, 0.15, 0.1, 0.08], train_eval_accuracy=[0.99] * 6)
    result = xdl.report(curves_run(digits_run, tmp_path / "a", history), "overfit", save=False)
    assert result.metrics["diagnosis"] == "overfitting", result.summary
    assert "training loss kept falling (0.250 → 0.080)" in result.summary and not result.warnings


def test_overfit_sees_a_short_run_still_improving(digits_run, tmp_path):
    history = dict(train_loss=[0.9, 0.6, 0.4, 0.25], train_accuracy=[0.99] * 4, val_loss=[1.0, 0.7, 0.5, 0.3],
                   val_accuracy=[0.97] * 4, train_eval_loss=[0.9, 0.6, 0.4, 0.25], train_eval_accuracy=[0.99] * 4)
    result = xdl.report(curves_run(digits_run, tmp_path / "b", history), "overfit", save=False)
    assert result.metrics["diagnosis"] == "underfitting", result.summary
    assert "still falling when training stopped (0.500 → 0.300" in result.summary


def test_training_logs_a_clean_pass_over_a_fixed_training_subset(digits_run):
    from xdl.training.loop import PROBE_MIN
    from xdl.training.metrics import evaluate

    n = len(digits_run.data.train)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(digits_run.seed))
    probe = digits_run.data.train.subset(pick[: min(n, max(len(digits_run.data.val), PROBE_MIN))].sort().values)
    last = digits_run.history[-1]
    clean = evaluate(digits_run.model, probe, torch.device("cpu"))
    assert last["train_eval_accuracy"] == pytest.approx(clean["accuracy"])
    assert last["train_eval_loss"] == pytest.approx(clean["loss"], rel=1e-5)


def test_overfit_needs_a_run_with_history(digits_run, tmp_path, capsys):
    with pytest.raises(XdlError, match="needs a run directory"):
        xdl.report(nn.Linear(2, 2), "overfit", x=torch.zeros(3, 2))
    copy = tmp_path / "nohistory"
    shutil.copytree(digits_run.path, copy, ignore=shutil.ignore_patterns("explain", "attack", "report"))
    (copy / "history.csv").unlink()
    assert "has no history.csv" in cli_error(capsys, "report", copy, "--method", "overfit")


# -----------------------------------------------------------------------------------------
# Calibration
# -----------------------------------------------------------------------------------------


def test_ece_by_hand():
    # Confidences 0.9, 0.9 (one right) and 0.7 (right), 15 bins: bin (0.867, 0.933] adds
    # |0.5 − 0.9| · 2/3, bin (0.667, 0.733] adds |1 − 0.7| · 1/3: ECE = 11/30.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7]])
    bins = reliability(probs.log(), torch.tensor([0, 1, 1]), 15)
    assert bins["ece"] == pytest.approx(11 / 30)
    assert bins["count"].sum() == 3 and bins["count"][13] == 2 and bins["count"][10] == 1


def test_temperature_scaling_recovers_the_true_temperature():
    """Labels drawn from softmax(z / 2.5): the fitted T is the NLL minimizer, close to 2.5."""
    from scipy.optimize import minimize_scalar

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=gen, dtype=torch.float64) * 6
    y = torch.multinomial(torch.softmax(logits / 2.5, 1), 1, generator=gen)[:, 0]
    fitted = fit_temperature(logits, y)
    nll = lambda t: torch.nn.functional.cross_entropy(logits / t, y).item()  # noqa: E731
    reference = minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-8}).x
    assert fitted == pytest.approx(reference, rel=1e-4)
    assert fitted == pytest.approx(2.5, rel=0.1)


def test_calibration_fits_on_validation_and_reports_test(tmp_path):
    # An identity model: the inputs are the logits, over-confident by a factor 3 on both splits.
    gen = torch.Generator().manual_seed(1)

    def split(n):
        z = torch.randn(n, 4, generator=gen) * 2
        return Split(z * 3, torch.multinomial(torch.softmax(z, 1), 1, generator=gen)[:, 0])

    val, test = split(3000), split(3000)
    data = DataSplits(val, val, test, "tabular", list("abcd"), {"name": "synthetic"})
    ctx = bare_context(nn.Identity(), test.x, test.y, data=data, classes=data.class_names)
    result = analyze(load_analyzer("report", "calibration")(), ctx)
    m = result.metrics
    assert m["temperature"] == pytest.approx(3.0, rel=0.1)
    assert m["ece_scaled"] < m["ece"] / 3 and m["nll_scaled"] < m["nll"]
    assert "overconfident" in result.summary and "reliability" in result.figures
    assert sum(r["before_count"] for r in result.tables["bins"]) == len(test)


def test_calibration_on_a_run(digits_run, tmp_path):
    result = xdl.report(digits_run, "calibration", out=tmp_path / "cal")
    assert (tmp_path / "cal" / "reliability.png").stat().st_size > 1000
    # ECE by hand over 15 equal-width bins (lo, hi] of the whole test split's top-class confidence.
    test, model = digits_run.data.test, digits_run.model
    with torch.no_grad():
        logits = model(test.x).double()
    confidence, predicted = torch.softmax(logits, 1).max(1)
    correct = (predicted == test.y).double()
    ece = 0.0
    for lo, hi in zip(np.linspace(0, 1, 16)[:-1], np.linspace(0, 1, 16)[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += float(inside.double().mean() * (correct[inside].mean() - confidence[inside].mean()).abs())
    assert result.metrics["ece"] == pytest.approx(ece, abs=1e-9)
    # The fitted temperature minimizes the validation NLL: nudging it either way does worse.
    with torch.no_grad():
        val = torch.log_softmax(model(digits_run.data.val.x).double(), 1)
    nll = lambda t: float(torch.nn.functional.cross_entropy(val / t, digits_run.data.val.y))  # noqa: E731
    t = result.metrics["temperature"]
    assert nll(t) <= min(nll(0.95 * t), nll(1.05 * t))
