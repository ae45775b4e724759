"""Your own data: an ``.npz`` of arrays, or a folder of class sub-folders of images."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from xdl.data import stream
from xdl.data.sampling import random_splits
from xdl.data.types import ColumnEncoding, DataSplits, Encoding, Split
from xdl.errors import XdlError

__all__ = ["IMAGE_SUFFIXES", "load_folder", "load_npz"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
# Labels index the model's output layer: a stray 10**9 must not size a billion-class model.
MAX_CLASSES = 1000
MIN_SIDE = 2  # a 1×1 "image" has no spatial structure to explain or to convolve


# --------------------------------------------------------------------------- npz


def _image_array(x: np.ndarray, what: str, path: Path, notes: list[str]) -> np.ndarray:
    """N×H×W, N×H×W×C or N×C×H×W → float32 N×C×H×W in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4:
        first, last = x.shape[1] in (1, 3, 4), x.shape[3] in (1, 3, 4)
        if last and not first:
            x = np.transpose(x, (0, 3, 1, 2))
            if what == "x":
                notes.append("converted channels-last images (N×H×W×C) to N×C×H×W")
        elif not first:
            raise XdlError(
                f"{path}: {what!r} has shape {x.shape}; images need 1, 3 or 4 channels "
                "as N×C×H×W or N×H×W×C"
            )
    else:
        raise XdlError(f"{path}: {what!r} has shape {x.shape}; expected N×F, N×H×W, N×H×W×C or N×C×H×W")
    if min(x.shape[2:]) < MIN_SIDE:
        raise XdlError(f"{path}: {what!r} holds {x.shape[2]}×{x.shape[3]} images; images need at least {MIN_SIDE}×{MIN_SIDE} pixels")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)
    if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.number):
        out = np.ascontiguousarray(x, dtype=np.float32)
        if out.size and not (np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0):
            lo, hi = np.nanmin(out), np.nanmax(out)
            raise XdlError(
                f"{path}: {what!r} holds {x.dtype} pixels in [{lo:g}, {hi:g}]; "
                "image data must be uint8 (0..255) or floats within [0, 1]"
            )
        return out
    raise XdlError(f"{path}: {what!r} has dtype {x.dtype}; expected numbers")


def _tabular_array(x: np.ndarray, what: str, path: Path) -> np.ndarray:
    if not (x.dtype == np.bool_ or np.issubdtype(x.dtype, np.number)):
        raise XdlError(f"{path}: {what!r} has dtype {x.dtype}; expected numbers")
    out = np.asarray(x, dtype=np.float32)
    if not np.isfinite(out).all():
        raise XdlError(f"{path}: {what!r} has {int((~np.isfinite(out)).sum())} missing or infinite values; impute them first")
    return out


def _label_array(y: np.ndarray, what: str, path: Path, n: int) -> np.ndarray:
    if y.ndim != 1:
        raise XdlError(f"{path}: {what!r} has shape {y.shape}; expected one integer label per row")
    if len(y) != n:
        raise XdlError(f"{path}: {what!r} has {len(y)} labels but the inputs have {n} rows")
    if np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise XdlError(f"{path}: {what!r} has dtype {y.dtype}; labels must be integers 0, 1, 2, …")
    if len(y) and y.min() < 0:
        raise XdlError(f"{path}: {what!r} has negative labels; labels must be integers 0, 1, 2, …")
    if len(y) and y.max() >= MAX_CLASSES:
        raise XdlError(f"{path}: {what!r} has label {int(y.max())}; xdl supports at most {MAX_CLASSES} classes (labels 0..{MAX_CLASSES - 1})")
    return y.astype(np.int64)


def load_npz(spec: dict) -> DataSplits:
    """An ``.npz`` with ``x`` and ``y`` (optional ``x_test``/``y_test``, ``class_names``)."""
    path = Path(spec["path"])
    if path.is_file() and not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(6)
        size = path.stat().st_size
        what = (
            "a single .npy array" if head == b"\x93NUMPY"
            else "a Python pickle (xdl never unpickles)" if head[:1] == b"\x80"
            else "empty" if not size
            else f"{size} bytes that are not a zip archive"
        )
        raise XdlError(f"cannot read {path} as an .npz file: it is {what}; save x and y with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise XdlError(f"cannot read {path} as an .npz file: {message}") from None
    if not isinstance(arrays, dict):  # pragma: no cover - np.load of a .npy
        raise XdlError(f"{path} is a single array, not an .npz archive with 'x' and 'y'")
    for key in ("x", "y"):
        if key not in arrays:
            raise XdlError(f"{path} has no array {key!r}; arrays are: {', '.join(sorted(arrays)) or 'none'}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise XdlError(f"{path} must hold both 'x_test' and 'y_test', or neither")

    notes: list[str] = []
    x_raw = arrays["x"]
    if x_raw.ndim < 2 or len(x_raw) == 0:
        raise XdlError(f"{path}: 'x' has shape {x_raw.shape}; expected at least one row")
    kind = "tabular" if x_raw.ndim == 2 else "image"
    convert = (lambda a, w: _tabular_array(a, w, path)) if kind == "tabular" else (
        lambda a, w: _image_array(a, w, path, notes)
    )
    x = convert(x_raw, "x")
    y = _label_array(arrays["y"], "y", path, len(x))
    test = None
    if "x_test" in arrays:
        if arrays["x_test"].ndim != x_raw.ndim:
            raise XdlError(f"{path}: 'x_test' has shape {arrays['x_test'].shape} but 'x' has shape {x_raw.shape}")
        xt = convert(arrays["x_test"], "x_test")
        if xt.shape[1:] != x.shape[1:]:
            raise XdlError(f"{path}: 'x_test' rows have shape {xt.shape[1:]} but 'x' rows have shape {x.shape[1:]}")
        yt = _label_array(arrays["y_test"], "y_test", path, len(xt))
        test = (xt, yt)

    num_classes = int(max(y.max(), test[1].max() if test is not None and len(test[1]) else 0)) + 1
    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise XdlError(f"{path}: 'class_names' must be a 1-D array of strings")
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
        if len(class_names) < num_classes:
            raise XdlError(f"{path}: labels go up to {num_classes - 1} but 'class_names' names only {len(class_names)} classes")
    else:
        class_names = [str(i) for i in range(num_classes)]
    if len(np.unique(y)) < 2:
        raise XdlError(f"{path}: 'y' has only one class; need at least two")

    train, val, test_split = random_splits(x, y, spec, test=test)
    if kind == "tabular":
        features = [f"f{i}" for i in range(x.shape[1])]
        encoding = Encoding([ColumnEncoding(name, "numeric") for name in features])
        return DataSplits(train, val, test_split, "tabular", class_names, spec, features, encoding, notes)
    return DataSplits(train, val, test_split, "image", class_names, spec, notes=notes)


# ------------------------------------------------------------------------ folder


def _image_files(class_dir: Path) -> list[Path]:
    """Image files under ``class_dir`` (recursively), each real folder visited once: no symlink loops."""
    found: list[Path] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in seen)
        found += [
            Path(root) / f
            for f in sorted(files)
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
        ]
    return found






def _image_options(spec: dict) -> tuple[tuple[int, int] | None, bool | None]:
    """The spec's ``input_size`` (a square side, or [height, width] as an imported model asks)
    and ``channels`` (1 or 3), checked."""
    size, channels = spec.get("input_size"), spec.get("channels")
    sides = list(size) if isinstance(size, (list, tuple)) and len(size) == 2 else [size, size]
    if size is not None and any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096 for v in sides):
        raise XdlError(f"--input-size must be a whole number of pixels in 1..4096, got {size!r}")
    if channels is not None and channels not in (1, 3):
        raise XdlError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return (None if size is None else (sides[0], sides[1])), (None if channels is None else channels == 1)


def _probe(files: list[tuple[Path, int]], size: tuple[int, int] | None, gray: bool | None) -> tuple[tuple[int, int], bool]:
    """The decoded image size and colour, from file headers only (no pixel is decoded).

    Without ``input_size`` the first image's size is the size; without ``channels`` the
    images are colour if any of (a seeded sample of at most PROBE) files is.
    """
    from PIL import Image

    def header(path: Path) -> tuple[tuple[int, int], str]:
        try:
            with Image.open(path) as image:
                return (image.height, image.width), image.mode
        except Exception as exc:  # as in stream.read_image
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise XdlError(f"cannot read image {path}: {message}") from None

    first_size, _ = header(files[0][0])
    if gray is None:
        pick = np.random.default_rng(0).permutation(len(files))[:PROBE] if len(files) > PROBE else range(len(files))
        gray = all(header(files[i][0])[1] in stream.GRAY_MODES for i in pick)
    return size or first_size, gray


PROBE = 256  # files whose header decides grayscale or colour for a streamed folder


def load_folder(spec: dict) -> DataSplits:
    """A folder of class sub-folders of images (png, jpg, jpeg, bmp, gif), class names sorted."""
    root = Path(spec["path"])
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    notes: list[str] = []
    files: list[tuple[Path, int]] = []
    class_names: list[str] = []
    for class_dir in class_dirs:
        images = _image_files(class_dir)
        if not images:
            notes.append(f"skipped folder {class_dir.name!r}: it holds no images")
            continue
        files += [(f, len(class_names)) for f in images]
        class_names.append(class_dir.name)
    if not files:
        raise XdlError(
            f"no images found in {root}: expected one sub-folder per class holding "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} files"
        )
    if len(class_names) < 2:
        raise XdlError(f"{root} has images for only one class ({class_names[0]!r}); need at least two class sub-folders")

    # Split file numbers first (as CSV splits row numbers): --limit then reads only the images it
    # keeps, and a streamed folder holds only paths.
    y = np.array([label for _, label in files], dtype=np.int64)
    parts = random_splits(np.arange(len(files), dtype=np.float64)[:, None], y, spec)
    kept = [part.x[:, 0].long().numpy() for part in parts]
    size, gray = _image_options(spec)
    files = [files[i] for i in np.concatenate(kept)]  # train, val, test, in that order
    decoded, probed_gray = _probe(files, size, gray)
    if len(files) * (1 if probed_gray else 3) * decoded[0] * decoded[1] * 4 > stream.threshold():
        return _streamed(files, parts, kept, class_names, spec, notes, decoded, probed_gray, given=size is not None)
    arrays: list[np.ndarray] = []
    for path, _ in files:
        array = stream.read_image(path, size, gray)
        if arrays and array.shape[:2] != arrays[0].shape[:2]:
            (h0, w0), (h, w) = arrays[0].shape[:2], array.shape[:2]
            raise XdlError(
                f"{path} is {h}×{w} pixels but {files[0][0]} is {h0}×{w0}; "
                "all images must have the same size (resize them first, or pass --input-size)"
            )
        arrays.append(array)
    if min(arrays[0].shape[:2]) < MIN_SIDE:
        h, w = arrays[0].shape[:2]
        raise XdlError(f"the images in {root} are {h}×{w} pixels; images need at least {MIN_SIDE}×{MIN_SIDE}")
    if all(a.ndim == 2 for a in arrays):
        x = np.stack(arrays)[:, None, :, :]
    else:
        x = np.stack([np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a for a in arrays])
        x = np.transpose(x, (0, 3, 1, 2))
        if any(a.ndim == 2 for a in arrays):
            notes.append("converted grayscale images to RGB to match the colour ones")
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0))
    bounds = np.cumsum([0, *map(len, kept)])
    train, val, test = (Split(x[a:b], part.y, part.groups, source=rows)
                        for a, b, part, rows in zip(bounds, bounds[1:], parts, kept))
    return DataSplits(train, val, test, "image", class_names, spec, notes=notes)


def _streamed(files: list[tuple[Path, int]], parts: tuple, kept: list[np.ndarray], class_names: list[str],
              spec: dict, notes: list[str], size: tuple[int, int], gray: bool, given: bool) -> DataSplits:
    """The folder as streamed splits: paths and labels in memory, pixels decoded per batch.

    ``files`` are the kept files in split order (train, val, test); ``parts`` the splits of
    their numbers, ``kept`` each split's numbers in the folder's listing.
    """
    images = stream.ImageFiles([str(path) for path, _ in files], size, gray)
    bounds = np.cumsum([0, *map(len, kept)])
    splits = [Split(stream.LazyImages(images, np.arange(a, b)), p.y, p.groups, source=rows)
              for a, b, p, rows in zip(bounds, bounds[1:], parts, kept)]
    gib = len(files) * (1 if gray else 3) * size[0] * size[1] * 4 / 2**30
    notes.append(f"streaming {len(files)} images ({gib:.1f} GiB decoded) from disk in batches instead of holding them")
    if not given:
        notes.append(f"images are resized and centre-cropped to the first one's {size[0]}×{size[1]}; "
                     "pass --input-size to choose")
    return DataSplits(*splits, "image", class_names, spec, notes=notes)
