"""Core: training determinism, the run directory, and the CLI's bad-input contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import xdl
from xdl.errors import XdlError
from xdl.models import build_model, model_config


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "xdl", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_run_directory_rebuilds_the_model(digits_run):
    info = json.loads((digits_run.path / "run.json").read_text())
    assert info["format_version"] == 1
    assert info["model"]["in_shape"] == [1, 8, 8]
    assert {"torch", "python"} <= set(info["versions"])
    again = xdl.load(digits_run.path)
    x = again.data.test.x[:16]
    assert not again.model.training
    assert torch.equal(again.model(x), digits_run.model(x))
    assert len(again.history) == 4
    # Reloading the data spec gives identical splits.
    assert torch.equal(again.data.test.x, xdl.load_data(info["data"]).test.x)


def test_training_is_deterministic_on_cpu(tmp_path):
    kwargs = dict(epochs=2, quiet=True, model_options={"hidden": [16]}, augment=["noise"], mixup=0.2)
    a = xdl.train("digits", "mlp", tmp_path / "a", **kwargs)
    b = xdl.train("digits", "mlp", tmp_path / "b", **kwargs)
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), name


def test_model_takes_natural_range_inputs(digits_run):
    from xdl.models import Normalize

    norm = digits_run.model[0]
    assert isinstance(norm, Normalize)
    x = digits_run.data.train.x
    assert torch.allclose(norm.mean.flatten(), x.mean().reshape(1), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn_fits_every_image_size(shape):
    model = build_model(model_config("cnn"), shape, 10)
    assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_augmentations_keep_shape_and_range():
    from xdl.training import TrainConfig, augment

    cfg = TrainConfig(augment=["shift", "rotate", "flip", "noise", "cutout"])
    x = torch.rand(5, 3, 16, 16)
    out = augment(x, cfg)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


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
    from xdl.analyzers import Result

    first = Result("m", "explain", figures={"old": b"png"}, metrics={"a": 1})
    first.save(tmp_path / "m")
    Result("m", "explain", metrics={"a": 2}).save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["result.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no partial or old folder left behind
