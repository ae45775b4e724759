"""Shared fixtures: tiny trained runs, made once per test session (seconds, not minutes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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
    """A small CNN trained for a few epochs on digits (image data, 8×8, 10 classes)."""
    out = tmp_path_factory.mktemp("runs") / "cnn"
    return xdl.train("digits", "cnn", out, epochs=4, quiet=True, model_options={"channels": [8, 16], "hidden": 32})


@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory):
    """A small MLP on digits: image data without conv layers (gradcam must refuse it)."""
    out = tmp_path_factory.mktemp("runs") / "mlp"
    return xdl.train("digits", "mlp", out, epochs=4, quiet=True, model_options={"hidden": [32]})


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
