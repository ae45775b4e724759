"""Core: training determinism, the run directory, and the CLI's bad-input contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import xdl
from xdl.errors import XdlError
from xdl.models.builders import build_model, model_config


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "xdl", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_run_directory_rebuilds_the_model(digits_run):
    info = json.loads((digits_run.path / "run.json").read_text())
    assert info["format_version"] == 1
    assert info["model"]["in_shape"] == [1, 8, 8]
    assert {"torch", "python"} <= set(info["versions"])
    again = xdl.load(digits_run.path)
    assert not again.model.training
    assert len(again.history) == 4
    # The reloaded net on the reloaded splits gives the metrics the trained net gave at training time.
    from xdl.training.metrics import evaluate

    for split in ("train", "val", "test"):
        measured = evaluate(again.model, again.data.split(split), torch.device("cpu"))
        assert measured["accuracy"] == digits_run.metrics[f"{split}_accuracy"], split
        assert measured["loss"] == pytest.approx(digits_run.metrics[f"{split}_loss"], rel=1e-6), split


def test_a_saved_run_reloads_as_the_trained_net(tmp_path):
    from xdl.models.builders import set_normalization
    from xdl.runs.run import save_run
    from xdl.training.config import TrainConfig
    from xdl.training.loop import fit

    data = xdl.load_data("digits", limit=60)
    cfg = model_config("cnn", "image", channels=[4], hidden=8)
    net = build_model(cfg, data.input_shape, data.num_classes)
    set_normalization(net, data.train.x)
    history = fit(net, data, TrainConfig(epochs=1), progress=False, log=lambda line: None)
    save_run(tmp_path / "run", net, data, cfg, {}, history, {})
    x = data.test.x
    with torch.no_grad():
        torch.testing.assert_close(xdl.load(tmp_path / "run").model(x), net.eval()(x), rtol=0, atol=0)


def test_training_is_deterministic_on_cpu(tmp_path):
    kwargs = dict(epochs=2, quiet=True, model_options={"hidden": [16]}, augment=["noise"], mixup=0.2)
    a = xdl.train("digits", "mlp", tmp_path / "a", **kwargs)
    b = xdl.train("digits", "mlp", tmp_path / "b", **kwargs)
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), name


def test_model_takes_natural_range_inputs(digits_run):
    from xdl.models.builders import Normalize

    norm = digits_run.model[0]
    assert isinstance(norm, Normalize)
    x = digits_run.data.train.x
    assert torch.allclose(norm.mean.flatten(), x.mean().reshape(1), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn_fits_every_image_size(shape):
    model = build_model(model_config("cnn"), shape, 10)
    assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_augmentations_do_what_they_say():
    from xdl.training.config import TrainConfig
    from xdl.training.steps import augment

    torch.manual_seed(0)
    x = torch.rand(64, 3, 16, 16) * 0.5 + 0.25  # away from the clamp at 0 and 1
    # flip: every image is itself or its mirror, both happen
    out = augment(x, TrainConfig(augment=["flip"]))
    same, mirrored = (out == x).flatten(1).all(1), (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    # a shift by s of the width moves content by at most s·16 pixels; zero shift is the identity
    still = augment(x, TrainConfig(augment=["shift"], shift=0.0))
    torch.testing.assert_close(still, x, atol=1e-5, rtol=0)
    dot = torch.zeros(64, 1, 16, 16)
    dot[:, :, 8, 8] = 1.0
    moved = augment(dot, TrainConfig(augment=["shift"], shift=0.1))
    grid = torch.arange(16.0)
    mass = moved.sum((1, 2, 3))
    centre = torch.stack([(moved.sum(3)[:, 0] * grid).sum(1), (moved.sum(2)[:, 0] * grid).sum(1)], 1) / mass[:, None]
    offset = (centre - torch.tensor([8.0, 8.0])).abs()
    assert (offset <= 0.1 * 16 + 1e-4).all() and (offset > 0.05).any()
    # cutout: one square of side round(f·16) set to 0 (smaller where it meets the border), the rest untouched
    cfg = TrainConfig(augment=["cutout"], cutout=0.25)
    out = augment(x, cfg)
    holes = (out == 0).all(1)  # all channels
    assert ((out == 0) | (out == x)).all() and (holes.flatten(1).sum(1) <= 25).all() and holes.any()
    # noise: zero-mean Gaussian of the configured standard deviation
    out = augment(x, TrainConfig(augment=["noise"], noise=0.05))
    delta = out - x
    assert abs(float(delta.mean())) < 2e-3 and float(delta.std()) == pytest.approx(0.05, rel=0.05)


def test_existing_run_is_not_overwritten(digits_run):
    before = (digits_run.path / "model.safetensors").read_bytes()
    with pytest.raises(XdlError, match="already holds a run"):
        xdl.train("digits", "mlp", digits_run.path, epochs=1, quiet=True)
    assert (digits_run.path / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "nope"], "unknown dataset"),
        (["--model", "resnet"], "unknown model"),
        (["--epochs", "0"], "epochs must be > 0"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--dropout", "1.0"], "dropout must be in [0, 1)"),
        (["--model", "no.such.module:factory"], "cannot resolve model factory"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
        (["--augment", "warp"], "unknown augmentation"),
    ],
)
def test_train_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = cli("train", "--out", tmp_path / "r", "--epochs", "1", *args) if "--epochs" not in args else cli(
        "train", "--out", tmp_path / "r", *args
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "r" / "run.json").exists()


def test_load_refuses_newer_format(digits_run, tmp_path):
    import shutil

    copy = tmp_path / "future"
    shutil.copytree(digits_run.path, copy)
    info = json.loads((copy / "run.json").read_text())
    info["format_version"] = 99
    (copy / "run.json").write_text(json.dumps(info))
    with pytest.raises(XdlError, match="newer xdl"):
        xdl.load(copy)


def test_few_steps_train_without_a_one_cycle_crash(tmp_path):
    # 60 rows in batches of 128: one step per epoch, too few for one-cycle's phases.
    run = xdl.train("digits", "mlp", tmp_path / "r", epochs=2, quiet=True, data_options={"limit": 60},
                    model_options={"hidden": [8]})
    assert run.metrics["epochs_run"] == 2


def test_forced_result_replaces_the_whole_folder(tmp_path):
    from xdl.analysis import Result

    first = Result("m", "explain", figures={"old": b"png"}, metrics={"a": 1})
    first.save(tmp_path / "m")
    Result("m", "explain", metrics={"a": 2}).save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["result.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no partial or old folder left behind
