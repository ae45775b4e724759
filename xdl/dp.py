"""Differentially private training (DP-SGD, Abadi et al. 2016) with Opacus.

Every step Opacus samples each training record independently with probability q (Poisson
sampling, which the privacy analysis assumes), clips each record's gradient to
``dp_max_grad_norm`` and adds Gaussian noise whose multiplier
``PrivacyEngine.make_private_with_epsilon`` chooses so that the whole run spends at most
``dp_epsilon`` at ``dp_delta``. The accountant's ε after every epoch goes into the history;
the last one is the guarantee recorded in run.json.

The data stay resident on the device, as in :func:`xdl.training.fit`: Opacus' Poisson
loader yields record indices, and a batch is an index gather.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xdl.data.types import DataSplits
from xdl.errors import XdlError

INSTALL = "differentially private training needs Opacus: pip install 'xdl[privacy]'"

# Options that would break per-record privacy or that Opacus clips away.
EXCLUSIVE = {
    "mixup": "mixup blends records, so one gradient no longer belongs to one record",
    "l1": "an L1 penalty's gradient bypasses Opacus' per-record gradients",
    "grad_clip": "Opacus clips each record's gradient (--dp-max-grad-norm); a global clip has no place",
    "adv_train": "adversarial training is not supported with differential privacy",
    "compile": "torch.compile is not supported with Opacus' per-record gradient hooks",
}


# What a DP practitioner trains with when the user chose nothing else (``xdl train
# --dp-epsilon`` without --model/--batch-size/--lr/--epochs). DP-SGD's noise is added once per
# step and shared by the batch, so large batches and few epochs are the norm (De et al. 2022,
# "Unlocking High-Accuracy Differentially Private Image Classification through Scale"), and
# per-record gradients make every parameter cost once per record: a small network. Measured
# on 3,600 real MNIST digits at ε = 3 (benchmarks/bench_privacy.py): these settings beat
# Opacus' MNIST example recipe in less time, where xdl's default CNN took 20× as long.
DEFAULTS = {"batch_size": 256, "lr": 1e-2, "epochs": 10}
# Papernot et al. 2021's small MNIST CNN with GroupNorm (xdl.models.build_dpcnn); tables keep the MLP.
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


def _opacus():
    try:
        import opacus
    except ImportError:
        raise XdlError(INSTALL) from None
    return opacus


def check_config(cfg) -> None:
    """Validate the DP fields of a TrainConfig (called from its ``__post_init__``)."""
    if not 0 < cfg.dp_epsilon < math.inf:
        raise XdlError(f"dp-epsilon must be > 0 and finite, got {cfg.dp_epsilon}")
    if not 0 < cfg.dp_delta < 1:
        raise XdlError(f"dp-delta must be in (0, 1), got {cfg.dp_delta}")
    if not 0 < cfg.dp_max_grad_norm < math.inf:
        raise XdlError(f"dp-max-grad-norm must be > 0 and finite, got {cfg.dp_max_grad_norm}")
    for name, why in EXCLUSIVE.items():
        value = getattr(cfg, name)
        if value and value != "none":
            raise XdlError(f"--{name.replace('_', '-')} cannot be combined with --dp-epsilon: {why}")


def make_compatible(model: nn.Module, log: Callable[[str], None] | None = None) -> nn.Module:
    """The model with every layer Opacus cannot train privately replaced; each change is logged.

    BatchNorm mixes the records of a batch, so it becomes GroupNorm (Opacus' fixer picks
    gcd(32, channels) groups, which divides even small layers); in-place activations would
    overwrite what the per-record gradient hooks read, so they stop being in place. A model
    still incompatible after that is the user's error, named by its first offending layer.
    """
    from opacus.validators import ModuleValidator

    _opacus()
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
    opacus = _opacus()
    from torch.utils.data import DataLoader, TensorDataset

    from xdl import distributed
    from xdl.device import seed_everything
    from xdl.training import TrainingDiverged, _optimizer, _progress, _scheduler, augment, early_stopping, evaluate

    world = distributed.current()
    if world.size > 1:
        raise XdlError("differentially private training runs in one process; drop torchrun")
    if resume:
        raise XdlError("a differentially private run cannot be resumed: the privacy accountant is not checkpointed")
    n = len(data.train)
    if cfg.dp_delta >= 1 / n:
        raise XdlError(
            f"dp-delta {cfg.dp_delta:g} is not below 1/N = {1 / n:.3g} for {n} training records: "
            "a δ that large allows leaking whole records; use a smaller --dp-delta"
        )
    device = distributed.local_device(cfg.device, world)
    seed_everything(cfg.seed)
    model.to(device)
    x_train, y_train = data.train.x.to(device), data.train.y.to(device)
    opt = _optimizer(model, cfg)
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
            module.train()
            start = time.perf_counter()
            total_loss = torch.zeros((), device=device)
            total_correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            bar = _progress(steps, f"epoch {epoch}/{cfg.epochs} (DP)", progress)
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
                    raise TrainingDiverged(epoch, step, steps, None)
                total_loss += loss.detach() * len(idx)
                total_correct += (logits.argmax(1) == yb).sum()
                seen += len(idx)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            val = evaluate(model, data.val, device)
            epsilon = float(engine.get_epsilon(cfg.dp_delta))
            seconds = time.perf_counter() - start
            row = {
                "epoch": epoch, "train_loss": float(total_loss) / max(seen, 1),
                "train_accuracy": float(total_correct) / max(seen, 1), "val_loss": val["loss"],
                "val_accuracy": val["accuracy"], "lr": opt.param_groups[0]["lr"], "seconds": seconds,
                "dp_epsilon": epsilon, "dp_noise_multiplier": sigma,
            }
            history.append(row)
            log(f"epoch {epoch:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}  "
                f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  ε {epsilon:.3f}")
            # Choosing the epoch on validation data spends no privacy of the training records.
            if cfg.early_stopping:
                best, stop = early_stopping(best, val["loss"], epoch, model, cfg.early_stopping, log)
                if stop:
                    break
    finally:
        quiet.__exit__(None, None, None)
        module.cleanup()  # the caller's model keeps no Opacus hooks or per-record gradients
    if best is not None:
        model.load_state_dict(best[2])
        history[best[1] - 1]["best"] = True
    model.eval()
    return history
