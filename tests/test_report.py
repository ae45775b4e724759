"""Report analyzers: bias (fairlearn's numbers), overfitting diagnosis, calibration.

Inside the model: activation statistics, feature maps, embeddings and the compute card.

Membership inference (xdl report --method privacy) and differentially private training.

Data quality: confident learning, duplicates, OOD scores — known answers and references.

References: cleanlab (confident joint, find_label_issues) on the same probabilities;
brute-force numpy for pair search and Mahalanobis; planted copies whose answer is known.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from sklearn.metrics import roc_auc_score
from torch import nn
from xdl_plugins.bias import fairness_measures, group_rates
from xdl_plugins.calibration import fit_temperature, reliability

import xdl
from xdl.analysis import Context, analyze, load_analyzer
from xdl.data import load_data
from xdl.data.types import DataSplits, Split
from xdl.errors import XdlError
from xdl.methods.privacy import attack_metrics, auc_interval, half_assignment, lira_offline
from xdl.methods.quality import duplicates as dup
from xdl.methods.quality import labels as cl
from xdl.methods.quality import ood
from xdl.models.inference import hook_count
from xdl.training.compute import count_flops

# -----------------------------------------------------------------------------------------
# reports
# -----------------------------------------------------------------------------------------


def cli_error(capsys, *args) -> str:
    """Run the CLI in-process; it must exit 2 with one stderr line, which is returned."""
    code, _, err = run_cli(capsys, *args)
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
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
        MetricFrame,
        demographic_parity_difference,
        demographic_parity_ratio,
        equalized_odds_difference,
        false_positive_rate,
        selection_rate,
        true_positive_rate,
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
# unregularized net (no augmentation either) keep sharpening past its optimum.
SMALL = dict(epochs=200, batch_size=64, lr=1e-2, schedule="none", augment=[], quiet=True,
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

# -----------------------------------------------------------------------------------------
# inside
# -----------------------------------------------------------------------------------------


def test_flops_of_a_hand_built_mlp_match_the_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    forward, step = count_flops(model, torch.randn(4, 10))
    # A Linear(i, o) costs 2·i·o FLOPs per sample forward (one multiply-add per weight).
    assert forward == 2 * (10 * 20 + 20 * 3)  # 520
    # Backward: every weight gradient costs as much again; the input gradient is needed only
    # by the second layer (the first layer's input is data, which needs no gradient).
    weight_grads = 2 * (10 * 20 + 20 * 3)
    input_grads = 2 * (20 * 3)
    assert step == forward + weight_grads + input_grads  # 1160
    # Counting must not touch the model: no gradients left behind, mode unchanged.
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_train_writes_the_compute_card_and_info_prints_it(digits_run, capsys):
    card = json.loads((digits_run.path / "run.json").read_text())["compute"]
    model = digits_run.model
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    # The fixture's CNN on 8×8 digits, by hand (2 FLOPs per multiply-add):
    # conv 1→8, 3×3 at 8×8: 2·8·9·64; pool to 4×4; conv 8→16, 3×3 at 4×4: 2·16·72·16;
    # Linear(16·4·4, 32): 2·256·32; Linear(32, 10): 2·32·10.
    assert card["flops_forward_per_sample"] == 2 * (8 * 9 * 64 + 16 * 72 * 16 + 256 * 32 + 32 * 10)
    n = digits_run.metrics["epochs_run"] * digits_run.info["dataset"]["sizes"]["train"]
    assert card["samples_seen"] == n
    assert card["train_seconds"] == pytest.approx(sum(row["seconds"] for row in digits_run.history))
    assert card["samples_per_second"] == pytest.approx(n / card["train_seconds"])
    assert card["energy_wh"] == pytest.approx(card["assumed_watts"] * card["train_seconds"] / 3600)
    assert card["peak_memory_bytes"] > 0 and "getrusage" in card["peak_memory_source"]
    assert card["device"] == "cpu" and "W per CPU thread" in card["power_assumption"]

    assert card["attack_passes_per_sample"] == 0 and card["flops_training_total"] == card["flops_train_step_per_sample"] * n
    code, out, _ = run_cli(capsys, "info", digits_run.path)
    assert code == 0
    assert "test_accuracy" in out
    assert "63.10 kFLOP per sample" in out
    assert f"{card['parameters']:,}" in out and "energy (estimate)" in out


def test_the_compute_card_counts_adversarial_trainings_extra_passes(tmp_path):
    run = xdl.train("digits", "mlp", tmp_path / "adv", epochs=1, quiet=True, adv_train="pgd", adv_steps=3,
                    data_options={"limit": 40}, model_options={"hidden": [8]})
    card = run.info["compute"]
    # Each sample: the training step, plus 3 PGD steps of forward and backward through the net.
    assert card["attack_passes_per_sample"] == 3
    assert card["flops_training_total"] == 4 * card["flops_train_step_per_sample"] * card["samples_seen"]


# -----------------------------------------------------------------------------------------
# Activations
# -----------------------------------------------------------------------------------------


def test_dead_units_of_a_layer_with_a_very_negative_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].bias.fill_(-1e3)  # pre-activations ≈ -1000 for any input near the origin
        model[2].bias.fill_(1.0)  # fed only zeros, layer 2 outputs its bias: every unit alive
    model.train()
    x = torch.randn(20, 4)
    result = xdl.explain(model, "activations", x=x, samples=None, batch_size=7)
    # A live model is analyzed inside xdl's wrapper (any output as class scores), so its
    # layers are named under "model.".
    rows = {r["layer"]: r for r in result.tables["layers"]}
    assert rows["model.1"]["dead_fraction"] == 1.0
    assert rows["model.3"]["dead_fraction"] == 0.0
    assert rows["model.0"]["dead_fraction"] is None  # only rectifiers have dead units
    assert len(result.warnings) == 1 and "layer model.1 (ReLU)" in result.warnings[0]
    # Streamed statistics (batches of 7) equal the whole-tensor ones.
    with torch.no_grad():
        hidden = model[0](x)
    assert rows["model.0"]["mean"] == pytest.approx(hidden.mean().item(), rel=1e-5)
    assert rows["model.0"]["std"] == pytest.approx(hidden.std(unbiased=False).item(), rel=1e-4)
    # An MLP has no feature maps or filters: said plainly, not an error.
    assert not result.figures and "filters" not in result.arrays
    assert "no conv layer" in result.summary and result.metrics["filters"].startswith("none")
    assert hook_count(model) == 0 and model.training


def test_feature_maps_strongest_channels_first_and_first_filters(digits_run):
    result = xdl.explain(digits_run, "activations", samples=3, save=False, params={"channels": 4})
    model = digits_run.model
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert {f"maps_{n}" for n in convs} | {"filters"} <= set(result.figures)
    x = digits_run.data.test.x[result.provenance["indices"]]
    with torch.no_grad():
        first_maps = model[1](model[0](x))
    expected = first_maps.mean((0, 2, 3)).argsort(descending=True)[:4].numpy()
    np.testing.assert_array_equal(result.arrays[f"channels/{convs[0]}"], expected)
    np.testing.assert_allclose(result.arrays[f"maps/{convs[0]}"], first_maps[:, expected].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.arrays["filters"], model[1].weight.detach().numpy())
    # Statistics cover the whole test split, not just the 3 samples drawn.
    assert result.metrics["samples_for_statistics"] == len(digits_run.data.test)
    assert hook_count(model) == 0


def test_deep_models_draw_a_few_layers_and_save_every_one():
    layers, width = [], 1
    for _ in range(10):
        layers += [nn.Conv2d(width, 4, 3, padding=1), nn.ReLU()]
        width = 4
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    result = xdl.explain(model, "activations", x=torch.rand(4, 1, 8, 8), save=False, params={"drawn": 3})
    # First, middle and last conv layers drawn (positions 0, 4.5→4, 9 of 10); every layer's maps kept.
    assert {k for k in result.figures if k.startswith("maps_")} == {"maps_model.0", "maps_model.8", "maps_model.18"}
    assert len([k for k in result.arrays if k.startswith("maps/")]) == 10
    assert any("drawn for 3 of the 10 conv layers" in w for w in result.warnings)


def test_unknown_layer_is_one_line_exit_2(digits_run, capsys):
    code, _, err = run_cli(capsys, "explain", digits_run.path, "--method", "activations", "-p", "layers=1,nope")
    assert code == 2
    assert err.count("\n") == 1 and "'nope' does not exist" in err and "valid layer names: 0, 1," in err
    with pytest.raises(XdlError, match="valid layer names"):
        xdl.explain(digits_run.model, "activations", x=torch.rand(2, 1, 8, 8), params={"layers": ["fc"]})


# -----------------------------------------------------------------------------------------
# Embedding
# -----------------------------------------------------------------------------------------


def test_embedding_of_the_test_split(digits_run):
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    # t-SNE's OpenMP threads spin-wait: on a shared, busy 2-core machine that made 60 points
    # take 10-30 s instead of 0.3 s. One thread keeps the test fast and changes no result.
    with threadpool_limits(1):
        result = xdl.explain(digits_run, "embedding", save=False, params={"tsne_points": 60})
    test = digits_run.data.test
    assert result.arrays["pca"].shape == (len(test), 2)
    assert result.arrays["tsne"].shape == (60, 2)
    # The captured features are the last Linear layer's input: PCA of model[:-1](x) agrees.
    with torch.no_grad():
        features = digits_run.model[:-1](test.x).numpy()
    expected = PCA(2, random_state=digits_run.seed).fit_transform(features)
    np.testing.assert_allclose(np.abs(result.arrays["pca"]), np.abs(expected), rtol=1e-3, atol=1e-3)
    predicted = digits_run.model(test.x).argmax(1).numpy()
    assert result.metrics["misclassified"] == int((predicted != test.y.numpy()).sum())
    assert {"pca_class", "tsne_class"} <= set(result.figures)


def test_embedding_colours_by_group_on_tabular_runs(tabular_run):
    result = xdl.explain(tabular_run, "embedding", save=False, params={"tsne": False})
    assert result.arrays["pca"].shape == (len(tabular_run.data.test), 2)
    assert set(result.figures) == {"pca_class", "pca_sex"}


def test_embedding_without_a_score_layer_projects_the_logits():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # pooled maps are the scores
    x = torch.rand(5, 1, 6, 6)
    result = xdl.explain(model, "embedding", x=x, samples=None, params={"tsne": False})
    assert result.metrics["features"] == 2 and result.metrics["features_from"].startswith("the logits")
    assert any("projected from the logits" in w for w in result.warnings)
    from sklearn.decomposition import PCA

    pca = PCA(2).fit(model(x).detach().numpy())
    np.testing.assert_allclose(np.abs(result.arrays["pca"]), np.abs(pca.transform(model(x).detach().numpy())), atol=1e-5)
    assert hook_count(model) == 0

# -----------------------------------------------------------------------------------------
# privacy
# -----------------------------------------------------------------------------------------


def test_loss_threshold_auc_is_sklearns_on_the_same_losses(digits_run):
    from xdl_plugins.privacy import outside_records

    result = xdl.report(digits_run, "privacy", params={"shadows": 0}, save=False)
    data, model = digits_run.data, digits_run.model
    members, outsiders = result.arrays["train_index"], result.arrays["outside_index"]
    # digits' test split is cut from the same rows as training: validation and test records are all non-members.
    pool, _, alike = outside_records(digits_run, data, np.random.default_rng(0))
    assert alike == len(pool) == len(data.val) + len(data.test)
    assert len(members) == len(outsiders) == min(len(data.train), len(pool))  # balanced
    x = torch.cat([data.train.x[members], pool.x[outsiders]])
    y = torch.cat([data.train.y[members], pool.y[outsiders]])
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y, reduction="none").numpy()
    is_member = np.r_[np.ones(len(members)), np.zeros(len(outsiders))]
    assert result.metrics["attacks"]["loss"]["auc"] == pytest.approx(roc_auc_score(is_member, -loss), abs=1e-9)
    assert result.metrics["headline"] == "loss"
    # 0.1% FPR on a few hundred non-members allows no false positive: said, not hidden.
    assert result.metrics["attacks"]["loss"]["tpr_at_fpr"]["0.001"]["meaningful"] is False
    assert any("0.1% FPR" in w for w in result.warnings)


def test_tpr_at_low_fpr_and_balanced_accuracy_by_hand():
    # 1,000 non-members at 0..999 and 10 members at 995..1004: at 1% FPR (10 false positives
    # allowed) the threshold sits above 989, so every member scoring ≥ 990 counts: all 10.
    scores = np.r_[np.arange(1000), np.arange(995, 1005)].astype(float)
    is_member = np.r_[np.zeros(1000, bool), np.ones(10, bool)]
    m = attack_metrics(scores, is_member)
    assert m["tpr_at_fpr"]["0.01"] == {"tpr": 1.0, "false_positives_allowed": 10, "non_members": 1000, "meaningful": True}
    # At 0.1% one false positive is allowed: the threshold 999 flags the non-member 999 and the
    # members 999..1004, 6 of 10.
    assert m["tpr_at_fpr"]["0.001"]["tpr"] == pytest.approx(0.6)
    assert m["auc"] == pytest.approx(roc_auc_score(is_member, scores))
    # Scores that know nothing: on 300 vs 300 the AUC's 95% interval holds 0.5 and spans about ±0.045.
    lo, hi = auc_interval(np.random.default_rng(3).random(600), np.r_[np.ones(300, bool), np.zeros(300, bool)])
    assert lo < 0.5 < hi and 0.06 < hi - lo < 0.13


def test_offline_lira_z_score_by_hand():
    shadow = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 9.0]])  # 3 reference models × 2 examples
    out = np.array([[True, True], [True, True], [True, False]])  # example 1 was IN model 2
    target = np.array([7.0, 4.0])
    z = lira_offline(target, shadow, out, "per-example")
    assert z == pytest.approx([(7 - 3) / 2, (4 - 1) / np.sqrt(2)])
    pooled = np.sqrt((4 + 0 + 4 + 1 + 1) / (5 - 2))  # residuals of the 5 OUT entries, 2 means fitted
    assert lira_offline(target, shadow, out, "global") == pytest.approx([4 / pooled, 3 / pooled])
    keep = half_assignment(8, 50, seed=1)
    assert (keep.sum(0) == 4).all()  # every record IN exactly half the models, OUT of the others


def _noisy_csv(path, n: int = 600, seed: int = 0):
    """Labels that are 30% coin flips: a model can only fit them by memorizing its records."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    y = (x[:, 0] + x[:, 1] > 0) ^ (rng.random(n) < 0.3)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)]).assign(label=np.where(y, "yes", "no"))
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("overfit")
    # test_fraction 0.6 leaves a non-training population (val + test) about twice the training set.
    return xdl.train(str(_noisy_csv(folder / "noisy.csv")), "mlp", folder / "run", epochs=40, batch_size=32,
                     weight_decay=0.0, quiet=True, device="cpu", data_options={"target": "label", "test_fraction": 0.6},
                     model_options={"hidden": [64, 64]})


def test_lira_finds_the_members_of_an_overfit_run_and_reuses_its_reference_models(overfit_run):
    first = xdl.report(overfit_run, "privacy", params={"shadows": 8}, device="cpu")
    lira = first.metrics["attacks"]["lira"]
    assert first.metrics["headline"] == "lira" and lira["members"] == lira["non_members"] == 216
    assert lira["auc"] > 0.6, lira  # a model that memorized 30% random labels gives its members away
    assert first.metrics["attacks"]["loss"]["auc"] > 0.6
    # The reference-model cache made report/privacy/ during the run; the result still goes there.
    assert first.path == overfit_run.path / "report" / "privacy" and not (first.path / ".claimed").exists()
    cache = overfit_run.path / "report" / "privacy" / "shadows"
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 8 and len(list(cache.glob("*.json"))) == 8
    stamps = [f.stat().st_mtime_ns for f in files]

    again = xdl.report(overfit_run, "privacy", params={"shadows": 8}, device="cpu", force=True)
    assert all(r["reused"] for r in again.tables["reference_models"])  # nothing retrained …
    assert not any(r["reused"] for r in first.tables["reference_models"])
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert again.metrics["attacks"] == first.metrics["attacks"]  # … and the same numbers
    np.testing.assert_array_equal(again.arrays["score_lira"], first.arrays["score_lira"])
    assert sorted(cache.glob("*.safetensors")) == files  # the cache outlives the result it served (--force)

    from xdl.analysis import load_analyzer

    (line,) = load_analyzer("report", "privacy").findings(again)
    assert line.value == f"{lira['tpr_at_fpr']['0.01']['tpr']:.1%}"
    assert line.detail.startswith(f"an attacker can identify {lira['tpr_at_fpr']['0.01']['tpr']:.1%} of training records at 1% false positives")
    assert "Carlini" in line.help and line.source == "report/privacy"


def test_a_tampered_reference_model_is_retrained(overfit_run):
    xdl.report(overfit_run, "privacy", params={"shadows": 2, "members": 40}, save=False, device="cpu")
    cache = overfit_run.path / "report" / "privacy" / "shadows"
    newest = max(cache.glob("*.safetensors"), key=lambda f: f.stat().st_mtime_ns)
    newest.write_bytes(newest.read_bytes()[:-4] + b"\0\0\0\0")
    again = xdl.report(overfit_run, "privacy", params={"shadows": 2, "members": 40}, save=False, device="cpu")
    assert [r["reused"] for r in again.tables["reference_models"]].count(True) == 1


# ------------------------------------------------------------------------- DP training


def test_dp_training_spends_at_most_its_budget_and_records_it(tmp_path, capsys):
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from xdl.analysis import load_analyzer
    from xdl.cli.main import main

    run = xdl.train("digits", "mlp", tmp_path / "dp", epochs=2, batch_size=64, dp_epsilon=2.0, device="cpu",
                    data_options={"limit": 400}, model_options={"hidden": [32], "batch_norm": True})
    err = capsys.readouterr().err
    assert "differential privacy: replaced 3: BatchNorm1d → GroupNorm" in err  # every change is named
    spent, history = run.metrics["dp_epsilon"], run.history
    assert 1.0 < spent <= 2.0 and history[0]["dp_epsilon"] < spent == history[-1]["dp_epsilon"]
    # The accountant's ε is RDP's for the noise, sampling rate and step count used (Mironov 2017).
    # Opacus' Poisson loader keeps the plain loader's length, ⌈N / batch⌉ steps an epoch, at q = 1 / that.
    per_epoch, sigma = math.ceil(len(run.data.train) / 64), history[0]["dp_noise_multiplier"]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=1 / per_epoch, noise_multiplier=sigma, steps=2 * per_epoch, orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert spent == pytest.approx(expected, rel=1e-6)
    # run.json rebuilds the private-trainable model, and the privacy report's finding quotes ε.
    assert run.info["model"]["dp_compatible"] and run.info["train"]["dp_epsilon"] == 2.0
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in xdl.load(run.path).model.modules())
    result = xdl.report(run, "privacy", params={"shadows": 0}, save=False)
    assert "ε = " in load_analyzer("report", "privacy").findings(result)[0].label
    with pytest.raises(SystemExit):
        main(["info", str(run.path)])
    assert f"spent ε = {spent:.3f} of 2" in capsys.readouterr().out


class _BufferedScale(torch.nn.Module):
    """A trainable layer with a buffer: Opacus has no per-record gradient for it."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width))
        self.register_buffer("shift", torch.zeros(width))

    def forward(self, x):
        return x * self.weight + self.shift


def incompatible(in_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(in_shape)), num_classes),
                               _BufferedScale(num_classes))


def test_an_incompatible_model_is_refused_in_one_sentence(tmp_path):
    with pytest.raises(xdl.errors.XdlError, match="cannot be trained with differential privacy"):
        xdl.train("digits", "test_report:incompatible", tmp_path / "x", epochs=1, dp_epsilon=3.0, quiet=True,
                  device="cpu", data_options={"limit": 100})


def test_a_dp_run_left_to_its_defaults_trains_a_small_dp_cnn_and_says_so(tmp_path, capsys):
    from xdl.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["train", "--dp-epsilon", "3", "--epochs", "1", "--limit", "300", "--device", "cpu",
              "--out", str(tmp_path / "dp")])
    assert done.value.code == 0
    err = capsys.readouterr().err
    run = xdl.load(tmp_path / "dp")
    assert run.info["model"]["name"] == "dpcnn" and run.info["model"]["group_norm"] == 4
    assert (run.info["train"]["batch_size"], run.info["train"]["lr"], run.info["train"]["epochs"]) == (256, 0.01, 1)
    assert "xdl chose the dpcnn model" in err and "batch size 256, learning rate 0.01 (" in err
    assert "replaced" not in err  # built private-trainable: nothing for Opacus' fixer to change
    assert any(isinstance(m, torch.nn.GroupNorm) for m in run.model.modules())
    # What the user chose stays; a plain run keeps the plain defaults.
    mine = xdl.train("digits", "mlp", tmp_path / "mine", dp_epsilon=3.0, batch_size=64, epochs=1, device="cpu",
                     quiet=True, data_options={"limit": 300})
    assert mine.info["model"]["name"] == "mlp" and mine.info["train"]["batch_size"] == 64
    assert mine.info["train"]["lr"] == 0.01
    plain = xdl.train("digits", out=tmp_path / "plain", epochs=1, device="cpu", quiet=True, data_options={"limit": 100})
    assert plain.info["model"]["name"] == "cnn" and plain.info["train"]["batch_size"] == 128


def test_non_members_are_held_out_training_rows_not_a_separate_test_file(tmp_path):
    from test_data import write_mnist
    from xdl_plugins.privacy import outside_records

    write_mnist(tmp_path / "mnist", gz=True, n_train=60, n_test=20)
    run = xdl.train("mnist", "mlp", tmp_path / "run", epochs=1, device="cpu", quiet=True,
                    data_options={"data_dir": str(tmp_path / "mnist"), "limit": 20})
    data = run.data
    pool, order, alike = outside_records(run, data, np.random.default_rng(0))
    # 54 training + 6 validation rows, 20 trained on: 40 held out, then the 20 of t10k.
    assert (alike, len(pool)) == (40, 60) and sorted(order[:alike]) == list(range(40))
    assert not np.isin(pool.source_index[:alike], data.train.source_index).any()
    result = xdl.report(run, "privacy", params={"shadows": 0}, save=False, device="cpu")
    assert len(result.arrays["outside_index"]) == 20 and (result.arrays["outside_index"] < alike).all()
    assert not any("separate test file" in w for w in result.warnings)
    lo, hi = result.metrics["attacks"]["loss"]["auc_ci95"]
    assert lo <= result.metrics["attacks"]["loss"]["auc"] <= hi

# -----------------------------------------------------------------------------------------
# quality
# -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_digits():
    """sklearn digits with 5% of labels flipped (seeded) and logistic-regression out-of-fold probabilities."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(y), int(0.05 * len(y)), replace=False)
    noisy = y.copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, len(flipped))) % 10
    probs = cross_val_predict(LogisticRegression(max_iter=300), x / 16, noisy, cv=4, method="predict_proba")
    truth = np.zeros(len(y), bool)
    truth[flipped] = True
    return noisy, probs, truth


def test_confident_joint_equals_cleanlabs(noisy_digits):
    from cleanlab.count import compute_confident_joint

    labels, probs, _ = noisy_digits
    assert np.array_equal(cl.confident_joint(labels, probs, False), compute_confident_joint(labels, probs, calibrate=False))
    assert np.array_equal(cl.confident_joint(labels, probs), compute_confident_joint(labels, probs))


def test_label_issues_recover_flips_and_agree_with_cleanlab(noisy_digits):
    from cleanlab.filter import find_label_issues

    labels, probs, truth = noisy_digits
    joint = cl.confident_joint(labels, probs)
    ours = cl.find_issues(labels, probs, joint)
    assert np.array_equal(ours, find_label_issues(labels, probs, confident_joint=joint, n_jobs=1))
    assert np.array_equal(ours, find_label_issues(labels, probs, n_jobs=1))
    assert (ours & truth).sum() / truth.sum() >= 0.8  # recall
    # A linear model misreads ~3% of clean digits too, and those count against precision here.
    assert (ours & truth).sum() / ours.sum() >= 0.6


def test_confident_learning_by_hand():
    # Two classes, threshold 0.7 for both (mean self-confidence). Sample 3 is labelled 0 but
    # confidently 1 (p1 = 0.9 ≥ 0.7): the joint has one count at (0, 1) and it is the issue.
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.1, 0.9], [0.5, 0.5]])
    probs[2] = [0.1, 0.9]
    assert np.allclose(cl.thresholds(labels, probs), [(0.9 + 0.9 + 0.1) / 3, 0.7])
    assert cl.confident_joint(labels, probs, calibrate=False).tolist() == [[2, 1], [0, 1]]
    assert cl.find_issues(labels, probs).tolist() == [False, False, True, False, False]
    margin = cl.quality_scores(labels, probs, "normalized_margin")
    assert np.allclose(margin, [0.9, 0.9, 0.1, 0.9, 0.5])


def test_labels_report_names_samples_and_caches(digits_run, monkeypatch):
    import xdl.training.loop

    first = xdl.report(digits_run, "labels", params={"folds": 2, "epochs": 1}, save=False)
    assert (digits_run.path / "cache" / "labels-oof" / f"{first.metrics['oof_cache']}.npz").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the out-of-fold probabilities are cached")

    monkeypatch.setattr(xdl.training.loop, "fit", no_training)
    again = xdl.report(digits_run, "labels", params={"folds": 2, "epochs": 1}, save=False)
    assert np.array_equal(first.arrays["probs"], again.arrays["probs"])
    train = digits_run.data.train
    assert first.arrays["probs"].shape == (len(train), 10)
    assert np.allclose(first.arrays["probs"].sum(1), 1, atol=1e-4)
    for row in first.tables["label_issues"]:
        assert row["split"] == "train"
        assert train.source_index[row["position"]] == row["source_index"]
        assert row["given"] == str(int(train.y[row["position"]]))


def test_exact_groups_and_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 3, (300, 4)).astype(np.float32)  # many repeats by construction
    groups = dup.exact_groups(rows)
    same = (rows[:, None] == rows[None]).all(-1)
    assert np.array_equal(groups[:, None] == groups[None], same)

    v = torch.as_tensor(rng.normal(size=(257, 6)), dtype=torch.float32)
    i, j, s = dup.similar_pairs(v, 0.8, chunk=50)
    unit = v.numpy() / np.linalg.norm(v.numpy(), axis=1, keepdims=True)
    cos = unit @ unit.T
    want = {(a, b) for a, b in zip(*np.nonzero(cos >= 0.8)) if a < b}
    assert set(zip(i.tolist(), j.tolist())) == want and np.allclose(s, cos[i, j], atol=1e-5)
    w = torch.as_tensor(rng.normal(size=(40, 6)), dtype=torch.float32)
    i, j, _ = dup.similar_pairs(v, 0.8, b=w, chunk=64)
    unit_w = w.numpy() / np.linalg.norm(w.numpy(), axis=1, keepdims=True)
    assert set(zip(i.tolist(), j.tolist())) == set(zip(*np.nonzero(unit @ unit_w.T >= 0.8)))


def test_phash_ignores_noise_and_shifts_but_not_content():
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    small = torch.as_tensor(load_digits().images[:50, None] / 16, dtype=torch.float32)
    images = F.pad(F.interpolate(small, size=(20, 20), mode="bilinear"), (4, 4, 4, 4))  # MNIST-like 28×28
    bits = dup.phash(images)
    noise = 0.02 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    noisy = (bits != dup.phash((images * 0.9 + noise).clamp(0, 1))).sum(1)
    moved = (bits != dup.phash(torch.roll(images, (1, -1), (2, 3)))).sum(1)
    others = (bits[:, None] != bits[None]).sum(-1)[~torch.eye(50, dtype=torch.bool)]
    assert bits.shape == (50, 195)
    assert moved.max() <= 2 and noisy.float().mean() < 16 and others.min() > 24 and others.float().mean() > 60


# 8×8 digits: upsampled to the hash's 32×32, two images differ in few hash bits and the
# features of a small CNN crowd together, so both thresholds are stricter than the 28×28 defaults.
TINY_IMAGES = {"feature_threshold": 0.995, "hash_distance": 32}


def _planted(digits_run):
    """The run's splits with 4 exact and 4 near (dimmed, noised) copies of training images appended to test."""
    data = digits_run.data
    rng = np.random.default_rng(1)
    pick = rng.choice(len(data.train), 8, replace=False)
    copies = data.train.x[pick].clone()
    copies[4:] = (copies[4:] * 0.97 + 0.01 * torch.randn(copies[4:].shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    n = len(data.test)
    test = Split(torch.cat([data.test.x, copies]), torch.cat([data.test.y, data.train.y[pick]]),
                 source=np.r_[data.test.source_index, 10_000 + np.arange(8)])
    return DataSplits(data.train, data.val, test, "image", data.class_names, data.spec), pick, n


def test_duplicates_finds_planted_copies_and_nothing_else(digits_run):
    run = xdl.load(digits_run.path)
    run.data, pick, n = _planted(digits_run)
    result = xdl.report(run, "duplicates", params=TINY_IMAGES, save=False)
    group, split, source = result.arrays["group"], result.arrays["split"], result.arrays["source_index"]
    train_pos = np.flatnonzero(split == 0)
    for k, original in enumerate(pick):
        copy = np.flatnonzero((split == 2) & (source == 10_000 + k))[0]
        assert group[copy] == group[train_pos[original]], f"planted copy {k} not grouped with its original"
    leaked = result.arrays["leaked_test"]
    assert sorted(source[leaked].tolist()) == list(range(10_000, 10_008))  # no real test image reported
    assert result.metrics["leaked_test"] == 8 and result.metrics["exact_duplicates"] >= 8
    accuracy = result.metrics["test_accuracy_without_leaked"]
    model = run.model
    with torch.no_grad():
        predicted = model(run.data.test.x[:n]).argmax(1)
    assert accuracy == pytest.approx(float((predicted == run.data.test.y[:n]).float().mean()))
    rows = result.tables["duplicates"]
    assert rows and all({"split", "source_index"} <= set(r) for r in rows)
    assert all({"split_a", "source_index_a", "split_b", "source_index_b"} <= set(r) for r in result.tables["near_pairs"])


def test_duplicates_flag_conflicting_labels(digits_run):
    run = xdl.load(digits_run.path)
    run.data, pick, _ = _planted(digits_run)
    run.data.test.y[-8] = (run.data.test.y[-8] + 1) % 10  # an exact copy with another label
    result = xdl.report(run, "duplicates", params=TINY_IMAGES, save=False)
    assert result.metrics["conflicting_groups"] == 1
    conflicted = [r for r in result.tables["duplicates"] if r["conflicting_labels"]]
    assert {(r["split"], r["source_index"]) for r in conflicted} >= {("test", 10_000)}


def test_auroc_known_answers():
    rng = np.random.default_rng(0)
    inside = rng.normal(0, 1, 500)
    assert ood.auroc(inside, rng.normal(-10, 1, 500)) > 0.999
    assert ood.auroc(inside, inside.copy()) == pytest.approx(0.5)
    assert ood.auroc(inside, rng.normal(10, 1, 500)) < 0.001  # scored as more familiar: worse than chance


def test_mahalanobis_equals_direct_numpy():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(120, 5)) + np.repeat(np.eye(3, 5) * 4, 40, axis=0)
    y = np.repeat(np.arange(3), 40)
    m = ood.Mahalanobis(torch.as_tensor(f), torch.as_tensor(y), 3)
    means = np.stack([f[y == c].mean(0) for c in range(3)])
    centered = f - means[y]
    precision = np.linalg.inv(centered.T @ centered / len(f))
    queries = rng.normal(size=(30, 5)) * 3
    direct = np.array([[(q - mu) @ precision @ (q - mu) for mu in means] for q in queries])
    assert np.allclose(m.distances(torch.as_tensor(queries)).numpy(), direct, rtol=1e-8)
    assert np.allclose(m.score(torch.as_tensor(queries)), -direct.min(1))


def test_ood_report(digits_run, tmp_path):
    same = xdl.report(digits_run, "ood", other=digits_run.data.test.x, save=False)
    assert all(v == pytest.approx(0.5) for v in same.metrics["auroc"].values())
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    far = xdl.report(digits_run, "ood", other=noise, save=False)
    assert far.metrics["best_auroc"] > 0.95
    synthetic = xdl.report(digits_run, "ood", save=False)
    assert synthetic.metrics["out_data"].startswith("synthetic") and synthetic.warnings
    for row in synthetic.tables["least_familiar_test"]:
        assert row["split"] == "test" and row["source_index"] == digits_run.data.test.source_index[row["position"]]
    wrong = tmp_path / "big.npz"
    np.savez(wrong, x=np.zeros((20, 12, 12), np.uint8), y=np.arange(20) % 2)
    with pytest.raises(xdl.XdlError, match="shape"):
        xdl.report(digits_run, "ood", other=str(wrong), save=False)


def test_findings_one_each(digits_run):
    from xdl.analysis import load_analyzer

    for method, params in (("duplicates", {}), ("ood", {}), ("labels", {"folds": 2, "epochs": 1})):
        result = xdl.report(digits_run, method, params=params, save=False)
        found = load_analyzer("report", method).findings(result)
        assert len(found) == 1 and found[0].help and found[0].source == f"report/{method}"


def test_tabular_runs(tabular_run, tmp_path):
    from conftest import write_tabular_csv

    for method, params in (("labels", {"folds": 2, "epochs": 2}), ("duplicates", {}), ("ood", {})):
        result = xdl.report(tabular_run, method, params=params, save=False)
        assert result.summary
    # Fresh rows from the same generator, encoded the run's way: indistinguishable from its test split.
    same = xdl.report(tabular_run, "ood", other=str(write_tabular_csv(tmp_path / "more.csv", seed=1)), save=False)
    assert 0.35 < same.metrics["auroc"]["msp"] < 0.65
