"""Attacks: known answers on a hand-built linear model, torchattacks agreement, the CLI contract.

APGD, Square, AutoAttack and the gradient-masking checks: known answers and torchattacks agreement.

Common corruptions: exact values where the corruption has one, the analyzer's table and heat map.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import copy_run, run_cli
from torch import nn

import xdl
from xdl.errors import XdlError
from xdl.methods import masking, robust
from xdl.methods.autoattack import (
    apgd,
    autoattack,
    checkpoints,
    dlr_loss,
    margin,
    square,
)
from xdl.methods.corruptions import TYPES, corrupt
from xdl.testing import check_analyzer

# -----------------------------------------------------------------------------------------
# attacks
# -----------------------------------------------------------------------------------------


def linear_model() -> nn.Module:
    """logits = W·x with rows w0, w1: the input gradient of the loss is known in closed form.

    For label 0, ∇ₓ CE = (p0 − 1)·w0 + p1·w1 = p1·(w1 − w0), and p1 > 0, so FGSM moves x by
    eps·sign(w1 − w0); for label 1 by eps·sign(w0 − w1).
    """
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, 2.0, -3.0]]))
    return model


W_DIFF_SIGN = torch.tensor([-1.0, 1.0, 1.0, -1.0])  # sign(w1 − w0)


def test_fgsm_moves_by_eps_times_the_sign_of_the_input_gradient():
    x = torch.full((2, 1, 2, 2), 0.5)
    y = torch.tensor([0, 1])
    adv = robust.fgsm(linear_model(), x, y, eps=0.1)
    expected = x.flatten(1) + 0.1 * torch.stack([W_DIFF_SIGN, -W_DIFF_SIGN])
    assert torch.allclose(adv.flatten(1), expected, atol=1e-6)


def test_fgsm_analyzer_on_a_bare_model_gives_the_same_known_answer():
    x = torch.tensor([[0.2, -1.0, 3.0, 0.0]])  # tabular: unbounded, no clamping
    result = xdl.attack(linear_model(), "fgsm", x=x, y=torch.tensor([0]), params={"eps": 2.0}, save=False)
    assert np.allclose(result.arrays["adversarial"], (x + 2.0 * W_DIFF_SIGN).numpy(), atol=1e-6)
    assert result.metrics["mean_linf"] == pytest.approx(2.0)
    assert result.metrics["mean_l2"] == pytest.approx(4.0)  # 2·√4


def test_adversarial_images_are_clamped_to_the_unit_box():
    x = torch.tensor([[0.0, 0.95, 0.98, 0.02]]).view(1, 1, 2, 2)
    adv = robust.fgsm(linear_model(), x, torch.tensor([0]), eps=0.3)
    expected = (x.flatten(1) + 0.3 * W_DIFF_SIGN).clamp(0, 1)
    assert torch.allclose(adv.flatten(1), expected, atol=1e-6)
    adv = robust.pgd(linear_model(), torch.rand(16, 1, 2, 2), torch.randint(0, 2, (16,)), eps=0.5, steps=3)
    assert adv.min() >= 0 and adv.max() <= 1


def test_l2_pgd_stays_within_the_ball():
    x = torch.rand(32, 1, 2, 2) * 0.2 + 0.4
    adv = robust.pgd(linear_model(), x, torch.randint(0, 2, (32,)), eps=0.3, steps=5, norm="l2")
    norms = (adv - x).flatten(1).norm(dim=1)
    assert norms.max() <= 0.3 + 1e-5
    assert norms.min() > 0.29  # a linear model's loss grows all the way to the boundary


def test_training_attack_keeps_train_mode_and_accumulates_no_gradients():
    data = xdl.load_data("digits", limit=60)
    attack = robust.train_attack("pgd", 0.1, 2, data, torch.device("cpu"))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).train()
    adv = attack(model, data.train.x[:8], data.train.y[:8])
    assert model.training and all(p.grad is None for p in model.parameters())
    assert (adv - data.train.x[:8]).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("method, params", [("fgsm", {"eps": 0.1}), ("pgd", {"eps": [0, 0.1], "steps": 3})])
def test_attacks_pass_the_analyzer_contract(method, params):
    from xdl.analysis.registry import load_analyzer

    results = check_analyzer(load_analyzer("attack", method), params)
    assert set(results) == {"image", "tabular"}


@pytest.fixture(scope="module")
def digits_attacks(digits_run):
    """FGSM and PGD at eps 0.1 on 120 test digits, shared by the comparisons below (the
    AutoAttack family and corruptions have their own sections below)."""
    options = {"indices": range(120), "params": {"eps": 0.1}, "save": False}
    return {name: xdl.attack(digits_run, name, **options) for name in ("fgsm", "pgd")}


def test_robust_accuracy_never_exceeds_clean_accuracy(digits_attacks):
    assert {"fgsm", "pgd"} <= set(digits_attacks)
    for name, result in digits_attacks.items():
        m = result.metrics
        assert m["robust_accuracy"] <= m["clean_accuracy"], name
        assert m["robust_accuracy"] < m["clean_accuracy"], f"{name} at eps 0.1 changed nothing"
        assert m["mean_linf"] <= 0.1 + 1e-6


def test_pgd_is_at_least_as_strong_as_fgsm(digits_attacks):
    assert digits_attacks["pgd"].metrics["robust_accuracy"] <= digits_attacks["fgsm"].metrics["robust_accuracy"]


def test_fgsm_agrees_with_torchattacks(digits_run, digits_attacks):
    import torchattacks  # a [test] dependency: a missing one fails here instead of skipping
    model = digits_run.model
    x, y = digits_run.data.test.x[:120], digits_run.data.test.y[:120]
    reference = torchattacks.FGSM(model, eps=0.1)(x, y)
    with torch.no_grad():
        theirs = (model(reference).argmax(1) == y).double().mean().item()
    ours = digits_attacks["fgsm"]
    assert ours.metrics["robust_accuracy"] == theirs
    assert np.abs(ours.arrays["adversarial"] - reference.numpy()).max() < 1e-5


def test_tabular_attacks_move_numeric_features_only(tabular_run):
    result = xdl.attack(tabular_run, "pgd", samples=64, params={"eps": 0.5, "steps": 3}, save=False)
    numeric = tabular_run.data.encoding.numeric_mask()
    x = tabular_run.data.test.x[result.provenance["indices"]].numpy()
    adv = result.arrays["adversarial"]
    assert np.array_equal(adv[:, ~numeric], x[:, ~numeric])
    assert np.abs(adv[:, numeric] - x[:, numeric]).max() > 0.1
    assert "numeric features only" in result.summary and "standardized" in result.metrics["perturbed"]


def test_adversarial_training_is_recorded_in_the_run(tmp_path):
    run = xdl.train("digits", "mlp", tmp_path / "adv", epochs=1, quiet=True, adv_train="fgsm", adv_eps=0.05,
                    data_options={"limit": 200}, model_options={"hidden": [16]})
    train = json.loads((tmp_path / "adv" / "run.json").read_text())["train"]
    assert (train["adv_train"], train["adv_eps"]) == ("fgsm", 0.05)
    assert xdl.load(tmp_path / "adv").model(run.data.test.x[:2]).shape == (2, 10)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eps", "-0.1"], "eps must be ≥ 0"),
        (["--eps", "2"], "larger than the whole input range"),
        (["-m", "pgd", "-p", "steps=0"], "steps must be ≥ 1"),
        (["-m", "pgd", "-p", "norm=l3"], "choose one of linf, l2"),
    ],
)
def test_attack_bad_input_is_one_line_exit_2(capsys, digits_run, args, message):
    code, _, err = run_cli(capsys, "attack", digits_run.path, "-q", *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_train_bad_adversarial_options_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--adv-train", "fgsm", "--adv-eps", "-1")
    assert code == 2 and "adv-eps must be > 0" in err
    assert not (tmp_path / "r" / "run.json").exists()


def test_eps_sweep_writes_table_and_curve(capsys, digits_run, tmp_path):
    code, out, _ = run_cli(capsys, "attack", digits_run.path, "--eps", "0.1,0,0.05", "--indices", ",".join(map(str, range(64))), "-q", "--force")
    assert code == 0 and "eps sweep" in out
    folder = digits_run.path / "attack" / "fgsm"
    saved = json.loads((folder / "result.json").read_text())
    rows = saved["tables"]["robustness"]
    assert [r["eps"] for r in rows] == [0.0, 0.05, 0.1]
    assert rows[0]["robust_accuracy"] == saved["metrics"]["clean_accuracy"]  # eps 0 changes nothing
    assert saved["metrics"]["eps"] == 0.1
    assert (folder / "robustness.csv").is_file() and (folder / "robustness_curve.png").stat().st_size > 1000
    assert (folder / "examples.png").is_file()
    assert np.load(folder / "arrays.npz")["adversarial"].shape == (64, 1, 8, 8)


def test_npz_tabular_attacks_say_raw_units(tmp_path):
    """An npz table is not standardized by xdl: eps is in the data's own units, and the summary says so."""
    rng = np.random.default_rng(0)
    x = rng.normal(50, 10, (200, 3)).astype(np.float32)
    np.savez(tmp_path / "t.npz", x=x, y=(x[:, 0] > 50).astype(np.int64))
    run = xdl.train(str(tmp_path / "t.npz"), "mlp", tmp_path / "run", epochs=1, quiet=True, model_options={"hidden": [8]})
    result = xdl.attack(run, "pgd", samples=16, params={"eps": 2.0, "steps": 2}, save=False)
    assert "raw units" in result.summary and "standardized" not in result.summary
    assert result.metrics["mean_linf"] == pytest.approx(2.0, abs=1e-4)  # moved by eps in those raw units


class CallCounter(nn.Module):
    """The linear model, counting its calls: how many forward passes an attack costs."""

    def __init__(self):
        super().__init__()
        self.inner, self.calls = linear_model(), 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_fgsm_takes_its_gradient_from_the_clean_pass():
    # A hand-written FGSM loop makes two model calls per batch (clean with input gradient,
    # then adversarial); the analyzer used to make three, a third more work over a big folder.
    # Counted per extra batch, so that the fixed probes (output form, memory) cancel.
    calls = []
    for n in (2, 4):
        model, x = CallCounter(), torch.full((n, 1, 2, 2), 0.5)
        y = torch.arange(n) % 2
        result = xdl.attack(model, "fgsm", x=x, y=y, params={"eps": 0.1}, batch_size=1, save=False)
        calls.append(model.calls)
        signs = torch.stack([W_DIFF_SIGN if label == 0 else -W_DIFF_SIGN for label in y])
        assert np.allclose(result.arrays["adversarial"].reshape(n, -1), (x.flatten(1) + 0.1 * signs).numpy(), atol=1e-6)
    assert calls[1] - calls[0] == 2 * 2

# -----------------------------------------------------------------------------------------
# autoattack
# -----------------------------------------------------------------------------------------


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
    # What the evaluation and what the checks cost, apart, and in the summary a user reads.
    seconds = {r["part"]: r["seconds"] for r in result.tables["seconds"]}
    assert seconds.keys() == {"attacks", "masking checks"} and all(v > 0 for v in seconds.values())
    assert f"masking checks {seconds['masking checks']:.1f} s" in result.summary
    from xdl_plugins.autoattack import AutoAttack

    found = AutoAttack.findings(result)
    assert found[0].label.startswith("AutoAttack robust accuracy") and found[0].help
    assert found[1].label == "Gradient-masking checks"
    assert (found[1].level == "warn") == bool(m["masking_checks_failed"])


@pytest.mark.parametrize("choice,expected", [("autoattack", ["attack/autoattack"]), ("pgd", ["attack/pgd"])])
def test_audit_attack_choice(digits_run, tmp_path, choice, expected):
    run = copy_run(digits_run, tmp_path / "run")
    # AutoAttack's parts (apgd, square) are not run again beside it; with pgd, none of the three runs.
    page = xdl.audit(run, only=["attack"], skip=["fgsm", "corruptions", *(["pgd"] if choice == "autoattack" else [])],
                     samples=12, progress=False, audit_attack=choice)
    assert [s.key for s in page.sections] == expected
    assert all(s.status == "computed" for s in page.sections), [s.error for s in page.sections]
    if choice == "autoattack":
        result = page.sections[0].result
        assert result.params["steps"] == 25 and result.params["queries"] == 300  # the audit's budget
        assert "masking_checks" in result.tables

# -----------------------------------------------------------------------------------------
# corruptions
# -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 28, 28, generator=g) * 0.6 + 0.2


def test_brightness_and_contrast_exact(images):
    assert torch.allclose(corrupt(images, "brightness", 1), (images + 0.1).clamp(0, 1))
    assert torch.allclose(corrupt(images, "brightness", 5), (images + 0.5).clamp(0, 1))
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(corrupt(images, "contrast", 2), (images - mean) * 0.5 + mean, atol=1e-6)


def test_translate_moves_whole_pixels_and_rotation_keeps_a_centred_disk():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 12:16, 12:16] = 1.0
    out = corrupt(x, "translate", 3, torch.Generator().manual_seed(1))
    # Whole-pixel shift: the same 16 bright pixels, elsewhere, no blur.
    assert torch.isclose(out.sum(), torch.tensor(16.0), atol=1e-4) and ((out - 0.5).abs() > 0.49).all()
    assert not torch.equal(out, x)
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    disk = (((rows - 13.5) ** 2 + (cols - 13.5) ** 2) < 36).float().view(1, 1, 28, 28)
    assert (corrupt(disk, "rotate", 5) - disk).abs().mean() < 0.02


def test_every_type_and_severity_stays_in_range_and_grows_with_severity(images):
    for kind in TYPES:
        changes = []
        for severity in (1, 5):
            out = corrupt(images, kind, severity, torch.Generator().manual_seed(0))
            assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1, kind
            changes.append(float((out - images).abs().mean()))
        assert changes[0] > 0, kind
        assert changes[1] >= changes[0] * 0.9, kind


def test_corruptions_are_reproducible_and_refuse_bad_input(images):
    a = corrupt(images, "glass_blur", 3, torch.Generator().manual_seed(5))
    b = corrupt(images, "glass_blur", 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(XdlError, match="unknown corruption"):
        corrupt(images, "snow", 1)
    with pytest.raises(XdlError, match="severity"):
        corrupt(images, "fog", 6)


def test_analyzer_table_heatmap_and_findings(digits_run):
    result = xdl.attack(digits_run, "corruptions", indices=range(40), params={"types": ["brightness", "impulse_noise"]})
    rows = result.tables["corruptions"]
    assert len(rows) == 10 and "heatmap" in result.figures
    mean = sum(r["accuracy"] for r in rows) / len(rows)
    assert result.metrics["mean_corruption_accuracy"] == pytest.approx(mean)
    # Brightness is deterministic: its accuracy is the model's on x + 0.3 (severity 3), clipped.
    test = digits_run.data.test
    with torch.no_grad():
        expected = float((digits_run.model.eval()((test.x[:40] + 0.3).clamp(0, 1)).argmax(1) == test.y[:40]).double().mean())
    assert [r["accuracy"] for r in rows if r["corruption"] == "brightness" and r["severity"] == 3] == [pytest.approx(expected)]
    from xdl_plugins.corruptions import Corruptions

    (finding,) = Corruptions.findings(result)
    assert finding.label == "Mean corruption accuracy" and finding.help
