"""A model prepared for the thousands of evaluations one explanation makes.

Expected gradients, LIME and integrated gradients evaluate the same frozen (eval-mode)
model on many points per sample, so they use a copy with each BatchNorm folded into the
convolution before it (``torch.fx``'s own ``fuse``) and the convolutions in channels-last
memory, the layout the CPU's (oneDNN) and cuDNN's convolution kernels run fastest on: on
the default CNN a forward+backward pass over 28×28 digits takes about 0.6× the time. The
copy computes the same function; a model that torch.fx cannot trace, or whose copy does not
give the same outputs on the sample, is used as it is.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn


class ChannelsLast(nn.Module):
    """Runs the wrapped model on channels-last images; gradients come back in the caller's layout."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)


def fast_model(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """A faster copy of an eval-mode ``model`` that gives the same outputs on ``sample`` (else ``model``)."""
    if model.training or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        fast = ChannelsLast(fuse(copy.deepcopy(model)))
    except Exception:  # noqa: BLE001 - any model fx cannot trace (data-dependent control flow, ...) runs unfused
        return model
    with torch.inference_mode():
        expected, got = model(sample), fast(sample)
    scale = expected.abs().max().clamp_min(1.0)
    return fast if got.shape == expected.shape and bool(((got - expected).abs() <= 1e-4 * scale).all()) else model


# Activations one model call may keep for its backward pass. At 8×8–32×32 it never binds (the
# default CNN keeps ~50 KB per 28×28 digit); at 224×224 it is what keeps memory bounded: a
# ResNet-50 keeps 82 MiB per image, so --batch-size 256 in one call would need over 20 GB.
ACTIVATION_BUDGET = 512 * 2**20


def row_bytes(model: nn.Module, sample: torch.Tensor) -> int:
    """Bytes autograd saves per input row of ``model`` at ``sample``'s shape.

    Measured, not estimated: the tensors saved during a forward pass over one row, each
    storage once, less the weights and buffers (saved once per call, whatever its size).
    """
    fixed = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in fixed:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = sample[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _hooks_off(model):
        model(x)
    return max(sum(seen.values()), 4 * sample[0].numel())


@contextlib.contextmanager
def _hooks_off(model: nn.Module) -> Iterator[None]:
    """The modules' forward hooks set aside: the probe runs lazily, on an analyzer's first
    batch, when the analyzer may already have hooked the model to capture what its passes see."""
    kept = [(m, m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    for m, _, _ in kept:
        m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        for m, hooks, pre in kept:
            m._forward_hooks, m._forward_pre_hooks = hooks, pre


def rows_per_pass(model: nn.Module, sample: torch.Tensor, budget: int | None = None) -> int:
    """How many rows like ``sample`` one forward+backward call of ``model`` may take within ``budget``
    bytes of saved activations (default :data:`ACTIVATION_BUDGET`) and a quarter of the memory
    that is free; at least 1."""
    from xdl.limits import available_memory

    budget = ACTIVATION_BUDGET if budget is None else budget
    free = available_memory() if sample.device.type == "cpu" else torch.cuda.mem_get_info(sample.device)[0]
    room = min(budget, free // 4) if free else budget
    return max(1, room // row_bytes(model, sample))
