"""Membership inference (xdl report --method privacy) and differentially private training."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

import xdl
from xdl.methods.privacy import attack_metrics, auc_interval, half_assignment, lira_offline


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
        xdl.train("digits", "test_privacy:incompatible", tmp_path / "x", epochs=1, dp_epsilon=3.0, quiet=True,
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
