"""``xdl train`` end to end: data, model, the loop, the compute card, the run directory.

Read top to bottom: settle the config (a fresh one, or the one a checkpoint saved), load the
data, build the model, fit it, measure it, save the run. Under torchrun every rank trains
its share with DDP; rank 0 writes the run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from torch import nn

from xdl.data import load_data
from xdl.data.types import DataSplits
from xdl.device import resolve_device, seed_everything
from xdl.errors import XdlError
from xdl.methods import robust
from xdl.models.builders import (build_model, check_choice, load_user_weights, make_compatible, model_config,
                                 set_normalization)
from xdl.runs import checkpoint
from xdl.runs.run import Run, check_train_out, clear_run, new_run_path, save_run
from xdl.runs.schema import check_model, check_model_memory
from xdl.training import distributed
from xdl.training.compute import compute_card, reset_peak_memory
from xdl.training.config import DEFAULTS, TrainConfig, config_dict
from xdl.training.dp import choose_model, describe_defaults
from xdl.training.loop import fit, training_autocast
from xdl.training.metrics import final_metrics
from xdl.trust import require_trust


def train(
    data: str | dict | DataSplits = "digits",
    model: str | dict = "auto",
    out: str | Path | None = None,
    *,
    force: bool = False,
    quiet: bool = False,
    data_options: dict | None = None,
    model_options: dict | None = None,
    resume: bool = False,
    init_weights: str | Path | None = None,
    trust_code: bool = False,
    **train_options,
) -> Run | None:
    """Train a model and save it as a run directory.

    >>> run = xdl.train(data="digits", model="cnn", epochs=3)      # doctest: +SKIP
    >>> run.metrics["test_accuracy"]                                # doctest: +SKIP

    ``train_options`` are the fields of :class:`xdl.training.TrainConfig` (epochs, lr, …);
    ``data_options`` go to the data spec (data_dir, target, sensitive, seed …);
    ``model_options`` override the model config (hidden, channels, dropout …).
    Under torchrun every rank trains its share with DDP; rank 0 writes the run and the
    other ranks return None.
    ``init_weights`` starts from a user's weights (.safetensors, or .pt/.pth read without
    executing code). ``resume=True`` continues the unfinished run at ``out`` from its last
    epoch checkpoint, with the config saved there (other arguments are ignored); a saved
    ``package.module:factory`` model is imported only with ``trust_code=True``.
    """
    log = (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr))
    if resume:
        data, model, data_options, model_options, cfg, dp_chosen = _saved_config(out, trust_code)
    else:
        cfg, dp_chosen = _new_config(train_options)
        check_choice(model, model_options)
    resolve_device(cfg.device)  # fail on a missing GPU or a model that cannot build before loading any data
    world = distributed.join(cfg.device)  # torchrun's process group; a no-op for one process
    if not world.main:  # rank 0 speaks and writes for all
        log, quiet = (lambda line: None), True
    out = distributed.broadcast(Path(out) if out else new_run_path(), world)
    check_train_out(out, force, resume)
    splits = _load(data, data_options, cfg, log)
    if not resume and cfg.dp_epsilon is not None:
        model = choose_model(model, splits.kind)
        line = describe_defaults(model, dp_chosen)
        if line:
            log(line)
    cfg = cfg.for_data(splits.kind)  # run.json records the augmentation the run had, chosen or default
    if cfg.epochs is None and cfg.dp_epsilon is None:
        log("epochs: until the validation loss stops improving (--epochs N fixes the count)")
    net, mcfg = _build(model, model_options, splits, cfg, log)
    if not resume:
        if init_weights is not None:
            load_user_weights(net, init_weights)
        distributed.barrier(world)  # every rank has checked ``out`` before rank 0 writes there
        if world.main:
            checkpoint.save_config(out / checkpoint.FOLDER, {"model": mcfg, "data": splits.spec, "train": config_dict(cfg)})
    device = distributed.local_device(cfg.device, world)
    reset_peak_memory(device)
    started = time.perf_counter()
    history = fit(net, splits, cfg, log=log, progress=not quiet, checkpoint_dir=out / checkpoint.FOLDER, resume=resume)
    metrics, card = _measure(net, splits, cfg, history, device, world, time.perf_counter() - started)
    if not world.main:
        distributed.leave(world)
        return None
    if force:
        clear_run(out)
    run = save_run(out, net.cpu(), splits, mcfg, config_dict(cfg), history, metrics, extra={"compute": card, "stopped": history[-1]["stopped"]})
    log(
        f"test accuracy {metrics['test_accuracy']:.4f} after {len(history)} epochs in {metrics['train_seconds']:.1f}s; "
        f"run saved to {out}"
    )
    distributed.leave(world)
    return run


def _saved_config(out: str | Path | None, trust_code: bool) -> tuple:
    """What ``--resume`` continues with: the data, model and train config the checkpoint saved."""
    if out is None:
        raise XdlError("resuming needs the run directory: xdl train --resume RUN")
    saved = checkpoint.load_config(Path(out) / checkpoint.FOLDER)
    if saved["model"].get("name") == "custom":  # a shared run must not run code on --resume
        require_trust(f"{out} (model factory {saved['model'].get('factory')!r})", trust_code)
    return saved["data"], saved["model"], None, None, TrainConfig.from_dict(saved["train"]), {}


def _new_config(train_options: dict) -> tuple[TrainConfig, dict]:
    """The config of a fresh run, and the DP defaults xdl filled in for options left unset."""
    # None is "not chosen" (the CLI's unset flags), so a DP run can fill in its own defaults.
    train_options = {k: v for k, v in train_options.items() if v is not None}
    dp_chosen: dict = {}
    if train_options.get("dp_epsilon") is not None:
        dp_chosen = {k: v for k, v in DEFAULTS.items() if k not in train_options}
    return TrainConfig(**train_options, **dp_chosen), dp_chosen


def _load(data, data_options: dict | None, cfg: TrainConfig, log) -> DataSplits:
    data_options = dict(data_options or {})
    if data_options.get("seed") is None and not (isinstance(data, dict) and "seed" in data):
        data_options["seed"] = cfg.seed  # --seed draws the split too, unless the data spec fixes its own
    splits = data if isinstance(data, DataSplits) else load_data(data, **data_options)
    for note in splits.notes:
        log(f"data: {note}")
    return splits


def _build(model, model_options: dict | None, splits: DataSplits, cfg: TrainConfig, log) -> tuple[nn.Module, dict]:
    """The seeded initial model and the config run.json rebuilds it from, sized before it allocates."""
    mcfg = model_config(model, splits.kind, **(model_options or {}))
    sized = {**mcfg, "in_shape": list(splits.input_shape), "num_classes": splits.num_classes}
    # Training holds each parameter four times: weight, gradient and the optimizer's two moments.
    check_model_memory("the model options", check_model("the model options", sized), bytes_per_parameter=16)
    # Seed before building so the initial weights, too, follow from the seed.
    seed_everything(cfg.seed)
    net = build_model(mcfg, splits.input_shape, splits.num_classes)
    if cfg.dp_epsilon is not None:
        net = make_compatible(net, log)
        mcfg["dp_compatible"] = True  # run.json rebuilds the same, private-trainable layers
    set_normalization(net, splits.train.x)
    return net, mcfg


def _measure(net: nn.Module, splits: DataSplits, cfg: TrainConfig, history: list[dict], device, world,
             seconds: float) -> tuple[dict, dict]:
    """The run's final metrics (every split, eval mode) and its compute card."""
    # Epoch times, not this call's wall time: a resumed run's history holds every session's epochs.
    epoch_seconds = sum(row["seconds"] for row in history)
    card = compute_card(net, splits.train.x[:2], epoch_seconds, len(history) * len(splits.train), device, world.size,
                        robust.attack_passes(cfg.adv_train, cfg.adv_steps), training_autocast(cfg, device))
    metrics = final_metrics(net, splits, device)
    metrics["train_seconds"] = seconds
    metrics["epochs_run"] = len(history)
    if cfg.dp_epsilon is not None:  # the ε the accountant says the whole run spent (≤ the target)
        metrics["dp_epsilon"] = history[-1]["dp_epsilon"]
    return metrics, card
