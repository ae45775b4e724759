"""Models xdl did not train: the wrapper, ``xdl import`` in every form, Grad-CAM and DeepLIFT on
real architectures (transformers models built from configs — nothing is downloaded), live
models, notebooks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MEAN, STD, run_cli, tiny_resnet, tiny_vit, write_pngs
from torch import nn

import xdl
from xdl.errors import XdlError
from xdl.models.imported import Imported, class_scores

transformers = pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
@pytest.fixture(scope="module")
def hf_run(hf_folder, tmp_path_factory):
    images = write_pngs(tmp_path_factory.mktemp("pngs") / "photos")
    return xdl.import_model(f"hf:{hf_folder}", str(images), tmp_path_factory.mktemp("runs") / "hf", quiet=True)


# ------------------------------------------------------------------------------ the wrapper


def test_every_output_form_becomes_the_same_scores():
    from transformers.modeling_outputs import ImageClassifierOutput

    s = torch.randn(4, 3)
    for out in (s, (s, "extra"), [s], {"logits": s, "hidden": s * 2}, {"scores": s}, ImageClassifierOutput(logits=s)):
        assert torch.equal(class_scores(out), s)
    with pytest.raises(XdlError, match="returned str, not class scores"):
        class_scores("nope")
    with pytest.raises(XdlError, match=r"shape \[4\].*not class scores"):
        class_scores(s[:, 0])


def test_seed_style_keras_model_is_explained_on_log_probabilities():
    """The issue's crash: Keras Flatten → Dense → Dense(softmax) on N×H×W inputs."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    x = torch.rand(6, 8, 8)
    with pytest.warns(UserWarning, match="outputs probabilities"):
        result = xdl.explain(model, "saliency", x=x, params={"abs": False})
    assert any("probabilities" in w for w in result.warnings)
    assert result.arrays["attributions"].shape == (6, 1, 8, 8)
    # Known answer: the gradient of log p_target with respect to the N×H×W input.
    xg = x.clone().requires_grad_()
    logp = torch.log(model(xg))
    target = torch.as_tensor(result.arrays["targets"])
    logp[torch.arange(6), target].sum().backward()
    np.testing.assert_allclose(result.arrays["attributions"][:, 0], xg.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_normalization_inside_and_channels_last_layout():
    class ChannelsLast(nn.Module):
        def forward(self, x):  # N×H×W×C in, the per-channel means out as scores
            assert x.shape[-1] == 3
            return x.mean((1, 2))

    x = torch.rand(2, 3, 4, 5)
    wrapped = Imported(ChannelsLast(), (3, 4, 5), mean=MEAN, std=STD, model_shape=(4, 5, 3))
    expected = ((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]).mean((2, 3))
    torch.testing.assert_close(wrapped(x), expected)


# ------------------------------------------------------------------------------ xdl import


def test_hf_import_reloads_with_its_own_preprocessing_and_labels(hf_run, hf_folder):
    info = hf_run.info
    assert info["imported"]["format"] == "hf" and len(info["imported"]["digest"]) == 64
    assert info["model"]["normalize"]["mean"] == pytest.approx(MEAN) and hf_run.data.class_names == ["cat", "dog", "fox"]
    assert (hf_run.path / "history.csv").read_text().count("\n") == 1  # a header, no epochs
    reloaded = xdl.load(hf_run.path)
    x = reloaded.data.test.x[:3]
    reference = tiny_resnet()
    reference.load_state_dict(transformers.AutoModelForImageClassification.from_pretrained(hf_folder).state_dict())
    expected = reference((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]).logits
    torch.testing.assert_close(reloaded.model(x), expected, rtol=1e-4, atol=1e-5)


def test_a_changed_artifact_is_refused(hf_run, tmp_path):
    import shutil

    copy = Path(shutil.copytree(hf_run.path, tmp_path / "copy"))
    config = json.loads((copy / "model" / "config.json").read_text())
    (copy / "model" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(XdlError, match="does not match the sha256"):
        xdl.load(copy).model


def test_cli_import_then_every_command_works_unchanged(hf_folder, tmp_path, capsys):
    images = write_pngs(tmp_path / "photos", per_class=5)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "import", f"hf:{hf_folder}", "--data", images, "--out", run, "--normalize", "imagenet", "-q")
    assert code == 0 and f"run saved to {run}" in out, err
    assert json.loads((run / "run.json").read_text())["model"]["normalize"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    for argv in (["info", run], ["explain", run, "--method", "gradcam", "-n", "2", "-q"],
                 ["attack", run, "-n", "4", "-q"], ["report", run, "--method", "calibration", "-q"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, (argv, err)
    code, out, err = run_cli(capsys, "explain", run, "--method", "gradcam", "-p", "layer=list", "-q")
    assert code == 0 and "model.resnet.encoder.stages.1 (auto)" in out


def test_pt2_with_a_fixed_batch_is_fed_in_chunks(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    torch.export.save(torch.export.export(net, (torch.rand(4, 1, 8, 8),)), tmp_path / "m.pt2")
    run = xdl.import_model(str(tmp_path / "m.pt2"), "digits", tmp_path / "run", quiet=True)
    assert run.info["model"]["fixed_batch"] == 4
    x = run.data.test.x[:7]  # 7 = one chunk of 4 and a padded one
    torch.testing.assert_close(xdl.load(run.path).model(x), net(x))


def test_factory_import_needs_trust_and_names_the_first_misfit(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    (tmp_path / "usermodels.py").write_text(
        "from torch import nn\n"
        "def tiny(in_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("XDL_TRUST_CODE", raising=False)
    good = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    save_file(good.state_dict(), tmp_path / "w.safetensors")
    save_file(nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10)).state_dict(), tmp_path / "bad.safetensors")
    with pytest.raises(XdlError, match="--trust-code"):
        xdl.import_model("usermodels:tiny", "digits", tmp_path / "r", weights=tmp_path / "w.safetensors")
    with pytest.raises(XdlError, match=r"'1.weight' is 12×64 in the file but 16×64 in the model"):
        xdl.import_model("usermodels:tiny", "digits", tmp_path / "r", weights=tmp_path / "bad.safetensors", trust_code=True)
    run = xdl.import_model("usermodels:tiny", "digits", tmp_path / "r", weights=tmp_path / "w.safetensors", trust_code=True, quiet=True)
    with pytest.raises(XdlError, match="--trust-code"):
        xdl.load(run.path).model
    monkeypatch.setenv("XDL_TRUST_CODE", "1")
    x = run.data.test.x[:5]
    torch.testing.assert_close(xdl.load(run.path).model(x), good(x))


# ------------------------------------------------------------------------------ Grad-CAM, DeepLIFT


def test_gradcam_on_a_resnet_equals_captums_layer_gradcam():
    """Reference: captum's LayerGradCam on the last stage, whose maps are not rescaled: equal values."""
    from captum.attr import LayerAttribution, LayerGradCam

    model, x = tiny_resnet(), torch.rand(4, 3, 16, 16)
    result = xdl.explain(model, "gradcam", x=x)
    assert result.params["layer"] == "model.resnet.encoder.stages.1"
    wrapped = Imported(model, (3, 16, 16)).eval()
    maps = LayerGradCam(wrapped, model.resnet.encoder.stages[-1]).attribute(
        x, target=torch.as_tensor(result.arrays["targets"]), relu_attributions=True)
    expected = LayerAttribution.interpolate(maps, (16, 16), interpolate_mode="bilinear").detach().numpy()
    np.testing.assert_allclose(result.arrays["attributions"], expected, rtol=1e-4, atol=1e-7)


def test_gradcam_on_a_resnet_agrees_with_the_grad_cam_package(monkeypatch):
    """Reference: pytorch-grad-cam's GradCAM on the same layer. It scales each map to [0, 1]
    before resizing it (affine, and bilinear resizing commutes with it), so the maps agree up
    to a positive scale and offset per image."""
    from references import grad_cam

    GradCAM, ClassifierOutputTarget = grad_cam(monkeypatch.setitem)
    model, x = tiny_resnet(), torch.rand(4, 3, 32, 32)
    result = xdl.explain(model, "gradcam", x=x)
    assert result.params["layer"] == "model.resnet.encoder.stages.1"
    targets = [ClassifierOutputTarget(int(t)) for t in result.arrays["targets"]]
    with GradCAM(Imported(model, (3, 32, 32)).eval(), [model.resnet.encoder.stages[-1]]) as cam:
        expected = cam(input_tensor=x, targets=targets)
    ours = result.arrays["attributions"][:, 0]
    for a, b in zip(ours, expected):
        scale, offset = np.polyfit(a.ravel(), b.ravel(), 1)
        assert scale > 0 and b.max() > 0.99
        np.testing.assert_allclose(scale * a + offset, b, atol=1e-4)


def test_gradcam_on_a_vit_uses_the_patch_token_grid():
    """Known answer by hand: weights = mean gradient over the 4×4 patch grid, CAM = ReLU(Σ w·A), upsampled."""
    model, x = tiny_vit(), torch.rand(3, 3, 16, 16)
    result = xdl.explain(model, "gradcam", x=x)
    assert result.params["layer"] == "model.vit.layers.1.layernorm_before"
    layer, kept = model.vit.layers[1].layernorm_before, {}

    def keep(_, __, out):
        out.retain_grad()
        kept["a"] = out

    handle = layer.register_forward_hook(keep)
    scores = model(x).logits
    handle.remove()
    scores[torch.arange(3), torch.as_tensor(result.arrays["targets"])].sum().backward()
    a, g = kept["a"][:, 1:], kept["a"].grad[:, 1:]  # patch tokens: the class token left aside
    cam = torch.relu((g.mean(1, keepdim=True) * a).sum(2)).reshape(3, 1, 4, 4)
    expected = nn.functional.interpolate(cam, (16, 16), mode="bilinear", align_corners=False).detach().numpy()
    np.testing.assert_allclose(result.arrays["attributions"], expected, rtol=1e-4, atol=1e-7)


def test_deeplift_on_a_resnet_and_a_reused_relu():
    from captum.attr import IntegratedGradients

    result = xdl.explain(tiny_resnet(), "deeplift", x=torch.rand(3, 3, 16, 16))
    assert not result.warnings and result.metrics["convergence_delta_max_abs"] < 1e-4

    class Reuse(nn.Module):  # one ReLU used twice, as torchvision's BasicBlock does
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.relu, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Linear(4, 3)

        def forward(self, x):
            h = self.relu(self.c1(x))
            return self.fc(self.relu(self.c2(h) + h).mean((2, 3)))

    torch.manual_seed(0)
    model, x = Reuse().eval(), torch.rand(3, 3, 8, 8)
    result = xdl.explain(model, "deeplift", x=x)
    assert "used integrated gradients" in result.warnings[0] and result.params["fallback"] == "ig"
    expected = IntegratedGradients(model).attribute(x, target=torch.as_tensor(result.arrays["targets"]), n_steps=50)
    np.testing.assert_allclose(result.arrays["attributions"], expected.numpy(), rtol=1e-4, atol=1e-6)
    shap = xdl.explain(tiny_resnet(), "shap", x=torch.rand(4, 3, 16, 16), params={"method": "deep", "background": 4})
    assert shap.params["method"] == "gradient" and any("DeepSHAP cannot" in w for w in shap.warnings)


# ------------------------------------------------------------------------------ live models, notebooks


def test_live_model_takes_a_dataset_and_audits_into_a_run(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()
    x, y = torch.rand(80, 1, 8, 8), torch.arange(80) % 10
    attack = xdl.attack(model, "fgsm", data=DataLoader(TensorDataset(x, y), batch_size=16), samples=8)
    assert attack.metrics["clean_accuracy"] == pytest.approx((model(x[:8]).argmax(1) == y[:8]).float().mean().item())
    audit = xdl.audit(model, data=(x, y), out=tmp_path / "run", only=["saliency", "calibration"], samples=8, progress=False)
    assert audit.html_path.is_file() and not audit.failed
    run = xdl.load(tmp_path / "run")
    assert run.info["imported"]["format"] == "pt2" and (tmp_path / "run" / "data.npz").is_file()
    torch.testing.assert_close(run.model(x[:4]), model(x[:4]))
    # No training history: the overfit report does not apply (rather than fail in every audit);
    # nor does the privacy report (xdl's split is not what the model was trained on), nor the
    # labels report, which retrains the model on folds by a recipe xdl does not know.
    not_applicable = xdl.audit(run, only=["overfit", "privacy", "labels"], progress=False).not_applicable
    assert sorted(not_applicable) == ["report/labels", "report/overfit", "report/privacy"]
    assert not_applicable["report/overfit"] == "an imported model: it has no training history"
    with pytest.raises(XdlError, match="'labels' does not apply to an imported model: the report retrains it"):
        xdl.report(run, "labels", save=False)
    with pytest.raises(XdlError, match="'privacy' does not apply to an imported model: its training records are unknown"):
        xdl.report(run, "privacy", save=False)
    html = audit._repr_html_()
    assert "Summary of findings" in html and 'id="explain-saliency"' in html
    assert 'id="explain-saliency"' in audit.sections[0].result._repr_html_()


def test_example_notebook_runs_headless(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = nbformat.read(EXAMPLES / "bring_your_model.ipynb", as_version=4)
    os.environ["XDL_NOTEBOOK_OUT"] = str(tmp_path)
    try:
        NotebookClient(notebook, timeout=180, kernel_name="python3").execute()
    finally:
        del os.environ["XDL_NOTEBOOK_OUT"]
    html = [o["data"]["text/html"] for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "text/html" in o.get("data", {})]
    assert len(html) == 2 and 'id="explain-gradcam"' in html[0] and "Summary of findings" in html[1]
    assert (tmp_path / "run" / "audit.html").is_file()
