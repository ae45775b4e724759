"""Models xdl did not train: a wrapper that puts them behind xdl's rule, and their readers.

The rule (DESIGN.md) is that every model takes inputs in the data's natural range ([0, 1]
images, N×C×H×W) and returns class scores. ``Imported`` wraps any ``nn.Module`` so that it
does: normalization (the model's own mean/std) happens inside, a model that wants N×H×W
(a Keras ``Flatten`` first) or channels-last gets its layout, and whatever it returns — a
tensor, a tuple, a dict, a Hugging Face ``ModelOutput`` — becomes one N×K tensor of scores.
A model that outputs probabilities is explained and attacked on their logarithm: the
gradient of a saturated softmax is ~0, which makes attacks fail and robustness look better
than it is (Carlini & Wagner 2017; AutoAttack's checks warn about the same thing).

    >>> run = xdl.import_model("hf:./my-resnet", data="./photos", out="runs/resnet")  # doctest: +SKIP
    >>> xdl.audit(run)                                                              # doctest: +SKIP

A run made by :func:`xdl.training.importing.import_model` stores the model as the artifact it came in — a Hugging Face folder
(safetensors weights), a ``.keras`` file (loaded in Keras' safe mode) or a ``.pt2``
``torch.export`` program — plus its sha256, so it reloads with no flags and no code
trusted; only a ``package.module:factory`` needs ``--trust-code``, now and on reload.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xdl.errors import XdlError
from xdl.models.builders import build_custom, load_user_weights
from xdl.models.inference import eval_mode
from xdl.models.weights import WEIGHTS, load_weights
from xdl.trust import require_trust

FORMATS = ("hf", "keras", "pt2", "factory", "module")
# ImageNet statistics of torchvision's and timm's pretrained models.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# A row of non-negative outputs summing to 1 within this is taken for probabilities.
PROB_TOLERANCE = 1e-3
# log(0) would be -inf; a probability this small is as good as impossible for a float32 softmax.
LOG_FLOOR = 1e-12
PROBABILITY_WARNING = (
    "the model outputs probabilities (a softmax head): xdl explains and attacks their logarithm, "
    "because gradients through a saturated softmax vanish and overstate robustness"
)

# -----------------------------------------------------------------------------------------
# The wrapper
# -----------------------------------------------------------------------------------------


def class_scores(out: Any) -> torch.Tensor:
    """The N×K class scores in a model's output: a tensor, ``logits`` or the first entry."""
    seen = out
    while not torch.is_tensor(out):
        if isinstance(out, Mapping):  # dicts and Hugging Face ModelOutputs alike
            values = [v for v in out.values() if v is not None]
            out = out["logits"] if out.get("logits") is not None else (values[0] if values else None)
        elif isinstance(out, (tuple, list)) and out:
            out = out[0]
        else:
            raise XdlError(f"the model returned {type(seen).__name__}, not class scores (a tensor, tuple, dict or ModelOutput)")
    if out.dim() != 2 or out.shape[1] < 2 or not out.is_floating_point():
        per = f"{out.shape[1]} output{'s' if out.shape[1] != 1 else ''} per input" if out.dim() == 2 else f"{out.dim()}-D"
        raise XdlError(
            f"the model's output has shape {list(out.shape)} ({per}, {out.dtype}), not class scores: "
            "xdl needs one row of at least two float scores per input (N×classes)"
        )
    return out


def looks_like_probabilities(scores: torch.Tensor) -> bool:
    """Rows that are non-negative and sum to 1: a softmax (or sigmoid-normalized) head."""
    if not len(scores):
        return False
    ones = torch.ones(len(scores), dtype=scores.dtype, device=scores.device)
    return bool((scores >= 0).all()) and torch.allclose(scores.sum(1), ones, atol=PROB_TOLERANCE)


class Imported(nn.Module):
    """Any model behind xdl's rule: [0, 1] inputs N×C×H×W (or N×F) in, N×K class scores out.

    ``mean``/``std`` are buffers (saved in the run's model.safetensors); ``model_shape``
    is the per-sample shape the wrapped model takes, reached from the data's C×H×W by a
    channels-last permute or a reshape; ``fixed_batch`` feeds a program exported with a
    static batch size in chunks of that size. ``log_probs`` turns probabilities into
    log-probabilities.
    """

    def __init__(self, model: nn.Module, in_shape: tuple[int, ...], *, mean=None, std=None,
                 model_shape: tuple[int, ...] | None = None, log_probs: bool = False,
                 fixed_batch: int | None = None, frozen_mode: bool = False):
        super().__init__()
        self.model = model
        self.in_shape = tuple(in_shape)
        self.model_shape = tuple(model_shape) if model_shape else self.in_shape
        self.log_probs = log_probs
        self.fixed_batch = fixed_batch
        # An exported program cannot change mode (its train/eval was fixed at export).
        self.frozen_mode = frozen_mode
        stats = (len(mean),) + (1,) * (len(self.in_shape) - 1) if mean is not None else (1,) * len(self.in_shape)
        self.register_buffer("mean", torch.as_tensor(mean if mean is not None else 0.0, dtype=torch.float32).reshape(stats))
        self.register_buffer("std", torch.as_tensor(std if std is not None else 1.0, dtype=torch.float32).reshape(stats))

    def config(self) -> dict:
        """What run.json records to rebuild the wrapper (the buffers travel in safetensors)."""
        return {"model_shape": list(self.model_shape), "log_probs": self.log_probs, "fixed_batch": self.fixed_batch,
                "normalize": {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}}

    def train(self, mode: bool = True) -> "Imported":
        if not self.frozen_mode:
            return super().train(mode)
        self.training = mode
        return self

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.model_shape == self.in_shape:
            return x
        c = self.in_shape[0]
        if len(self.in_shape) == 3 and self.model_shape == (*self.in_shape[1:], c):
            return x.permute(0, 2, 3, 1)  # channels-last (Keras' default for conv nets)
        if math.prod(self.model_shape) != math.prod(self.in_shape):  # another size: the model itself says if it copes
            return x
        return x.reshape(len(x), *self.model_shape)  # e.g. N×1×H×W → N×H×W for a Flatten-first model

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fixed_batch or len(x) == self.fixed_batch:
            return class_scores(self.model(x))
        b, n = self.fixed_batch, len(x)
        # Pad the last chunk by repeating its last row; those outputs are dropped.
        padded = torch.cat([x, x[-1:].expand(-(-n // b) * b - n, *x.shape[1:])]) if n % b else x
        return torch.cat([class_scores(self.model(chunk)) for chunk in padded.split(b)])[:n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self._call(self._layout((x - self.mean) / self.std))
        return scores.clamp_min(LOG_FLOOR).log() if self.log_probs else scores


def parse_normalize(text: str | None, channels: int) -> tuple[list[float], list[float]] | None:
    """``imagenet`` | ``none`` | ``MEAN,STD`` (each a number or per-channel ``a/b/c``) → (mean, std)."""
    if text is None or text.strip().lower() == "none":
        return None
    if text.strip().lower() == "imagenet":
        mean, std = IMAGENET
        if channels != 3:
            raise XdlError(f"--normalize imagenet is for 3-channel images; this data has {channels}")
        return list(mean), list(std)
    parts = text.split(",")
    try:
        mean, std = ([float(v) for v in p.split("/")] for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        mean = std = None
    if mean is None or std is None:
        raise XdlError(f"--normalize must be imagenet, none or MEAN,STD (per channel: m1/m2/m3,s1/s2/s3), got {text!r}")
    if len(mean) != len(std) or len(mean) not in (1, channels):
        raise XdlError(f"--normalize {text!r} gives {len(mean)} means and {len(std)} stds for {channels}-channel data")
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise XdlError(f"--normalize {text!r}: means must be finite and stds > 0")
    return mean, std


def as_classifier(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor, list[str]]:
    """A live model and its samples as analyzers want them: wrapped, images N×C×H×W, notes.

    Inputs N×H×W become N×1×H×W images (the model still gets N×H×W); the output is made
    class scores, and probabilities their logarithm, with a warning saying so.
    """
    if isinstance(model, Imported):
        return model, x, []
    images = x.unsqueeze(1) if x.dim() == 3 else x
    wrapped = Imported(model, tuple(images.shape[1:]), model_shape=tuple(x.shape[1:]))
    notes = []
    with torch.no_grad():
        scores = _probe(wrapped, images[:8])
    if looks_like_probabilities(scores):
        wrapped.log_probs = True
        notes.append(PROBABILITY_WARNING)
        warnings.warn(PROBABILITY_WARNING, stacklevel=3)
    return wrapped, images, notes


def _probe(wrapped: Imported, x: torch.Tensor) -> torch.Tensor:
    """One forward pass on real samples; a model that rejects them is the user's error, in one line."""
    try:
        # eval_mode restores each module's own flag: wrapped.train(was) would switch the
        # caller's model into the fresh wrapper's default training mode.
        with eval_mode(wrapped):
            return wrapped(x)
    except XdlError:
        raise
    except Exception as exc:  # a foreign model raises anything for a wrong shape (RuntimeError, ValueError, …)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XdlError(f"the model rejects inputs of shape {list(x.shape[1:])}: {first[:300]}") from None


# -----------------------------------------------------------------------------------------
# Reading a model in each form
# -----------------------------------------------------------------------------------------


def is_imported(run: Any) -> bool:
    """Whether ``run`` holds a model brought in with ``xdl import``: xdl did not train it, so
    its "training split" is only xdl's split of the data, not what the model learned from."""
    return run is not None and isinstance(run.info.get("imported"), dict)


def detect_format(source: str) -> tuple[str, str]:
    """(format, path) for ``hf:DIR``, ``FILE.keras``, ``FILE.pt2`` or ``package.module:factory``."""
    if source.startswith("hf:"):
        return "hf", source[3:]
    suffix = Path(source).suffix.lower()
    if suffix == ".keras":
        return "keras", source
    if suffix == ".pt2":
        return "pt2", source
    module, sep, attr = source.partition(":")
    if sep and module and attr and all(p.isidentifier() for p in module.split(".")) and attr.isidentifier():
        return "factory", source
    raise XdlError(
        f"unknown model {source!r}: give hf:DIR (a save_pretrained folder), FILE.keras, FILE.pt2 "
        "(torch.export) or package.module:factory with --weights FILE"
    )


def sha256(path: Path) -> str:
    """The digest of a file, or of a folder's files (names and contents, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# The files of a save_pretrained folder an image classifier needs; never pytorch_model.bin (pickle).
HF_FILES = ("config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json")


def read_hf(folder: Path) -> tuple[nn.Module, dict]:
    """A transformers image classifier from a local folder (safetensors only, no hub, no remote code)."""
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise XdlError(f"hf:{folder} is not a Hugging Face model folder (no config.json); save one with save_pretrained")
    if not list(folder.glob("*.safetensors")):
        raise XdlError(f"hf:{folder} has no .safetensors weights; xdl does not unpickle pytorch_model.bin (save with safe_serialization)")
    try:
        from transformers import AutoModelForImageClassification
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise XdlError("hf: models need transformers: pip install 'xdl[hf]'") from None
    hf_logging.set_verbosity_error()  # its "weights not initialized" notes are for training, not for reading a model
    hf_logging.disable_progress_bar()  # a bar per load would clutter every command that opens the run
    try:
        model = AutoModelForImageClassification.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError… for a folder it cannot use
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XdlError(f"cannot load hf:{folder} as an image classifier: {first[:300]}") from None
    meta: dict[str, Any] = {"channels": int(getattr(model.config, "num_channels", 3))}
    labels = getattr(model.config, "id2label", None) or {}
    names = [str(labels[k]) for k in sorted(labels, key=int)]
    if names and names != [f"LABEL_{i}" for i in range(len(names))]:  # transformers' placeholders say nothing
        meta["classes"] = names
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        cfg = json.loads(processor.read_text(encoding="utf-8"))
        size = cfg.get("crop_size") if cfg.get("do_center_crop") else cfg.get("size")
        size = size or cfg.get("size")
        if isinstance(size, int):
            meta["size"] = [size, size]
        elif isinstance(size, dict) and "height" in size:
            meta["size"] = [int(size["height"]), int(size["width"])]
        elif isinstance(size, dict) and "shortest_edge" in size:
            meta["size"] = [int(size["shortest_edge"])] * 2
        if cfg.get("do_normalize", True) and cfg.get("image_mean") is not None:
            meta["normalize"] = (list(map(float, cfg["image_mean"])), list(map(float, cfg["image_std"])))
    elif isinstance(getattr(model.config, "image_size", None), int):
        meta["size"] = [model.config.image_size] * 2
    return model, meta


def _keras():
    # Keras picks its backend once, at import; xdl's models are torch modules.
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError:
        raise XdlError(".keras models need Keras 3: pip install 'xdl[keras]'") from None
    if keras.backend.backend() != "torch":
        raise XdlError(f"Keras was already started on the {keras.backend.backend()!r} backend; set KERAS_BACKEND=torch")
    return keras


def read_keras(path: Path) -> tuple[nn.Module, dict]:
    """A Keras 3 model file in safe mode (no lambda code), on the torch backend: an nn.Module."""
    keras = _keras()
    try:
        model = keras.saving.load_model(str(path), safe_mode=True, compile=False)
    except Exception as exc:  # Keras raises ValueError/TypeError/OSError… for a file it cannot load safely
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XdlError(f"cannot load {path} as a Keras model: {first[:300]}") from None
    if not isinstance(model, nn.Module):
        raise XdlError(f"{path} did not load as a torch module: Keras is not on its torch backend")
    shape = [d for d in (model.inputs[0].shape[1:] if getattr(model, "inputs", None) else [])]
    return model, {"model_shape": [int(d) for d in shape] if shape and None not in shape else None}


def read_pt2(path: Path) -> tuple[nn.Module, dict]:
    """A ``torch.export`` program (graph and weights, no pickled code) as a module."""
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # a zip that is not a program, a newer format, …
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XdlError(f"cannot load {path} as a torch.export program: {first[:300]}") from None
    user = list(program.graph_signature.user_inputs)
    if len(user) != 1:
        raise XdlError(f"{path} takes {len(user)} inputs; xdl feeds a model one image or feature tensor")
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == user[0])
    shape = list(getattr(node.meta.get("val"), "shape", []))
    meta: dict[str, Any] = {}
    if shape and isinstance(shape[0], int):
        meta["fixed_batch"] = shape[0]  # exported without a dynamic batch dimension
    if shape and all(isinstance(d, int) for d in shape[1:]):
        meta["model_shape"] = [int(d) for d in shape[1:]]
    return program.module(), meta


def read_factory(target: str, weights: Path | None, in_shape: tuple[int, ...], num_classes: int, trust_code: bool | None) -> nn.Module:
    require_trust(f"the model {target!r}", trust_code)
    model = build_custom({"factory": target}, in_shape, num_classes)
    if weights is not None:
        load_user_weights(model, weights)
    return model


# -----------------------------------------------------------------------------------------
# What an imported run stores
# -----------------------------------------------------------------------------------------


ARTIFACT = {"hf": "model", "keras": "model.keras", "pt2": "model.pt2"}




class _BuffersOnly(nn.Module):
    """The wrapper's own state (mean, std) without the model's weights, for model.safetensors."""

    def __init__(self, wrapped: Imported):
        super().__init__()
        self.register_buffer("mean", wrapped.mean)
        self.register_buffer("std", wrapped.std)








# The forms whose file carries the whole model, each read the same way at import and at reload.
READERS = {"hf": read_hf, "keras": read_keras, "pt2": read_pt2}


# -----------------------------------------------------------------------------------------
# Reloading an imported run (xdl.runs.run.Run.model calls this)
# -----------------------------------------------------------------------------------------


def load_model(run, trust_code: bool | None = None) -> nn.Module:
    """The wrapped model of an imported run, its artifact checked against the recorded digest."""
    cfg, info = run.info["model"], run.info["imported"]
    fmt = cfg.get("format")
    if fmt not in ("hf", "keras", "pt2", "factory"):
        raise XdlError(f"{run.path}/run.json names an unknown imported format {fmt!r}")
    artifact = run.path / info.get("artifact", ARTIFACT.get(fmt, WEIGHTS))
    if not artifact.exists():
        raise XdlError(f"{run.path} has lost its model: {artifact.name} is missing")
    if fmt == "factory":
        require_trust(f"run {run.path} (model factory {cfg.get('factory')!r})", trust_code)
    if fmt != "factory" and info.get("digest") and sha256(artifact) != info["digest"]:
        raise XdlError(f"{artifact} does not match the sha256 recorded in run.json: the model was changed after import")
    in_shape = tuple(cfg["in_shape"])
    if fmt in READERS:
        net, _ = READERS[fmt](artifact)
    else:
        net = build_custom({"factory": cfg["factory"]}, in_shape, cfg["num_classes"])
    norm = cfg.get("normalize") or {}
    wrapped = Imported(net, in_shape, mean=norm.get("mean"), std=norm.get("std"), model_shape=cfg.get("model_shape"),
                       log_probs=bool(cfg.get("log_probs")), fixed_batch=cfg.get("fixed_batch"), frozen_mode=fmt == "pt2")
    load_weights(wrapped if fmt == "factory" else _BuffersOnly(wrapped), run.path / WEIGHTS)
    return wrapped.eval()


