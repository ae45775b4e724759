"""Every architecture gets the whole audit: penultimate features read where the class scores are
produced (xdl's MLP and CNN, a Keras ``Dense``, Hugging Face heads), dense layers' activations,
and a method the architecture rules out listed as not applicable, with its reason, not failed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import copy_run, tiny_vit, write_pngs
from torch import nn

import xdl
from xdl.data import load_data
from xdl.methods.quality.features import logits_and_features
from xdl.models.layers import layer_tree, score_head

FEATURE_SECTIONS = ("explain/embedding", "report/duplicates", "report/ood")


def sections(audit) -> dict:
    return {s.key: s for s in audit.sections}


def assert_whole_audit(audit, features: int) -> dict:
    """No section failed, and the feature-based ones read ``features``-wide penultimate features."""
    assert not audit.failed, [(s.key, s.error) for s in audit.failed]
    found = sections(audit)
    for key in FEATURE_SECTIONS:
        assert found[key].status == "computed", key
        assert found[key].result.metrics["features_from"].startswith("the input of "), key
    assert found["explain/embedding"].result.metrics["features"] == features
    saved = json.loads(audit.json_path.read_text())
    assert saved["not_applicable"] == audit.not_applicable
    return found


# ------------------------------------------------------------------ the head, found by hooks


def test_the_head_is_the_last_layer_that_produces_the_scores():
    torch.manual_seed(0)
    hidden = nn.Linear(64, 10)  # as wide as the scores: the head is the *last* such layer, not this one
    model = nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), nn.Sequential(nn.Linear(10, 10), nn.Softmax(-1)))
    x = torch.rand(5, 1, 8, 8)
    head = score_head(model, x[:2])
    assert head.name == "3.0" and head.module is model[3][0]
    logits, features = logits_and_features(model, x, torch.device("cpu"), batch_size=2)
    torch.testing.assert_close(features, torch.relu(hidden(x.flatten(1))))
    torch.testing.assert_close(logits, model(x))


def test_no_layer_producing_the_scores_means_the_logits_stand_in():
    class Pairs(nn.Module):  # 20 units summed in pairs: no module's output is the scores
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 20)

        def forward(self, x):
            return self.fc(x.flatten(1)).view(-1, 10, 2).sum(-1)

    model, x = Pairs(), torch.rand(3, 1, 8, 8)
    head = score_head(model, x[:2])
    assert head.module is None and head.described.startswith("the logits")
    logits, features = logits_and_features(model, x, torch.device("cpu"))
    torch.testing.assert_close(features, logits)


def test_xdl_models_heads_are_their_last_linear(digits_run, mlp_run):
    x = digits_run.data.test.x[:2]
    for run in (digits_run, mlp_run):
        linear = [m for m in run.model.modules() if isinstance(m, nn.Linear)][-1]
        assert score_head(run.model, x).module is linear


# ------------------------------------------------------------------ whole audits, one per architecture


def test_an_mlp_trained_by_xdl(mlp_run, tmp_path):
    run = xdl.load(copy_run(mlp_run, tmp_path / "mlp"))
    found = assert_whole_audit(xdl.audit(run, samples=4, progress=False), features=32)
    assert "spatial layer" in xdl.audit(run, only=["gradcam"], progress=False).not_applicable["explain/gradcam"]
    rows = {r["layer"]: r for r in found["explain/activations"].result.tables["layers"]}
    assert {r["type"] for r in rows.values()} >= {"Linear", "ReLU"}
    assert all((r["dead_fraction"] is None) == (r["type"] != "ReLU") for r in rows.values())


def test_the_seeds_keras_model(tmp_path):
    """Flatten → Dense(16, relu) → Dense(10, softmax), trained here, saved, imported and audited."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    data = load_data("digits")
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(data.train.x[:, 0].numpy(), data.train.y.numpy(), epochs=5, batch_size=64, verbose=0)
    model.save(tmp_path / "model.keras")
    run = xdl.import_model(str(tmp_path / "model.keras"), "digits", tmp_path / "run", quiet=True)

    audit = xdl.audit(run, samples=4, progress=False)
    found = assert_whole_audit(audit, features=16)
    assert "spatial layer" in audit.not_applicable["explain/gradcam"]
    assert audit.not_applicable["report/overfit"] == "an imported model: it has no training history"
    assert "Dense" in found["report/ood"].result.metrics["features_from"]
    # Known answer: the features are the first Dense layer's ReLU output, computed from its weights.
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    x = data.test.x[:6]
    kernel, bias = (torch.as_tensor(np.asarray(w)) for w in dense[0].get_weights())
    _, features = logits_and_features(run.model, x, torch.device("cpu"))
    torch.testing.assert_close(features, torch.relu(x.flatten(1) @ kernel + bias), rtol=1e-5, atol=1e-5)
    # The activations cover both Dense layers; only the ReLU one can have dead units.
    rows = [r for r in found["explain/activations"].result.tables["layers"] if r["type"] == "Dense"]
    assert [r["shape"] for r in rows] == [[16], [10]]
    assert rows[0]["dead_fraction"] is not None and rows[1]["dead_fraction"] is None
    assert set(layer_tree(run.model)) >= {f"model.{layer.name}" for layer in dense}


def test_a_hugging_face_resnet_on_a_folder_of_photos(hf_folder, tmp_path):
    run = xdl.import_model(f"hf:{hf_folder}", str(write_pngs(tmp_path / "photos")), tmp_path / "run", quiet=True)
    audit = xdl.audit(run, samples=4, progress=False)
    found = assert_whole_audit(audit, features=16)  # hidden_sizes[-1], pooled
    assert "explain/gradcam" not in audit.not_applicable and found["explain/gradcam"].status == "computed"
    assert "classifier.1 (Linear)" in found["report/duplicates"].result.metrics["features_from"]


def test_a_hugging_face_vit_whose_head_follows_a_norm(tmp_path):
    folder = tmp_path / "vit"
    tiny_vit().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_resize": True,
         "size": {"height": 16, "width": 16}}))
    run = xdl.import_model(f"hf:{folder}", str(write_pngs(tmp_path / "photos")), tmp_path / "run", quiet=True)
    found = assert_whole_audit(xdl.audit(run, samples=4, progress=False), features=16)  # hidden_size: the CLS token
    assert "classifier (Linear)" in found["explain/embedding"].result.metrics["features_from"]
