"""Models built from JSON-able configs.

Every model starts with a ``Normalize`` layer holding the training data's statistics, so
it takes inputs in the data's natural range ([0, 1] for images). That one rule makes an
attack's eps and an explanation's baseline mean the same thing for every model.
"""

from __future__ import annotations

import importlib
import inspect
import math
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from xdl.errors import XdlError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "elu": nn.ELU}

DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [256, 128], "activation": "relu", "dropout": 0.0, "batch_norm": False},
    # Two conv stages suit 8×8 digits up to 28×28 MNIST; CIFAR-sized inputs want a third.
    "cnn": {"channels": [32, 64], "hidden": 128, "activation": "relu", "dropout": 0.0, "batch_norm": True},
    # The MNIST network of Papernot et al. 2021 ("Tempered Sigmoid Activations for Deep Learning
    # with Differential Privacy"), ~35k parameters, so DP-SGD's per-record gradients stay cheap,
    # with GroupNorm of 4 groups after each convolution (De et al. 2022). Their tanh measured
    # worse than ReLU here under xdl's AdamW at ε = 3 on 3,600 real digits (82.8% vs 87.8%).
    "dpcnn": {"channels": [16, 32], "hidden": 32, "activation": "relu", "dropout": 0.0, "group_norm": 4},
}


class Normalize(nn.Module):
    """(x - mean) / std with the statistics stored as buffers, so they travel with the weights."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise XdlError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _check(config: dict) -> None:
    dropout = config.get("dropout", 0.0)
    if not 0.0 <= dropout < 1.0:
        raise XdlError(f"dropout must be in [0, 1), got {dropout}")


def _dense(width: int, hidden: list[int], num_classes: int, config: dict, batch_norm: bool) -> list[nn.Module]:
    """Linear [→ BatchNorm] → activation [→ Dropout] per hidden width, then the output layer.

    The order is part of the saved format: state-dict keys are these layers' positions.
    """
    layers: list[nn.Module] = []
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(_activation(config["activation"]))
        if config.get("dropout"):
            layers.append(nn.Dropout(config["dropout"]))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return layers


def build_mlp(config: dict, in_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    _check(config)
    features = math.prod(in_shape)
    stats_shape = (in_shape[0], 1, 1) if len(in_shape) == 3 else tuple(in_shape)
    layers: list[nn.Module] = [Normalize(stats_shape), nn.Flatten()]
    layers += _dense(features, config["hidden"], num_classes, config, batch_norm=bool(config.get("batch_norm")))
    return nn.Sequential(*layers)


def build_cnn(config: dict, in_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    _check(config)
    if len(in_shape) != 3:
        raise XdlError(f"the cnn model needs image inputs (C×H×W); this data has shape {list(in_shape)}")
    channels, size = in_shape[0], min(in_shape[1:])
    layers: list[nn.Module] = [Normalize((channels, 1, 1))]
    for width in config["channels"]:
        layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not config.get("batch_norm")))
        if config.get("batch_norm"):
            layers.append(nn.BatchNorm2d(width))
        layers.append(_activation(config["activation"]))
        # Halve the resolution while it is at least 7 pixels: 8→4, 28→14→7→3, 32→16→8→4.
        if size >= 7:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        channels = width
    with torch.no_grad():
        flat = nn.Sequential(*layers[1:], nn.Flatten())(torch.zeros(1, *in_shape)).shape[1]
    layers.append(nn.Flatten())
    # The dense head: one width (the saved default) or a list, as --hidden gives for mlp.
    # batch_norm is the conv blocks' option; the head never had one.
    hidden = config["hidden"]
    layers += _dense(flat, [hidden] if isinstance(hidden, int) else hidden, num_classes, config, batch_norm=False)
    return nn.Sequential(*layers)


def build_dpcnn(config: dict, in_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Strided convolutions (8×8, then 4×4, stride 2), each followed by a 2×2 max-pool of stride 1.

    Striding from the first layer keeps the activations, and so the per-record gradients
    Opacus materializes, small. ``group_norm`` is the groups per GroupNorm (0: none); it
    never mixes records, so DP-SGD may use it where BatchNorm is refused.
    """
    _check(config)
    groups = config.get("group_norm", 0)
    if not isinstance(groups, int) or isinstance(groups, bool) or not 0 <= groups <= 1024:
        raise XdlError(f"group_norm must be a whole number of groups in 0..1024, got {groups!r}")
    if len(in_shape) != 3:
        raise XdlError(f"the dpcnn model needs image inputs (C×H×W); this data has shape {list(in_shape)}")
    channels, size = in_shape[0], min(in_shape[1:])
    layers: list[nn.Module] = [Normalize((channels, 1, 1))]
    for i, width in enumerate(config["channels"]):
        # 8×8 then 4×4 kernels (narrower on tiny images): 28 px → 14 → 13 → 6 → 5; 8 px → 4 → 3 → 2 → 1.
        kernel = min(8 if i == 0 else 4, size)
        padding = (kernel - 1) // 2
        layers.append(nn.Conv2d(channels, width, kernel, 2, padding=padding))
        if groups:  # a group count that divides the layer's width, as Opacus' fixer picks
            layers.append(nn.GroupNorm(math.gcd(groups, width), width))
        layers.append(_activation(config["activation"]))
        size = (size + 2 * padding - kernel) // 2 + 1
        if size >= 2:
            layers.append(nn.MaxPool2d(2, 1))
            size -= 1
        channels = width
    layers.append(nn.Flatten())
    with torch.no_grad():
        flat = nn.Sequential(*layers[1:])(torch.zeros(1, *in_shape)).shape[1]
    hidden = config["hidden"]
    layers += _dense(flat, [hidden] if isinstance(hidden, int) else hidden, num_classes, config, batch_norm=False)
    return nn.Sequential(*layers)


def resolve_factory(target: str) -> Any:
    """The function a ``package.module:factory`` names (importing its module runs its code)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise XdlError(f"--model must be mlp, cnn, dpcnn or package.module:factory, got {target!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise XdlError(f"cannot resolve model factory {target!r}: {exc}") from None


def check_choice(model: str | dict, overrides: dict | None = None) -> None:
    """Refuse a model choice that cannot build, before any data is loaded for it."""
    config = model_config(model, "image", **(overrides or {}))
    _check(config)
    if config["name"] == "custom":
        resolve_factory(config["factory"])


def build_custom(config: dict, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A user's ``package.module:factory``, called as factory(in_shape, num_classes, **kwargs)."""
    target = config.get("factory", "")
    factory = resolve_factory(target)
    kwargs = config.get("kwargs", {})
    try:
        inspect.signature(factory).bind(tuple(in_shape), num_classes, **kwargs)
    except TypeError:  # not callable, or a signature that cannot take these arguments
        raise XdlError(
            f"model factory {target!r} must be callable as factory(in_shape, num_classes, **kwargs)"
        ) from None
    except ValueError:  # some builtins expose no signature; calling them says the rest
        pass
    model = factory(tuple(in_shape), num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise XdlError(f"model factory {target!r} returned {type(model).__name__}, not an nn.Module")
    return model


BUILDERS = {"mlp": build_mlp, "cnn": build_cnn, "dpcnn": build_dpcnn, "custom": build_custom}


def model_config(model: str | dict = "auto", kind: str = "image", **overrides) -> dict:
    """Complete a model choice into the JSON-able config saved with the run."""
    config = dict(model) if isinstance(model, dict) else {"name": model}
    name = config["name"]
    if name == "auto":
        name = config["name"] = "cnn" if kind == "image" else "mlp"
    if ":" in name:
        config.update(name="custom", factory=name)
    elif name not in BUILDERS:
        raise XdlError(f"unknown model {name!r}: choose mlp, cnn, dpcnn or package.module:factory")
    for key, value in DEFAULTS.get(config["name"], {}).items():
        config.setdefault(key, value)
    config.update({k: v for k, v in overrides.items() if v is not None})
    return config


def build_model(config: dict, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the (untrained) model a config describes; the same call rebuilds a saved run."""
    model = BUILDERS[config["name"]](config, tuple(in_shape), num_classes)
    if config.get("dp_compatible"):  # trained with differential privacy: the same replaced layers
        model = make_compatible(model)
    return model


def set_normalization(model: nn.Module, x: torch.Tensor) -> None:
    """Fill the model's Normalize layer with the statistics of the training inputs."""
    norm = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    if norm is None:  # a user's own model normalizes itself, or not at all
        return
    dims = [0, 2, 3] if x.dim() == 4 and norm.mean.dim() == 3 and norm.mean.shape[1:] == (1, 1) else [0]
    mean, std = x.mean(dims, keepdim=True)[0], x.std(dims, keepdim=True)[0]
    norm.mean.copy_(mean.reshape(norm.mean.shape))
    # A constant pixel or feature has std 0: leave it unscaled instead of dividing by zero.
    norm.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).reshape(norm.std.shape))



def load_user_weights(model: nn.Module, path: str | Path) -> None:
    """Load a user's weights into ``model`` without ever executing code from the file.

    ``.safetensors`` holds tensors only. ``.pt``/``.pth`` go through torch's restricted
    unpickler (``weights_only=True``), which refuses any object but tensors and containers,
    so a file crafted to run a command on load is rejected before anything runs. Missing
    normalization buffers keep the statistics computed from the training data.
    """
    path = Path(path)
    if not path.is_file():
        raise XdlError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise XdlError(f"cannot read weights {path}: {exc}") from None
    elif suffix in (".pt", ".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        # The restricted unpickler and the zip reader raise many types for a bad or hostile
        # file (UnpicklingError, RuntimeError, EOFError, …); each means "not plain weights".
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise XdlError(f"refusing to load {path}: not a plain tensor checkpoint ({first})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    else:
        raise XdlError(f"cannot read weights {path}: expected a .safetensors, .pt or .pth file")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise XdlError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    norm = {f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, Normalize) for b in ("mean", "std")}
    own = model.state_dict()
    for key, value in own.items():  # the first misfit in the model's order, which torch's message does not promise
        if key in state and state[key].shape != value.shape:
            shapes = ["×".join(map(str, s)) or "scalar" for s in (state[key].shape, value.shape)]
            raise XdlError(f"weights in {path} do not fit the model: {key!r} is {shapes[0]} in the file but {shapes[1]} in the model")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise XdlError(f"weights in {path} do not fit the model: {first}") from None
    missing = [k for k in missing if k not in norm]
    if missing or unexpected:
        what = f"lack {missing[0]!r}" if missing else f"have an unknown parameter {unexpected[0]!r}"
        raise XdlError(f"weights in {path} do not fit the model: they {what}")


INSTALL = "differentially private training needs Opacus: pip install 'xdl[privacy]'"


def opacus_module():
    try:
        import opacus
    except ImportError:
        raise XdlError(INSTALL) from None
    return opacus


def make_compatible(model: nn.Module, log: Callable[[str], None] | None = None) -> nn.Module:
    """The model with every layer Opacus cannot train privately replaced; each change is logged.

    BatchNorm mixes the records of a batch, so it becomes GroupNorm (Opacus' fixer picks
    gcd(32, channels) groups, which divides even small layers); in-place activations would
    overwrite what the per-record gradient hooks read, so they stop being in place. A model
    still incompatible after that is the user's error, named by its first offending layer.
    """
    from opacus.validators import ModuleValidator

    opacus_module()
    before = dict(model.named_modules())
    fixed = ModuleValidator.fix(model)
    changes = []
    for name, module in fixed.named_modules():
        old = before.get(name)
        if old is not None and type(old) is not type(module):
            changes.append(f"{name}: {type(old).__name__} → {module}")
        if getattr(module, "inplace", False):
            module.inplace = False
            changes.append(f"{name}: {type(module).__name__}(inplace=True) → inplace=False")
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise XdlError(f"this model cannot be trained with differential privacy: {str(errors[0]).splitlines()[0]}")
    for change in changes:
        (log or (lambda line: None))(f"differential privacy: replaced {change}")
    return fixed
