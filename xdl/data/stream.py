"""Streamed image splits: a split too large to hold decoded is a view of its files.

A folder's images are decoded only when a batch of them is asked for, by Pillow in
DataLoader worker processes; the split itself holds file paths and labels (a few bytes
per image), never pixels. :class:`LazyImages` looks enough like an N×C×H×W float tensor
that code written for tensors keeps working where it only reads some samples: ``x[i]``,
``x[a:b]`` and ``x[indices]`` decode just those images, ``len(x)`` and ``x.shape`` cost
nothing. A pass over a whole split goes through :func:`batches`, which for a tensor is
plain slicing (the in-memory fast path) and for a view is decoding in workers, so memory
is bounded by the batch size, not by the folder.

Which path a folder takes is decided by its decoded size (:func:`threshold`); both paths
decode with the same function, so a result does not depend on it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from xdl.errors import XdlError

__all__ = ["EpochLoader", "ImageFiles", "LazyImages", "batches", "is_streamed", "select", "threshold", "workers"]

THRESHOLD = 256 * 2**20  # decoded float32 bytes above which a split streams (env XDL_STREAM_BYTES)
INLINE = 64  # up to this many images are decoded in this process; more go to the workers
STATS_SAMPLES = 2000  # images a mean/std is estimated from (a seeded sample; exact below it)


def _env_count(name: str, unit: str) -> int | None:
    """A non-negative whole number from environment variable ``name``; None when it is unset."""
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        count = int(value)
    except ValueError:
        raise XdlError(f"{name} must be a whole number{unit}, got {value!r}") from None
    if count < 0:
        raise XdlError(f"{name} must be ≥ 0, got {count}")
    return count


def threshold() -> int:
    """Decoded bytes above which an image folder is streamed instead of held in memory."""
    limit = _env_count("XDL_STREAM_BYTES", " of bytes")
    return THRESHOLD if limit is None else limit


def workers() -> int:
    """Decoding processes: XDL_WORKERS, else one per usable core (at most 8; 0 decodes in this process)."""
    count = _env_count("XDL_WORKERS", "")
    if count is not None:
        return count
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(usable, 8)


# -----------------------------------------------------------------------------------------
# Decoding
# -----------------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """Image files decoded to uint8 C×H×W, resized and centre-cropped to ``size`` (H, W).

    Workers return uint8 (a quarter of float32's bytes through the worker queues); a file
    that cannot be read comes back as its error message, raised in the main process, so
    the user sees one clean line instead of a worker traceback.
    """

    def __init__(self, paths: Sequence[str], size: tuple[int, int], gray: bool):
        self.paths = list(paths)
        self.size = size
        self.gray = gray

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | str:
        try:
            array = read_image(Path(self.paths[i]), self.size, self.gray)
        except XdlError as exc:
            return str(exc)
        image = torch.from_numpy(array)
        return image[None] if image.dim() == 2 else image.permute(2, 0, 1).contiguous()


def _collate(items: list) -> torch.Tensor | str:
    bad = next((item for item in items if isinstance(item, str)), None)
    return bad if bad is not None else torch.stack(items)


def _to_float(batch: torch.Tensor | str, device: torch.device | None) -> torch.Tensor:
    if isinstance(batch, str):
        raise XdlError(batch)
    if device is not None:
        batch = batch.to(device, non_blocking=True)
    # The same float32 division as the in-memory loader, so both paths give equal inputs.
    return batch.float().div_(255.0)


def _return_big_buffers() -> None:
    """Have glibc give batch-sized buffers back to the OS when they are freed.

    After the first large free glibc raises its mmap threshold and serves later batch-sized
    tensors from the heap, where the small tensors kept per batch (per-sample metrics) pin
    the freed space: the process then grows with the number of batches, not their size
    (measured: +500 MiB over 34 FGSM batches of 7 MiB). A fixed threshold, as the
    MALLOC_MMAP_THRESHOLD_ variable would set, keeps every buffer over 1 MiB in its own
    mapping. Only streaming sets it; elsewhere (macOS, musl) there is nothing to do.
    """
    global _BUFFERS_RETURNED
    if _BUFFERS_RETURNED:
        return
    _BUFFERS_RETURNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_BUFFERS_RETURNED = False


def _loader(dataset: Dataset, **options) -> DataLoader:
    _return_big_buffers()
    count = workers()
    # Its own generator: iterating a DataLoader draws a worker seed, which from the global
    # generator would shift every later random draw (PGD's start, dropout) against the in-memory path.
    return DataLoader(
        dataset, num_workers=count, persistent_workers=count > 0, collate_fn=_collate,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0), **options,
    )


# -----------------------------------------------------------------------------------------
# A split's images, as a tensor-like view
# -----------------------------------------------------------------------------------------


class LazyImages:
    """The images ``files[index]`` as a read-only N×C×H×W float32 "tensor" in [0, 1].

    Indexing decodes (and returns a real tensor); :meth:`view` selects without decoding;
    :meth:`batches` streams the whole view through persistent workers. Tensor methods that
    would need every image at once raise an XdlError saying so.
    """

    dtype = torch.float32

    def __init__(self, files: ImageFiles, index: np.ndarray | Sequence[int]):
        self.files = files
        self.index = np.asarray(index, dtype=np.int64)
        self._loaders: dict[int, DataLoader] = {}
        self._moments: tuple[np.ndarray, np.ndarray, int] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} images of {tuple(self.shape[1:])} from {len(self.files)} files)"

    @property
    def shape(self) -> torch.Size:
        h, w = self.files.size
        return torch.Size((len(self), 1 if self.files.gray else 3, h, w))

    @property
    def sample_bytes(self) -> int:
        """Bytes of one decoded float32 image."""
        return 4 * int(np.prod(self.shape[1:]))

    def dim(self) -> int:
        return 4

    def paths(self) -> list[str]:
        """The files of this view, in its order."""
        return [self.files.paths[i] for i in self.index]

    def __array__(self, *args, **kwargs):
        # Without it numpy would build the array image by image through __getitem__.
        self.numpy()

    def view(self, index: np.ndarray | Sequence[int] | torch.Tensor) -> "LazyImages":
        """The images at positions ``index`` of this view, still undecoded."""
        return LazyImages(self.files, self.index[_positions(len(self), index)])

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return self._decode(_positions(len(self), [key]))[0]
        if isinstance(key, tuple):
            raise XdlError("a streamed split can be indexed along its samples only")
        return self._decode(_positions(len(self), key))

    def _decode(self, positions: np.ndarray) -> torch.Tensor:
        if len(positions) <= INLINE:
            return _to_float(_collate([self.files[int(i)] for i in self.index[positions]]), None) if len(positions) else (
                torch.empty(0, *self.shape[1:])
            )
        return torch.cat([xb for _, xb in self.view(positions).batches(256)])

    def batches(self, batch_size: int, device: torch.device | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """(positions, images) batches in order, decoded by workers that stay up between passes."""
        loader = self._loaders.get(batch_size)
        if loader is None:
            loader = self._loaders[batch_size] = _loader(Subset(self.files, self.index), batch_size=batch_size)
        start = 0
        for batch in loader:
            xb = _to_float(batch, device)
            yield slice(start, start + len(xb)), xb
            start += len(xb)

    def mean(self, dim: int | Sequence[int] = 0, keepdim: bool = False) -> torch.Tensor:
        """The mean over ``dim`` (which must include 0), estimated from at most STATS_SAMPLES images."""
        return self._moment(dim, keepdim)[0]

    def std(self, dim: int | Sequence[int] = 0, keepdim: bool = False) -> torch.Tensor:
        """The (unbiased) standard deviation over ``dim``, from the same sample as :meth:`mean`."""
        return self._moment(dim, keepdim)[1]

    def _moment(self, dim: int | Sequence[int], keepdim: bool) -> tuple[torch.Tensor, torch.Tensor]:
        dims = sorted({d % 4 for d in ([dim] if isinstance(dim, int) else dim)})
        if 0 not in dims:
            raise XdlError("a streamed split can be averaged over its samples (dim 0) only")
        if self._moments is None:
            # Sums per element in float64 over one pass: no N×C×H×W tensor, and no cancellation
            # to speak of for values in [0, 1].
            n = min(len(self), STATS_SAMPLES)
            sample = np.sort(np.random.default_rng(0).permutation(len(self))[:n]) if n < len(self) else np.arange(n)
            total = np.zeros(tuple(self.shape[1:]))
            squares = np.zeros(tuple(self.shape[1:]))
            for _, xb in self.view(sample).batches(256):
                values = xb.double().numpy()
                total += values.sum(0)
                squares += (values**2).sum(0)
            self._moments = (total, squares, n)
        total, squares, n = self._moments
        inner = tuple(d - 1 for d in dims if d > 0)
        count = n * int(np.prod([total.shape[d] for d in inner]))
        s1, s2 = total.sum(inner, keepdims=True), squares.sum(inner, keepdims=True)
        mean = s1 / count
        var = np.maximum(s2 - s1 * mean, 0.0) / max(count - 1, 1)
        out = [torch.as_tensor(v, dtype=torch.float32)[None] for v in (mean, np.sqrt(var))]
        if not keepdim:
            out = [t.squeeze(tuple(dims)) for t in out]
        return out[0], out[1]

    def __getattr__(self, name: str):
        # Tensor methods that need every pixel at once (x.numpy(), x.to(device), x.sum() …).
        if not name.startswith("_") and hasattr(torch.Tensor, name):
            gib = len(self) * self.sample_bytes / 2**30
            raise XdlError(
                f"this split is streamed from image files ({len(self)} images, {gib:.1f} GiB decoded), "
                f"and {name}() would need all of it in memory; analyze fewer samples (--samples), "
                "or raise XDL_STREAM_BYTES to hold it"
            )
        raise AttributeError(name)


def _positions(n: int, key) -> np.ndarray:
    """Positions 0..n-1 picked by an int list, array, tensor, bool mask or slice (as tensors index)."""
    if isinstance(key, torch.Tensor):
        key = key.cpu().numpy()
    if isinstance(key, slice):
        return np.arange(n)[key]
    key = np.asarray(key)
    if key.dtype == np.bool_:
        if key.shape != (n,):
            raise XdlError(f"a mask of shape {key.shape} does not fit {n} samples")
        return np.flatnonzero(key)
    key = key.astype(np.int64).reshape(-1)
    bad = key[(key < -n) | (key >= n)]
    if bad.size:
        raise IndexError(f"index {int(bad[0])} is out of range for {n} samples")
    return np.where(key < 0, key + n, key)


# -----------------------------------------------------------------------------------------
# One way to walk any split
# -----------------------------------------------------------------------------------------


def is_streamed(x) -> bool:
    return isinstance(x, LazyImages)


def batches(
    x: torch.Tensor | LazyImages, batch_size: int, device: torch.device | None = None, rows: slice | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(positions, inputs) over ``x`` (or its ``rows``) in order: tensor slices, or decoded batches.

    With ``device`` the inputs arrive there (a streamed batch as uint8, converted on the device).
    """
    rows = slice(0, len(x)) if rows is None else rows
    start, stop = rows.start or 0, len(x) if rows.stop is None else rows.stop
    if isinstance(x, LazyImages):
        part = x if (start, stop) == (0, len(x)) else x.view(np.arange(start, stop))
        for s, xb in part.batches(batch_size, device):
            yield slice(start + s.start, start + s.stop), xb
        return
    for first in range(start, stop, batch_size):
        s = slice(first, min(first + batch_size, stop))
        yield s, x[s] if device is None else x[s].to(device, non_blocking=True)


def select(x: torch.Tensor | LazyImages, index: np.ndarray) -> torch.Tensor | LazyImages:
    """The samples at ``index``: a tensor, unless they are streamed and too large to decode at once."""
    if isinstance(x, LazyImages) and len(index) * x.sample_bytes > threshold():
        return x.view(index)
    return x[torch.as_tensor(np.asarray(index), dtype=torch.long)]


class _Order:
    """A batch sampler whose batches are set per epoch (the loader, and its workers, persist)."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class EpochLoader:
    """Training batches of a streamed split, in an order the trainer draws each epoch."""

    def __init__(self, x: LazyImages, device: torch.device):
        self.x, self.device, self.order = x, device, _Order()
        self.loader = _loader(x.files, batch_sampler=self.order)

    def epoch(self, order: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The images of each batch of positions in ``order``, on the device."""
        self.order.batches = [self.x.index[idx.cpu().numpy()] for idx in order]
        for batch in self.loader:
            yield _to_float(batch, self.device)


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def read_image(path: Path, size: tuple[int, int] | None = None, gray: bool | None = None) -> np.ndarray:
    """uint8 H×W (grayscale) or H×W×3 (colour); ``gray`` forces one, else the file's own decides.

    With ``size`` (H, W) the image is scaled so that it covers H×W and centre-cropped to it
    (Pillow's ``ImageOps.fit``): the shorter side is kept whole, the longer one trimmed.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            if size is not None:
                # JPEG only: decode at the smallest 1/2^k scale still covering ``size`` (much faster).
                image.draft(None, (size[1], size[0]))
            image.load()
            native_gray = image.mode in GRAY_MODES
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                array = np.asarray(image, dtype=np.float64)
                top = 65535.0 if array.max() > 255 else 255.0
                image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8))
            image = image.convert("L" if (native_gray if gray is None else gray) else "RGB")
            if size is not None and image.size != (size[1], size[0]):
                image = ImageOps.fit(image, (size[1], size[0]), Image.Resampling.BILINEAR)
            return np.array(image, dtype=np.uint8)  # writable: torch.from_numpy refuses read-only arrays
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, …)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise XdlError(f"cannot read image {path}: {message}") from None
