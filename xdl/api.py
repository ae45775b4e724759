"""The Python API: each CLI action is one call here, and the CLI calls exactly these."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from torch import nn

from xdl import checkpoint
from xdl import distributed, robust
from xdl.compute import compute_card, reset_peak_memory
from xdl.data import load_data
from xdl.data.types import DataSplits
from xdl.errors import XdlError
from xdl.models import build_model, check_choice, load_user_weights, model_config, set_normalization
from xdl.analysis import analyze
from xdl.schema import check_model, check_model_memory
from xdl.run import Run, check_train_out, clear_run, new_run_path, save_run
from xdl.trust import require_trust
from xdl.training import SAMPLE_BUDGET, TrainConfig, config_dict, evaluate, fit
from xdl.device import resolve_device, seed_everything


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
        if out is None:
            raise XdlError("resuming needs the run directory: xdl train --resume RUN")
        saved = checkpoint.load_config(Path(out) / checkpoint.FOLDER)
        if saved["model"].get("name") == "custom":  # a shared run must not run code on --resume
            require_trust(f"{out} (model factory {saved['model'].get('factory')!r})", trust_code)
        data, model, data_options, model_options = saved["data"], saved["model"], None, None
        cfg = TrainConfig.from_dict(saved["train"])
    else:
        # None is "not chosen" (the CLI's unset flags), so a DP run can fill in its own defaults.
        train_options = {k: v for k, v in train_options.items() if v is not None}
        dp_chosen: dict = {}
        if train_options.get("dp_epsilon") is not None:
            from xdl.dp import DEFAULTS

            dp_chosen = {k: v for k, v in DEFAULTS.items() if k not in train_options}
        cfg = TrainConfig(**train_options, **dp_chosen)
        check_choice(model, model_options)
    resolve_device(cfg.device)  # fail on a missing GPU or a model that cannot build before loading any data
    world = distributed.join(cfg.device)  # torchrun's process group; a no-op for one process
    if not world.main:  # rank 0 speaks and writes for all
        log, quiet = (lambda line: None), True
    out = distributed.broadcast(Path(out) if out else new_run_path(), world)
    check_train_out(out, force, resume)
    data_options = dict(data_options or {})
    if data_options.get("seed") is None and not (isinstance(data, dict) and "seed" in data):
        data_options["seed"] = cfg.seed  # --seed draws the split too, unless the data spec fixes its own
    splits = data if isinstance(data, DataSplits) else load_data(data, **data_options)
    for note in splits.notes:
        log(f"data: {note}")
    if not resume and cfg.dp_epsilon is not None:
        from xdl.dp import choose_model, describe_defaults

        model = choose_model(model, splits.kind)
        line = describe_defaults(model, dp_chosen)
        if line:
            log(line)
    if cfg.epochs is None:
        cfg = cfg.for_samples(len(splits.train.y))
        log(f"epochs: {cfg.epochs} (the default budget of about {SAMPLE_BUDGET:,} samples for "
            f"{len(splits.train.y):,} training samples; --epochs sets it)")
    mcfg = model_config(model, splits.kind, **(model_options or {}))
    sized = {**mcfg, "in_shape": list(splits.input_shape), "num_classes": splits.num_classes}
    # Training holds each parameter four times: weight, gradient and the optimizer's two moments.
    check_model_memory("the model options", check_model("the model options", sized), bytes_per_parameter=16)
    # Seed before building so the initial weights, too, follow from the seed.
    seed_everything(cfg.seed)
    net = build_model(mcfg, splits.input_shape, splits.num_classes)
    if cfg.dp_epsilon is not None:
        from xdl.dp import make_compatible

        net = make_compatible(net, log)
        mcfg["dp_compatible"] = True  # run.json rebuilds the same, private-trainable layers
    set_normalization(net, splits.train.x)
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
    seconds = time.perf_counter() - started
    # Epoch times, not this call's wall time: a resumed run's history holds every session's epochs.
    epoch_seconds = sum(row["seconds"] for row in history)
    card = compute_card(net, splits.train.x[:2], epoch_seconds, len(history) * len(splits.train), device, world.size,
                        robust.attack_passes(cfg.adv_train, cfg.adv_steps))
    metrics = final_metrics(net, splits, device)
    metrics["train_seconds"] = seconds
    metrics["epochs_run"] = len(history)
    if cfg.dp_epsilon is not None:  # the ε the accountant says the whole run spent (≤ the target)
        metrics["dp_epsilon"] = history[-1]["dp_epsilon"]
    if not world.main:
        distributed.leave(world)
        return None
    if force:
        clear_run(out)
    run = save_run(out, net.cpu(), splits, mcfg, config_dict(cfg), history, metrics, extra={"compute": card})
    log(
        f"test accuracy {metrics['test_accuracy']:.4f} after {len(history)} epochs in {seconds:.1f}s; "
        f"run saved to {out}"
    )
    distributed.leave(world)
    return run


def final_metrics(model: nn.Module, data: DataSplits, device, splits: tuple[str, ...] = ("train", "val", "test")) -> dict:
    """Loss and accuracy on each of ``splits`` (default all), in eval mode (the overfitting report compares them)."""
    metrics = {}
    for name in splits:
        result = evaluate(model, data.split(name), device)
        metrics[f"{name}_loss"] = result["loss"]
        metrics[f"{name}_accuracy"] = result["accuracy"]
    return metrics


def load(path: str | Path, trust_code: bool = False) -> Run:
    """Open a run: ``run.model`` (eval mode, CPU) and ``run.data`` (its splits) load on first use.

    A run whose model is a user's ``package.module:factory`` builds only with ``trust_code=True``
    (or XDL_TRUST_CODE=1): loading a downloaded run must not run code from it.
    """
    return Run(path, trust_code=trust_code)


def explain(source, method: str = "saliency", **options):
    """Explain a run's (or a model's) predictions: ``xdl.explain(run, "ig", samples=8)``."""
    return analyze("explain", source, method, **options)


def attack(source, method: str = "fgsm", **options):
    """Attack a run or model: ``xdl.attack(run, "pgd", params={"eps": 0.1})``."""
    return analyze("attack", source, method, **options)


def report(source, method: str = "bias", **options):
    """Report on a run's health: ``xdl.report(run, "overfit")``."""
    return analyze("report", source, method, **options)


def audit(source: "Run | str | Path | nn.Module", data=None, out: str | Path | None = None, **options):
    """Run every applicable analyzer and write RUN/audit.html and RUN/audit.json.

    >>> page = xdl.audit(run, only=["ig", "pgd", "calibration"])   # doctest: +SKIP
    >>> page.html_path                                             # doctest: +SKIP

    Options (only, skip, samples, recompute, eps, device, progress, trust_code) are those of
    :func:`xdl.auditing.audit`; the ``xdl audit`` command calls this. A live ``nn.Module``
    is first imported into a run at ``out`` with ``data`` (see :func:`xdl.import_model`;
    normalize, classes, input_size, force and seed go there):
    ``xdl.audit(model, data=(x, y), out="runs/mine")``.
    """
    from xdl.auditing import audit as run_audit

    if isinstance(source, nn.Module):
        source = _import_live(source, data, out, options)
    return run_audit(source, **options)


def _import_live(model: nn.Module, data, out, options: dict) -> Run:
    """A live model is audited as a run: imported (model and data saved) into ``out`` first."""
    from xdl.imported import import_model

    if data is None or out is None:
        raise XdlError("auditing a live model needs data= (a spec, tensors or a Dataset) and out= (the run directory to write)")
    keys = ("normalize", "classes", "input_size", "force", "seed")
    settings = {k: options.pop(k) for k in keys if k in options}
    return import_model(model, data, out, device=options.get("device", "auto"), quiet=not options.get("progress", True), **settings)
