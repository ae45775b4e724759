"""Differentially private training (DP-SGD, Abadi et al. 2016) with Opacus.

Every step Opacus samples each training record independently with probability q (Poisson
sampling, which the privacy analysis assumes), clips each record's gradient to
``dp_max_grad_norm`` and adds Gaussian noise whose multiplier
``PrivacyEngine.make_private_with_epsilon`` chooses so that the whole run spends at most
``dp_epsilon`` at ``dp_delta``. The accountant's ε after every epoch goes into the history;
the last one is the guarantee recorded in run.json.

The data stay resident on the device, as in :func:`xdl.training.loop.fit`: Opacus' Poisson
loader yields record indices, and a batch is an index gather.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xdl.data.types import DataSplits
from xdl.device import seed_everything
from xdl.errors import XdlError
from xdl.models.builders import opacus_module
from xdl.training import distributed
from xdl.training.config import DEFAULTS
from xdl.training.metrics import evaluate
from xdl.training.steps import TrainingDiverged, _optimizer, _progress, _scheduler, augment, early_stopping

# Papernot et al. 2021's small MNIST CNN with GroupNorm (xdl.models.builders.build_dpcnn); tables keep the MLP.
IMAGE_MODEL = {"name": "dpcnn"}


def choose_model(model: str | dict, kind: str) -> str | dict:
    """The model a DP run trains: the user's, or for "auto" on images the small DP-SGD CNN."""
    return dict(IMAGE_MODEL) if model == "auto" and kind == "image" else model


def describe_defaults(model: str | dict, chosen: dict) -> str:
    """One line naming what xdl chose for a DP run; empty when the user chose everything."""
    parts = [f"the {model['name']} model (a small CNN with GroupNorm, Papernot et al. 2021)"] if isinstance(model, dict) and model == IMAGE_MODEL else []
    names = {"batch_size": "batch size", "lr": "learning rate", "epochs": "epochs"}
    parts += [f"{names[k]} {v:g}" for k, v in chosen.items()]
    if not parts:
        return ""
    return ("differential privacy: xdl chose " + ", ".join(parts)
            + " (DP-SGD's usual choices: a small network, large batches, few epochs); --model, --batch-size, --lr "
            "and --epochs override them")








def fit_private(
    model: nn.Module,
    data: DataSplits,
    cfg,
    log: Callable[[str], None],
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> list[dict]:
    """DP-SGD in place on ``model`` (already made compatible); one history row per epoch."""
    _check_private(data, cfg, resume)
    if cfg.epochs is None:  # the accountant sets the noise for a known number of epochs: no plateau to wait for
        cfg = replace(cfg, epochs=DEFAULTS["epochs"])
    device = distributed.local_device(cfg.device, distributed.current())
    seed_everything(cfg.seed)
    model.to(device)
    x_train, y_train = data.train.x.to(device), data.train.y.to(device)
    opt = _optimizer(model, cfg)
    engine, module, dp_opt, loader = _make_private(model, opt, len(data.train), cfg)
    sigma = dp_opt.noise_multiplier
    log(f"differential privacy: target ε={cfg.dp_epsilon:g} at δ={cfg.dp_delta:g}: noise multiplier {sigma:.3f}, "
        f"sampling rate {1 / len(loader):.4f}, per-record gradient norm ≤ {cfg.dp_max_grad_norm:g}")
    steps = len(loader)  # expected steps per epoch: 1/q
    sched = _scheduler(opt, cfg, cfg.epochs * steps)
    history: list[dict] = []
    best = None
    quiet = warnings.catch_warnings()
    quiet.__enter__()
    # The first layer's input needs no gradient; Opacus' full backward hooks fire anyway, as intended.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    try:
        for epoch in range(1, cfg.epochs + 1):
            start = time.perf_counter()
            bar = _progress(steps, f"epoch {epoch}/{cfg.epochs} (DP)", progress)
            loss_sum, correct, seen = _private_epoch(module, dp_opt, sched, loader, x_train, y_train, cfg, epoch, bar)
            val = evaluate(model, data.val, device)
            epsilon = float(engine.get_epsilon(cfg.dp_delta))
            row = {
                "epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                "train_accuracy": correct / max(seen, 1), "val_loss": val["loss"],
                "val_accuracy": val["accuracy"], "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - start,
                "dp_epsilon": epsilon, "dp_noise_multiplier": sigma,
            }
            history.append(row)
            log(f"epoch {epoch:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}  "
                f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  ε {epsilon:.3f}")
            # Choosing the epoch on validation data spends no privacy of the training records.
            if cfg.early_stopping:
                best, stopped = early_stopping(best, val["loss"], epoch, model, cfg.early_stopping, log)
                if stopped:
                    row["stopped"] = stopped
                    break
        else:
            row["stopped"] = f"ran the {cfg.epochs} epochs of the privacy budget's schedule"
    finally:
        quiet.__exit__(None, None, None)
        module.cleanup()  # the caller's model keeps no Opacus hooks or per-record gradients
    if best is not None:
        model.load_state_dict(best[2])
        history[best[1] - 1]["best"] = True
    model.eval()
    return history


def _check_private(data: DataSplits, cfg, resume: bool) -> None:
    """What DP-SGD refuses before it starts: several processes, resuming, a δ too large for N."""
    if distributed.current().size > 1:
        raise XdlError("differentially private training runs in one process; drop torchrun")
    if resume:
        raise XdlError("a differentially private run cannot be resumed: the privacy accountant is not checkpointed")
    n = len(data.train)
    if cfg.dp_delta >= 1 / n:
        raise XdlError(
            f"dp-delta {cfg.dp_delta:g} is not below 1/N = {1 / n:.3g} for {n} training records: "
            "a δ that large allows leaking whole records; use a smaller --dp-delta"
        )


def _make_private(model: nn.Module, opt: torch.optim.Optimizer, n: int, cfg) -> tuple:
    """Opacus' engine, module, optimizer and Poisson loader of record indices for ``n`` records."""
    opacus = opacus_module()
    from torch.utils.data import DataLoader, TensorDataset

    indices = DataLoader(TensorDataset(torch.arange(n)), batch_size=min(cfg.batch_size, n))
    # RDP accounting (Mironov 2017), as in Opacus' MNIST example and its published figures;
    # it is also cheap enough to report ε after every epoch.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # xdl says so in the README
        engine = opacus.PrivacyEngine(accountant="rdp")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        try:
            module, dp_opt, loader = engine.make_private_with_epsilon(
                module=model, optimizer=opt, data_loader=indices, target_epsilon=cfg.dp_epsilon,
                target_delta=cfg.dp_delta, epochs=cfg.epochs, max_grad_norm=cfg.dp_max_grad_norm,
                poisson_sampling=True,
            )
        except NotImplementedError as exc:  # a layer Opacus has no per-record gradient for
            first = str(exc.args[0][0] if exc.args and isinstance(exc.args[0], list) else exc).strip()
            raise XdlError(f"this model cannot be trained with differential privacy: {first.splitlines()[0]}") from None
    return engine, module, dp_opt, loader


def _private_epoch(module, dp_opt, sched, loader, x_train, y_train, cfg, epoch: int, bar) -> tuple[float, float, int]:
    """One epoch of Poisson-sampled DP-SGD steps: summed loss, correct count and records seen."""
    module.train()
    device = x_train.device
    total_loss = torch.zeros((), device=device)
    total_correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for step, (idx,) in enumerate(loader, 1):
        idx = idx.to(device)
        xb, yb = augment(x_train[idx], cfg), y_train[idx]
        logits = module(xb)
        # The batch mean Opacus assumes, and 0 rather than NaN for an empty Poisson batch.
        loss = F.cross_entropy(logits.float(), yb, reduction="sum", label_smoothing=cfg.label_smoothing)
        loss = loss / max(len(idx), 1)
        dp_opt.zero_grad(set_to_none=True)
        loss.backward()
        dp_opt.step()
        sched.step()
        if not torch.isfinite(loss.detach()):
            raise TrainingDiverged(epoch, step, len(loader), None)
        total_loss += loss.detach() * len(idx)
        total_correct += (logits.argmax(1) == yb).sum()
        seen += len(idx)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return float(total_loss), float(total_correct), seen
