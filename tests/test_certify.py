"""Certified robustness by randomized smoothing: radii against a closed form, Clopper–Pearson
against scipy, abstention, batching, the report on a trained run and ``--noise-sigma``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import copy_run, run_cli
from scipy.stats import binomtest, norm
from torch import nn

import xdl
from xdl.analysis import load_analyzer
from xdl.methods import certify as smoothing

SIGMA = 0.25


class Halfspace(nn.Module):
    """Class 1 where w·x + b > 0, else class 0: under N(0, σ²I) noise, class 1's probability is
    Φ((w·x + b) / (σ‖w‖)), so the smoothed classifier's exact certified radius is the distance
    to the boundary, |w·x + b| / ‖w‖ (Cohen et al. 2019, the linear case)."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([torch.zeros_like(score), score], 1)


def halfspace_samples(distances) -> tuple[Halfspace, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(1, 4, 4)
    unit = w / w.norm()
    model = Halfspace(w, b=0.3)
    # x = t·unit puts w·x + b = t‖w‖ + b; solve for the signed distance d = (w·x + b)/‖w‖.
    x = torch.stack([(d - 0.3 / w.norm()) * unit for d in distances])
    return model, x


def certify(model, x, rows=1000, n=10_000, seed=0):
    return smoothing.certify(model, x, SIGMA, 100, n, 0.001, seed=seed, positions=np.arange(len(x)), rows=rows,
                             num_classes=2 if isinstance(model, Halfspace) else 3)


def test_the_certified_radius_of_a_halfspace_is_its_distance_to_the_boundary():
    distances = [0.1, 0.2, 0.3, -0.35]
    model, x = halfspace_samples(distances)
    cert = certify(model, x)
    true = np.abs(distances)
    assert cert.prediction.tolist() == [1, 1, 1, 0]
    radius = cert.radius.numpy()
    # The radius is σ·Φ⁻¹ of the lower bound, and that bound is below the true probability
    # (w.p. 1 − α), so the radius never exceeds the true distance, and falls short of it by
    # about what 10,000 draws resolve (≈ 3 binomial standard errors through Φ⁻¹'s slope).
    np.testing.assert_allclose(radius, SIGMA * norm.ppf(cert.p_lower.numpy()), rtol=1e-9)
    p = norm.cdf(true / SIGMA)
    slack = SIGMA * 4 * np.sqrt(p * (1 - p) / 10_000) / norm.pdf(norm.ppf(p))
    assert np.all(radius <= true) and np.all(radius >= true - slack), (radius, true, slack)


def test_clopper_pearson_is_scipys_exact_interval():
    # A one-sided (1 − α) lower bound is the lower end of the two-sided exact (1 − 2α) interval.
    for k, n in ((0, 100), (1, 100), (60, 100), (9_500, 10_000), (10_000, 10_000)):
        expected = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * 0.001, method="exact").low
        assert smoothing.lower_bound(np.array([k]), n, 0.001)[0] == pytest.approx(expected, abs=1e-12)
    assert smoothing.max_radius(SIGMA, 10_000, 0.001) == pytest.approx(SIGMA * norm.ppf(0.001 ** 1e-4))


def test_it_abstains_when_no_class_reaches_a_half():
    class Noisy(nn.Module):  # the class is the largest of three input pixels: at x = 0, each a third
        def forward(self, x):
            return x.flatten(1)[:, :3]

    cert = certify(Noisy(), torch.zeros(3, 1, 2, 2), n=2_000)
    assert cert.prediction.tolist() == [-1, -1, -1] and cert.radius.tolist() == [0, 0, 0]
    assert np.all(cert.p_lower.numpy() < 0.5)


def test_counts_do_not_depend_on_the_batching():
    model, x = halfspace_samples([0.05, 0.15, 0.25])
    one = certify(model, x, rows=1000, n=1_000)
    for rows in (37, 100, 350):
        other = certify(model, x, rows=rows, n=1_000)
        assert torch.equal(one.prediction, other.prediction) and torch.equal(one.p_lower, other.p_lower)
    assert not torch.equal(one.p_lower, certify(model, x, n=1_000, seed=1).p_lower)  # the seed is used


def test_the_report_on_a_trained_run_bounds_below_what_an_attack_finds(digits_run, tmp_path):
    run = xdl.load(copy_run(digits_run, tmp_path / "run"))
    result = xdl.report(run, "certify", samples=12, params={"n0": 20, "n": 400, "radii": [0.25, 0.5],
                                                             "attack_steps": 5, "attack_draws": 4, "attack_n": 100})
    m = result.metrics
    assert set(m["certified_accuracy"]) >= {"0.25", "0.5"} and m["samples"] == 12
    assert m["violations"] == 0  # no sample certified beyond the perturbation that broke it
    for r in ("0.25", "0.5"):
        # The certified accuracy (lower bound) cannot exceed the attacked one (upper bound) at the same radius.
        assert m["certified_accuracy"][r] <= m["attack_accuracy"][r] + 1e-12
    assert m["max_radius"] == pytest.approx(smoothing.max_radius(SIGMA, 400, 0.001))
    radius, prediction = result.arrays["radius"], result.arrays["prediction"]
    assert np.all((radius > 0) == (prediction >= 0)) and np.all(radius <= m["max_radius"] + 1e-12)
    assert "certified_accuracy" in result.figures and result.params["sigma"] == SIGMA
    assert any("trained without noise" in w for w in result.warnings)
    assert len(set(result.provenance["indices"])) == 12 and result.provenance["split"] == "test"
    findings = load_analyzer("report", "certify").findings(result)
    assert any(f.label == "Certified accuracy (smoothed, L2 radius 0.5)" for f in findings)


def test_noise_sigma_is_recorded_and_a_bad_one_is_refused(capsys, tmp_path):
    out = tmp_path / "noisy"
    code, _, err = run_cli(capsys, "train", "--model", "mlp", "--epochs", "1", "--limit", "200", "--noise-sigma", "0.25",
                           "--out", out, "-q")
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["train"]["noise_sigma"] == 0.25
    result = xdl.report(xdl.load(out), "certify", samples=4, params={"n0": 10, "n": 50}, save=False)
    assert result.params["sigma"] == 0.25 and not any("trained without noise" in w for w in result.warnings)
    code, out_text, err = run_cli(capsys, "train", "--epochs", "1", "--noise-sigma", "-1", "--out", tmp_path / "bad")
    assert code == 2 and out_text == "" and len(err.splitlines()) == 1 and "noise-sigma must be ≥ 0" in err
    assert not (tmp_path / "bad").exists()
