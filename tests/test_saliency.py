"""The saliency family: known answers, agreement with captum, the CLI path and its errors."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import xdl
from xdl.analysis import hook_count
from xdl.cli.main import main
from xdl.device import seed_everything
from xdl.errors import XdlError

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


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


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
    code, out, err = cli(capsys, "explain", digits_run.path, "-n", "2", *args)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("xdl: error: ") and message in err


def test_cli_gradcam_on_an_mlp(capsys, mlp_run):
    code, _, err = cli(capsys, "explain", mlp_run.path, "--method", "gradcam", "-n", "2")
    assert code == 2 and err == "xdl: error: gradcam needs a conv layer; this model has none\n"


def test_cli_writes_results_and_never_overwrites_without_force(capsys, digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run.path, run, ignore=shutil.ignore_patterns("explain", "attack", "report"))
    args = ["explain", run, "--method", "ig", "--indices", "0,1,2", "-q", "--param", "steps=8"]
    code, out, _ = cli(capsys, *args)
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

    code, out, _ = cli(capsys, *args)
    assert code == 0 and out.splitlines()[-1].endswith(str(run / "explain" / "ig-2"))
    code, out, _ = cli(capsys, *args, "--force")
    assert code == 0 and out.splitlines()[-1].endswith(str(run / "explain" / "ig"))
    assert sorted(p.name for p in (run / "explain").iterdir()) == ["ig", "ig-2"]
    # --no-figures: the same numbers, no PNG
    code, out, _ = cli(capsys, *args, "--force", "--no-figures")
    assert code == 0 and {p.name for p in (run / "explain" / "ig").iterdir()} == {"result.json", "arrays.npz"}
    again = xdl.Result.load(run / "explain" / "ig", arrays=True)
    np.testing.assert_array_equal(again.arrays["attributions"], saved.arrays["attributions"])


def test_occlusion_patch_grows_with_the_image():
    from xdl_plugins.saliency import occlusion_window

    assert occlusion_window(torch.zeros(1, 1, 28, 28), None, None) == (3, 1)  # digits: as before
    assert occlusion_window(torch.zeros(1, 3, 224, 224), None, None) == (16, 8)  # captum's ImageNet tutorial's size
    assert occlusion_window(torch.zeros(1, 3, 224, 224), 5, None) == (5, 2)
    assert occlusion_window(torch.zeros(4, 10), None, None) == (1, 1)  # tabular: one feature
