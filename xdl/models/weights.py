"""Weights on disk as safetensors: read without unpickling, refused when not finite."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from xdl.errors import XdlError
from xdl.io import atomic_path

WEIGHTS = "model.safetensors"


WEIGHTS = "model.safetensors"


def save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage; contiguous CPU copies make every tensor its own.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_weights(model: nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise XdlError(f"cannot read weights {path}: {exc}") from None
    check_finite_weights(state, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise XdlError(f"weights in {path} do not fit the model in run.json: {first[-1].strip()}") from None


def check_finite_weights(state: dict, path: str | Path) -> None:
    """NaN or infinite weights make every later number meaningless: refuse them, naming the tensor."""
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise XdlError(f"{path} holds non-finite weights (NaN or inf) in {name!r}; the model cannot be used")
