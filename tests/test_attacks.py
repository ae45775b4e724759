"""Attacks: known answers on a hand-built linear model, torchattacks agreement, the CLI contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import xdl
from xdl.methods import robust
from xdl.cli.main import main as xdl_main
from xdl.testing import check_analyzer


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
    AutoAttack family and corruptions have their own tests in test_autoattack.py and test_corruptions.py)."""
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


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        xdl_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


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
    code, _, err = cli(capsys, "attack", digits_run.path, "-q", *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_train_bad_adversarial_options_exit_2(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--out", tmp_path / "r", "--adv-train", "fgsm", "--adv-eps", "-1")
    assert code == 2 and "adv-eps must be > 0" in err
    assert not (tmp_path / "r" / "run.json").exists()


def test_eps_sweep_writes_table_and_curve(capsys, digits_run, tmp_path):
    code, out, _ = cli(capsys, "attack", digits_run.path, "--eps", "0.1,0,0.05", "--indices", ",".join(map(str, range(64))), "-q", "--force")
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
