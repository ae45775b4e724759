"""Inside the model: activation statistics, feature maps, embeddings and the compute card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import xdl
from xdl.models.inference import hook_count
from xdl.training.compute import count_flops
from xdl.errors import XdlError


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process (no interpreter start-up) and return (exit code, out, err)."""
    from xdl.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


# -----------------------------------------------------------------------------------------
# Compute card
# -----------------------------------------------------------------------------------------


def test_flops_of_a_hand_built_mlp_match_the_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    forward, step = count_flops(model, torch.randn(4, 10))
    # A Linear(i, o) costs 2·i·o FLOPs per sample forward (one multiply-add per weight).
    assert forward == 2 * (10 * 20 + 20 * 3)  # 520
    # Backward: every weight gradient costs as much again; the input gradient is needed only
    # by the second layer (the first layer's input is data, which needs no gradient).
    weight_grads = 2 * (10 * 20 + 20 * 3)
    input_grads = 2 * (20 * 3)
    assert step == forward + weight_grads + input_grads  # 1160
    # Counting must not touch the model: no gradients left behind, mode unchanged.
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_train_writes_the_compute_card_and_info_prints_it(digits_run, capsys):
    card = json.loads((digits_run.path / "run.json").read_text())["compute"]
    model = digits_run.model
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    # The fixture's CNN on 8×8 digits, by hand (2 FLOPs per multiply-add):
    # conv 1→8, 3×3 at 8×8: 2·8·9·64; pool to 4×4; conv 8→16, 3×3 at 4×4: 2·16·72·16;
    # Linear(16·4·4, 32): 2·256·32; Linear(32, 10): 2·32·10.
    assert card["flops_forward_per_sample"] == 2 * (8 * 9 * 64 + 16 * 72 * 16 + 256 * 32 + 32 * 10)
    n = digits_run.metrics["epochs_run"] * digits_run.info["dataset"]["sizes"]["train"]
    assert card["samples_seen"] == n
    assert card["train_seconds"] == pytest.approx(sum(row["seconds"] for row in digits_run.history))
    assert card["samples_per_second"] == pytest.approx(n / card["train_seconds"])
    assert card["energy_wh"] == pytest.approx(card["assumed_watts"] * card["train_seconds"] / 3600)
    assert card["peak_memory_bytes"] > 0 and "getrusage" in card["peak_memory_source"]
    assert card["device"] == "cpu" and "W per CPU thread" in card["power_assumption"]

    assert card["attack_passes_per_sample"] == 0 and card["flops_training_total"] == card["flops_train_step_per_sample"] * n
    code, out, _ = cli(capsys, "info", digits_run.path)
    assert code == 0
    assert "test_accuracy" in out
    assert "63.10 kFLOP per sample" in out
    assert f"{card['parameters']:,}" in out and "energy (estimate)" in out


def test_the_compute_card_counts_adversarial_trainings_extra_passes(tmp_path):
    run = xdl.train("digits", "mlp", tmp_path / "adv", epochs=1, quiet=True, adv_train="pgd", adv_steps=3,
                    data_options={"limit": 40}, model_options={"hidden": [8]})
    card = run.info["compute"]
    # Each sample: the training step, plus 3 PGD steps of forward and backward through the net.
    assert card["attack_passes_per_sample"] == 3
    assert card["flops_training_total"] == 4 * card["flops_train_step_per_sample"] * card["samples_seen"]


# -----------------------------------------------------------------------------------------
# Activations
# -----------------------------------------------------------------------------------------


def test_dead_units_of_a_layer_with_a_very_negative_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].bias.fill_(-1e3)  # pre-activations ≈ -1000 for any input near the origin
        model[2].bias.fill_(1.0)  # fed only zeros, layer 2 outputs its bias: every unit alive
    model.train()
    x = torch.randn(20, 4)
    result = xdl.explain(model, "activations", x=x, samples=None, batch_size=7)
    # A live model is analyzed inside xdl's wrapper (any output as class scores), so its
    # layers are named under "model.".
    rows = {r["layer"]: r for r in result.tables["layers"]}
    assert rows["model.1"]["dead_fraction"] == 1.0
    assert rows["model.3"]["dead_fraction"] == 0.0
    assert rows["model.0"]["dead_fraction"] is None  # only rectifiers have dead units
    assert len(result.warnings) == 1 and "layer model.1 (ReLU)" in result.warnings[0]
    # Streamed statistics (batches of 7) equal the whole-tensor ones.
    with torch.no_grad():
        hidden = model[0](x)
    assert rows["model.0"]["mean"] == pytest.approx(hidden.mean().item(), rel=1e-5)
    assert rows["model.0"]["std"] == pytest.approx(hidden.std(unbiased=False).item(), rel=1e-4)
    # An MLP has no feature maps or filters: said plainly, not an error.
    assert not result.figures and "filters" not in result.arrays
    assert "no conv layer" in result.summary and result.metrics["filters"].startswith("none")
    assert hook_count(model) == 0 and model.training


def test_feature_maps_strongest_channels_first_and_first_filters(digits_run):
    result = xdl.explain(digits_run, "activations", samples=3, save=False, params={"channels": 4})
    model = digits_run.model
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert {f"maps_{n}" for n in convs} | {"filters"} <= set(result.figures)
    x = digits_run.data.test.x[result.provenance["indices"]]
    with torch.no_grad():
        first_maps = model[1](model[0](x))
    expected = first_maps.mean((0, 2, 3)).argsort(descending=True)[:4].numpy()
    np.testing.assert_array_equal(result.arrays[f"channels/{convs[0]}"], expected)
    np.testing.assert_allclose(result.arrays[f"maps/{convs[0]}"], first_maps[:, expected].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.arrays["filters"], model[1].weight.detach().numpy())
    # Statistics cover the whole test split, not just the 3 samples drawn.
    assert result.metrics["samples_for_statistics"] == len(digits_run.data.test)
    assert hook_count(model) == 0


def test_deep_models_draw_a_few_layers_and_save_every_one():
    layers, width = [], 1
    for _ in range(10):
        layers += [nn.Conv2d(width, 4, 3, padding=1), nn.ReLU()]
        width = 4
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    result = xdl.explain(model, "activations", x=torch.rand(4, 1, 8, 8), save=False, params={"drawn": 3})
    # First, middle and last conv layers drawn (positions 0, 4.5→4, 9 of 10); every layer's maps kept.
    assert {k for k in result.figures if k.startswith("maps_")} == {"maps_model.0", "maps_model.8", "maps_model.18"}
    assert len([k for k in result.arrays if k.startswith("maps/")]) == 10
    assert any("drawn for 3 of the 10 conv layers" in w for w in result.warnings)


def test_unknown_layer_is_one_line_exit_2(digits_run, capsys):
    code, _, err = cli(capsys, "explain", digits_run.path, "--method", "activations", "-p", "layers=1,nope")
    assert code == 2
    assert err.count("\n") == 1 and "'nope' does not exist" in err and "valid layer names: 0, 1," in err
    with pytest.raises(XdlError, match="valid layer names"):
        xdl.explain(digits_run.model, "activations", x=torch.rand(2, 1, 8, 8), params={"layers": ["fc"]})


# -----------------------------------------------------------------------------------------
# Embedding
# -----------------------------------------------------------------------------------------


def test_embedding_of_the_test_split(digits_run):
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    # t-SNE's OpenMP threads spin-wait: on a shared, busy 2-core machine that made 60 points
    # take 10-30 s instead of 0.3 s. One thread keeps the test fast and changes no result.
    with threadpool_limits(1):
        result = xdl.explain(digits_run, "embedding", save=False, params={"tsne_points": 60})
    test = digits_run.data.test
    assert result.arrays["pca"].shape == (len(test), 2)
    assert result.arrays["tsne"].shape == (60, 2)
    # The captured features are the last Linear layer's input: PCA of model[:-1](x) agrees.
    with torch.no_grad():
        features = digits_run.model[:-1](test.x).numpy()
    expected = PCA(2, random_state=digits_run.seed).fit_transform(features)
    np.testing.assert_allclose(np.abs(result.arrays["pca"]), np.abs(expected), rtol=1e-3, atol=1e-3)
    predicted = digits_run.model(test.x).argmax(1).numpy()
    assert result.metrics["misclassified"] == int((predicted != test.y.numpy()).sum())
    assert {"pca_class", "tsne_class"} <= set(result.figures)


def test_embedding_colours_by_group_on_tabular_runs(tabular_run):
    result = xdl.explain(tabular_run, "embedding", save=False, params={"tsne": False})
    assert result.arrays["pca"].shape == (len(tabular_run.data.test), 2)
    assert set(result.figures) == {"pca_class", "pca_sex"}


def test_embedding_needs_a_linear_head():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(XdlError, match="nn.Linear"):
        xdl.explain(model, "embedding", x=torch.rand(5, 1, 6, 6))
    assert hook_count(model) == 0
