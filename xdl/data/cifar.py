"""CIFAR-10 from the official "python" batches (safely unpickled) or the binary batches.

Looked up in ``spec["data_dir"]`` (the ``cifar-10-batches-py`` / ``cifar-10-batches-bin``
folders, the batches themselves, or ``cifar-10-python.tar.gz`` / ``cifar-10-binary.tar.gz``),
then in the cache; otherwise ``cifar-10-python.tar.gz`` is downloaded, verified and
extracted. The python batches are pickles: they are read with an unpickler that only
rebuilds numpy arrays and refuses every other global, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from xdl.data.sampling import random_splits
from xdl.data.download import cache_dir, fetch, safe_extract
from xdl.data.types import DataSplits
from xdl.errors import XdlError

__all__ = ["CIFAR10_CLASSES", "load_cifar10", "read_binary_batch", "read_python_batch", "safe_unpickle"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
PY_FOLDER, BIN_FOLDER = "cifar-10-batches-py", "cifar-10-batches-bin"
PY_ARCHIVE, BIN_ARCHIVE = "cifar-10-python.tar.gz", "cifar-10-binary.tar.gz"
_RECORD = 1 + 3 * 32 * 32  # binary format: one label byte, then 3072 pixel bytes (R, G, B planes)

# The only globals a pickle of plain numpy arrays (and numpy scalars) needs, for numpy 1.x
# ("numpy.core") and 2.x ("numpy._core"), pickle protocols 2 to 5.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts/lists/strings/numbers and numpy arrays; refuses any other global."""

    def __init__(self, handle, source: str):
        super().__init__(handle, encoding="latin1")  # the official batches are Python 2 pickles
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise XdlError(f"refusing to unpickle {module}.{name} from {self.source}")

    def persistent_load(self, pid):
        raise XdlError(f"refusing to unpickle a persistent object from {self.source}")


def safe_unpickle(path: str | Path):
    """Unpickle a file allowing only numpy arrays and plain Python containers."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise XdlError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), str(path)).load()
    except XdlError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, TypeError, …
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise XdlError(f"{path} is not a valid CIFAR python batch ({message})") from None


def _key(batch: dict, name: str):
    for key in (name, name.encode()):
        if key in batch:
            return batch[key]
    return None


def read_python_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One python batch → (uint8 N×3×32×32, int64 labels)."""
    path = Path(path)
    batch = safe_unpickle(path)
    if not isinstance(batch, dict):
        raise XdlError(f"{path} is not a CIFAR batch: it holds a {type(batch).__name__}, not a dict")
    data, labels = _key(batch, "data"), _key(batch, "labels")
    if data is None or labels is None:
        raise XdlError(f"{path} is not a CIFAR-10 batch: it has no 'data' and 'labels' entries")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _RECORD - 1:
        raise XdlError(f"{path}: 'data' is {data.dtype} {data.shape}; expected uint8 N×3072")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise XdlError(f"{path}: 'labels' are not integers") from None
    if labels.shape != (len(data),):
        raise XdlError(f"{path} has {labels.size} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), labels


def read_binary_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch (records of 1 label byte + 3072 pixel bytes) → (uint8 N×3×32×32, int64 labels)."""
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise XdlError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw.size == 0 or raw.size % _RECORD:
        raise XdlError(
            f"{path} is truncated or malformed: {raw.size} bytes is not a whole number of "
            f"{_RECORD}-byte CIFAR-10 records"
        )
    records = raw.reshape(-1, _RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _class_names_python(folder: Path) -> list[str]:
    meta = folder / "batches.meta"
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    names = safe_unpickle(meta)
    names = _key(names, "label_names") if isinstance(names, dict) else None
    if not isinstance(names, list) or len(names) != 10:
        raise XdlError(f"{meta} has no list of 10 'label_names'")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _class_names_binary(folder: Path) -> list[str]:
    meta = folder / "batches.meta.txt"
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    try:
        names = [line.strip() for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise XdlError(f"cannot read {meta}: {exc}") from None
    if len(names) != 10:
        raise XdlError(f"{meta} names {len(names)} classes; CIFAR-10 has 10")
    return names


def _find(spec: dict) -> tuple[str, Path]:
    """("python" | "binary", folder holding the batches), extracting or downloading if needed."""
    cache = cache_dir(spec, "cifar10")
    roots = [Path(spec["data_dir"])] if spec.get("data_dir") else []
    roots.append(cache)

    def look() -> tuple[str, Path] | None:
        for root in roots:
            for folder in (root / PY_FOLDER, root / "cifar10" / PY_FOLDER, root):
                if all((folder / f).is_file() for f in TRAIN_BATCHES + [TEST_BATCH]):
                    return "python", folder
            for folder in (root / BIN_FOLDER, root / "cifar10" / BIN_FOLDER, root):
                if all((folder / f"{f}.bin").is_file() for f in TRAIN_BATCHES + [TEST_BATCH]):
                    return "binary", folder
        return None

    found = look()
    if found:
        return found
    for root in roots:
        for archive in (root / PY_ARCHIVE, root / BIN_ARCHIVE):
            if archive.is_file():
                safe_extract(archive, archive.parent)
                found = look()
                if found:
                    return found
                raise XdlError(f"{archive} does not contain the CIFAR-10 batches")
    archive = fetch("cifar10", PY_ARCHIVE, cache)
    safe_extract(archive, cache)
    found = look()
    if not found:
        raise XdlError(f"{archive} does not contain the CIFAR-10 batches")
    return found


def load_cifar10(spec: dict) -> DataSplits:
    """CIFAR-10: 50,000 train / 10,000 test colour images, 3×32×32 in [0, 1]."""
    fmt, folder = _find(spec)
    if fmt == "python":
        read, suffix, class_names = read_python_batch, "", _class_names_python(folder)
    else:
        read, suffix, class_names = read_binary_batch, ".bin", _class_names_binary(folder)
    parts = [read(folder / f"{name}{suffix}") for name in TRAIN_BATCHES]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    xt, yt = read(folder / f"{TEST_BATCH}{suffix}")
    for labels, where in ((y, f"the training batches in {folder}"), (yt, str(folder / (TEST_BATCH + suffix)))):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise XdlError(f"{where} hold labels outside 0..{len(class_names) - 1}")
    x = x.astype(np.float32) / np.float32(255.0)
    xt = xt.astype(np.float32) / np.float32(255.0)
    train, val, test = random_splits(x, y, spec, test=(xt, yt))
    return DataSplits(train, val, test, "image", class_names, spec)
