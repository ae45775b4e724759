"""Data quality: confident learning, duplicates, OOD scores — known answers and references.

References: cleanlab (confident joint, find_label_issues) on the same probabilities;
brute-force numpy for pair search and Mahalanobis; planted copies whose answer is known.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import xdl
from xdl.data.types import DataSplits, Split
from xdl.methods.quality import duplicates as dup
from xdl.methods.quality import labels as cl
from xdl.methods.quality import ood


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
