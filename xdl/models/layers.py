"""The layers of any torch model, whatever built it: the module tree, the class-score head, dense layers.

``named_modules`` does not see every layer: a Keras 3 model on the torch backend is a torch
module whose layers are torch modules too, but they sit in the model's ``layers`` list, not
among its registered children (only their parameter dicts are). Hooks on them fire, so
:func:`layer_tree` adds them, named by their Keras names under the model's path.

The features a classifier separates are the input of the module that produces the class
scores. Which module that is, is read off one forward pass rather than off its type: the
last-started module holding weights of its own whose output is shaped like the logits — an
``nn.Linear``, a Keras ``Dense`` (with its softmax inside), the ``Linear`` inside a
Hugging Face head's ``Sequential``, the head after a ViT's final norm.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count

import torch
from torch import nn

from xdl.models.inference import eval_mode


def layer_tree(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` by name, as ``named_modules`` gives them plus the layers of
    any Keras model inside (``<path>.<layer name>``), each module once."""
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_modules(prefix=prefix):
            if id(child) in seen:
                continue
            seen.add(id(child))
            found[name] = child
            for layer in _keras_layers(child):
                visit(f"{name}.{layer.name}" if name else layer.name, layer)

    visit("", model)
    return found


def _keras_layers(module: nn.Module) -> Iterator[nn.Module]:
    """A Keras model's layers that are torch modules (all of them on the torch backend)."""
    if not type(module).__module__.startswith("keras."):
        return
    for layer in getattr(module, "layers", None) or ():
        if isinstance(layer, nn.Module):
            yield layer


@dataclass(frozen=True)
class Head:
    """The module that produces the class scores (``name`` in :func:`layer_tree`), whose input
    is the penultimate representation; ``module`` None: none does, and the logits stand in."""

    name: str
    module: nn.Module | None

    @property
    def described(self) -> str:
        if self.module is None:
            return "the logits (no layer of the model produces the class scores alone)"
        return f"the input of {self.name} ({type(self.module).__name__}), the layer that produces the class scores"


@torch.no_grad()
def score_head(model: nn.Module, sample: torch.Tensor) -> Head:
    """The head of ``model``, found by hooks on one forward pass of ``sample`` (a batch of one or two)."""
    order = count()
    started: dict[int, int] = {}
    outputs: list[tuple[int, str, nn.Module, tuple[int, ...]]] = []

    def before(module: nn.Module, _inputs) -> None:
        started[id(module)] = next(order)

    def after(name: str):
        def hook(module: nn.Module, _inputs, out) -> None:
            if torch.is_tensor(out):
                outputs.append((started.get(id(module), -1), name, module, tuple(out.shape)))
        return hook

    handles = []
    for name, module in layer_tree(model).items():
        # Parameter-free modules (softmax, dropout, flatten) pass the scores on, and a container
        # (a wrapper, a Sequential) only hands them up: neither produces them.
        if name and owns_parameters(module):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after(name))]
    try:
        with eval_mode(model):  # a probe: no BatchNorm statistics may move
            logits = model(sample)
    finally:
        for handle in handles:
            handle.remove()
    scores = [(start, name, module) for start, name, module, shape in outputs if shape == tuple(logits.shape)]
    if not scores:
        return Head("", None)
    _, name, module = max(scores, key=lambda item: item[0])
    return Head(name, module)


def owns_parameters(module: nn.Module) -> bool:
    """Whether the module holds weights itself (directly, or in a parameter container as a Keras
    layer does), rather than only through the layers inside it."""
    if next(module.parameters(recurse=False), None) is not None:
        return True
    return any(isinstance(child, (nn.ParameterDict, nn.ParameterList)) and next(child.parameters(), None) is not None
               for child in module.children())


def is_dense(module: nn.Module) -> bool:
    """A fully connected layer of any origin: ``nn.Linear``, or a Keras ``Dense`` (a 2-D kernel)."""
    if isinstance(module, nn.Linear):
        return True
    kernel = getattr(module, "kernel", None) if type(module).__module__.startswith("keras.") else None
    return kernel is not None and len(getattr(kernel, "shape", ())) == 2


def rectified(module: nn.Module) -> bool:
    """Whether the module's output passed a ReLU (a torch ReLU, or a Keras layer with ``activation="relu"``)."""
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return True
    activation = getattr(module, "activation", None) if type(module).__module__.startswith("keras.") else None
    return getattr(activation, "__name__", "") in ("relu", "relu6")
