"""APGD, Square, AutoAttack and the gradient-masking checks: known answers and torchattacks agreement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import xdl
from xdl.methods import masking
from xdl.methods import robust
from xdl.methods.autoattack import apgd, autoattack, checkpoints, dlr_loss, margin, square

N = 48  # samples per attack: enough to compare attacks, few enough for a 2-core CI


@pytest.fixture(scope="module")
def digits(digits_run):
    model = digits_run.model.eval()
    test = digits_run.data.test
    return model, test.x[:N], test.y[:N].long()


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


class Temperature(nn.Module):
    """A normal model whose logits are multiplied by 10⁴: softmax saturates, CE gradients vanish."""

    def __init__(self, model: nn.Module, factor: float = 1e4):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


class Quantized(nn.Module):
    """Inputs rounded to 2 levels before a normal model: a non-differentiable front (zero gradient)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x))


def test_checkpoints_match_the_reference_schedule():
    # p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) on 100 steps (Croce & Hein 2020, §3.1).
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_dlr_and_margin_known_values():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    y = torch.tensor([0])
    assert margin(logits, y).item() == pytest.approx(2.0)
    assert dlr_loss(logits, y).item() == pytest.approx(-2.0 / 3.0)  # −(3−1)/(3−0)
    assert dlr_loss(logits, y, torch.tensor([1])).item() == pytest.approx(-2.0 / 3.5)  # −(3−1)/(3−(0−1)/2)
    # Scale invariance, the point of DLR: a temperature does not change it.
    assert dlr_loss(100 * logits, y).item() == pytest.approx(-2.0 / 3.0)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_attacks_stay_in_the_ball_and_the_box(digits, norm, eps):
    model, x, y = digits
    torch.manual_seed(0)
    for adv in (apgd(model, x, y, eps, steps=10, norm=norm), square(model, x, y, eps, queries=50, norm=norm)):
        delta = (adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps + 1e-5).all()
        assert adv.min() >= 0 and adv.max() <= 1


def test_apgd_agrees_with_torchattacks_and_beats_pgd(digits):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits
    torch.manual_seed(0)
    ours = _accuracy(model, apgd(model, x, y, 0.1, steps=20), y)
    theirs = _accuracy(model, torchattacks.APGD(model, eps=0.1, steps=20, loss="ce", seed=0)(x, y), y)
    pgd = _accuracy(model, robust.pgd(model, x, y, 0.1, 10), y)
    assert abs(ours - theirs) <= 3 / N
    assert ours <= pgd + 1 / N


def test_square_breaks_a_model_gradients_cannot(digits):
    model, x, y = digits
    masked = Quantized(model).eval()
    torch.manual_seed(0)
    clean = _accuracy(masked, x, y)
    # Zero gradient: APGD only gets what its random start happens to break.
    stuck = _accuracy(masked, apgd(masked, x, y, 0.3, steps=10), y)
    assert stuck >= clean - 0.1
    assert _accuracy(masked, square(masked, x, y, 0.3, queries=200), y) < stuck - 0.2


def test_autoattack_is_the_per_sample_worst_case(digits):
    model, x, y = digits
    torch.manual_seed(0)
    adv, broken_by = autoattack(model, x, y, 0.1, steps=10, targets=3, queries=50)
    with torch.no_grad():
        correct = model(adv).argmax(1) == y
        clean_correct = model(x).argmax(1) == y
    # Robust exactly where nothing broke it; misclassified-before samples are marked "clean".
    assert torch.equal(correct, broken_by < 0)
    assert torch.equal(~clean_correct, broken_by == 0)
    assert correct.double().mean() <= _accuracy(model, robust.pgd(model, x, y, 0.1, 10), y) + 1 / N


def test_masking_checks_flag_a_saturated_model_that_pgd_calls_robust(digits):
    model, x, y = digits
    masked = Temperature(model).eval()
    torch.manual_seed(0)
    pgd = _accuracy(masked, robust.pgd(masked, x, y, 0.1, 10), y)
    assert pgd >= _accuracy(masked, x, y) - 0.1  # PGD-10 alone reports near-clean robustness
    adv, broken_by = autoattack(masked, x, y, 0.1, steps=10, targets=3, queries=50)
    assert _accuracy(masked, adv, y) < pgd - 0.3  # the scale-free DLR loss sees through it
    rows = masking.run_checks(masked, x, y, 0.1, broken_by=broken_by, steps=10)
    assert "gradients usable" in masking.failed(rows)


def test_masking_checks_pass_on_a_normal_model(digits):
    model, x, y = digits
    torch.manual_seed(0)
    _, broken_by = autoattack(model, x, y, 0.1, steps=10, targets=3, queries=50)
    rows = masking.run_checks(model, x, y, 0.1, broken_by=broken_by, steps=10)
    assert len(rows) == 7
    assert masking.failed(rows) == [], rows


def test_masking_checks_flag_probability_outputs(digits):
    model, x, y = digits
    probs = nn.Sequential(model, nn.Softmax(1)).eval()
    rows = masking.run_checks(probs, x[:8], y[:8], 0.1, steps=2)
    assert "logits, not probabilities" in masking.failed(rows)


def test_autoattack_analyzer_result_and_findings(digits_run):
    result = xdl.attack(digits_run, "autoattack", samples=24, params={"eps": 0.1, "steps": 5, "targets": 2, "queries": 20})
    m = result.metrics
    assert sum(m["broken_by"].values()) == pytest.approx(1.0)
    assert m["broken_by"]["robust"] == pytest.approx(m["robust_accuracy"])
    assert len(result.tables["masking_checks"]) == 7
    from xdl_plugins.autoattack import AutoAttack

    found = AutoAttack.findings(result)
    assert found[0].label.startswith("AutoAttack robust accuracy") and found[0].help
    assert found[1].label == "Gradient-masking checks"
    assert (found[1].level == "warn") == bool(m["masking_checks_failed"])


@pytest.mark.parametrize("choice,expected", [("autoattack", ["attack/autoattack"]), ("pgd", ["attack/pgd"])])
def test_audit_attack_choice(digits_run, tmp_path, choice, expected):
    import shutil

    run = shutil.copytree(digits_run.path, tmp_path / "run")
    # AutoAttack's parts (apgd, square) are not run again beside it; with pgd, none of the three runs.
    page = xdl.audit(run, only=["attack"], skip=["fgsm", "corruptions", *(["pgd"] if choice == "autoattack" else [])],
                     samples=12, progress=False, audit_attack=choice)
    assert [s.key for s in page.sections] == expected
    assert all(s.status == "computed" for s in page.sections), [s.error for s in page.sections]
    if choice == "autoattack":
        result = page.sections[0].result
        assert result.params["steps"] == 25 and result.params["queries"] == 300  # the audit's budget
        assert "masking_checks" in result.tables
