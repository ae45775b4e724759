"""Can this explanation be trusted: deletion curves with known answers, Spearman against scipy,
the cascading randomization on a copy, ``xdl explain --evaluate`` and ``xdl report --method trust``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import xdl
from xdl.analysis.evaluation import (
    cascading_randomization, faithfulness, map_similarity, parameterized_layers, passes_sanity, randomized_copies,
    spearman,
)


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def linear_model(weights: list[float]) -> nn.Module:
    """Class 0's logit is w·x, class 1's is 0: p(class 0) = sigmoid(w·x)."""
    model = nn.Linear(len(weights), 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weights, [0.0] * len(weights)]))
    return model.eval()


def copy_run(run, dest: Path) -> Path:
    """A private copy of a session run: these tests write results into it."""
    dest.mkdir()
    for name in ("run.json", "model.safetensors", "history.csv"):
        shutil.copy(run.path / name, dest / name)
    return dest


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    from xdl.cli.main import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# -----------------------------------------------------------------------------------------
# Known answers
# -----------------------------------------------------------------------------------------


def test_deletion_and_insertion_curves_of_a_linear_model():
    weights = [4.0, 3.0, 2.0, 1.0]
    model = linear_model(weights)
    x = torch.ones(1, 4)
    attributions = torch.tensor([weights]) * x  # gradient × input, exact for a linear model
    curves = faithfulness(model, x, torch.tensor([0]), attributions, torch.zeros(1, 4), steps=4, orders=8)
    # Deleting the largest weight first leaves w·x = 10, 6, 3, 1, 0; inserting it first 0, 4, 7, 9, 10.
    np.testing.assert_allclose(curves.deletion[0], [sigmoid(v) for v in (10, 6, 3, 1, 0)], rtol=1e-5)
    np.testing.assert_allclose(curves.insertion[0], [sigmoid(v) for v in (0, 4, 7, 9, 10)], rtol=1e-5)
    aucs = curves.aucs()
    expected = np.trapezoid([sigmoid(v) for v in (10, 6, 3, 1, 0)], np.linspace(0, 1, 5))
    assert aucs["deletion_auc"] == pytest.approx(expected, rel=1e-5)
    # The best order deletes fastest and inserts fastest: random orders are strictly worse.
    assert aucs["deletion_auc"] < aucs["random_deletion_auc"]
    assert aucs["insertion_auc"] > aucs["random_insertion_auc"]
    # The reverse order is the worst one: above random at deletion.
    reverse = faithfulness(model, x, torch.tensor([0]), -attributions, torch.zeros(1, 4), steps=4, orders=8).aucs()
    assert reverse["deletion_auc"] > reverse["random_deletion_auc"] > aucs["deletion_auc"]


def test_image_deletion_removes_whole_pixels():
    # One pixel carries the logit through both channels; deleting it first drops the score at once.
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 2 * 2, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0, [0, 4]] = 5.0  # pixel (0, 0) in channel 0 and channel 1
    x = torch.ones(1, 2, 2, 2)
    attributions = torch.zeros_like(x)
    attributions[0, 0, 0, 0] = 1.0  # only one channel of the pixel is attributed: the pixel still goes first
    curves = faithfulness(model, x, torch.tensor([0]), attributions, torch.zeros(1, 2, 2, 2), steps=4, orders=1)
    np.testing.assert_allclose(curves.deletion[0], [sigmoid(10)] + [sigmoid(0)] * 4, rtol=1e-5)


def test_spearman_matches_scipy_with_ties_and_constant_rows():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (6, 3, 4, 4)).astype(float)  # few values: many ties
    b = a + rng.normal(0, 2, a.shape)
    b[2] = rng.integers(0, 3, b[2].shape)
    b[5] = 1.0  # constant: undefined
    got = spearman(a, b)
    for i in range(5):
        assert got[i] == pytest.approx(spearmanr(a[i].ravel(), b[i].ravel()).statistic, abs=1e-12)
    assert np.isnan(got[5])
    # For the sanity checks a map that went flat kept none of the ranking; a flat original says nothing.
    flat = np.zeros_like(a[:2])
    np.testing.assert_array_equal(map_similarity(a[:2], flat), [0.0, 0.0])
    assert np.isnan(map_similarity(flat, a[:2])).all()


# -----------------------------------------------------------------------------------------
# Cascading randomization
# -----------------------------------------------------------------------------------------


def test_cascading_randomization_changes_every_layer_of_a_copy_top_down(digits_run):
    model = digits_run.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [name for name, _ in parameterized_layers(model)]
    assert layers[0] == max(layers, key=int)  # a Sequential: the output layer has the highest index
    steps = []
    for name, copy in randomized_copies(model, seed=0):
        changed = {n for n, m in parameterized_layers(copy)
                   if any(not torch.equal(p, model.get_submodule(n).get_parameter(k))
                          for k, p in m.named_parameters(recurse=False))}
        steps.append((name, changed))
    # Step i has randomized exactly the top i layers, so at the end every layer differs.
    assert [name for name, _ in steps] == layers
    for i, (_, changed) in enumerate(steps):
        assert changed == set(layers[: i + 1])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_cascade_of_fewer_steps_randomizes_the_layers_in_top_down_groups():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)]).eval()
    layers = [name for name, _ in parameterized_layers(model)]  # 4, 3, 2, 1, 0
    seen = []
    for name, copy in randomized_copies(model, seed=0, steps=2):
        seen.append((name, {n for n in layers if not torch.equal(copy.get_submodule(n).weight, model.get_submodule(n).weight)}))
    assert seen == [("3", {"4", "3"}), ("0", set(layers))]
    rows = cascading_randomization(model, lambda m, x, t: x.numpy(), torch.rand(3, 4), torch.zeros(3, dtype=torch.long),
                                   steps=2)
    assert [(r["layer"], r["layers_randomized"]) for r in rows] == [("3", 2), ("0", 5)]
    assert [name for name, _ in randomized_copies(model, steps=99)] == layers  # more steps than layers: one per layer


def test_a_map_that_ignores_the_model_fails_the_sanity_check():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(3, 1, 4, 4)
    rows = cascading_randomization(model, lambda m, x, t: x.numpy() * 2, x, torch.zeros(3, dtype=torch.long))
    assert [r["layer"] for r in rows] == ["3", "1"]
    assert all(r["spearman"] == pytest.approx(1.0) for r in rows)
    assert passes_sanity(rows) is False


# -----------------------------------------------------------------------------------------
# xdl explain --evaluate and xdl report --method trust
# -----------------------------------------------------------------------------------------


def test_saliency_maps_change_on_the_randomized_model(digits_run):
    result = xdl.explain(digits_run, "saliency", samples=4, save=False, evaluate=True)
    evaluation = result.metrics["evaluation"]
    # The bar: gradient saliency of the fully randomized model ranks pixels unlike the trained model's.
    assert evaluation["randomized_spearman"] < 0.5
    assert evaluation["passes_randomization_check"] is True
    assert [r["layers_randomized"] for r in result.tables["randomization"]] == list(range(1, 7))
    assert evaluation["infidelity"] >= 0 and evaluation["sensitivity_max"] >= 0


def test_cli_explain_ig_evaluate_writes_the_metrics(digits_run, tmp_path, capsys):
    run = copy_run(digits_run, tmp_path / "run")
    code, out, err = cli(["explain", str(run), "--method", "ig", "--evaluate", "-n", "4", "-p", "steps=8", "-q"], capsys)
    assert code == 0, err
    saved = json.loads((run / "explain" / "ig" / "result.json").read_text())
    evaluation = saved["metrics"]["evaluation"]
    assert {"deletion_auc", "random_deletion_auc", "insertion_auc", "random_insertion_auc", "infidelity",
            "sensitivity_max", "randomized_spearman", "passes_randomization_check"} <= set(evaluation)
    # The bar: IG removes the evidence for the class faster than a random order does.
    assert evaluation["deletion_auc"] < evaluation["random_deletion_auc"]
    assert (run / "explain" / "ig" / "evaluation.png").is_file() and (run / "explain" / "ig" / "randomization.csv").is_file()
    assert "randomization check" in out


def test_cli_report_trust_ranks_the_methods(digits_run, tmp_path, capsys):
    from xdl.analysis.base import Result

    run = copy_run(digits_run, tmp_path / "run")
    code, out, err = cli(["report", str(run), "--method", "trust", "-n", "4", "-p", "methods=saliency,ig",
                          "-p", "steps=5", "-p", "orders=1", "-q"], capsys)
    assert code == 0, err
    folder = run / "report" / "trust"
    saved = json.loads((folder / "result.json").read_text())
    ranking = saved["tables"]["ranking"]
    assert [r["rank"] for r in ranking] == [1, 2] and {r["method"] for r in ranking} == {"saliency", "ig"}
    assert saved["metrics"]["most_trusted"] == ranking[0]["method"]
    assert saved["metrics"]["agreement"]["ig"]["ig"] == pytest.approx(1.0)
    # A small run: the label randomization test retrained the model on shuffled labels. Rebuild
    # that model and compare captum's saliency maps of both nets on the same samples.
    from captum.attr import Saliency

    from xdl.analysis.base import Context
    from xdl.analysis.evaluation import map_similarity
    from xdl_plugins.trust import permuted_label_model

    again = xdl.load(run)
    x = again.data.test.x[saved["provenance"]["indices"]]
    ctx = Context(model=again.model, x=x, data=again.data, run=again, seed=again.seed, class_names=again.data.class_names)
    shuffled = permuted_label_model(ctx, "auto", Result("trust", "report"))
    target = again.model(x).argmax(1)
    maps = [Saliency(m).attribute(x.clone().requires_grad_(), target=target).detach().numpy() for m in (again.model, shuffled)]
    by_method = {r["method"]: r for r in ranking}
    assert by_method["saliency"]["label_randomized_spearman"] == pytest.approx(float(np.mean(map_similarity(*maps))), abs=1e-5)
    assert (folder / "ranking.csv").is_file() and (folder / "agreement.png").is_file()
    assert out.startswith(f"{ranking[0]['method']} is ") or out.startswith("no method passes")
    # The audit's summary names the method to trust, from the saved result.
    from xdl.auditing.audit import Section, findings

    found = [f for f in findings(digits_run, [Section("report", "trust", "reused", Result.load(folder))])
             if f.source == "report/trust"]
    assert [(f.label, f.value) for f in found] == [("Most trustworthy explanation", ranking[0]["method"])]
    assert f"randomization check: {ranking[0]['randomization_check']}" in found[0].detail


@pytest.mark.parametrize("args, message", [
    (["report", "{run}", "--method", "trust", "-p", "methods=saliency"], "at least two different explain methods"),
    (["report", "{run}", "--method", "trust", "-p", "methods=saliency,nope"], "unknown explain method 'nope'"),
    (["attack", "{run}", "--evaluate"], "No such option '--evaluate'"),
])
def test_bad_input_is_one_line_and_exit_2(digits_run, capsys, args, message):
    code, _, err = cli([a.format(run=digits_run.path) for a in args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
