"""The training loop: data resident in device tensors, augmentation on whole batches.

Read it top to bottom: hyperparameters, augmentation, evaluation, the loop. There is no
callback framework; early stopping and the schedule are a few lines each.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xdl import checkpoint
from xdl import distributed
from xdl import robust
from xdl.coguard import CatastrophicOverfitGuard
from xdl.data import stream
from xdl.data.types import DataSplits, Split
from xdl.device import seed_everything
from xdl.errors import XdlError

# -----------------------------------------------------------------------------------------
# Hyperparameters
# -----------------------------------------------------------------------------------------

AUGMENTATIONS = ("shift", "rotate", "flip", "noise", "cutout")
STREAM_EVAL_BATCH = 256  # evaluation batch of a streamed split: decoded images, not tensor slices
PROBE_MIN = 256  # training samples evaluated clean each epoch, at least (else as many as validation has)

# The default epoch count is a budget of training samples, not a fixed number of epochs:
# one-cycle converges in fewer epochs the more data each epoch holds. 8,000 gives the 1,293
# digits 6 epochs (98.6% test accuracy, as 15 did) and 3,600 real MNIST digits 2, where the
# default CNN matches a tutorial's 3-epoch batch-32 DataLoader loop in well under half its
# time (benchmarks/bench_recipe.py measures both); pass --epochs for more.
SAMPLE_BUDGET = 8_000
MIN_EPOCHS, MAX_EPOCHS = 2, 15


def epoch_budget(samples: int) -> int:
    """Epochs for ``samples`` training samples under the default budget, within [MIN_EPOCHS, MAX_EPOCHS]."""
    return max(MIN_EPOCHS, min(MAX_EPOCHS, round(SAMPLE_BUDGET / max(samples, 1))))


@dataclass
class TrainConfig:
    epochs: int | None = None  # None: epoch_budget of the training split's size
    batch_size: int = 128  # large batches keep the device busy; one-cycle makes them converge
    lr: float = 3e-3  # peak learning rate of the schedule
    optimizer: str = "adamw"  # adam | adamw | sgd (momentum 0.9, Nesterov)
    schedule: str = "onecycle"  # onecycle | cosine | none
    weight_decay: float = 5e-4  # decoupled for adamw, L2 for adam and sgd
    l1: float = 0.0  # L1 penalty on weights (not biases or norms), added to the loss
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    early_stopping: int = 0  # patience in epochs on validation loss; 0 = off. Restores the best weights
    augment: list[str] = field(default_factory=list)  # any of AUGMENTATIONS
    shift: float = 0.1  # max translation, as a fraction of the image size
    rotate: float = 10.0  # max rotation in degrees
    noise: float = 0.05  # Gaussian noise std, in input units
    cutout: float = 0.25  # cutout square side, as a fraction of the image size
    mixup: float = 0.0  # Beta(α, α) mixing; 0 = off
    adv_train: str = "none"  # none | fgsm (random start, Wong et al. 2020) | pgd (Madry et al. 2018)
    adv_eps: float = 0.1  # L∞ radius of the training attack, in input units (pixels in [0, 1])
    adv_steps: int = 10  # PGD steps, each 2.5·eps/steps
    adv_step: float = 1.25  # FGSM step, as a multiple of adv-eps (Wong et al. 2020; ≥ 2 invites catastrophic overfitting)
    device: str = "auto"
    amp: bool = True  # bf16/fp16 autocast, on CUDA only
    compile: bool = False  # torch.compile the training forward/backward; pays off on GPUs after a slow first epoch
    seed: int = 0
    # Differential privacy (xdl.dp, Opacus): off unless dp_epsilon is set.
    dp_epsilon: float | None = None  # total privacy budget ε of the run
    dp_delta: float = 1e-5  # δ of the (ε, δ) guarantee; must be below 1/N
    dp_max_grad_norm: float = 1.0  # per-record gradient clip C, in gradient-norm units

    def __post_init__(self) -> None:
        # NaN passes every bound below (each comparison is False), so refuse it for every field first.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise XdlError(f"{f.name.replace('_', '-')} must be a finite number, got {value}")
        if self.epochs is not None and self.epochs <= 0:
            raise XdlError(f"epochs must be > 0, got {self.epochs}")
        if not 0 < self.lr < math.inf:  # also refuses nan, which every comparison lets through
            raise XdlError(f"lr must be > 0 and finite, got {self.lr}")
        if self.batch_size <= 0:
            raise XdlError(f"batch size must be > 0, got {self.batch_size}")
        for name in ("weight_decay", "l1", "grad_clip", "early_stopping", "mixup", "noise"):
            if not 0 <= getattr(self, name) < math.inf:
                raise XdlError(f"{name.replace('_', '-')} must be ≥ 0 and finite, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise XdlError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise XdlError(f"unknown optimizer {self.optimizer!r}: choose adam, adamw or sgd")
        if self.schedule not in ("onecycle", "cosine", "none"):
            raise XdlError(f"unknown schedule {self.schedule!r}: choose onecycle, cosine or none")
        unknown = sorted(set(self.augment) - set(AUGMENTATIONS))
        if unknown:
            raise XdlError(f"unknown augmentation {unknown[0]!r}: choose from {', '.join(AUGMENTATIONS)}")
        if self.adv_train not in robust.ADV_TRAIN:
            raise XdlError(f"unknown adversarial training {self.adv_train!r}: choose {', '.join(robust.ADV_TRAIN)}")
        if self.adv_train != "none" and self.adv_eps <= 0:
            raise XdlError(f"adv-eps must be > 0, got {self.adv_eps}")
        if not 0 < self.adv_step <= 10:
            raise XdlError(f"adv-step must be in (0, 10] (a multiple of adv-eps), got {self.adv_step}")
        if self.adv_steps < 1:
            raise XdlError(f"adv-steps must be ≥ 1, got {self.adv_steps}")
        if self.dp_epsilon is not None:
            from xdl.dp import check_config

            check_config(self)

    def for_samples(self, samples: int) -> "TrainConfig":
        """This config with its epoch count settled for a training split of ``samples``."""
        return self if self.epochs is not None else replace(self, epochs=epoch_budget(samples))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# -----------------------------------------------------------------------------------------
# Augmentation: whole batches on the training device, no per-sample Python
# -----------------------------------------------------------------------------------------


def augment(x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    n = x.shape[0]
    if "shift" in cfg.augment or "rotate" in cfg.augment:
        angle = torch.zeros(n, device=x.device)
        shift = torch.zeros(n, 2, device=x.device)
        if "rotate" in cfg.augment:
            angle = (torch.rand(n, device=x.device) * 2 - 1) * math.radians(cfg.rotate)
        if "shift" in cfg.augment:
            # affine_grid works in [-1, 1] coordinates: a fraction f of the image is 2f.
            shift = (torch.rand(n, 2, device=x.device) * 2 - 1) * 2 * cfg.shift
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    if "flip" in cfg.augment:
        flip = torch.rand(n, 1, 1, 1, device=x.device) < 0.5
        x = torch.where(flip, x.flip(-1), x)
    if "cutout" in cfg.augment:
        h, w = x.shape[-2:]
        side = max(1, round(cfg.cutout * min(h, w)))
        cy = torch.randint(0, h, (n, 1, 1, 1), device=x.device)
        cx = torch.randint(0, w, (n, 1, 1, 1), device=x.device)
        rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
        hole = ((rows - cy).abs() <= side // 2) & ((cols - cx).abs() <= side // 2)
        x = x.masked_fill(hole, 0.0)
    if "noise" in cfg.augment:
        x = x + cfg.noise * torch.randn_like(x)
        if x.dim() == 4:  # images stay in their valid range; tabular rows are unbounded
            x = x.clamp(0, 1)
    return x


# -----------------------------------------------------------------------------------------
# Evaluation
# -----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, device: torch.device, batch_size: int = 1024) -> dict[str, float]:
    """Loss and accuracy over a split, in eval mode; the model's mode is restored after.

    Inside a process group each rank evaluates its own share and the sums are reduced, so
    every rank gets the same exact figures; all ranks must call it together.
    """
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    share = distributed.shard_range(len(split), distributed.current())
    if stream.is_streamed(split.x):
        batch_size = min(batch_size, STREAM_EVAL_BATCH)
    for rows, xb in stream.batches(split.x, batch_size, device, share):
        yb = split.y[rows].to(device, non_blocking=True)
        logits = model(xb).float()
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train(was_training)
    loss, correct = distributed.all_reduce_sum(loss, correct)
    n = max(len(split), 1)
    return {"loss": loss / n, "accuracy": correct / n}


# -----------------------------------------------------------------------------------------
# The loop
# -----------------------------------------------------------------------------------------


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    # One-cycle needs at least a step in each of its phases (PyTorch divides by their
    # lengths); with a handful of steps in all, a cosine decay does the same job.
    if cfg.schedule == "onecycle" and steps >= 8:
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.25)
    if cfg.schedule in ("cosine", "onecycle"):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _l1(model: nn.Module) -> torch.Tensor:
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(w.abs().sum() for w in weights)


Logger = Callable[[str], None]


class TrainingDiverged(XdlError):
    """The loss became NaN or infinite; the checkpoint of the last good epoch is kept."""

    def __init__(self, epoch: int, step: int, steps: int, checkpoint_dir: Path | None):
        kept = (
            f"the last good checkpoint (epoch {epoch - 1}) is kept in {checkpoint_dir}"
            if checkpoint_dir is not None and epoch > 1
            else "no good epoch was saved"
        )
        super().__init__(
            f"training diverged: the loss became NaN or infinite at epoch {epoch}, step {step} of {steps}; "
            f"{kept}. Lower --lr, or add --grad-clip"
        )
        self.epoch, self.step = epoch, step


def early_stopping(best: tuple | None, val_loss: float, epoch: int, model: nn.Module, patience: int,
                   log: Logger) -> tuple[tuple, bool]:
    """The best (validation loss, epoch, weights) so far, and whether ``patience`` epochs passed without a better one."""
    if best is None or val_loss < best[0]:
        return (val_loss, epoch, copy.deepcopy(model.state_dict())), False
    if epoch - best[1] >= patience:
        log(f"early stopping: validation loss has not improved since epoch {best[1]}")
        return best, True
    return best, False


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
    cfg = cfg.for_samples(len(data.train.y))
    if cfg.dp_epsilon is not None:  # DP-SGD samples, clips and noises its own way: xdl.dp's loop
        from xdl.dp import fit_private

        return fit_private(model, data, cfg, log, progress, checkpoint_dir, resume)
    world = distributed.current()
    device = distributed.local_device(cfg.device, world)
    if data.kind == "tabular" and set(cfg.augment) - {"noise"}:
        raise XdlError("tabular data supports only the 'noise' augmentation (and mixup)")
    generator = seed_everything(cfg.seed)
    if world.size > 1:
        # Ranks share the shuffling generator, not the augmentation and dropout noise.
        torch.manual_seed(cfg.seed + world.rank)
    model.to(device)
    # NHWC lets cuDNN choose its tensor-core convolution kernels; on CPU it gains nothing.
    channels_last = device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
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
    seen = min(n, steps_per_epoch * cfg.batch_size)  # samples per epoch, over all ranks
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    adversary = robust.train_attack(cfg.adv_train, cfg.adv_eps, cfg.adv_steps, data, device, fgsm_step=cfg.adv_step)
    # FGSM training can collapse to ~0% PGD accuracy within an epoch (Wong et al. 2020).
    guard = CatastrophicOverfitGuard(data, cfg.adv_eps, device, seed=cfg.seed) if cfg.adv_train == "fgsm" else None
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    # fp16 needs loss scaling against underflow; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    # Training steps go through DDP (and the compiler); evaluation uses the plain model,
    # whose forward passes need no collective and may differ in number between ranks.
    step_model = distributed.wrap(model, device, world)
    if cfg.compile:
        step_model = torch.compile(step_model)

    history: list[dict] = []
    best: tuple[float, int, dict] | None = None
    done = 0
    if resume:
        done, history, best = checkpoint.restore(checkpoint_dir, model, opt, sched, scaler, generator)
        log(f"resuming after epoch {done}/{cfg.epochs} from {checkpoint_dir}")
    for epoch in range(done + 1, cfg.epochs + 1):
        step_model.train()
        start = time.perf_counter()
        order = torch.randperm(n, generator=generator).to(device)
        total_loss = torch.zeros((), device=device)
        total_correct = torch.zeros((), device=device, dtype=torch.long)
        first_bad = torch.zeros((), device=device, dtype=torch.long)  # 1-based step of the first NaN/inf loss
        bar = _progress(steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", progress)
        shards = [distributed.shard_batch(order[step * cfg.batch_size : (step + 1) * cfg.batch_size], world)
                  for step in range(steps_per_epoch)]
        decoded = loader.epoch([idx for idx, _ in shards]) if streamed else None
        for step in range(steps_per_epoch):
            idx, share = shards[step]
            xb, yb = augment(next(decoded) if streamed else x_train[idx], cfg), y_train[idx]
            if adversary is not None:
                # The plain model, not DDP's wrapper: the attack's input gradient must not trigger a gradient sync.
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    xb = adversary(model, xb, yb)
            if cfg.mixup > 0:
                lam = float(torch.distributions.Beta(cfg.mixup, cfg.mixup).sample())
                perm = torch.randperm(len(idx), device=device)
                xb = lam * xb + (1 - lam) * xb[perm]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = step_model(xb)
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
                if cfg.mixup > 0:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(
                        logits.float(), yb[perm], label_smoothing=cfg.label_smoothing
                    )
                if cfg.l1 > 0:
                    loss = loss + cfg.l1 * _l1(model)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss * share if world.size > 1 else loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
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
            raise TrainingDiverged(epoch, int(first_bad.item()), steps_per_epoch, checkpoint_dir)
        loss_sum, correct_sum = distributed.all_reduce_sum(total_loss, total_correct)
        val = evaluate(model, data.val, device)
        clean = evaluate(model, probe, device)
        seconds = time.perf_counter() - start
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct_sum / seen,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "train_eval_loss": clean["loss"],
            "train_eval_accuracy": clean["accuracy"],
            "lr": opt.param_groups[0]["lr"],
            "seconds": seconds,
        }
        if guard is not None:
            row["pgd_accuracy"] = guard.measure(model)
        history.append(row)
        log(
            f"epoch {epoch:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}  "
            f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  {n / seconds:,.0f} samples/s"
        )
        if guard is not None and guard.update(model, epoch, row["pgd_accuracy"]):
            log(guard.message)
            best = (math.nan, guard.best_epoch, guard.best_state)
            break
        if cfg.early_stopping:
            best, stop = early_stopping(best, val["loss"], epoch, model, cfg.early_stopping, log)
            if stop:
                break
        if checkpoint_dir is not None and world.main:
            checkpoint.save(checkpoint_dir, epoch, model, opt, sched, scaler, generator, history, best)
    if best is not None:
        model.load_state_dict(best[2])
        history[best[1] - 1]["best"] = True
    model.eval()
    return history


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="batch", file=sys.stderr, dynamic_ncols=True)


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
