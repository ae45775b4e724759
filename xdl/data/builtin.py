"""scikit-learn's bundled 8×8 digits: the embedded default, no network needed."""

from __future__ import annotations

import numpy as np

from xdl.data import random_splits
from xdl.data.types import DataSplits


def load_digits(spec: dict) -> DataSplits:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    # Pixel values are integers 0..16; scale to the [0, 1] image range every model expects.
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train, val, test = random_splits(x, y, spec)
    return DataSplits(train, val, test, "image", [str(c) for c in range(10)], spec)
