"""``xdl import``: a run directory for a model xdl did not train.

Read top to bottom: check the request, read the model's own metadata, load the data at
the size the model wants, wrap the model behind xdl's input rule and check it on real
samples, then store the artifact, its digest and the test metrics as a run.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xdl.data import load_data
from xdl.data.given import tensors_of
from xdl.data.types import DataSplits
from xdl.device import resolve_device, seed_everything
from xdl.errors import XdlError
from xdl.io import atomic_path
from xdl.models.imported import (ARTIFACT, HF_FILES, PROBABILITY_WARNING, READERS, Imported, _BuffersOnly, _probe,
                                 detect_format, looks_like_probabilities, parse_normalize, read_factory, sha256)
from xdl.models.inference import eval_mode
from xdl.models.weights import WEIGHTS
from xdl.runs.run import Run, clear_run, new_run_path, save_run
from xdl.training.metrics import final_metrics
from xdl.trust import require_trust


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
) -> Run:
    """Make a run directory for a model xdl did not train; return the :class:`xdl.Run`.

    ``model`` is ``"hf:DIR"``, a ``.keras`` or ``.pt2`` path, ``"package.module:factory"``
    (with ``weights``; needs ``trust_code``), or a live ``nn.Module`` (saved into the run
    with ``torch.export``, or ``save_pretrained``/``.keras`` for those kinds). ``data`` is
    any data spec, a :class:`DataSplits`, tensors ``(x, y)`` or a torch Dataset/DataLoader
    (the last two are written into the run as ``data.npz``). The run holds the model, its
    digest and the evaluation metrics; it has no training history.
    """
    log = (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr))
    out = Path(out) if out else new_run_path()
    fmt, path = _check_request(model, out, force, input_size, weights, trust_code)
    dev = resolve_device(device)
    # 1. the model's own metadata, then the data at the size it wants
    net, meta = READERS[fmt](path) if fmt in READERS else (None, {})
    splits = _load_splits(data, out, _input_size(input_size, meta), data_options)
    _check_shape(splits, _input_size(input_size, meta), meta, fmt)
    in_shape = splits.input_shape
    k = num_classes or (len(classes) if classes else None) or len(meta.get("classes", [])) or splits.num_classes
    if fmt == "factory":
        net = read_factory(str(model), Path(weights) if weights else None, in_shape, k, trust_code)
    elif fmt == "module":
        net = model
    # 2. the wrapper, checked on real samples
    wrapped, names = _wrap(net, splits, meta, fmt, normalize, classes)
    splits.class_names = names
    # 3. the run: the artifact copied in, its digest, the wrapper's buffers, metrics; run.json last
    if force:
        clear_run(out)
        for name in ARTIFACT.values():
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    fmt_saved = _store(fmt, net, path, out, splits)
    artifact = out / ARTIFACT[fmt_saved] if fmt_saved in ARTIFACT else out / WEIGHTS
    seed_everything(seed)
    log(f"evaluating the imported model on {len(splits.train) + len(splits.val) + len(splits.test)} samples")
    with eval_mode(wrapped):  # a live model goes back to the caller in its own modes
        # The test split only: xdl's train and validation splits are not what the model learned
        # from, so their accuracy means nothing — and at 224 px it was 4/5 of an import's time.
        metrics = final_metrics(wrapped, splits, dev, ("test",))
    wrapped.cpu()
    state = wrapped if fmt_saved == "factory" else _BuffersOnly(wrapped)  # else the weights are in the artifact
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


def _check_request(model, out: Path, force: bool, input_size, weights, trust_code) -> tuple[str, Path | None]:
    """The model's format and path, after every refusal that needs no data."""
    if out.exists() and not out.is_dir():
        raise XdlError(f"--out {out} is a file; a run is a directory")
    if (out / "run.json").exists() and not force:
        raise XdlError(f"{out} already holds a run; choose another --out or pass --force to replace it")
    if input_size is not None and (len(input_size) != 2 or min(input_size) < 1):
        raise XdlError(f"--input-size must be one or two positive sizes (H,W), got {input_size}")
    if isinstance(model, nn.Module):
        fmt, path = "module", None
    else:
        fmt, text = detect_format(str(model))
        path = Path(text).expanduser()
        if fmt != "factory" and not path.exists():
            raise XdlError(f"model not found: {path}")
    if weights is not None and fmt != "factory":
        raise XdlError("--weights goes with a package.module:factory model; the other forms carry their weights")
    if fmt == "factory":
        require_trust(f"the model {str(model)!r}", trust_code)  # before loading any data
    return fmt, path


def _input_size(input_size, meta: dict) -> list[int] | None:
    """H, W the model takes: as given, from its config, or from the shape it was exported with."""
    size = list(input_size) if input_size is not None else meta.get("size")
    if size is None and meta.get("model_shape") and len(meta["model_shape"]) >= 2:
        dims = meta["model_shape"]
        size = dims[-2:] if dims[-1] > 4 or len(dims) == 2 else dims[-3:-1]
    return size


def _check_shape(splits: DataSplits, size, meta: dict, fmt: str) -> None:
    in_shape = splits.input_shape
    if splits.kind == "image" and size is not None and list(in_shape[1:]) != list(size):
        raise XdlError(
            f"the data's images are {in_shape[1]}×{in_shape[2]} but the model takes {size[0]}×{size[1]}: "
            "resize the images (or pass --input-size for a model that takes other sizes)"
        )
    if fmt == "hf" and splits.kind == "image" and in_shape[0] != meta["channels"]:
        raise XdlError(f"the model takes {meta['channels']}-channel images but the data has {in_shape[0]} channels")


def _wrap(net: nn.Module, splits: DataSplits, meta: dict, fmt: str, normalize, classes) -> tuple[Imported, list[str]]:
    """The model behind xdl's input rule, probed on test samples; and one class name per output."""
    in_shape = splits.input_shape
    norm = parse_normalize(normalize, in_shape[0]) if normalize else meta.get("normalize")
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
    return wrapped, names


def _load_splits(data, out: Path, size, options: dict | None) -> DataSplits:
    """Any data xdl reads; tensors and torch datasets are written into the run first (data.npz)."""
    if isinstance(data, DataSplits):
        return data
    if isinstance(data, (str, dict, Path)):
        spec_options = dict(options or {})
        if size is not None and not isinstance(data, dict) and Path(str(data)).is_dir():
            spec_options.setdefault("input_size", list(size))  # image folders resize to the model's size
        return load_data(str(data) if isinstance(data, Path) else data, **spec_options)
    x, y = tensors_of(data)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "data.npz"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, x=x.numpy(), y=y.numpy())
    return load_data(str(path), **(options or {}))


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
