"""Exact and near duplicates among many samples, without a quadratic Python loop.

Exact copies are rows with identical bytes, grouped by sorting (``np.unique`` over the rows
viewed as opaque byte strings: no hash collisions to worry about). Near copies are pairs whose
unit-normalized vectors have cosine similarity at or above a threshold, found by chunked matrix
products (``chunk`` rows against all N at a time, so memory stays chunk × N). The perceptual hash
is the classic DCT hash (Zauner 2010, "pHash"): images resized to 32×32, a 2-D DCT as two matrix
products, the 8×8 lowest frequencies (DC excluded) compared to their median, 63 bits per image.
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


def phash(images: torch.Tensor, size: int = 32, keep: int = 8) -> torch.Tensor:
    """DCT perceptual hashes of N×C×H×W images as N×(keep²−1) booleans."""
    gray = images.float().mean(1, keepdim=True)
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
