"""Seeded train/test cuts equal, index for index, to scikit-learn's ``train_test_split``.

Every run rebuilds its splits from its data spec, so the cut must stay the one that saved
runs were trained on — scikit-learn's. Importing ``sklearn.model_selection`` pulls SciPy's
statistics and costs 1–2.5 s of every ``xdl`` process that loads data (a quarter of an
``xdl explain`` on digits); this module draws the same indices from the same
``RandomState`` stream with NumPy alone. ``tests/test_data.py`` checks it against
scikit-learn on random class mixes, sizes and seeds.
"""

from __future__ import annotations

import math

import numpy as np


def _sizes(n: int, test_size: float | int | None, train_size: float | int | None) -> tuple[int, int]:
    """scikit-learn's ``_validate_shuffle_split``: a float is a fraction, an int a count."""
    if test_size is None and train_size is None:
        test_size = 0.25
    for size in (test_size, train_size):
        if size is None:
            continue
        if isinstance(size, (int, np.integer)) and not 0 < size < n:
            raise ValueError(f"a split size of {size} does not fit {n} samples")
        if isinstance(size, (float, np.floating)) and not 0 < size < 1:
            raise ValueError(f"a split fraction of {size} is not in (0, 1)")
    if isinstance(test_size, float) and isinstance(train_size, float) and test_size + train_size > 1:
        raise ValueError("the split fractions add up to more than 1")
    n_test = math.ceil(test_size * n) if isinstance(test_size, float) else test_size
    n_train = math.floor(train_size * n) if isinstance(train_size, float) else train_size
    if train_size is None:
        n_train = n - n_test
    elif test_size is None:
        n_test = n - n_train
    if n_train + n_test > n:
        raise ValueError(f"{n_train} + {n_test} samples do not fit {n}")
    if n_train == 0:
        raise ValueError("the training side of the split would be empty")
    return int(n_train), int(n_test)


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class draws closest to the class shares; ties among the remainders broken at random."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (at,) = np.where(remainder == value)
            now = min(len(at), need)
            floored[rng.choice(at, size=now, replace=False)] += 1
            need -= now
            if need == 0:
                break
    return floored.astype(int)


def shuffle_split(
    index: np.ndarray,
    *,
    seed: int,
    test_size: float | int | None = None,
    train_size: float | int | None = None,
    stratify: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) entries of ``index``, as ``train_test_split(index, ..., random_state=seed)``.

    Raises ValueError where scikit-learn does (a class of one member, fewer rows on a side
    than classes when stratifying, sizes that do not fit).
    """
    index = np.asarray(index)
    n_train, n_test = _sizes(len(index), test_size, train_size)
    rng = np.random.RandomState(seed)
    if stratify is None:
        order = rng.permutation(len(index))
        return index[order[n_test:n_test + n_train]], index[order[:n_test]]
    classes, codes = np.unique(np.asarray(stratify), return_inverse=True)
    counts = np.bincount(codes)
    if counts.min() < 2:
        raise ValueError("the least populated class has only 1 member")
    if n_train < len(classes) or n_test < len(classes):
        raise ValueError(f"a stratified split needs at least {len(classes)} rows on each side")
    members = np.split(np.argsort(codes, kind="mergesort"), np.cumsum(counts)[:-1])
    train_counts = _approximate_mode(counts, n_train, rng)
    test_counts = _approximate_mode(counts - train_counts, n_test, rng)
    train: list = []
    test: list = []
    for rows, k_train, k_test in zip(members, train_counts, test_counts):
        shuffled = rows.take(rng.permutation(len(rows)), mode="clip")
        train.extend(shuffled[:k_train])
        test.extend(shuffled[k_train:k_train + k_test])
    return index[rng.permutation(train)], index[rng.permutation(test)]
