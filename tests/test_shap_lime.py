"""SHAP and LIME: agreement with the shap and lime libraries, additivity, seeding, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import xdl
from xdl.analysis import Context
from xdl.errors import XdlError


def cli(*args):
    return subprocess.run([sys.executable, "-m", "xdl", *map(str, args)], capture_output=True, text=True)


def test_expected_gradients_agree_with_shap_gradient_explainer(digits_run):
    import shap

    from xdl_plugins.shap import expected_gradients

    model, x = digits_run.model, digits_run.data.test.x[:3]
    background = digits_run.data.train.x[:30]
    target = model(x).argmax(1)
    ours, _ = expected_gradients(Context(model=model, x=x), background, target, 400, "iid")
    # ranked_outputs=1 makes shap explain only the top class (the target here), 10× cheaper.
    theirs, ranks = shap.GradientExplainer(model, background).shap_values(x, nsamples=400, rseed=0, ranked_outputs=1)
    assert torch.equal(ranks[:, 0], target)
    theirs = torch.as_tensor(theirs[..., 0]).float()
    for a, b in zip(ours.flatten(1), theirs.flatten(1)):
        assert np.corrcoef(a, b)[0, 1] > 0.9


def test_linear_model_gets_exact_kernel_shap():
    # For f(x) = Wx + b, SHAP values are W[t] * (x - E[background]) exactly.
    import shap

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(20, 4)
    # A bare model has no training split: its samples are the background.
    result = xdl.explain(model, "shap", x=x, samples=None, params={"method": "kernel", "clusters": 6}, save=False)
    background = shap.kmeans(x.numpy().astype(np.float64), 6)
    mean = torch.as_tensor(background.weights @ background.data, dtype=torch.float32)
    target = model(x).argmax(1)
    expected = model.weight.detach()[target] * (x - mean)
    assert torch.allclose(torch.as_tensor(result.arrays["shap"]), expected, atol=1e-5)
    assert result.metrics["additivity_relative_gap"] < 1e-5


def test_kernel_shap_matches_shap_per_column(tabular_run):
    import shap

    result = xdl.explain(tabular_run, "shap", samples=4, seed=3, save=False)
    model, x = tabular_run.model, tabular_run.data.test.x[result.provenance["indices"]]

    def logits(a):
        return model(torch.as_tensor(a, dtype=torch.float32)).detach().numpy()

    background = shap.kmeans(tabular_run.data.train.x.numpy().astype(np.float64), 10)
    np.random.seed(3)
    theirs = shap.KernelExplainer(logits, background).shap_values(x.numpy(), silent=True)
    target = model(x).argmax(1).numpy()
    np.testing.assert_allclose(result.arrays["shap"], theirs[np.arange(4), :, target], atol=1e-5)
    # One-hot parts of 'job' are summed back into one column.
    columns = result.arrays["shap_columns"]
    assert columns.shape == (4, 3)
    np.testing.assert_allclose(columns[:, 2], result.arrays["shap"][:, 2:].sum(1), atol=1e-6)
    assert {"shap_bar", "shap_waterfall"} <= set(result.figures)


@pytest.mark.parametrize("method, tolerance", [("deep", 1e-4), ("gradient", 0.1)])
def test_additivity_on_plain_mlp(mlp_run, method, tolerance):
    # DeepSHAP sums to f(x) - E[f(b)] exactly; expected gradients only in expectation.
    result = xdl.explain(mlp_run, "shap", samples=4, params={"method": method, "background": 50, "nsamples": 2000}, save=False)
    assert result.params["method"] == method and not result.warnings
    assert result.metrics["additivity_relative_gap"] < tolerance


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.nn.functional.relu(self.a(x)))


def test_deep_shap_falls_back_instead_of_failing():
    torch.manual_seed(0)
    x = torch.randn(30, 5)
    result = xdl.explain(Functional(), "shap", x=x, samples=None, params={"method": "deep", "background": 10}, save=False)
    assert result.params["method"] == "gradient"
    assert any("used expected gradients" in w for w in result.warnings)
    assert result.arrays["shap"].shape == (30, 5)


def test_deep_shap_rewrites_inplace_activations():
    # The in-place ReLU is made out-of-place for the call, so DeepSHAP runs and sums exactly.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    result = xdl.explain(model, "shap", x=torch.randn(30, 5), samples=None, params={"method": "deep", "background": 10}, save=False)
    assert result.params["method"] == "deep" and result.metrics["additivity_relative_gap"] < 1e-4
    assert model[1].inplace  # restored afterwards


def test_shap_draws_chunked_to_the_activation_cap_give_the_same_values(digits_run, monkeypatch):
    from xdl.analysis.base import Context

    params = {"background": 20}
    whole = xdl.explain(digits_run, "shap", samples=3, seed=4, params=params, save=False)
    # 7 rows per model call: one sample per batch, its 50 draws in 8 calls (a 224 px ResNet-50 allows 6).
    # Each sample's draws come from its own generator, so neither split changes a value.
    monkeypatch.setattr(Context, "rows", lambda self: 7)
    chunked = xdl.explain(digits_run, "shap", samples=3, seed=4, params=params, save=False)
    np.testing.assert_allclose(chunked.arrays["shap"], whole.arrays["shap"], rtol=1e-4, atol=1e-6)
    assert chunked.metrics["estimated_correlation_with_converged_median"] == pytest.approx(
        whole.metrics["estimated_correlation_with_converged_median"], abs=1e-5)


def test_shap_is_seeded(digits_run):
    runs = [xdl.explain(digits_run, "shap", samples=2, seed=s, params={"background": 20}, save=False) for s in (1, 1, 2)]
    assert np.array_equal(runs[0].arrays["shap"], runs[1].arrays["shap"])
    assert not np.array_equal(runs[0].arrays["shap"], runs[2].arrays["shap"])


def test_lime_weights_equal_lime_given_the_same_masks(digits_run):
    from lime.lime_image import LimeImageExplainer

    params = {"segmentation": "slic", "n_segments": 12, "num_samples": 300}
    result = xdl.explain(digits_run, "lime", indices=[0, 1], seed=5, params=params)  # the rows the reference reads
    model = digits_run.model

    def classify(images):  # lime hands over RGB copies of the gray digit
        x = torch.as_tensor(images[..., :1], dtype=torch.float32).permute(0, 3, 1, 2)
        return torch.softmax(model(x), 1).detach().numpy()

    scores = []
    for i in range(2):
        segments, target = result.arrays["segments"][i], int(result.arrays["target"][i])
        explanation = LimeImageExplainer(random_state=5 + i).explain_instance(
            digits_run.data.test.x[i, 0].double().numpy(), classify, labels=(target,), top_labels=None,
            num_samples=300, batch_size=100, segmentation_fn=lambda image, s=segments: s, random_seed=0,
        )
        theirs = np.zeros(segments.max() + 1)
        for feature, weight in explanation.local_exp[target]:
            theirs[feature] = weight
        np.testing.assert_allclose(result.arrays["weights"][i, : len(theirs)], theirs, atol=1e-5)
        scores.append(explanation.score)
    assert result.metrics["mean_r2"] == pytest.approx(np.mean(scores), abs=1e-6)
    assert "lime" in result.figures and (result.path / "lime.png").is_file()


def test_lime_is_seeded(digits_run):
    params = {"segmentation": "slic", "n_segments": 12, "num_samples": 100}
    runs = [xdl.explain(digits_run, "lime", samples=2, seed=s, params=params, save=False) for s in (1, 1, 2)]
    assert np.array_equal(runs[0].arrays["weights"], runs[1].arrays["weights"])
    assert not np.array_equal(runs[0].arrays["weights"], runs[2].arrays["weights"])


def test_lime_tabular_per_column(tabular_run):
    result = xdl.explain(tabular_run, "lime", samples=2, params={"num_samples": 300}, save=False)
    weights, columns = result.arrays["weights"], result.arrays["column_weights"]
    assert weights.shape == (2, 6) and columns.shape == (2, 3)
    np.testing.assert_allclose(columns[:, 2], weights[:, 2:].sum(1))
    assert [row["column"] for row in result.tables["lime_columns"]] == ["age", "hours", "job"]


def test_single_output_model_is_refused():
    with pytest.raises(XdlError, match="1 output"):
        xdl.explain(nn.Linear(4, 1), "shap", x=torch.randn(8, 4), save=False)
    with pytest.raises(XdlError, match="1 output"):
        xdl.explain(nn.Linear(4, 1), "lime", x=torch.randn(8, 4), save=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "shap", "-p", "background=100000"], "larger than the training split"),
        (["-m", "lime", "-p", "num_samples=5"], "num_samples must be >= 10"),
    ],
)
def test_bad_input_is_one_line_exit_2(digits_run, args, message):
    done = cli("explain", digits_run.path, "-n", "2", *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_all_classes_reports_the_target_class_not_class_0(tabular_run):
    """With every class explained, the target array, tables and evaluation still follow the target class."""
    from xdl_plugins.shap import Shap

    one = xdl.explain(tabular_run, "shap", samples=6, seed=1, save=False)
    every = xdl.explain(tabular_run, "shap", samples=6, seed=1, params={"all_classes": True}, save=False)
    x = tabular_run.data.test.x[one.provenance["indices"]]
    predicted = tabular_run.model(x).argmax(1).numpy()
    assert predicted.any(), "the check needs a sample whose target is not class 0"
    np.testing.assert_array_equal(every.arrays["target"], predicted)
    assert every.arrays["shap"].shape == (6, 2, x.shape[1])
    np.testing.assert_allclose(every.arrays["shap"][np.arange(6), predicted], one.arrays["shap"], atol=1e-5)
    for mine, theirs in zip(every.tables["shap_columns"], one.tables["shap_columns"], strict=True):
        assert mine["column"] == theirs["column"] and mine["mean_abs_shap"] == pytest.approx(theirs["mean_abs_shap"], abs=1e-5)
    np.testing.assert_allclose(Shap.attributions(every, x), one.arrays["shap"], atol=1e-5)
