"""Models xdl did not train: a wrapper that puts them behind xdl's rule, and ``xdl import``.

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

A run made here stores the model as the artifact it came in — a Hugging Face folder
(safetensors weights), a ``.keras`` file (loaded in Keras' safe mode) or a ``.pt2``
``torch.export`` program — plus its sha256, so it reloads with no flags and no code
trusted; only a ``package.module:factory`` needs ``--trust-code``, now and on reload.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xdl.errors import XdlError

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
    from xdl.analyzers.base import eval_mode

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
    from xdl.models import build_custom, load_user_weights
    from xdl.trust import require_trust

    require_trust(f"the model {target!r}", trust_code)
    model = build_custom({"factory": target}, in_shape, num_classes)
    if weights is not None:
        load_user_weights(model, weights)
    return model


# -----------------------------------------------------------------------------------------
# xdl import
# -----------------------------------------------------------------------------------------


ARTIFACT = {"hf": "model", "keras": "model.keras", "pt2": "model.pt2"}


def import_model(
    model: "str | nn.Module",
    data: Any = "digits",
    out: str | Path | None = None,
    *,
    weights: str | Path | None = None,
    input_size: tuple[int, int] | list[int] | None = None,
    normalize: str | None = None,
    classes: list[str] | None = None,
    num_classes: int | None = None,
    trust_code: bool | None = None,
    force: bool = False,
    seed: int = 0,
    device: str = "auto",
    data_options: dict | None = None,
    quiet: bool = False,
):
    """Make a run directory for a model xdl did not train; return the :class:`xdl.Run`.

    ``model`` is ``"hf:DIR"``, a ``.keras`` or ``.pt2`` path, ``"package.module:factory"``
    (with ``weights``; needs ``trust_code``), or a live ``nn.Module`` (saved into the run
    with ``torch.export``, or ``save_pretrained``/``.keras`` for those kinds). ``data`` is
    any data spec, a :class:`DataSplits`, tensors ``(x, y)`` or a torch Dataset/DataLoader
    (the last two are written into the run as ``data.npz``). The run holds the model, its
    digest and the evaluation metrics; it has no training history.
    """
    from xdl.api import final_metrics
    from xdl.data import load_data
    from xdl.data.types import DataSplits
    from xdl.device import resolve_device, seed_everything
    from xdl.run import WEIGHTS, Run, clear_run, new_run_path, save_run

    log = (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr))
    out = Path(out) if out else new_run_path()
    if out.exists() and not out.is_dir():
        raise XdlError(f"--out {out} is a file; a run is a directory")
    if (out / "run.json").exists() and not force:
        raise XdlError(f"{out} already holds a run; choose another --out or pass --force to replace it")
    if input_size is not None and (len(input_size) != 2 or min(input_size) < 1):
        raise XdlError(f"--input-size must be one or two positive sizes (H,W), got {input_size}")
    dev = resolve_device(device)
    live = isinstance(model, nn.Module)
    if live:
        fmt, path = "module", None
    else:
        fmt, text = detect_format(str(model))
        path = Path(text).expanduser()
        if fmt != "factory" and not path.exists():
            raise XdlError(f"model not found: {path}")
    if weights is not None and fmt != "factory":
        raise XdlError("--weights goes with a package.module:factory model; the other forms carry their weights")
    if fmt == "factory":
        from xdl.trust import require_trust

        require_trust(f"the model {str(model)!r}", trust_code)  # before loading any data
    # 1. the model's own metadata, then the data at the size it wants
    net, meta = READERS[fmt](path) if fmt in READERS else (None, {})
    size = list(input_size) if input_size is not None else meta.get("size")
    if size is None and meta.get("model_shape") and len(meta["model_shape"]) >= 2:
        dims = meta["model_shape"]
        size = dims[-2:] if dims[-1] > 4 or len(dims) == 2 else dims[-3:-1]
    splits = _load_splits(data, out, size, data_options, load_data, DataSplits)
    in_shape = splits.input_shape
    if splits.kind == "image" and size is not None and list(in_shape[1:]) != list(size):
        raise XdlError(
            f"the data's images are {in_shape[1]}×{in_shape[2]} but the model takes {size[0]}×{size[1]}: "
            "resize the images (or pass --input-size for a model that takes other sizes)"
        )
    if fmt == "hf" and splits.kind == "image" and in_shape[0] != meta["channels"]:
        raise XdlError(f"the model takes {meta['channels']}-channel images but the data has {in_shape[0]} channels")
    k = num_classes or (len(classes) if classes else None) or len(meta.get("classes", [])) or splits.num_classes
    if fmt == "factory":
        net = read_factory(str(model), Path(weights) if weights else None, in_shape, k, trust_code)
    elif live:
        net = model
    # 2. the wrapper, checked on real samples
    norm = parse_normalize(normalize, in_shape[0] if splits.kind == "image" else in_shape[0]) if normalize else meta.get("normalize")
    mean, std = norm if norm else (None, None)
    wrapped = Imported(net, in_shape, mean=mean, std=std, model_shape=meta.get("model_shape"),
                       fixed_batch=meta.get("fixed_batch"), frozen_mode=fmt == "pt2")
    with torch.no_grad():
        scores = _probe(wrapped, splits.test.x[: min(8, len(splits.test))])
    if looks_like_probabilities(scores):
        wrapped.log_probs = True
        print(f"warning: {PROBABILITY_WARNING}", file=sys.stderr)
    outputs = scores.shape[1]
    names = list(classes) if classes else meta.get("classes") or splits.class_names
    if len(names) != outputs:
        raise XdlError(
            f"the model has {outputs} outputs but {len(names)} class names "
            f"({'--classes' if classes else 'from the model' if meta.get('classes') else 'from the data'}); "
            "pass --classes with one name per output"
        )
    if splits.num_classes > outputs:
        raise XdlError(f"the data has {splits.num_classes} classes but the model only {outputs} outputs")
    splits.class_names = names
    # 3. the run: the artifact copied in, its digest, the wrapper's buffers, metrics; run.json last
    if force:
        clear_run(out)
        for name in (*ARTIFACT.values(),):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    fmt_saved = _store(fmt, net, path, out, splits)
    artifact = out / ARTIFACT[fmt_saved] if fmt_saved in ARTIFACT else out / WEIGHTS
    seed_everything(seed)
    log(f"evaluating the imported model on {len(splits.train) + len(splits.val) + len(splits.test)} samples")
    from xdl.analyzers.base import eval_mode

    with eval_mode(wrapped):  # a live model goes back to the caller in its own modes
        # The test split only: xdl's train and validation splits are not what the model learned
        # from, so their accuracy means nothing — and at 224 px it was 4/5 of an import's time.
        metrics = final_metrics(wrapped, splits, dev, ("test",))
    wrapped.cpu()
    if fmt_saved == "factory":
        state = wrapped
    else:  # only the wrapper's own buffers: the model's weights are in its artifact
        state = _BuffersOnly(wrapped)
    model_cfg = {"name": "imported", "format": fmt_saved, **wrapped.config()}
    if fmt_saved == "factory":
        model_cfg.update(factory=str(model))
    # Provenance: the digest of the artifact in the run, or of the user's weights for a factory.
    digest = sha256(artifact) if fmt_saved != "factory" else (sha256(Path(weights)) if weights else None)
    imported = {"source": str(path.resolve()) if path else f"live {type(model).__name__}", "format": fmt_saved,
                "artifact": artifact.name, "digest": digest, "classes": names}
    if fmt_saved == "factory" and weights is not None:
        imported["weights"] = str(Path(weights).resolve())
    save_run(out, state, splits, model_cfg, {"seed": seed, "epochs": 0}, [], metrics, extra={"imported": imported})
    log(f"imported {imported['source']} ({fmt_saved}); test accuracy {metrics['test_accuracy']:.4f}; run saved to {out}")
    return Run(out)


class _BuffersOnly(nn.Module):
    """The wrapper's own state (mean, std) without the model's weights, for model.safetensors."""

    def __init__(self, wrapped: Imported):
        super().__init__()
        self.register_buffer("mean", wrapped.mean)
        self.register_buffer("std", wrapped.std)


def _load_splits(data, out: Path, size, options: dict | None, load_data, DataSplits):
    """Any data xdl reads; tensors and torch datasets are written into the run first (data.npz)."""
    if isinstance(data, DataSplits):
        return data
    if isinstance(data, (str, dict, Path)):
        spec_options = dict(options or {})
        if size is not None and not isinstance(data, dict) and Path(str(data)).is_dir():
            spec_options.setdefault("input_size", list(size))  # image folders resize to the model's size
        return load_data(str(data) if isinstance(data, Path) else data, **spec_options)
    x, y = _tensors(data)
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    path = out / "data.npz"
    from xdl.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, x=x.numpy(), y=y.numpy())
    return load_data(str(path), **(options or {}))


def _tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a pair of tensors/arrays, a torch Dataset of (x, y) items or a DataLoader."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (torch.as_tensor(v) for v in data)
    elif isinstance(data, (Dataset, DataLoader)):
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=256)
        xs, ys = [], []
        for batch in loader:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise XdlError("a Dataset/DataLoader for xdl must yield (input, label) pairs")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise XdlError(
            f"data must be a data spec (name, path or dict), DataSplits, (x, y) tensors or a torch Dataset/DataLoader, "
            f"not {type(data).__name__}"
        )
    return x.detach().cpu(), y.detach().cpu().long()


def _store(fmt: str, net: nn.Module, path: Path | None, out: Path, splits) -> str:
    """Put the model into the run as a file that reloads without running code; the format saved."""
    if fmt == "hf":
        (out / "model").mkdir(exist_ok=True)
        for name in sorted({*HF_FILES, *(p.name for p in path.glob("*.safetensors"))}):
            if (path / name).is_file():
                shutil.copyfile(path / name, out / "model" / name)
        return fmt
    if fmt in ("keras", "pt2"):
        shutil.copyfile(path, out / ARTIFACT[fmt])
        return fmt
    if fmt == "factory":
        return fmt
    # A live module: the artifact of its kind, else a torch.export program.
    if hasattr(net, "save_pretrained") and hasattr(net, "config"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        net.save_pretrained(str(out / "model"), safe_serialization=True)
        return "hf"
    if type(net).__module__.startswith("keras"):
        net.save(str(out / "model.keras"))
        return "keras"
    sample = splits.test.x[:2]
    was = {m: m.training for m in net.modules()}
    net.eval()
    try:
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(net, (sample.reshape(len(sample), *sample.shape[1:]),), dynamic_shapes=({0: batch},))
    except Exception as exc:  # export refuses data-dependent control flow, unsupported ops, …
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XdlError(
            f"cannot save this {type(net).__name__} into a run: torch.export failed ({first[:200]}); "
            "import it as package.module:factory with --weights instead"
        ) from None
    finally:
        for m, mode in was.items():
            m.training = mode
    torch.export.save(program, str(out / "model.pt2"))
    return "pt2"


# The forms whose file carries the whole model, each read the same way at import and at reload.
READERS = {"hf": read_hf, "keras": read_keras, "pt2": read_pt2}


# -----------------------------------------------------------------------------------------
# Reloading an imported run (xdl.run.Run.model calls this)
# -----------------------------------------------------------------------------------------


def load_model(run, trust_code: bool | None = None) -> nn.Module:
    """The wrapped model of an imported run, its artifact checked against the recorded digest."""
    from xdl.run import WEIGHTS, load_weights

    cfg, info = run.info["model"], run.info["imported"]
    fmt = cfg.get("format")
    if fmt not in ("hf", "keras", "pt2", "factory"):
        raise XdlError(f"{run.path}/run.json names an unknown imported format {fmt!r}")
    artifact = run.path / info.get("artifact", ARTIFACT.get(fmt, WEIGHTS))
    if not artifact.exists():
        raise XdlError(f"{run.path} has lost its model: {artifact.name} is missing")
    if fmt == "factory":
        from xdl.trust import require_trust

        require_trust(f"run {run.path} (model factory {cfg.get('factory')!r})", trust_code)
    if fmt != "factory" and info.get("digest") and sha256(artifact) != info["digest"]:
        raise XdlError(f"{artifact} does not match the sha256 recorded in run.json: the model was changed after import")
    in_shape = tuple(cfg["in_shape"])
    if fmt in READERS:
        net, _ = READERS[fmt](artifact)
    else:
        from xdl.models import build_custom

        net = build_custom({"factory": cfg["factory"]}, in_shape, cfg["num_classes"])
    norm = cfg.get("normalize") or {}
    wrapped = Imported(net, in_shape, mean=norm.get("mean"), std=norm.get("std"), model_shape=cfg.get("model_shape"),
                       log_probs=bool(cfg.get("log_probs")), fixed_batch=cfg.get("fixed_batch"), frozen_mode=fmt == "pt2")
    load_weights(wrapped if fmt == "factory" else _BuffersOnly(wrapped), run.path / WEIGHTS)
    return wrapped.eval()


def live_samples(data: Any, split: str = "test") -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """Samples for a live model: (x, y, DataSplits) from a spec, (x, y, None) from tensors or a Dataset."""
    from xdl.data import load_data
    from xdl.data.types import DataSplits

    if isinstance(data, (str, dict, Path, DataSplits)):
        splits = data if isinstance(data, DataSplits) else load_data(str(data) if isinstance(data, Path) else data)
        part = splits.split(split)
        return part.x, part.y, splits
    x, y = _tensors(data)
    return x, y, None
