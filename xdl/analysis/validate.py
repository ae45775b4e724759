"""Checks on what a Python caller hands to ``xdl.explain/attack/report`` with a live model.

A run directory's inputs are checked by its loaders; a live model and its tensors come
straight from the caller, so misuse (a string array, a model on the meta device, labels
that do not fit) is caught here, as one XdlError sentence, before any analyzer sees it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from xdl.errors import XdlError

MAX_INDEX = 2**31 - 1


def check_model(model: nn.Module) -> None:
    """A model whose weights hold values, in a precision gradients are reliable in."""
    params = list(model.parameters()) + list(model.buffers())
    if any(p.is_meta for p in params):
        raise XdlError(
            "the model's weights are on the meta device (shapes without values); load its weights "
            "first, e.g. model.to_empty(device='cpu') and model.load_state_dict(...)"
        )
    low = next((p.dtype for p in params if p.is_floating_point() and p.dtype not in (torch.float32, torch.float64)), None)
    if low is not None:
        raise XdlError(
            f"the model holds {str(low).replace('torch.', '')} weights; xdl analyzes float32 models "
            "(gradients in half precision are unreliable): pass model.float()"
        )


def as_samples(x: Any, gray_hw: bool = False) -> torch.Tensor:
    """``x`` as float32 N×F (tabular) or N×C×H×W (images) in the data's natural range.

    ``gray_hw`` also takes N×H×W grayscale images, for a live model that wants them so
    (a Keras ``Flatten`` first layer); the caller adds the channel axis.
    """
    if torch.is_tensor(x):
        array_dtype = x.dtype
        tensor = x.detach()
    else:
        try:
            array = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise XdlError(f"x must be an array of numbers: {str(exc).splitlines()[0]}") from None
        if array.dtype.kind not in "biuf":
            raise XdlError(f"x must hold numbers, not {array.dtype} values")
        tensor = torch.as_tensor(array)
        array_dtype = tensor.dtype
    if tensor.dim() not in ((2, 3, 4) if gray_hw else (2, 4)):
        hint = "; add the channel axis with x[:, None]" if tensor.dim() == 3 else ""
        raise XdlError(
            f"x has shape {tuple(tensor.shape)}: xdl analyzes N×F rows (tabular) or N×C×H×W images{hint}"
        )
    if len(tensor) == 0:
        raise XdlError("x holds no samples")
    if tensor.is_complex():
        raise XdlError("x must hold real numbers, not complex ones")
    if tensor.dim() >= 3 and not array_dtype.is_floating_point:
        # 0..255 pixels read as floats would be 255× too bright for a model trained on [0, 1].
        raise XdlError(
            f"x holds {str(array_dtype).replace('torch.', '')} images; xdl takes images as floats in [0, 1]: "
            "pass x / 255.0 for 0..255 pixels"
        )
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        raise XdlError(f"x holds {int((~torch.isfinite(tensor)).sum())} NaN or infinite values")
    return tensor


def as_labels(y: Any, n: int) -> torch.Tensor:
    """``y`` as one integer class per sample."""
    try:
        labels = y.detach() if torch.is_tensor(y) else torch.as_tensor(np.asarray(y))
    except (ValueError, TypeError) as exc:
        raise XdlError(f"y must be integer class labels: {str(exc).splitlines()[0]}") from None
    if labels.dim() != 1 or len(labels) != n:
        raise XdlError(f"y has shape {tuple(labels.shape)}; expected one label per sample of x ({n})")
    if labels.is_floating_point():
        if not bool((labels == labels.round()).all()):
            raise XdlError("y holds non-integer values; labels are class indices 0, 1, 2, …")
    elif labels.dtype == torch.bool or labels.is_complex():
        raise XdlError(f"y holds {labels.dtype} values; labels are class indices 0, 1, 2, …")
    return labels.long()


def check_labels(y: torch.Tensor | None, num_classes: int) -> None:
    if y is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise XdlError(f"y holds label {bad}, but the model has classes 0..{num_classes - 1}")


def check_indices(indices: Any) -> list[int] | None:
    """Sample indices as Python ints within what numpy can index, or None for 'not given'."""
    if indices is None:
        return None
    try:
        items = [int(i) for i in indices]
    except (TypeError, ValueError):
        raise XdlError("indices must be a list of integer sample positions") from None
    if not items:
        raise XdlError("indices is empty: give at least one sample position")
    wild = next((i for i in items if abs(i) > MAX_INDEX), None)  # the split's own range is checked later
    if wild is not None:
        raise XdlError(f"sample index {wild if abs(wild) < 10**12 else 'huge'} is out of range")
    return items
