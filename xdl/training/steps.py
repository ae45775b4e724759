"""The pieces every training loop shares: augmentation, optimizer, schedule, stopping rules.

:func:`xdl.training.loop.fit` and DP-SGD's :func:`xdl.training.dp.fit_private` are built from these.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xdl.errors import XdlError
from xdl.training.config import TrainConfig


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
    if cfg.noise_sigma:
        # Not clamped, unlike "noise" above: the smoothed classifier feeds the model x + N(0, σ²)
        # as it is, and the model must have seen that distribution (Cohen et al. 2019, sec. 4).
        x = x + cfg.noise_sigma * torch.randn_like(x)
    return x


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class PlateauSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Warm-up, then the peak rate until :meth:`decay` is called, then a linear decay to zero.

    The warmup–stable–decay shape (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
    beyond Fixed Training Durations") matches a one-cycle run of the same length without fixing
    that length in advance: the loop calls :meth:`decay` once the validation loss plateaus. Its
    state is plain numbers, so a checkpoint's JSON holds it and ``--resume`` continues it.
    """

    def __init__(self, opt: torch.optim.Optimizer, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.decay_from: int | None = None  # the step the decay started at
        self.decay_steps = 0
        self.why = ""  # why the decay began, for the reason training stopped
        super().__init__(opt)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if self.decay_from is not None:
            scale = max(0.0, 1 - (step - self.decay_from) / self.decay_steps)
        else:  # one epoch from peak/25 up to the peak, as one-cycle starts
            scale = min(1.0, 0.04 + 0.96 * step / self.steps_per_epoch)
        return [base * scale for base in self.base_lrs]

    def decay(self, epochs: int, why: str) -> None:
        """Start decaying now, reaching zero after ``epochs`` more epochs."""
        self.decay_from, self.decay_steps, self.why = self.last_epoch, max(1, epochs) * self.steps_per_epoch, why

    @property
    def decaying(self) -> bool:
        return self.decay_from is not None

    @property
    def finished(self) -> bool:
        return self.decaying and self.last_epoch >= self.decay_from + self.decay_steps


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


def keep_best(best: tuple | None, val_loss: float, epoch: int, model: nn.Module) -> tuple:
    """The best (validation loss, epoch, weights) so far, this epoch's if its validation loss is lower."""
    if best is None or val_loss < best[0]:
        return val_loss, epoch, copy.deepcopy(model.state_dict())
    return best


def early_stopping(best: tuple | None, val_loss: float, epoch: int, model: nn.Module, patience: int,
                   log: Logger) -> tuple[tuple, str | None]:
    """The best (validation loss, epoch, weights) so far, and why training stops when ``patience``
    epochs passed without a better one (else None)."""
    best = keep_best(best, val_loss, epoch, model)
    if epoch - best[1] >= patience:
        why = f"early stopping: the validation loss had not improved for {patience} epochs since epoch {best[1]}"
        log(why)
        return best, why
    return best, None


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="batch", file=sys.stderr, dynamic_ncols=True)
