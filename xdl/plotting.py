"""Figures every analyzer shares: image grids, attribution overlays, bar charts.

matplotlib is imported inside each function (``import xdl`` must stay light), and figures
are built as bare ``matplotlib.figure.Figure`` objects, not through pyplot: no GUI
backend is touched, nothing is registered globally, so figures cannot leak between runs.
``Result.add_figure`` renders one to PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Inches per image panel: small enough that 16 samples fit on a report page.
PANEL = 1.6


def _hwc(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """C×H×W (or H×W) in [0, 1] → something imshow draws: H×W with a gray map, or H×W×3."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 2:
        return np.clip(image, 0, 1), "gray"
    if image.ndim == 3 and image.shape[0] in (3, 4):
        return np.clip(np.moveaxis(image[:3], 0, -1), 0, 1), None
    # Any other channel count has no natural colour: show the channel mean.
    return np.clip(image.mean(0), 0, 1), "gray"


def _figure(rows: int, cols: int, width: float = PANEL, height: float = PANEL) -> tuple["Figure", np.ndarray]:
    from matplotlib.figure import Figure

    fig_height = rows * height + 0.3
    fig = Figure(figsize=(cols * width, fig_height))
    # Fixed margins rather than a constrained layout, which costs as much as the drawing itself.
    top = 1 - 0.3 / fig_height
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def sample_titles(
    y_true: Sequence[int] | np.ndarray | None,
    y_pred: Sequence[int] | np.ndarray,
    confidence: Sequence[float] | np.ndarray,
    class_names: Sequence[str] | None = None,
) -> list[str]:
    """Panel titles like ``"true 3 / pred 3 (0.98)"`` (``"pred 3 (0.98)"`` without labels)."""
    names = list(class_names) if class_names else None

    def label(i: int) -> str:
        return names[i] if names and 0 <= i < len(names) else str(i)

    titles = []
    for k, (pred, conf) in enumerate(zip(np.asarray(y_pred).tolist(), np.asarray(confidence).tolist())):
        text = f"pred {label(int(pred))} ({conf:.2f})"
        if y_true is not None:
            text = f"true {label(int(np.asarray(y_true)[k]))} / {text}"
        titles.append(text)
    return titles


def image_grid(images: np.ndarray, titles: Sequence[str] | None = None, ncols: int = 8) -> "Figure":
    """Images (N×C×H×W or N×H×W, values in [0, 1]) in a grid, one title each."""
    images = np.asarray(images)
    n = len(images)
    cols = max(1, min(ncols, n))
    fig, axes = _figure(max(1, math.ceil(n / cols)), cols)
    for i, image in enumerate(images):
        ax = axes.flat[i]
        pixels, cmap = _hwc(image)
        ax.imshow(pixels, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        if titles is not None and i < len(titles):
            ax.set_title(titles[i], fontsize=7)
    return fig


def attribution_grid(
    x: np.ndarray,
    attributions: np.ndarray,
    titles: Sequence[str] | None = None,
    cmap: Literal["bwr", "hot"] | str = "bwr",
    max_samples: int = 16,
    ncols: int = 4,
) -> "Figure":
    """For each sample, the input and its heat map laid over it.

    Attributions are summed over channels. Signed maps are drawn symmetric around 0 (white
    is "no effect", so red and blue compare fairly); non-negative maps (saliency, Grad-CAM)
    from 0 up. Each sample is scaled to its own largest magnitude: the figure shows where a
    model looks, not how the magnitudes of different samples compare (arrays.npz has those).
    """
    x = np.asarray(x, dtype=np.float32)[:max_samples]
    heat = np.asarray(attributions, dtype=np.float32)[:max_samples]
    if heat.ndim == 4:
        heat = heat.sum(1)
    n = len(x)
    pairs = max(1, min(ncols, n))
    fig, axes = _figure(max(1, math.ceil(n / pairs)), 2 * pairs)
    signed = bool((heat < 0).any())
    for i in range(n):
        image_ax, heat_ax = axes.flat[2 * i], axes.flat[2 * i + 1]
        pixels, gray = _hwc(x[i])
        image_ax.imshow(pixels, cmap=gray, vmin=0, vmax=1, interpolation="nearest")
        if titles is not None and i < len(titles):
            image_ax.set_title(titles[i], fontsize=7)
        scale = float(np.abs(heat[i]).max()) or 1.0
        heat_ax.imshow(pixels.mean(-1) if pixels.ndim == 3 else pixels, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        heat_ax.imshow(
            heat[i], cmap=cmap, alpha=0.65, interpolation="nearest",
            vmin=-scale if signed else 0.0, vmax=scale,
        )
    return fig


def bar_chart(names: Sequence[str], values: np.ndarray, title: str = "", xlabel: str = "") -> "Figure":
    """Horizontal bars sorted by value, the largest at the top."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values)  # barh draws bottom-up, so ascending puts the largest on top
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 0.8 + 0.28 * len(values)), layout="constrained")
    ax = fig.subplots()
    ax.barh([str(names[i]) for i in order], values[order], color="tab:blue")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.tick_params(axis="y", labelsize=8)
    return fig
