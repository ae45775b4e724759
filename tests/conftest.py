"""Shared fixtures: tiny trained runs, made once per test session (seconds, not minutes)."""

from __future__ import annotations

import os

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
