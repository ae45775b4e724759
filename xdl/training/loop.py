"""The training loop: data resident in device tensors, augmentation on whole batches.

Read it top to bottom: the set-up (device, data, optimizer, attack), one epoch of steps,
the epoch's row of history, the loop. There is no callback framework; early stopping and
the schedule are a few lines each. The hyperparameters are :class:`xdl.training.config.TrainConfig`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xdl.data import stream
from xdl.data.types import DataSplits, Split
from xdl.device import autocast_dtype, seed_everything
from xdl.errors import XdlError
from xdl.methods import robust
from xdl.models.builders import build_model, set_normalization
from xdl.runs import checkpoint
from xdl.training import distributed
from xdl.training.coguard import CatastrophicOverfitGuard
from xdl.training.config import DECAY_FRACTION, MAX_EPOCHS, PATIENCE, TrainConfig
from xdl.training.dp import fit_private
from xdl.training.metrics import evaluate
from xdl.training.steps import (Logger, PlateauSchedule, TrainingDiverged, _l1, _optimizer, _progress, _scheduler, augment,
                                early_stopping, keep_best)

PROBE_MIN = 256  # training samples evaluated clean each epoch, at least (else as many as validation has)


# -----------------------------------------------------------------------------------------
# Set-up: everything one run's epochs share
# -----------------------------------------------------------------------------------------


@dataclass
class _Loop:
    model: nn.Module
    data: DataSplits
    cfg: TrainConfig
    world: distributed.World
    device: torch.device
    generator: torch.Generator
    streamed: bool
    loader: Any  # stream.EpochLoader of a streamed split, else None
    x_train: torch.Tensor | None
    y_train: torch.Tensor
    probe: Split
    steps_per_epoch: int
    seen: int  # samples per epoch, over all ranks
    opt: torch.optim.Optimizer
    sched: Any
    adversary: Any
    guard: CatastrophicOverfitGuard | None
    use_amp: bool
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler
    step_model: nn.Module

    @classmethod
    def start(cls, model: nn.Module, data: DataSplits, cfg: TrainConfig) -> "_Loop":
        world = distributed.current()
        device = distributed.local_device(cfg.device, world)
        if data.kind == "tabular" and set(cfg.augment) - {"noise"}:
            raise XdlError("tabular data supports only the 'noise' augmentation (and mixup)")
        generator = seed_everything(cfg.seed)
        if world.size > 1:
            # Ranks share the shuffling generator, not the augmentation and dropout noise.
            torch.manual_seed(cfg.seed + world.rank)
        model.to(device)
        # NHWC lets cuDNN choose its tensor-core convolution kernels, and oneDNN's CPU kernels
        # are faster in it too (the default CNN trains ~15% faster on 28×28 digits, 2 cores).
        channels_last = any(isinstance(m, nn.Conv2d) for m in model.modules())
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # Data lives on the device for the whole run: batches are index gathers, not copies.
        # A streamed split (too large to hold) is decoded per batch by persistent workers instead.
        streamed = stream.is_streamed(data.train.x)
        loader = stream.EpochLoader(data.train.x, device) if streamed else None
        x_train, y_train = (None if streamed else data.train.x.to(device)), data.train.y.to(device)
        if channels_last and not streamed:
            x_train = x_train.contiguous(memory_format=torch.channels_last)  # index gathers keep the layout
        n = len(y_train)
        # A fixed training subset, evaluated each epoch exactly as the validation split is: the loss
        # logged while training is of augmented, mixed or adversarial batches in train mode (with any
        # L1 term), so only this one compares like with like against the validation loss.
        probe_size = min(n, max(len(data.val), PROBE_MIN))
        probe = data.train.subset(torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:probe_size].sort().values)
        steps_per_epoch = distributed.steps_per_epoch(n, cfg.batch_size, world)
        opt = _optimizer(model, cfg)
        sched = PlateauSchedule(opt, steps_per_epoch) if cfg.epochs is None else _scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
        adversary = robust.train_attack(cfg.adv_train, cfg.adv_eps, cfg.adv_steps, data, device, fgsm_step=cfg.adv_step)
        # FGSM training can collapse to ~0% PGD accuracy within an epoch (Wong et al. 2020).
        guard = CatastrophicOverfitGuard(data, cfg.adv_eps, device, seed=cfg.seed) if cfg.adv_train == "fgsm" else None
        autocast = training_autocast(cfg, device)
        use_amp = autocast is not None
        amp_dtype = autocast or torch.bfloat16  # without autocast any dtype every device accepts
        # fp16 needs loss scaling against underflow; bf16 has fp32's range and does not.
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        # Training steps go through DDP (and the compiler); evaluation uses the plain model,
        # whose forward passes need no collective and may differ in number between ranks.
        step_model = distributed.wrap(model, device, world)
        if cfg.compile:
            step_model = torch.compile(step_model)
        return cls(model, data, cfg, world, device, generator, streamed, loader, x_train, y_train, probe,
                   steps_per_epoch, min(n, steps_per_epoch * cfg.batch_size), opt, sched, adversary, guard,
                   use_amp, amp_dtype, scaler, step_model)

    # -------------------------------------------------------------------------------------
    # One epoch of steps
    # -------------------------------------------------------------------------------------

    def epoch(self, epoch: int, progress: bool, checkpoint_dir: Path | None) -> tuple[float, float]:
        """Train one epoch; the summed loss and correct count over all ranks."""
        cfg, device = self.cfg, self.device
        self.step_model.train()
        order = torch.randperm(len(self.y_train), generator=self.generator).to(device)
        total_loss = torch.zeros((), device=device)
        total_correct = torch.zeros((), device=device, dtype=torch.long)
        first_bad = torch.zeros((), device=device, dtype=torch.long)  # 1-based step of the first NaN/inf loss
        bar = _progress(self.steps_per_epoch, f"epoch {epoch}{self.of}", progress)
        shards = [distributed.shard_batch(order[step * cfg.batch_size : (step + 1) * cfg.batch_size], self.world)
                  for step in range(self.steps_per_epoch)]
        decoded = self.loader.epoch([idx for idx, _ in shards]) if self.streamed else None
        for step, (idx, share) in enumerate(shards):
            xb, yb = augment(next(decoded) if self.streamed else self.x_train[idx], cfg), self.y_train[idx]
            logits, loss = self.step(xb, yb, share)
            # Accumulate on the device: a .item() per step would sync the GPU every batch.
            total_loss += loss.detach() * len(idx)
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss.detach()), step + 1, first_bad)
            total_correct += (logits.argmax(1) == yb).sum()
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        if bar is not None:
            bar.close()
        if first_bad.item():
            raise TrainingDiverged(epoch, int(first_bad.item()), self.steps_per_epoch, checkpoint_dir)
        loss_sum, correct_sum = distributed.all_reduce_sum(total_loss, total_correct)
        return loss_sum, correct_sum

    def step(self, xb: torch.Tensor, yb: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch (attacked and mixed first when asked); its logits and loss."""
        cfg, device = self.cfg, self.device
        if self.adversary is not None:
            # The plain model, not DDP's wrapper: the attack's input gradient must not trigger a gradient sync.
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                xb = self.adversary(self.model, xb, yb)
        if cfg.mixup > 0:
            lam = float(torch.distributions.Beta(cfg.mixup, cfg.mixup).sample())
            perm = torch.randperm(len(yb), device=device)
            xb = lam * xb + (1 - lam) * xb[perm]
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            logits = self.step_model(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
            if cfg.mixup > 0:
                loss = lam * loss + (1 - lam) * F.cross_entropy(logits.float(), yb[perm], label_smoothing=cfg.label_smoothing)
            if cfg.l1 > 0:
                loss = loss + cfg.l1 * _l1(self.model)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss * share if self.world.size > 1 else loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return logits, loss

    # -------------------------------------------------------------------------------------
    # The epoch's row of history
    # -------------------------------------------------------------------------------------

    def row(self, epoch: int, loss_sum: float, correct_sum: float, start: float) -> dict:
        val = evaluate(self.model, self.data.val, self.device)
        clean = evaluate(self.model, self.probe, self.device)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / self.seen,
            "train_accuracy": correct_sum / self.seen,
            "val_loss": val["loss"],
            "val_loss_se": val["loss_se"],
            "val_accuracy": val["accuracy"],
            "train_eval_loss": clean["loss"],
            "train_eval_accuracy": clean["accuracy"],
            "lr": self.opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - start,
        }
        if self.guard is not None:
            row["pgd_accuracy"] = self.guard.measure(self.model)
        return row

    @property
    def of(self) -> str:
        """The "/N" of an epoch's label when the count is fixed; a plateau run has no N in advance."""
        return "" if self.cfg.epochs is None else f"/{self.cfg.epochs}"

    def stop(self, epoch: int, row: dict, best: tuple | None, log: Logger) -> tuple[tuple | None, str | None]:
        """The best (validation loss, epoch, weights) to restore, and why training stops here (else None)."""
        if self.guard is not None and self.guard.update(self.model, epoch, row["pgd_accuracy"]):
            log(self.guard.message)
            return (math.nan, self.guard.best_epoch, self.guard.best_state), self.guard.message
        if self.cfg.epochs is None:
            return self.plateau(epoch, row, best, log)
        if self.cfg.early_stopping:
            best, why = early_stopping(best, row["val_loss"], epoch, self.model, self.cfg.early_stopping, log)
            if why:
                return best, why
        return best, (f"ran the {epoch} epochs --epochs asked for" if epoch == self.cfg.epochs else None)

    def plateau(self, epoch: int, row: dict, best: tuple | None, log: Logger) -> tuple[tuple, str | None]:
        """Without --epochs: hold the peak rate until the validation loss plateaus, then decay and stop."""
        val_loss = row["val_loss"]
        best = keep_best(best, val_loss, epoch, self.model)
        sched, patience = self.sched, self.cfg.early_stopping or PATIENCE
        if sched.finished:
            started = sched.decay_from // self.steps_per_epoch
            decayed = f"{sched.why}; the learning rate then decayed to zero over epochs {started + 1}-{epoch}"
            # The annealed end is what the decay was for. The epoch of lowest validation loss is
            # partly chosen by the noise of a small validation set (on 400 MNIST digits it picked
            # a mid-decay epoch 1 point worse on the test set), so an earlier epoch is kept only
            # where it was better by more than the last loss's standard error: overfitting.
            if best[0] < val_loss - row["val_loss_se"]:
                return best, (f"{decayed}; the weights of epoch {best[1]} are kept: its validation loss {best[0]:.4f} "
                              f"is below the last epoch's {val_loss:.4f} by more than its standard error")
            return (val_loss, epoch, self.model.state_dict()), (
                f"{decayed}, and the last epoch's weights are kept (no earlier validation loss was lower by more than "
                f"the standard error, {row['val_loss_se']:.4f})")
        stalled = epoch - best[1] >= patience
        if not sched.decaying and (stalled or epoch >= MAX_EPOCHS):
            why = (f"the validation loss had not improved for {patience} epochs since epoch {best[1]}"
                   if stalled else f"the cap of {MAX_EPOCHS} epochs at the peak rate was reached")
            decay_epochs = math.ceil(DECAY_FRACTION * epoch)
            sched.decay(decay_epochs, why)
            log(f"{why}: decaying the learning rate to zero over {decay_epochs} epochs")
        return best, None


# -----------------------------------------------------------------------------------------
# The loop
# -----------------------------------------------------------------------------------------


def training_autocast(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype ``fit`` autocasts training steps to, None for fp32: ``--amp`` where the device
    runs a lower precision natively; DP-SGD's loop always trains in fp32."""
    return autocast_dtype(device) if cfg.amp and cfg.dp_epsilon is None else None


def fit(
    model: nn.Module,
    data: DataSplits,
    cfg: TrainConfig,
    log: Logger | None = None,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> list[dict]:
    """Train ``model`` in place on ``data.train``; return one history row per epoch.

    With ``checkpoint_dir`` the complete state is saved there after every epoch, and
    ``resume`` continues from it so that the result equals an uninterrupted run (on CPU).
    A NaN or infinite loss raises :class:`TrainingDiverged`, leaving the last good checkpoint.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    cfg = cfg.for_data(data.kind)
    if cfg.dp_epsilon is not None:  # DP-SGD samples, clips and noises its own way: xdl.training.dp's loop
        return fit_private(model, data, cfg, log, progress, checkpoint_dir, resume)
    loop = _Loop.start(model, data, cfg)
    history: list[dict] = []
    best: tuple[float, int, dict] | None = None
    epoch = 0
    if resume:
        epoch, history, best = checkpoint.restore(checkpoint_dir, model, loop.opt, loop.sched, loop.scaler, loop.generator)
        log(f"resuming after epoch {epoch}{loop.of} from {checkpoint_dir}")
    stopped = None
    while stopped is None:
        epoch += 1
        start = time.perf_counter()
        loss_sum, correct_sum = loop.epoch(epoch, progress, checkpoint_dir)
        row = loop.row(epoch, loss_sum, correct_sum, start)
        history.append(row)
        log(
            f"epoch {epoch:>3}{loop.of}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  {len(loop.y_train) / row['seconds']:,.0f} samples/s"
        )
        best, stopped = loop.stop(epoch, row, best, log)
        if stopped is None and checkpoint_dir is not None and loop.world.main:
            checkpoint.save(checkpoint_dir, epoch, model, loop.opt, loop.sched, loop.scaler, loop.generator, history, best)
    row["stopped"] = stopped
    if best is not None:
        model.load_state_dict(best[2])
        history[best[1] - 1]["best"] = True
    model.eval()
    return history


def retrain(model_cfg: dict, train_cfg: dict, data: DataSplits, init_seed: int) -> nn.Module:
    """A fresh model of ``model_cfg`` trained quietly on ``data`` with ``train_cfg`` (seed included);
    ``init_seed`` draws its initial weights. The methods that retrain a run's model — LiRA's
    reference models, out-of-fold label checks — are handed this by their analyzer."""
    cfg = TrainConfig.from_dict(train_cfg)
    torch.manual_seed(init_seed)
    net = build_model(model_cfg, tuple(model_cfg["in_shape"]), model_cfg["num_classes"])
    set_normalization(net, data.train.x)
    fit(net, data, cfg, log=lambda line: None, progress=False)
    return net
