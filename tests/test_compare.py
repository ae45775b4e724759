"""xdl compare: runs side by side, paired by sample, with known-answer statistics.

The statistics are checked against hand computations and scipy (statsmodels too, when it is
installed); the orchestration on tiny digits runs: the session CNN, a copy of it (the same
model, so every difference is exactly 0) and a one-epoch MLP trained here on the same data.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import copy_run, run_cli
from scipy.stats import binom, binomtest, spearmanr

import xdl
from xdl.methods.paired import mcnemar, mean_spearman, paired_bootstrap
from xdl.render.layout import chromium, measure

AUDIT = {"only": ["saliency", "pgd"], "samples": 16, "progress": False}


@pytest.fixture(scope="module")
def runs(digits_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    cnn, twin = copy_run(digits_run, root / "cnn"), copy_run(digits_run, root / "twin")
    mlp = xdl.train("digits", "mlp", root / "mlp", epochs=1, quiet=True, model_options={"hidden": [16]})
    return {"cnn": cnn, "twin": twin, "mlp": mlp.path, "root": root}


@pytest.fixture(scope="module")
def compared(runs):
    return xdl.compare([runs["cnn"], runs["mlp"]], out=runs["root"] / "out", **AUDIT)


@pytest.fixture(scope="module")
def identical(runs):
    return xdl.compare([runs["cnn"], runs["twin"]], out=runs["root"] / "same", **AUDIT)


def row(comparison, label_start: str):
    return next(r for r in comparison.rows if r.label.startswith(label_start))


# -----------------------------------------------------------------------------------------
# The statistics, on hand-built outcomes
# -----------------------------------------------------------------------------------------


def test_mcnemar_on_hand_counted_discordant_pairs():
    # 6 samples only the first gets right, 1 only the second, 3 both: p = 2·P(X ≤ 1), X ~ Bin(7, ½).
    a = np.array([1] * 6 + [0] + [1] * 3 + [0] * 2)
    b = np.array([0] * 6 + [1] + [1] * 3 + [0] * 2)
    test = mcnemar(a, b)
    assert (test.only_a, test.only_b) == (6, 1)
    assert test.p_exact == pytest.approx(2 * (1 + 7) / 2**7)  # 0.125
    assert test.p_mid == pytest.approx(0.125 - 7 / 2**7)  # minus P(X = 1)
    assert test.p_exact == pytest.approx(binomtest(1, 7, 0.5).pvalue)
    equal = mcnemar(np.array([1, 0, 1, 0]), np.array([0, 1, 0, 1]))  # 2 vs 2: no evidence either way
    assert equal.p_exact == equal.p_mid == 1.0
    try:
        from statsmodels.stats.contingency_tables import mcnemar as reference
    except ImportError:
        return
    assert test.p_exact == pytest.approx(reference([[3, 6], [1, 2]], exact=True).pvalue)


def test_the_bootstrap_is_paired():
    rng = np.random.default_rng(0)
    a = (rng.random(200) < 0.5).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:5]] = 1  # the same samples, five more right
    interval = paired_bootstrap(a, b)
    assert interval.difference == pytest.approx(5 / 200)
    # Paired, the five flips are all the uncertainty: the interval excludes 0. Two independent
    # 50% accuracies on 200 samples would be uncertain by about ±10 points.
    assert 0 < interval.low <= interval.difference <= interval.high <= 0.05
    assert interval.excludes_zero
    same = paired_bootstrap(a, a)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero


def test_mean_spearman_agrees_with_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 2, 4, 4)), rng.normal(size=(3, 2, 4, 4))
    b[0] = a[0] * 2 + 1  # a monotone transform ranks alike
    expected = np.mean([spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)])
    assert mean_spearman(a, b) == pytest.approx(expected)
    assert mean_spearman(a[:1], b[:1]) == pytest.approx(1.0)


# -----------------------------------------------------------------------------------------
# Two runs on the same data
# -----------------------------------------------------------------------------------------


def test_test_accuracy_is_paired_per_sample_with_mcnemar(compared):
    first, second = (s.right for s in compared.sides)
    accuracy = row(compared, "Test accuracy")
    d = accuracy.differences[0]
    only_first, only_second = int(((first == 1) & (second == 0)).sum()), int(((second == 1) & (first == 0)).sum())
    assert (d.test.only_a, d.test.only_b) == (only_first, only_second)
    n, low = only_first + only_second, min(only_first, only_second)
    assert d.test.p_exact == pytest.approx(min(1.0, binomtest(low, n, 0.5).pvalue))
    assert d.test.p_mid == pytest.approx(min(1.0, 2 * binom.cdf(low, n, 0.5) - binom.pmf(low, n, 0.5)))
    assert d.interval.difference == pytest.approx(second.mean() - first.mean())
    assert d.interval.low <= d.interval.difference <= d.interval.high
    # The run's own saved test accuracy, measured again here sample by sample.
    assert first.mean() == pytest.approx(compared.sides[0].run.metrics["test_accuracy"], abs=1e-6)
    assert len(d.only_first) == only_first and len(d.only_other) == only_second


def test_attack_rows_pair_the_attacked_samples(compared):
    pgd = row(compared, "Robust accuracy (PGD")
    assert pgd.source == "attack/pgd" and not pgd.why
    d = pgd.differences[0]
    indices = compared.sides[0].results["attack/pgd"].provenance["indices"]
    assert len(indices) == 16 and set(d.only_first + d.only_other) <= set(indices)
    arrays = [s.results["attack/pgd"].arrays for s in compared.sides]
    right = [a["predictions"] == a["labels"] for a in arrays]
    assert (d.test.only_a, d.test.only_b) == (int((right[0] & ~right[1]).sum()), int((right[1] & ~right[0]).sum()))
    assert pgd in compared.attacks
    view = next(v for v in compared.explanations if v.source == "explain/saliency")
    assert not view.why and view.samples == 16 and -1 <= view.spearman[0] <= 1 and view.figure[:4] == b"\x89PNG"


def test_identical_runs_differ_by_exactly_nothing(identical):
    paired = [r for r in identical.rows + identical.classes if r.differences and r.differences[0].interval]
    assert len(paired) >= 2 + 10  # test and robust accuracy, ten classes
    for r in paired:
        d = r.differences[0]
        assert (d.interval.low, d.interval.high) == (0.0, 0.0) and d.better == 0 and not any(r.marks), r.label
        assert d.test.only_a == d.test.only_b == 0 and d.test.p_exact == 1.0
    saliency = next(v for v in identical.explanations if v.source == "explain/saliency")
    assert saliency.spearman == [pytest.approx(1.0)]


def test_a_result_on_other_samples_says_why_instead_of_numbers(runs, compared, tmp_path):
    other = copy_run(xdl.load(runs["mlp"]), tmp_path / "mlp8")
    xdl.audit(other, only=["pgd"], samples=8, progress=False)
    mixed = xdl.compare([runs["cnn"], other], out=tmp_path / "out")  # both audits as they are
    pgd = row(mixed, "Robust accuracy (PGD")
    assert "different samples (16 samples of the test split vs 8 samples of the test split)" in pgd.why
    assert pgd.values == ["", ""] and not pgd.differences
    html = mixed.html_path.read_text()
    assert "not comparable: cnn vs mlp8: computed on different samples" in html
    saliency = next(v for v in mixed.explanations if v.source == "explain/saliency")
    assert "mlp8's audit has no saved explain/saliency result" in saliency.why


def test_the_page_is_self_contained_and_names_every_run(compared):
    html = compared.html_path.read_text()
    assert not re.search(r"<script|<link|@import|url\(|(src|href)=\"https?://", html, re.IGNORECASE)
    for name in ("cnn", "mlp"):
        assert f"<code>{name}</code>" in html
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img[^>]*\bsrc="([^"]*)"', html))
    saved = json.loads(compared.json_path.read_text())
    assert [r["label"] for r in saved["summary"]][:2] == ["Test accuracy", "Robust accuracy (PGD, eps 0.1)"]
    assert saved["summary"][0]["differences"][0]["interval"]["difference"] == pytest.approx(
        compared.rows[0].differences[0].interval.difference)
    inline = compared._repr_html_()
    assert inline.startswith('<p class="meta">Comparison of cnn, mlp') and "Test accuracy" in inline


@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)")
def test_compare_layout_holds_in_a_real_browser(compared):
    pytest.importorskip("playwright")
    geometry = measure(compared.html_path)
    assert geometry["squeezed"] == [], geometry["squeezed"]
    assert geometry["scroll_width"] <= geometry["inner_width"] == 1280
    assert geometry["tallest_cell"]["height"] < 200, geometry["tallest_cell"]
    assert geometry["images"] >= 1 and geometry["images_decoded"]
    assert geometry["toc_sticky"]
    assert geometry["page_height"] < 1500 + 1300 * geometry["sections"], geometry["page_height"]


# -----------------------------------------------------------------------------------------
# The command, and what it refuses
# -----------------------------------------------------------------------------------------


def test_the_command_writes_the_page(capsys, runs, compared, tmp_path):
    code, out, err = run_cli(capsys, "compare", runs["cnn"], runs["mlp"], "--out", tmp_path / "cli", "-q")
    assert code == 0, err
    assert "compare.html" in out and (tmp_path / "cli" / "compare.json").is_file()


def test_runs_on_other_data_are_refused_naming_the_digest(capsys, runs, tmp_path):
    small = xdl.train("digits", "mlp", tmp_path / "small", epochs=1, quiet=True, model_options={"hidden": [8]},
                      data_options={"limit": 300})
    code, _, err = run_cli(capsys, "compare", runs["cnn"], small.path, "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "different data" in lines[0] and small.info["data_sha256"][:12] in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("case", ["one run", "not a run", "twice"])
def test_bad_input_is_one_line_and_exit_2(capsys, runs, tmp_path, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {"one run": [runs["cnn"]], "not a run": [runs["cnn"], empty], "twice": [runs["cnn"], runs["cnn"]]}[case]
    code, _, err = run_cli(capsys, "compare", *args, "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    expected = {"one run": "two or more runs", "not a run": "is not an xdl run", "twice": "is given twice"}[case]
    assert expected in lines[0]


def test_an_audit_of_other_weights_is_stale(runs, compared, tmp_path):
    """An audit.json whose results came from other weights (retrained since) is audited again, not quoted."""
    from xdl.auditing.compare import _stale

    assert not _stale(xdl.load(runs["cnn"]))
    stale = copy_run(xdl.load(runs["cnn"]), tmp_path / "stale")
    assert _stale(xdl.load(stale))  # no audit at all
    info = json.loads((runs["cnn"] / "audit.json").read_text())
    info["sections"][0]["provenance"]["model_sha256"] = "0" * 64
    (stale / "audit.json").write_text(json.dumps(info))
    assert _stale(xdl.load(stale))
