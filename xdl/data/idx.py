"""MNIST and Fashion-MNIST from the standard IDX files (gzipped or not).

The four files are looked up in ``spec["data_dir"]`` (also in its ``<name>/`` and
torchvision-style ``MNIST/raw`` / ``FashionMNIST/raw`` sub-folders); whatever is missing
is downloaded into the cache (see ``xdl.data.download``) and checked against its
published checksum. The official t10k files are the test split; validation is a seeded,
stratified part of the training files.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from xdl.data.sampling import random_splits
from xdl.data.download import cache_dir, fetch
from xdl.data.types import DataSplits
from xdl.errors import XdlError
from xdl.limits import require_memory

__all__ = ["IDX_FILES", "load_fashion_mnist", "load_mnist", "read_idx"]

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes (third byte of the magic number) → big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into a native-endian array, validating its header and size.

    The header is read first and sizes the read: a gzip bomb or a header promising 65536⁴
    values is refused before its body is decompressed or allocated.
    """
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            head = handle.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
                raise XdlError(f"{path} is not an IDX file (bad magic number {head.hex() or 'empty file'})")
            dtype, ndim = _IDX_DTYPES[head[2]], head[3]
            raw_dims = handle.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise XdlError(f"{path} is truncated: its header is cut off after {4 + len(raw_dims)} bytes")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            count = math.prod(dims)  # Python ints: 65536⁴ must not wrap around to 0
            expected = count * dtype.itemsize
            require_memory(expected, f"{path} (its header promises {'×'.join(map(str, dims))} values)")
            # One byte beyond the promise tells a malformed file without reading the rest of it.
            data = handle.read(expected + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise XdlError(f"{path} is a truncated or corrupt gzip file ({exc})") from None
    except OSError as exc:
        raise XdlError(f"cannot read {path}: {exc.strerror or exc}") from None
    body = len(data)
    if body < expected:
        shape = "×".join(map(str, dims))
        raise XdlError(f"{path} is truncated: its header promises {shape} values ({expected} bytes) but only {body} bytes follow")
    if body > expected:
        raise XdlError(f"{path} is malformed: unexpected bytes follow the {expected} bytes its header promises")
    array = np.frombuffer(data, dtype=dtype, count=count).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _candidates(name: str, filename: str) -> list[str]:
    dotted = filename.replace("-idx", ".idx")  # some mirrors spell them train-images.idx3-ubyte
    return [filename, filename + ".gz", dotted, dotted + ".gz"]


def _locate(spec: dict, name: str) -> dict[str, Path]:
    """Find each IDX file in data_dir (or the cache); download the missing ones."""
    cache = cache_dir(spec, name)
    folders = []
    if spec.get("data_dir"):
        root = Path(spec["data_dir"])
        folders += [root, root / name, root / _TORCHVISION_FOLDERS[name] / "raw"]
    folders.append(cache)
    found: dict[str, Path] = {}
    for key, filename in IDX_FILES.items():
        for folder in folders:
            hit = next((folder / c for c in _candidates(name, filename) if (folder / c).is_file()), None)
            if hit is not None:
                found[key] = hit
                break
        else:
            found[key] = fetch(name, filename + ".gz", cache)
    return found


def _images(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim != 3:
        raise XdlError(f"{path} holds an array of shape {array.shape}, not N×H×W images")
    if array.dtype == np.uint8:
        images = array.astype(np.float32) / 255.0
    else:
        images = array.astype(np.float32)
        if images.size and not (np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0):
            raise XdlError(f"{path} holds {array.dtype} pixels outside [0, 1]; expected unsigned bytes")
    return images[:, None, :, :]


def _labels(array: np.ndarray, path: Path, n: int, num_classes: int) -> np.ndarray:
    if array.ndim != 1:
        raise XdlError(f"{path} holds an array of shape {array.shape}, not a list of labels")
    if len(array) != n:
        raise XdlError(f"{path} has {len(array)} labels but its image file has {n} images")
    if not np.issubdtype(array.dtype, np.integer) or (len(array) and (array.min() < 0 or array.max() >= num_classes)):
        raise XdlError(f"{path} holds labels outside 0..{num_classes - 1}")
    return array.astype(np.int64)


def _load_idx_dataset(spec: dict, name: str, class_names: list[str]) -> DataSplits:
    paths = _locate(spec, name)
    x = _images(read_idx(paths["train_images"]), paths["train_images"])
    y = _labels(read_idx(paths["train_labels"]), paths["train_labels"], len(x), len(class_names))
    xt = _images(read_idx(paths["test_images"]), paths["test_images"])
    yt = _labels(read_idx(paths["test_labels"]), paths["test_labels"], len(xt), len(class_names))
    if x.shape[1:] != xt.shape[1:]:
        raise XdlError(
            f"{paths['test_images']} holds {xt.shape[2]}×{xt.shape[3]} images but "
            f"{paths['train_images']} holds {x.shape[2]}×{x.shape[3]}"
        )
    train, val, test = random_splits(x, y, spec, test=(xt, yt))
    return DataSplits(train, val, test, "image", list(class_names), spec)


def load_mnist(spec: dict) -> DataSplits:
    """MNIST handwritten digits: 60,000 train / 10,000 test images, 1×28×28 in [0, 1]."""
    return _load_idx_dataset(spec, "mnist", MNIST_CLASSES)


def load_fashion_mnist(spec: dict) -> DataSplits:
    """Fashion-MNIST (Zalando): 60,000 train / 10,000 test images, 1×28×28 in [0, 1]."""
    return _load_idx_dataset(spec, "fashion-mnist", FASHION_MNIST_CLASSES)
