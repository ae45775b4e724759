"""The shape of ``run.json`` (and of a checkpoint's ``config.json``), checked before anything is built.

A run directory is something people download and share, so its JSON is untrusted input:
every field that sizes an allocation is bounded here and every name that selects code or a
file is checked, and a bad one is one XdlError line naming the field, before a tensor exists.
"""

from __future__ import annotations

import math
import re
from typing import Any

from xdl.data import DATASETS, FORMATS
from xdl.errors import XdlError
from xdl.limits import require_memory
from xdl.models.builders import ACTIVATIONS, BUILDERS

MAX_SIDE = 1 << 20  # pixels per image side, features per row (MAX_INPUT bounds the product)
MAX_INPUT = 1 << 24  # values per input (a 3×2048×2048 image is ~12.6 M)
MAX_CLASSES = 100_000
MAX_WIDTH = 1 << 16  # hidden units or conv channels per layer
MAX_LAYERS = 64
MAX_SEED = 2**32 - 1
DATA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FACTORY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def _fail(where: str, field: str, message: str) -> None:
    damaged = "; the file is damaged or was not written by xdl" if where.endswith(".json") else ""
    raise XdlError(f"{where}: {field} {message}{damaged}")


def _int(where: str, field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, field, f"must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        _fail(where, field, f"is {value if abs(value) < 10**12 else 'huge'}, outside {lo}..{hi}")
    return value


def _number(where: str, field: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(where, field, f"must be a number, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        _fail(where, field, "must be finite")
    if not lo <= value <= hi:
        _fail(where, field, f"is {value:g}, outside [{lo:g}, {hi:g}]")
    return float(value)


def _str(where: str, field: str, value: Any) -> str:
    if not isinstance(value, str):
        _fail(where, field, f"must be a string, not {type(value).__name__}")
    return value


def _dict(where: str, field: str, value: Any) -> dict:
    if not isinstance(value, dict):
        _fail(where, field, f"must be an object, not {type(value).__name__}")
    return value


def _widths(where: str, field: str, value: Any, allow_int: bool) -> list[int]:
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_LAYERS:
        _fail(where, field, f"must be a list of 1..{MAX_LAYERS} layer widths")
    return [_int(where, f"{field}[{i}]", v, 1, MAX_WIDTH) for i, v in enumerate(value)]


def parameter_count(model: dict) -> int:
    """How many parameters the mlp or cnn a (checked) config describes will allocate."""
    shape = model["in_shape"]
    classes = model["num_classes"]

    def dense(width: int, hidden: list[int]) -> int:
        total = 0
        for size in [*hidden, classes]:
            total += width * size + size
            width = size
        return total

    if model["name"] == "mlp":
        return dense(math.prod(shape), model["hidden"])
    channels, height, width = shape
    total, size = 0, min(height, width)
    for out in model["channels"]:
        total += channels * out * 9 + out
        if size >= 7:  # the same halving rule as xdl.models.builders.build_cnn
            height, width, size = height // 2, width // 2, size // 2
        channels = out
    hidden = model["hidden"]
    return total + dense(channels * height * width, [hidden] if isinstance(hidden, int) else hidden)


# What xdl import stores a model as (xdl.models.imported.load_model reads exactly these).
IMPORTED_FORMATS = ("hf", "keras", "pt2", "factory")


def check_model(where: str, model: Any, built: bool = True) -> dict:
    """``built``: the config carries the input shape and class count (run.json, not a checkpoint's)."""
    model = _dict(where, "model", model)
    name = _str(where, "model.name", model.get("name"))
    if name not in (*BUILDERS, "imported"):
        _fail(where, "model.name", f"is {name[:80]!r}, not one of {', '.join(BUILDERS)}, imported")
    if name == "imported":  # xdl import: the artifact beside run.json is the model (digest-checked on load)
        if model.get("format") not in IMPORTED_FORMATS:
            _fail(where, "model.format", f"is {str(model.get('format'))[:40]!r}, not one of {', '.join(IMPORTED_FORMATS)}")
        if model["format"] == "factory" and not FACTORY.match(_str(where, "model.factory", model.get("factory"))):
            _fail(where, "model.factory", f"is {model['factory'][:80]!r}, not package.module:function")
    if name == "custom":
        factory = _str(where, "model.factory", model.get("factory"))
        if not FACTORY.match(factory):
            _fail(where, "model.factory", f"is {factory[:80]!r}, not package.module:function")
        _dict(where, "model.kwargs", model.get("kwargs", {}))
    if not built:
        return model
    shape = model.get("in_shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4:
        _fail(where, "model.in_shape", "must be a list of 1 to 4 sizes")
    for i, side in enumerate(shape):
        _int(where, f"model.in_shape[{i}]", side, 1, MAX_SIDE)
    if math.prod(shape) > MAX_INPUT:
        _fail(where, "model.in_shape", f"holds {math.prod(shape)} values per input, over {MAX_INPUT}")
    _int(where, "model.num_classes", model.get("num_classes"), 2, MAX_CLASSES)
    if name not in ("mlp", "cnn"):  # a factory's own arguments are its business
        return model
    if _str(where, "model.activation", model.get("activation")) not in ACTIVATIONS:
        _fail(where, "model.activation", f"is {model['activation'][:40]!r}, not one of {', '.join(ACTIVATIONS)}")
    dropout = _number(where, "model.dropout", model.get("dropout", 0.0), -math.inf, math.inf)
    if not 0 <= dropout < 1:
        _fail(where, "model.dropout", f"must be in [0, 1), got {dropout:g}")
    if not isinstance(model.get("batch_norm", False), bool):
        _fail(where, "model.batch_norm", "must be true or false")
    _widths(where, "model.hidden", model.get("hidden"), allow_int=name == "cnn")
    if name == "cnn":
        if built and len(model["in_shape"]) != 3:
            _fail(where, "model.in_shape", "must be C×H×W for a cnn")
        _widths(where, "model.channels", model.get("channels"), allow_int=False)
    return model


def check_data(where: str, data: Any) -> dict:
    data = _dict(where, "data", data)
    name = _str(where, "data.name", data.get("name"))
    # A name, never a path: make_spec would read "../../etc" as a folder of images. Data given
    # in memory (a DataSplits) keeps its own name, and Run.data says it cannot be reloaded.
    if not DATA_NAME.match(name) or ".." in name:
        _fail(where, "data.name", f"is {name[:80]!r}, not a dataset name such as {', '.join([*DATASETS, *FORMATS])}")
    if name in FORMATS:
        _str(where, "data.path", data.get("path"))
    for key in ("target", "data_dir"):
        if data.get(key) is not None:
            _str(where, f"data.{key}", data[key])
    for key in ("sensitive", "extra_groups"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            _fail(where, f"data.{key}", "must be a list of column names")
    _int(where, "data.seed", data.get("seed", 0), 0, MAX_SEED)
    val = _number(where, "data.val_fraction", data.get("val_fraction", 0.1), 1e-6, 0.9)
    test = _number(where, "data.test_fraction", data.get("test_fraction", 0.2), 1e-6, 0.9)
    if val + test >= 1:
        _fail(where, "data.val_fraction + data.test_fraction", "must be below 1")
    if data.get("limit") is not None:
        _int(where, "data.limit", data["limit"], 1, 2**40)
    return data


def check_train(where: str, train: Any) -> dict:
    train = _dict(where, "train", train)
    _int(where, "train.seed", train.get("seed", 0), 0, MAX_SEED)
    return train


def check_run_info(where: str, info: Any, built: bool = True) -> dict:
    """Validate a run.json (``built``) or a checkpoint's config.json; refuse a model too big for this machine."""
    info = _dict(where, "the file", info)
    model = check_model(where, info.get("model"), built)
    check_data(where, info.get("data"))
    check_train(where, info.get("train"))
    for key in ("dataset", "metrics", "versions", "compute"):
        if info.get(key) is not None:
            _dict(where, key, info[key])
    if info.get("encoding") is not None and not isinstance(info["encoding"], list):
        _fail(where, "encoding", "must be a list of column encodings")
    if built:
        check_model_memory(where, model, bytes_per_parameter=8)  # the weights and the state dict read into them
    return info


def check_model_memory(where: str, model: dict, bytes_per_parameter: int) -> None:
    """Refuse an mlp or cnn whose parameters (float32, times what each one carries) would not fit in memory."""
    if model["name"] in ("mlp", "cnn"):
        count = parameter_count(model)
        require_memory(bytes_per_parameter * count, f"{where}: the {model['name']} ({count:,} parameters)")
