"""The saliency family: known answers, agreement with captum, the CLI path and its errors.

SHAP and LIME: agreement with the shap and lime libraries, additivity, seeding, bad input.

The faster estimators behind shap, lime and ig: known answers, unbiasedness, exactness of the shortcuts.

Can this explanation be trusted: deletion curves with known answers, Spearman against scipy,
the cascading randomization on a copy, ``xdl explain --evaluate`` and ``xdl report --method trust``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import copy_run, run_cli, run_process
from scipy.stats import spearmanr
from torch import nn
from xdl_plugins.shap import expected_gradients, reliability_metrics

import xdl
from xdl.analysis import Context, hook_count
from xdl.analysis.evaluation import (
    cascading_randomization,
    faithfulness,
    map_similarity,
    parameterized_layers,
    passes_sanity,
    randomized_copies,
    spearman,
)
from xdl.device import seed_everything
from xdl.errors import XdlError
from xdl.models.inference import fast_model

# -----------------------------------------------------------------------------------------
# saliency
# -----------------------------------------------------------------------------------------


N = 4  # samples per check: enough for two batches of 2, cheap enough for CI


@pytest.fixture(scope="module")
def digits(digits_run):
    """The trained CNN and N test digits with the classes it predicts for them."""
    model = digits_run.model
    x = digits_run.data.test.x[:N]
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target


def explain(source, method, **options):
    # The first N test digits, as the captum references below take them (samples=N would draw a stratified sample).
    return xdl.explain(source, method, indices=range(N), save=False, device="cpu", **options)


# -----------------------------------------------------------------------------------------
# Agreement with captum on the same model and inputs
# -----------------------------------------------------------------------------------------


def captum_reference(method: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from captum import attr

    if method == "saliency":
        return attr.Saliency(model).attribute(x, target=target)
    if method == "ig":
        return attr.IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=50)
    if method == "deeplift":
        with pytest.warns(UserWarning, match="Setting forward, backward hooks"):
            return attr.DeepLift(model).attribute(x, baselines=torch.zeros_like(x), target=target)
    if method == "occlusion":
        return attr.Occlusion(model).attribute(x, sliding_window_shapes=(1, 3, 3), strides=(1, 2, 2), baselines=0.0, target=target)
    if method == "gradcam":
        # xdl's automatic layer: the last spatial map before the head (the ReLU after the last conv).
        last_map = model[[isinstance(m, nn.Flatten) for m in model].index(True) - 1]
        maps = attr.LayerGradCam(model, last_map).attribute(x, target=target, relu_attributions=True)
        return attr.LayerAttribution.interpolate(maps, x.shape[-2:], interpolate_mode="bilinear")
    raise ValueError(method)


@pytest.mark.parametrize("method", ["saliency", "ig", "deeplift", "occlusion", "gradcam"])
def test_attributions_equal_captums(digits, digits_run, method):
    model, x, target = digits
    # batch_size=2: xdl splits the samples (and IG its steps) into chunks; captum does not.
    result = explain(digits_run, method, batch_size=2, params={"stride": 2} if method == "occlusion" else None)
    expected = captum_reference(method, model, x.clone().requires_grad_(), target).detach().numpy()
    np.testing.assert_array_equal(result.arrays["targets"], target.numpy())
    np.testing.assert_allclose(result.arrays["attributions"], expected, rtol=1e-4, atol=1e-6)


def test_smoothgrad_equals_captums_noise_tunnel_with_the_same_seed(digits, digits_run):
    from captum.attr import NoiseTunnel, Saliency

    model, x, target = digits
    result = explain(digits_run, "smoothgrad", params={"samples": 6, "stdev": 0.2})
    seed_everything(digits_run.seed)
    # xdl draws noise for 4 copies of the batch per forward pass (BATCHES_PER_PASS × 256 // 4 ≥ 6).
    expected = NoiseTunnel(Saliency(model)).attribute(
        x.clone().requires_grad_(), nt_type="smoothgrad", nt_samples=6, stdevs=0.2, target=target, nt_samples_batch_size=6
    )
    np.testing.assert_allclose(result.arrays["attributions"], expected.numpy(), rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------------------
# Known answers on a linear model: f(x) = W x + b, so every method has a closed form
# -----------------------------------------------------------------------------------------

W = torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0], [-1.0, 4.0, -0.5, 2.0, 0.25], [0.0, 1.0, 1.0, -3.0, -1.0]])


@pytest.fixture
def linear():
    model = nn.Linear(5, 3)
    with torch.no_grad():
        model.weight.copy_(W)
        model.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.linspace(-1, 1, 6 * 5).reshape(6, 5)
    return model, x


def test_saliency_of_a_linear_model_is_its_weight_row(linear):
    model, x = linear
    for target in range(3):
        result = xdl.explain(model, "saliency", x=x, target=target)
        np.testing.assert_array_equal(result.arrays["attributions"], W[target].abs().expand(6, 5).numpy())
    signed = xdl.explain(model, "saliency", x=x, target=1, params={"abs": False})
    np.testing.assert_array_equal(signed.arrays["attributions"], W[1].expand(6, 5).numpy())
    smooth = xdl.explain(model, "smoothgrad", x=x, target=2, params={"samples": 5})
    np.testing.assert_allclose(smooth.arrays["attributions"], W[2].abs().expand(6, 5).numpy(), rtol=1e-6)


@pytest.mark.parametrize("method", ["ig", "deeplift", "occlusion"])
def test_linear_attributions_are_input_times_weight(linear, method):
    model, x = linear
    predicted = (x @ W.T + model.bias.detach()).argmax(1)
    result = xdl.explain(model, method, x=x, y=torch.zeros(6, dtype=torch.long))
    np.testing.assert_array_equal(result.arrays["targets"], predicted.numpy())
    np.testing.assert_allclose(result.arrays["attributions"], (x * W[predicted]).numpy(), rtol=1e-5, atol=1e-6)
    if method != "occlusion":
        assert result.metrics["convergence_delta_max_abs"] < 1e-5
    true = xdl.explain(model, method, x=x, y=torch.full((6,), 2), target="true")
    np.testing.assert_allclose(true.arrays["attributions"], (x * W[2]).numpy(), rtol=1e-5, atol=1e-6)


def test_ig_mean_baseline_measures_from_the_mean(linear):
    model, x = linear
    result = xdl.explain(model, "ig", x=x, target=0, params={"baseline": "mean", "steps": 10})
    np.testing.assert_allclose(result.arrays["attributions"], ((x - x.mean(0)) * W[0]).numpy(), rtol=1e-5, atol=1e-6)


def test_params_are_validated(linear):
    model, x = linear
    for params, message in [
        (["steps=0"], "steps must be >= 1"),
        (["steps=many"], "not a valid int"),
        (["baseline=noise"], "choose one of zeros, blur, mean"),
        (["nsteps=3"], "valid parameters: steps, baseline"),
        (["baseline=blur"], "baseline=blur applies to images only"),
    ]:
        with pytest.raises(XdlError, match=message):
            xdl.explain(model, "ig", x=x, params=params)
    with pytest.raises(XdlError, match="occlusion window 9 is larger than the 5 features"):
        xdl.explain(model, "occlusion", x=x, params={"window": 9})
    with pytest.raises(XdlError, match="occlusion stride 2 is larger than the window 1"):
        xdl.explain(model, "occlusion", x=x, params={"stride": 2})
    with pytest.raises(XdlError, match="target class 3 does not exist"):
        xdl.explain(model, "saliency", x=x, target=3)


# -----------------------------------------------------------------------------------------
# The model is left as it was found
# -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["deeplift", "gradcam", "ig"])
def test_model_mode_and_hooks_are_restored(digits, method):
    model = copy.deepcopy(digits[0]).train()
    seen = []
    model[0].register_forward_hook(lambda *args: seen.append(1))  # the user's own hook must survive
    result = xdl.explain(model, method, x=digits[1], params={"steps": 4} if method == "ig" else None)
    assert all(m.training for m in model.modules())
    assert hook_count(model) == 1 and seen
    # Attributions were taken in eval mode: dropout/BatchNorm in train mode would change them.
    np.testing.assert_array_equal(result.arrays["targets"], digits[2].numpy())


# -----------------------------------------------------------------------------------------
# Tabular runs: attributions summed back to the original columns
# -----------------------------------------------------------------------------------------


def test_tabular_attributions_sum_to_original_columns(tabular_run):
    result = xdl.explain(tabular_run, "ig", samples=5, save=False, params={"steps": 16})
    encoding = tabular_run.data.encoding
    per_feature, per_column = result.arrays["attributions"], result.arrays["column_attributions"]
    assert per_column.shape == (5, len(encoding.original_names))
    np.testing.assert_allclose(per_column, encoding.sum_to_columns(per_feature), rtol=1e-6)
    np.testing.assert_allclose(per_column.sum(1), per_feature.sum(1), rtol=1e-5, atol=1e-6)
    rows = result.tables["columns"]
    assert sorted(r["column"] for r in rows) == sorted(encoding.original_names)
    assert [r["mean_abs_attribution"] for r in rows] == sorted((r["mean_abs_attribution"] for r in rows), reverse=True)
    assert set(result.figures) == {"columns"} and result.figures["columns"].startswith(b"\x89PNG")
    with pytest.raises(XdlError, match="'gradcam' does not apply to tabular data"):
        xdl.explain(tabular_run, "gradcam", save=False)


# -----------------------------------------------------------------------------------------
# The CLI
# -----------------------------------------------------------------------------------------




@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nope"], "unknown explain method 'nope'; available: "),
        (["--indices", "0,5000"], "index 5000 is out of range: the split has"),
        (["--target", "10"], "target class 10 does not exist"),
        (["--method", "ig", "--param", "steps=0"], "steps must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(capsys, digits_run, args, message):
    code, out, err = run_cli(capsys, "explain", digits_run.path, "-n", "2", *args)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("xdl: error: ") and message in err


def test_cli_gradcam_on_an_mlp(capsys, mlp_run):
    code, _, err = run_cli(capsys, "explain", mlp_run.path, "--method", "gradcam", "-n", "2")
    assert code == 2 and err == ("xdl: error: explain method 'gradcam' does not apply to a model with no spatial layer "
                                 "(a conv map or ViT patch tokens) its class score depends on\n")


def test_cli_writes_results_and_never_overwrites_without_force(capsys, digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run.path, run, ignore=shutil.ignore_patterns("explain", "attack", "report"))
    args = ["explain", run, "--method", "ig", "--indices", "0,1,2", "-q", "--param", "steps=8"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and out.splitlines()[-1] == f"explain results saved to {run / 'explain' / 'ig'}"
    assert {p.name for p in (run / "explain" / "ig").iterdir()} == {"result.json", "grid.png", "arrays.npz"}
    saved = xdl.Result.load(run / "explain" / "ig", arrays=True)
    assert saved.params == {"steps": 8, "baseline": "zeros"} and saved.arrays["attributions"].shape == (3, 1, 8, 8)
    assert saved.arrays["indices"].tolist() == [0, 1, 2]
    # IG's completeness gap, recomputed: |Σ attributions − (f(x) − f(0))| for the explained class.
    x, t = digits_run.data.test.x[:3], torch.as_tensor(saved.arrays["targets"])[:, None]
    with torch.no_grad():
        change = (digits_run.model(x).gather(1, t) - digits_run.model(torch.zeros_like(x)).gather(1, t))[:, 0]
    gap = (torch.as_tensor(saved.arrays["attributions"]).flatten(1).sum(1) - change).abs().max()
    assert saved.metrics["convergence_delta_max_abs"] == pytest.approx(float(gap), rel=1e-3, abs=1e-6)

    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and out.splitlines()[-1].endswith(str(run / "explain" / "ig-2"))
    code, out, _ = run_cli(capsys, *args, "--force")
    assert code == 0 and out.splitlines()[-1].endswith(str(run / "explain" / "ig"))
    assert sorted(p.name for p in (run / "explain").iterdir()) == ["ig", "ig-2"]
    # --no-figures: the same numbers, no PNG
    code, out, _ = run_cli(capsys, *args, "--force", "--no-figures")
    assert code == 0 and {p.name for p in (run / "explain" / "ig").iterdir()} == {"result.json", "arrays.npz"}
    again = xdl.Result.load(run / "explain" / "ig", arrays=True)
    np.testing.assert_array_equal(again.arrays["attributions"], saved.arrays["attributions"])


def test_occlusion_patch_grows_with_the_image():
    from xdl_plugins.saliency import occlusion_window

    assert occlusion_window(torch.zeros(1, 1, 28, 28), None, None) == (3, 1)  # digits: as before
    assert occlusion_window(torch.zeros(1, 3, 224, 224), None, None) == (16, 8)  # captum's ImageNet tutorial's size
    assert occlusion_window(torch.zeros(1, 3, 224, 224), 5, None) == (5, 2)
    assert occlusion_window(torch.zeros(4, 10), None, None) == (1, 1)  # tabular: one feature

# -----------------------------------------------------------------------------------------
# shap lime
# -----------------------------------------------------------------------------------------


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
    done = run_process("explain", digits_run.path, "-n", "2", *args)
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

# -----------------------------------------------------------------------------------------
# explain speed
# -----------------------------------------------------------------------------------------


class Quadratic(nn.Module):
    """f_k(x) = sum_i a_ki x_i^2, whose expected-gradients values are a_ki (x_i^2 - E[r_i^2]) exactly."""

    def __init__(self, features: int):
        super().__init__()
        self.a = nn.Parameter(torch.randn(2, features))

    def forward(self, x):
        return (x[:, None] ** 2 * self.a).sum(-1)


def test_stratified_expected_gradients_are_exact_on_a_linear_model():
    # Gradients are constant, so only the references matter; drawing each background sample
    # once per cycle makes the mean over references exact: W[t] * (x - mean(background)).
    torch.manual_seed(0)
    model, x, background = nn.Linear(6, 3), torch.randn(5, 6), torch.randn(10, 6)
    target = torch.tensor([0, 1, 2, 0, 1])
    for draws in (10, 30):
        values, _ = expected_gradients(Context(model=model, x=x, seed=3), background, target, draws)
        expected = model.weight.detach()[target] * (x - background.mean(0))
        torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


def test_stratified_expected_gradients_are_unbiased_and_less_noisy_than_iid():
    # 40 draws over 40 references: each reference once, so only the path points add noise.
    torch.manual_seed(1)
    model, x, background = Quadratic(8), torch.randn(4, 8), torch.randn(40, 8)
    target = torch.tensor([0, 1, 1, 0])
    exact = model.a.detach()[target] * (x ** 2 - (background ** 2).mean(0))
    runs = {
        sampling: torch.stack([expected_gradients(Context(model=model, x=x, seed=s), background, target, 40, sampling)[0]
                               for s in range(40)])
        for sampling in ("stratified", "iid")
    }
    scale = exact.abs().mean()
    for values in runs.values():  # the mean over seeds converges to the exact value: no bias
        assert (values.mean(0) - exact).abs().mean() < 0.1 * scale
    rms = {k: float(((v - exact) ** 2).mean().sqrt()) for k, v in runs.items()}
    assert rms["stratified"] < 0.6 * rms["iid"], rms


def test_split_half_reliability_follows_spearman_brown():
    metrics = reliability_metrics(torch.tensor([[0.9, 0.6]]))
    assert metrics["split_half_correlation_median"] == pytest.approx(0.6)
    assert metrics["estimated_correlation_with_converged_min"] == pytest.approx(math.sqrt(2 * 0.6 / 1.6), abs=1e-6)
    assert metrics["estimated_correlation_with_converged_median"] == pytest.approx(math.sqrt(2 * 0.6 / 1.6), abs=1e-6)


def test_shap_reports_its_fidelity_estimate(digits_run):
    result = xdl.explain(digits_run, "shap", samples=3, params={"background": 20}, save=False)
    assert result.metrics["draws"] == 50
    # On a trained CNN the two halves of the draws agree far better than chance.
    assert 0.5 < result.metrics["estimated_correlation_with_converged_median"] <= 1


def test_lime_classifies_each_distinct_mask_once(digits_run):
    result = xdl.explain(digits_run, "lime", samples=3, params={"segmentation": "slic", "n_segments": 4}, save=False)
    superpixels = result.arrays["segments"].reshape(3, -1).max(1) + 1
    # 1,000 masks over S superpixels hold at most 2^S distinct ones (and nearly all of them).
    assert result.metrics["model_evaluations_per_image"] <= np.mean(2.0 ** superpixels)
    assert result.metrics["model_evaluations_per_image"] >= np.mean(2.0 ** superpixels) - 1


def test_fast_model_computes_the_same_function_and_gradients(digits_run):
    model = digits_run.model
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = digits_run.data.test.x[:8].clone().requires_grad_()
    fast = fast_model(model, x[:2].detach())
    assert fast is not model and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    (g1,) = torch.autograd.grad(model(x)[:, 3].sum(), x)
    (g2,) = torch.autograd.grad(fast(x)[:, 3].sum(), x)
    torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)


class ConvNorm(nn.Module):
    """conv → BatchNorm, with the conv's output read as ``how`` says (statistics set, eval mode)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)
        self.bn.running_mean.uniform_(-1, 1), self.bn.running_var.uniform_(0.5, 2), self.bn.weight.data.uniform_(0.5, 2)

    def forward(self, x):
        if x.shape[1] != 1:  # a shape check, as Hugging Face models make: fixed for a given input shape
            raise ValueError("one channel")
        y = self.conv(x)
        if self.how == "branch":  # which reader the conv has depends on the data
            return (self.bn(y) if x.sum() > 0 else y).flatten(1)
        return (self.bn(y) + y if self.how == "shared" else self.bn(y)).flatten(1)


@pytest.mark.parametrize("how, folded", [("plain", True), ("shared", False), ("branch", False)])
def test_fast_model_folds_a_batchnorm_only_where_it_alone_reads_the_convolution(how, folded):
    torch.manual_seed(0)
    model = ConvNorm(how).eval()
    fast = fast_model(model, torch.rand(2, 1, 5, 5))
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) != folded
    for x in (torch.rand(3, 1, 5, 5), -torch.rand(3, 1, 5, 5)):  # both branches of "branch"
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)


def test_fast_model_folds_a_hugging_face_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    from xdl.models.imported import Imported

    torch.manual_seed(0)
    net = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                    layer_type="basic", num_labels=3)).eval()
    for m in net.modules():  # statistics that make a wrong fold show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    model = Imported(net, (3, 32, 32)).eval()
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    fast = fast_model(model, x[:2].detach())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    (g1,) = torch.autograd.grad(model(x)[:, 1].sum(), x)
    (g2,) = torch.autograd.grad(fast(x)[:, 1].sum(), x)
    torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)


def test_fast_model_keeps_a_model_that_cannot_run_channels_last():
    class Viewed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 2, 3), nn.Linear(18, 2)

        def forward(self, x):
            return self.head(self.conv(x).view(len(x), -1))  # view needs the default layout

    model = Viewed().eval()
    assert fast_model(model, torch.rand(2, 1, 5, 5)) is model

# -----------------------------------------------------------------------------------------
# trust
# -----------------------------------------------------------------------------------------


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def linear_model(weights: list[float]) -> nn.Module:
    """Class 0's logit is w·x, class 1's is 0: p(class 0) = sigmoid(w·x)."""
    model = nn.Linear(len(weights), 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weights, [0.0] * len(weights)]))
    return model.eval()


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
    for name, copied in randomized_copies(model, seed=0):
        changed = {n for n, m in parameterized_layers(copied)
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
    for name, copied in randomized_copies(model, seed=0, steps=2):
        seen.append((name, {n for n in layers if not torch.equal(copied.get_submodule(n).weight, model.get_submodule(n).weight)}))
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
    code, out, err = run_cli(capsys, *["explain", str(run), "--method", "ig", "--evaluate", "-n", "4", "-p", "steps=8", "-q"])
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
    code, out, err = run_cli(capsys, *["report", str(run), "--method", "trust", "-n", "4", "-p", "methods=saliency,ig",
                          "-p", "steps=5", "-p", "orders=1", "-q"])
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
    from xdl_plugins.trust import permuted_label_model

    from xdl.analysis.base import Context
    from xdl.analysis.evaluation import map_similarity

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
    code, _, err = run_cli(capsys, *[a.format(run=digits_run.path) for a in args])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
