"""Datasets: one ``load_data(spec)`` from a JSON-able spec to ``DataSplits``.

A spec is what ``run.json`` stores, so a run rebuilds its exact splits from it. Loaders
are imported lazily so that reading one format never pays for the others.
Imports: the ground modules (errors, io, limits) only: data is the ground floor.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from xdl.data.sampling import random_splits
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


