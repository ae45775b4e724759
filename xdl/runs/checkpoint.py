"""Epoch checkpoints: everything ``fit()`` needs to continue a run exactly where it stopped.

    RUN/checkpoint/
      config.json              the run's model, data and training config (for ``--resume``)
      state-EPOCH.safetensors  weights, optimizer tensors, RNG states, early-stopping best
      state.json               epoch, history, scheduler, optimizer hyperparameters, numpy
                               and Python RNG states, and the name of its tensors file

No pickle anywhere: tensors go to safetensors under flat keys, the rest to JSON. Each file
is written atomically, and ``state.json`` goes last and names its tensors file, so a crash
at any moment leaves the previous complete checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xdl.errors import XdlError
from xdl.io import atomic_path, read_json, write_json
from xdl.runs.schema import check_run_info

FORMAT_VERSION = 1
FOLDER = "checkpoint"
CONFIG = "config.json"
STATE = "state.json"


def exists(folder: Path) -> bool:
    return (Path(folder) / STATE).is_file()


def save_config(folder: Path, config: dict) -> None:
    """The run's config, written once before the first epoch so ``--resume`` can rebuild it."""
    write_json(Path(folder) / CONFIG, {"format_version": FORMAT_VERSION, **config})


def load_config(folder: Path) -> dict:
    folder = Path(folder)
    if not exists(folder) or not (folder / CONFIG).is_file():
        raise XdlError(f"{folder.parent} has no checkpoint to resume from (no {FOLDER}/{STATE})")
    config = _versioned(read_json(folder / CONFIG), folder / CONFIG)
    missing = [k for k in ("model", "data", "train") if not isinstance(config.get(k), dict)]
    if missing:
        raise XdlError(f"{folder / CONFIG} lacks the {missing[0]!r} section: the checkpoint is damaged")
    return check_run_info(str(folder / CONFIG), config, built=False)


def save(
    folder: Path,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    history: list[dict],
    best: tuple[float, int, dict] | None,
) -> None:
    """Write the state at the end of ``epoch``; older tensor files are removed after the commit."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    opt_rest: dict[str, dict] = {}
    for index, entries in opt["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value
            else:
                opt_rest.setdefault(str(index), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator.get_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    if best is not None:
        tensors.update({f"best.{k}": v for k, v in best[2].items()})
    # safetensors refuses shared storage; contiguous CPU copies make every tensor its own.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    weights = f"state-{epoch:04d}.safetensors"
    with atomic_path(folder / weights) as tmp:
        save_file(tensors, str(tmp))
    np_state = np.random.get_state()
    py_state = random.getstate()
    write_json(
        folder / STATE,
        {
            "format_version": FORMAT_VERSION,
            "epoch": epoch,
            "tensors": weights,
            "history": history,
            "optimizer": {"param_groups": opt["param_groups"], "state": opt_rest},
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "best": None if best is None else {"loss": best[0], "epoch": best[1]},
        },
    )
    for stale in folder.glob("state-*.safetensors"):
        if stale.name != weights:
            stale.unlink()


def restore(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
) -> tuple[int, list[dict], tuple[float, int, dict] | None]:
    """Load the last checkpoint into the given objects; return (epoch, history, best)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    state = _versioned(read_json(folder / STATE), folder / STATE)
    try:
        tensors = load_file(str(folder / state["tensors"]))
    except (SafetensorError, OSError, KeyError, TypeError) as exc:
        raise XdlError(f"cannot read the checkpoint tensors in {folder}: {exc}") from None

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        model.load_state_dict(group("model."))
        opt_state: dict[int, dict] = {}
        for key, value in group("optim.").items():
            index, _, name = key.partition(".")
            opt_state.setdefault(int(index), {})[name] = value
        for index, entries in state["optimizer"]["state"].items():
            opt_state.setdefault(int(index), {}).update(entries)
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise XdlError(f"the checkpoint in {folder} does not fit this model and config: {first}") from None
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    cuda = group("rng.cuda.")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([cuda[str(i)] for i in range(len(cuda))])
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    best = None
    if state.get("best"):
        best = (state["best"]["loss"], state["best"]["epoch"], group("best."))
    return int(state["epoch"]), state["history"], best


def _versioned(info: Any, path: Path) -> dict:
    version = info.get("format_version") if isinstance(info, dict) else None
    if not isinstance(version, int):
        raise XdlError(f"{path} has no format_version: not an xdl checkpoint")
    if version > FORMAT_VERSION:
        raise XdlError(f"{path} was written by a newer xdl (checkpoint format {version}); upgrade xdl to resume it")
    return info
