"""scikit-learn's bundled 8×8 digits: the embedded default, no network needed."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from xdl.data.sampling import random_splits
from xdl.data.types import DataSplits


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8×8 images (0..16) and labels, read from the file scikit-learn ships.

    ``find_spec`` locates the package without running it: importing sklearn pulls SciPy
    and costs seconds for a 1,797-row table. Without the file, sklearn's loader reads it.
    """
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec else []
    table = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if table is None or not table.is_file():
        from sklearn.datasets import load_digits as sk_digits

        bunch = sk_digits()
        return bunch.images, bunch.target
    with gzip.open(table, "rt") as rows:
        data = np.loadtxt(rows, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load_digits(spec: dict) -> DataSplits:
    images, target = digits_arrays()
    # Pixel values are integers 0..16; scale to the [0, 1] image range every model expects.
    x = (images.astype(np.float32) / 16.0)[:, None, :, :]
    y = target.astype(np.int64)
    train, val, test = random_splits(x, y, spec)
    return DataSplits(train, val, test, "image", [str(c) for c in range(10)], spec)
