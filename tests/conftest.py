"""Shared fixtures: tiny trained runs, made once per test session (seconds, not minutes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import xdl

# Two threads keep runs deterministic and fair to the 2-core CI machine; under pytest-xdist
# each worker (and every process it starts) takes one, so two workers share the two cores
# instead of four threads fighting over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A small CNN trained for a few epochs on digits (image data, 8×8, 10 classes).

    Without augmentation: the thresholds of the tests that share it (duplicates' feature
    cosine, saliency agreement) were set on this model, and the default shift has tests of its own."""
    out = tmp_path_factory.mktemp("runs") / "cnn"
    return xdl.train("digits", "cnn", out, epochs=4, augment=[], quiet=True,
                     model_options={"channels": [8, 16], "hidden": 32})


@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory):
    """A small MLP on digits: image data without conv layers (gradcam must refuse it)."""
    out = tmp_path_factory.mktemp("runs") / "mlp"
    return xdl.train("digits", "mlp", out, epochs=4, augment=[], quiet=True, model_options={"hidden": [32]})


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process (no interpreter start-up) and return (exit code, out, err)."""
    from xdl.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def run_process(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m xdl`` in a fresh interpreter, as a user's shell would."""
    return subprocess.run([sys.executable, "-m", "xdl", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def copy_run(run, dest: Path) -> Path:
    """A private copy of a session run as training left it, without the results other tests
    wrote into the shared run (which vary with the order xdist gives the tests)."""
    dest.mkdir()
    for name in ("run.json", "model.safetensors", "history.csv"):
        shutil.copy(run.path / name, dest / name)
    if (run.path / "checkpoint").is_dir():
        shutil.copytree(run.path / "checkpoint", dest / "checkpoint")
    return dest


def write_tabular_csv(path, n: int = 400, seed: int = 0):
    """An Adult-census-like table: numeric and categorical columns, a sensitive column."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 70, n)
    hours = rng.normal(40, 10, n).round(1)
    sex = rng.choice(["female", "male"], n)
    job = rng.choice(["clerk", "sales", "tech", "manager"], n)
    score = 0.05 * (age - 40) + 0.08 * (hours - 40) + np.where(job == "manager", 1.5, 0) + rng.normal(0, 0.7, n)
    income = np.where(score > 0.3, ">50K", "<=50K")
    import pandas as pd

    pd.DataFrame({"age": age, "hours": hours, "sex": sex, "job": job, "income": income}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tabular_run(tmp_path_factory):
    """An MLP on a small Adult-like CSV with 'sex' as the sensitive column."""
    folder = tmp_path_factory.mktemp("tabular")
    csv = write_tabular_csv(folder / "adult.csv")
    return xdl.train(
        str(csv), "mlp", folder / "run", epochs=10, quiet=True,
        data_options={"target": "income", "sensitive": "sex"}, model_options={"hidden": [16]},
    )


# ------------------------------------------------------------- models xdl did not train
# Hugging Face architectures built from configs (nothing is downloaded) and a folder of photos.
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def tiny_resnet(channels: int = 3, labels: int = 3) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    names = {i: n for i, n in enumerate(["cat", "dog", "fox"][:labels])}
    config = ResNetConfig(num_channels=channels, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=labels, id2label=names, label2id={n: i for i, n in names.items()})
    return ResNetForImageClassification(config).eval()


def tiny_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    return ViTForImageClassification(config).eval()


def write_pngs(root: Path, classes=("cat", "dog", "fox"), per_class: int = 8, size: int = 16) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny Hugging Face ResNet saved as ``save_pretrained`` writes it, with its preprocessor."""
    folder = tmp_path_factory.mktemp("hf") / "resnet"
    tiny_resnet().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": MEAN, "image_std": STD, "do_resize": True, "size": {"height": 16, "width": 16}}
    ))
    return folder
