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
import torch

from xdl.data.types import Split
from xdl.errors import XdlError


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


def random_splits(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray,
    spec: dict,
    groups: dict[str, np.ndarray] | None = None,
    test: tuple[np.ndarray | torch.Tensor, np.ndarray] | None = None,
    source: np.ndarray | None = None,
) -> tuple[Split, Split, Split]:
    """Seeded, stratified train/val/test split (test only when no official one is given).

    Stratification keeps every class in every split when it can; it falls back to a plain
    shuffle for classes too small to stratify. ``spec["limit"]`` caps the training split at
    that many rows, a seeded stratified sample of the full split's, and shrinks a val and a
    test split made here by the same fraction: every limited split is a subset of the
    unlimited one, so a test row never becomes a training row as the limit changes (an
    official test split stays whole). ``source`` is each row's number in its
    file when ``x`` is already a selection of it; each split keeps these numbers.
    """
    groups = groups or {}
    n = len(y)
    index = np.arange(n)
    source = index if source is None else np.asarray(source)
    # Each split needs rows: test and validation take their fractions (at least one row each),
    # and training keeps at least two.
    needed = 2 + 1 + (test is None)
    if n < needed or (test is None and round(n * spec["test_fraction"]) >= n - 2):
        raise XdlError(f"the data has {n} rows; xdl needs at least {needed} to split into train, validation and test")

    def cut(idx: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            return shuffle_split(idx, test_size=fraction, seed=seed, stratify=y[idx])
        except ValueError:
            pass
        try:
            return shuffle_split(idx, test_size=fraction, seed=seed)
        except ValueError:
            raise XdlError(f"{n} samples are too few to split into training, validation and test data") from None

    if test is None:
        rest, test_idx = cut(index, spec["test_fraction"], spec["seed"])
    else:
        rest, test_idx = index, None
    train_idx, val_idx = cut(rest, spec["val_fraction"], spec["seed"] + 1)
    limit = spec.get("limit")
    if limit is not None and int(limit) < 1:
        raise XdlError(f"--limit must be a positive number of rows, not {limit}")
    if limit and int(limit) < len(train_idx):
        share = int(limit) / len(train_idx)

        def keep(idx: np.ndarray, count: int, seed: int) -> np.ndarray:
            if count >= len(idx):
                return idx
            try:
                return shuffle_split(idx, train_size=count, seed=seed, stratify=y[idx])[0]
            except ValueError:
                return shuffle_split(idx, train_size=count, seed=seed)[0]

        train_idx = keep(train_idx, int(limit), spec["seed"] + 2)
        val_idx = keep(val_idx, max(1, round(share * len(val_idx))), spec["seed"] + 3)
        if test_idx is not None:
            test_idx = keep(test_idx, max(1, round(share * len(test_idx))), spec["seed"] + 4)

    def take(idx: np.ndarray) -> Split:
        xs = torch.as_tensor(x[np.sort(idx)] if isinstance(x, np.ndarray) else x[torch.as_tensor(np.sort(idx))])
        return Split(
            xs.float(),
            torch.as_tensor(y[np.sort(idx)], dtype=torch.long),
            {k: v[np.sort(idx)] for k, v in groups.items()},
            source[np.sort(idx)],
        )

    if test is None:
        test_split = take(test_idx)
    else:
        test_split = Split(torch.as_tensor(test[0]).float(), torch.as_tensor(test[1], dtype=torch.long),
                           source=np.arange(len(test[1])))
    return take(train_idx), take(val_idx), test_split
