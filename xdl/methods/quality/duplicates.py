"""Exact and near duplicates among many samples, without a quadratic Python loop.

Exact copies are rows with identical bytes, grouped by sorting (``np.unique`` over the rows
viewed as opaque byte strings: no hash collisions to worry about). Near copies are pairs whose
unit-normalized vectors have cosine similarity at or above a threshold, found by chunked matrix
products (``chunk`` rows against all N at a time, so memory stays chunk × N). The perceptual hash
is the classic DCT hash (Zauner 2010, "pHash"): images resized to 32×32, a 2-D DCT as two matrix
products, the 14×14 lowest frequencies (DC excluded) compared to their median: 195 bits per
image (the classic 63 bits call two different handwritten 1s the same). Images are smoothed
and centred on their ink first, so noise and small shifts barely move the hash.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F


def exact_groups(rows: np.ndarray) -> np.ndarray:
    """For each row, a group id shared by exactly the rows with the same bytes (ids 0..G−1)."""
    flat = np.ascontiguousarray(rows.reshape(len(rows), -1))
    opaque = flat.view(np.dtype((np.void, flat.dtype.itemsize * flat.shape[1]))).ravel()
    return np.unique(opaque, return_inverse=True)[1].ravel()


def _dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix: D @ v is the DCT of v."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


def centred(gray: torch.Tensor) -> torch.Tensor:
    """N×1×H×W images translated (bilinear, sub-pixel) so their intensity centroid is the centre.

    A copy moved by a pixel or two then hashes like its original (MNIST itself centres digits
    by centre of mass); on photos, whose centroid sits near the middle anyway, it changes little.
    """
    n, _, h, w = gray.shape
    # Only above-average pixels weigh: faint noise over the background must not drag the centroid.
    ink = (gray - gray.mean((1, 2, 3), keepdim=True)).clamp(min=0)
    mass = ink.sum((1, 2, 3)).clamp(min=1e-8)
    ys = torch.linspace(-1, 1, h) if h > 1 else torch.zeros(1)
    xs = torch.linspace(-1, 1, w) if w > 1 else torch.zeros(1)
    cy = (ink.sum((1, 3)) * ys).sum(1) / mass  # centroid in grid_sample's [−1, 1] coordinates
    cx = (ink.sum((1, 2)) * xs).sum(1) / mass
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = cx, cy
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=True)
    return F.grid_sample(gray, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def phash(images: torch.Tensor, size: int = 32, keep: int = 14) -> torch.Tensor:
    """DCT perceptual hashes of N×C×H×W images (centroid-aligned first) as N×(keep²−1) booleans."""
    # A 3×3 mean filter first, as pHash does, so pixel noise barely moves the low frequencies.
    gray = centred(F.avg_pool2d(images.float().mean(1, keepdim=True), 3, 1, 1, count_include_pad=False))
    small = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[:, 0]
    d = _dct_matrix(size)
    low = (d @ small @ d.T)[:, :keep, :keep].reshape(len(images), -1)[:, 1:]  # DC is the mean brightness only
    return low > low.median(1, keepdim=True).values


def similar_pairs(a: torch.Tensor, threshold: float, b: torch.Tensor | None = None, chunk: int = 1024,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j) with cos(a_i, b_j) ≥ threshold, and their similarity.

    Without ``b``, pairs within ``a`` with i < j. Rows of zeros have similarity 0 with everything.
    """
    a = F.normalize(a.float(), dim=1)
    same = b is None
    b = a if same else F.normalize(b.float(), dim=1)
    rows, cols, sims = [], [], []
    starts = range(0, len(a), chunk)
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="near duplicates", unit="chunk", leave=False, file=sys.stderr, dynamic_ncols=True)
    for start in starts:
        block = a[start:start + chunk]
        # Within one set only the upper triangle is needed: columns from this chunk's first row on.
        first = start if same else 0
        s = block @ b[first:].T
        i, j = torch.nonzero(s >= threshold, as_tuple=True)
        if same:
            upper = (j + first) > (i + start)
            i, j = i[upper], j[upper]
        rows.append((i + start).numpy())
        cols.append((j + first).numpy())
        sims.append(s[i, j].numpy())
    if not rows:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)


def hamming(bits: torch.Tensor, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Hamming distance between the bit vectors of rows i and j, pair by pair."""
    ii, jj = torch.as_tensor(i, dtype=torch.long), torch.as_tensor(j, dtype=torch.long)
    return (bits[ii] != bits[jj]).sum(1).numpy()


def signs(bits: torch.Tensor) -> torch.Tensor:
    """Bits as ±1 / √L: unit vectors whose dot product is 1 − 2·Hamming / L."""
    return (bits.float() * 2 - 1) / math.sqrt(bits.shape[1])


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component id per node of the graph with edges (i, j): duplicate groups."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]
