"""Device choice and seeding, with no side effects at import time."""

from __future__ import annotations

import operator
import random
from typing import Any

import numpy as np
import torch

from xdl.errors import XdlError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; asking for a missing device is a user error."""
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise XdlError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise XdlError("--device mps was asked for, but MPS is not available")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise XdlError(f"unknown device {name!r}: choose auto, cpu, cuda or mps")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype mixed-precision training autocasts to on ``device``, or None where it would not pay.

    CUDA: bf16 where the GPU has it, else fp16 (with loss scaling). CPU: bf16 only where oneDNN
    runs it natively (AVX512-BF16 or AMX): there the default CNN's whole ``xdl train`` on 3,600
    real MNIST digits took 10.8 s instead of 16.1 s, at 0.2 points lower test accuracy on average
    (98.26% vs 98.46%, seeds 0-7, benchmarks/bench_recipe.py); emulated bf16 would be slower than
    fp32. MPS: none.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        except (AttributeError, RuntimeError):  # a build without the oneDNN query
            return None
    return None


def check_seed(seed: Any) -> int:
    """``seed`` as an int that numpy and torch accept, or an XdlError."""
    try:
        seed = operator.index(seed)
    except TypeError:
        raise XdlError(f"seed must be an integer, not {type(seed).__name__}") from None
    if not -(2**63) <= seed < 2**64:  # numpy and torch overflow beyond 64 bits
        raise XdlError("seed must fit in 64 bits")
    return seed


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a CPU generator for shuffling."""
    seed = check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
