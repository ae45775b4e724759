"""Datasets: one ``load_data(spec)`` from a JSON-able spec to ``DataSplits``.

A spec is what ``run.json`` stores, so a run rebuilds its exact splits from it. Loaders
are imported lazily so that reading one format never pays for the others.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import torch

from xdl.data.types import ColumnEncoding, DataSplits, Encoding, Split
from xdl.errors import XdlError

__all__ = [
    "ColumnEncoding",
    "DataSplits",
    "Encoding",
    "Split",
    "DATASETS",
    "load_data",
    "make_spec",
    "random_splits",
]

# Named datasets → "module:function(spec) -> DataSplits".
DATASETS = {
    "digits": "xdl.data.builtin:load_digits",
    "mnist": "xdl.data.idx:load_mnist",
    "fashion-mnist": "xdl.data.idx:load_fashion_mnist",
    "cifar10": "xdl.data.cifar:load_cifar10",
}
# File formats, chosen from the path → loader.
FORMATS = {
    "csv": "xdl.data.csv:load_csv",
    "npz": "xdl.data.files:load_npz",
    "folder": "xdl.data.files:load_folder",
}

DEFAULT_SPEC = {
    "seed": 0,
    "val_fraction": 0.1,  # of the training data, when no official validation split exists
    "test_fraction": 0.2,  # of all data, when no official test split exists
}


def make_spec(data: str | dict = "digits", **options) -> dict:
    """Turn ``"digits"``, a path, or a partial dict into a complete, JSON-able spec."""
    spec = dict(data) if isinstance(data, dict) else {"name": str(data)}
    spec.update({k: v for k, v in options.items() if v is not None})
    for key, value in DEFAULT_SPEC.items():
        spec.setdefault(key, value)
    name = spec["name"]
    if name in DATASETS:
        if name != "digits" and "data_dir" not in spec and os.environ.get("XDL_DATA_DIR"):
            spec["data_dir"] = os.environ["XDL_DATA_DIR"]
        if spec.get("data_dir"):
            spec["data_dir"] = str(Path(spec["data_dir"]).expanduser().resolve())
        return spec
    if name in FORMATS and spec.get("path"):  # an already-resolved file spec, e.g. from run.json
        if not Path(spec["path"]).exists():
            raise XdlError(f"data file not found: {spec['path']}")
        return spec
    path = Path(name).expanduser()
    if path.suffix.lower() == ".csv":
        fmt = "csv"
    elif path.suffix.lower() == ".npz":
        fmt = "npz"
    elif path.is_dir():
        fmt = "folder"
    else:
        raise XdlError(
            f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, "
            "or give a .csv file, a .npz file or a folder of class sub-folders"
        )
    if not path.exists():
        raise XdlError(f"data file not found: {path}")
    spec.update(name=fmt, path=str(path.resolve()))
    if isinstance(spec.get("sensitive"), str):
        spec["sensitive"] = [s for s in spec["sensitive"].split(",") if s]
    return spec


def load_data(data: str | dict = "digits", **options) -> DataSplits:
    """Load a dataset by name, path or spec; every split is a tensor in the natural range."""
    spec = make_spec(data, **options)
    if spec["name"] in FORMATS and "sensitive" in spec and spec["name"] != "csv":
        raise XdlError("--sensitive applies to CSV data only")
    target = DATASETS.get(spec["name"]) or FORMATS[spec["name"]]
    module, func = target.split(":")
    splits = getattr(importlib.import_module(module), func)(spec)
    splits.spec = spec
    return splits


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
    from xdl.data.sampling import shuffle_split

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
