"""What a Result was computed on, so a number is never quoted for samples it did not see.

:func:`record` builds the ``Result.provenance`` dict: the split, the exact sample
positions (a list up to ``INDEX_LIST_MAX`` of them, else only their digest), the target,
the seed, the asked parameters, the xdl version, and sha256 digests of the model's weights
and of the split's tensors. Two results may stand for each other — the audit reusing a
saved one — only when their provenance is equal (:func:`same`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xdl import __version__
from xdl.data.stream import is_streamed
from xdl.io import _jsonable

INDEX_LIST_MAX = 10_000  # above this, result.json keeps only the indices' digest
CHUNK = 1 << 20
# run.json's mark that its data_sha256 digests a streamed folder's files, not its pixels
STREAMED_DIGEST = "files"


def _update(h: "hashlib._Hash", array: Any, pixels: bool = False) -> None:
    """Feed dtype, shape and bytes: equal digests mean equal arrays, not merely equal bytes.

    A streamed split is fed as its shape and its files' digests, in order: its pixels would
    have to be decoded whole (12 GiB of float32 for 20,000 images at 224 px, each time a run
    is loaded) where reading each file once fixes them as well. ``pixels`` feeds its decoded
    pixels instead, a batch at a time: how runs saved before ``STREAMED_DIGEST`` digested it.
    """
    if is_streamed(array) and not pixels:
        h.update(f"files{tuple(array.shape)}".encode())
        for path in array.paths():
            h.update(file_digest(path).encode())
        return
    if is_streamed(array):
        h.update(f"{np.dtype(np.float32).str}{tuple(array.shape)}".encode())
        for _, xb in array.batches(256):
            h.update(memoryview(xb.numpy()).cast("B"))
        return
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().contiguous().numpy()
    array = np.ascontiguousarray(array)
    if array.dtype == object:  # group labels: strings
        array = array.astype(str)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(memoryview(array).cast("B"))


def digest_arrays(*arrays: Any) -> str:
    h = hashlib.sha256()
    for array in arrays:
        _update(h, array)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """sha256 of the state dict: names, dtypes, shapes and values, in sorted name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        _update(h, tensor)
    return h.hexdigest()


def data_digest(x: torch.Tensor, y: torch.Tensor | None, groups: dict[str, np.ndarray] | None = None,
                pixels: bool = False) -> str:
    """sha256 of a split as the model sees it: inputs after encoding (files, streamed), labels, group labels."""
    h = hashlib.sha256()
    _update(h, x, pixels)
    if y is not None:
        _update(h, y)
    for name, labels in sorted((groups or {}).items()):
        h.update(name.encode())
        _update(h, labels)
    return h.hexdigest()


def splits_digest(data: Any, pixels: bool = False) -> str:
    """sha256 of every split of a DataSplits, as the model sees them (what run.json stores at training)."""
    h = hashlib.sha256()
    for name in ("train", "val", "test"):
        part = data.split(name)
        h.update(data_digest(part.x, part.y, part.groups, pixels).encode())
    return h.hexdigest()


def record(*, split: str, index: np.ndarray, target: Any, seed: int, params: dict[str, Any], model: str,
           data: str) -> dict[str, Any]:
    """The provenance of a result computed on ``index`` of ``split`` with ``params``."""
    index = np.asarray(index, dtype=np.int64)
    digest = digest_arrays(index)
    return {
        "split": split,
        "samples": int(len(index)),
        "indices": index.tolist() if len(index) <= INDEX_LIST_MAX else digest,
        "indices_sha256": digest,
        "target": target if isinstance(target, str) else int(target),
        "seed": int(seed),
        # as result.json reads them back, so a saved and a fresh provenance compare equal
        "params": json.loads(json.dumps(params, default=_jsonable)),
        "xdl_version": __version__,
        "model_sha256": model,
        "data_sha256": data,
    }


def same(saved: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    """Whether a saved result was computed on exactly what ``wanted`` describes (all of it)."""
    return isinstance(saved, dict) and bool(saved) and saved == wanted


def describe(provenance: dict[str, Any]) -> str:
    """``"8 samples of the test split"``: for the page, beside every section."""
    if not provenance:
        return ""
    n = provenance.get("samples")
    return f"{n} sample{'s' if n != 1 else ''} of the {provenance.get('split')} split"
