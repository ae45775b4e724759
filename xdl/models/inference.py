"""A model prepared for the thousands of evaluations one explanation makes.

Expected gradients, LIME and integrated gradients evaluate the same frozen (eval-mode)
model on many points per sample, so they use a copy with each BatchNorm folded into the
convolution before it and the convolutions in channels-last memory, the layout the CPU's
(oneDNN) and cuDNN's convolution kernels run fastest on: a forward+backward pass takes
about 0.6× the time on the default CNN over 28×28 digits, 0.7× on a ResNet-50 at 224×224.

Which BatchNorm reads which convolution is read off the model's graph, where a convolution
is folded only if the BatchNorm is the one reader of its output: ``torch.fx``'s own ``fuse``
(8 ms on the default CNN), and for a model fx cannot trace — a Hugging Face ResNet, whose
shape checks are Python ``if``s — the graph ``torch.export`` records for the sample's shape
(its first call in a process costs ~1.5 s). Both refuse data-dependent control flow, so the
graph is every path the model can take. The copy computes the same function; a model whose
copy does not give the same outputs on the sample is used as it is.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from xdl import limits


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

    copied = copy.deepcopy(model)
    try:
        # In place on the copy: where fx fails, it fails tracing, before it changes anything.
        copied = fuse(copied, inplace=True)
    except Exception:  # noqa: BLE001 - a model fx cannot trace (control flow, …): export's graph instead
        for conv, norm in _conv_norm_pairs(copied, sample):
            _swap(copied, conv, fuse_conv_bn_eval(copied.get_submodule(conv), copied.get_submodule(norm)))
            _swap(copied, norm, nn.Identity())
    fast = ChannelsLast(copied)
    with torch.inference_mode():
        expected = model(sample)
        try:
            got = fast(sample)
        except RuntimeError:  # x.view(n, -1) on a channels-last map, …
            return model
    scale = expected.abs().max().clamp_min(1.0)
    return fast if got.shape == expected.shape and bool(((got - expected).abs() <= 1e-4 * scale).all()) else model


def _conv_norm_pairs(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) module names where the BatchNorm alone reads the convolution's
    output, each module called once; none when the model does not export."""
    # A refused export prints and logs the graph it got to, which is for torch's developers.
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            graph = torch.export.export(model, (sample,), strict=False).graph
    except Exception:  # noqa: BLE001 - data-dependent control flow, unsupported ops …: nothing is folded
        return []
    finally:
        logging.disable(logging.NOTSET)

    def module(node) -> str | None:
        stack = node.meta.get("nn_module_stack") or {}
        return next(reversed(stack.values()))[0] if stack else None

    calls = [node for node in graph.nodes if node.op == "call_function"]
    called = Counter(module(node) for node in calls if node.target in (*CONVOLUTIONS, *BATCH_NORMS))
    pairs = []
    for node in calls:
        source = node.args[0] if node.target in BATCH_NORMS else None
        if source is None or getattr(source, "target", None) not in CONVOLUTIONS or len(source.users) != 1:
            continue
        conv, norm = module(source), module(node)
        if conv and norm and called[conv] == called[norm] == 1 and _kinds(model, conv, norm):
            pairs.append((conv, norm))
    return pairs


def _kinds(model: nn.Module, conv: str, norm: str) -> bool:
    """Whether the names are an eval-mode Conv2d and a BatchNorm2d that tracks running statistics."""
    try:
        c, b = model.get_submodule(conv), model.get_submodule(norm)
    except AttributeError:
        return False
    return type(c) is nn.Conv2d and type(b) is nn.BatchNorm2d and b.track_running_stats and not b.training


def _swap(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, replacement)


CONVOLUTIONS = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
BATCH_NORMS = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default)


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
    budget = ACTIVATION_BUDGET if budget is None else budget
    free = limits.available_memory() if sample.device.type == "cpu" else torch.cuda.mem_get_info(sample.device)[0]
    room = min(budget, free // 4) if free else budget
    return max(1, room // row_bytes(model, sample))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode and restore each one's own flag afterwards.

    ``model.train(was_training)`` would not do: it would overwrite submodules that the
    caller had deliberately left in another mode (a frozen BatchNorm, say).
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode


def hook_count(model: nn.Module) -> int:
    """Forward/backward hooks registered on the model (analyzers must leave none behind)."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )
