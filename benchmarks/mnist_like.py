"""A stand-in for MNIST in its real distribution format, made offline from sklearn's digits.

No network reaches this machine, so the MNIST benchmarks run on IDX files written here:
digits upsampled to 28×28 and varied by random affine transforms and stroke noise. Train
and test images come from disjoint source digits, so test accuracy measures generalization
to unseen writers' digits, not to transformed copies of training images.

    python benchmarks/mnist_like.py DIR [--train 8000] [--test 2000]
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def _variants(images: np.ndarray, labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(images), (count,), generator=g)
    x = torch.as_tensor(images, dtype=torch.float32)[pick][:, None] / 16.0
    # 8×8 → 20×20 digit in a 28×28 frame, as MNIST centres a 20×20 box.
    x = F.pad(F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    angle = (torch.rand(count, generator=g) * 2 - 1) * 0.25
    scale = 1 + (torch.rand(count, generator=g) * 2 - 1) * 0.1
    shift = (torch.rand(count, 2, generator=g) * 2 - 1) * 0.1
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    x = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return (x[:, 0] * 255).round().to(torch.uint8).numpy(), labels[pick.numpy()].astype(np.uint8)


def _write_idx(path: Path, array: np.ndarray) -> None:
    # IDX: magic 0x00 0x00 <dtype 0x08 = ubyte> <ndim>, then big-endian int32 dims, then data.
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def write_mnist_like(folder: str | Path, train: int = 8000, test: int = 2000, seed: int = 0) -> Path:
    """Write train/t10k IDX files (gzipped) into ``folder``; returns the folder."""
    from sklearn.datasets import load_digits

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    cut = int(0.8 * len(order))
    for prefix, idx, count in (("train", order[:cut], train), ("t10k", order[cut:], test)):
        x, y = _variants(digits.images[idx], digits.target[idx], count, seed + len(prefix))
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--test", type=int, default=2000)
    args = parser.parse_args()
    print(write_mnist_like(args.dir, args.train, args.test))
