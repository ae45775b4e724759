"""What one training run is asked to do: every hyperparameter with its unit and default.

The config is validated when it is built, so a bad flag fails before any data loads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from xdl.errors import XdlError
from xdl.methods import robust


AUGMENTATIONS = ("shift", "rotate", "flip", "noise", "cutout")


# Without --epochs, training runs until the validation loss stops improving: the peak rate is
# held (after a one-epoch warm-up) until PATIENCE epochs pass without a better validation loss,
# then decays linearly to zero over DECAY_FRACTION of the epochs run so far, and the annealed
# weights are kept (xdl.training.steps.PlateauSchedule, xdl.training.loop._Loop.plateau). More
# data, more epochs before the plateau: the fixed sample budget this replaces gave 8,000 real
# digits 2 epochs and 94%. A decay as long as the stable phase, with its annealed weights kept,
# instead of a quarter of it and the lowest-loss epoch's, took the default CNN on 3,600 real
# MNIST digits from 0.984 to 0.987 (mean over seeds 0-2; seed 1 from 0.977 to 0.986) and the
# MLP from 0.95 to 0.958, at about 1.5x the epochs (benchmarks/bench_recipe.py).
PATIENCE = 2
DECAY_FRACTION = 1.0
MAX_EPOCHS = 60  # at the peak rate, before the decay: a plateau that never comes still ends

# Small random shifts are what keeps a network from memorising pixel positions; without them
# the default CNN stops at 97.7% on 3,600 real MNIST digits and the MLP at 92.7% (seed 0)
# (benchmarks/bench_recipe.py). Images get them unless --augment says otherwise; tables none.
IMAGE_AUGMENT = ["shift"]


@dataclass
class TrainConfig:
    epochs: int | None = None  # None: until the validation loss plateaus (PATIENCE, DECAY_FRACTION, MAX_EPOCHS)
    batch_size: int = 128  # large batches keep the device busy; one-cycle makes them converge
    lr: float = 3e-3  # peak learning rate of the schedule
    optimizer: str = "adamw"  # adam | adamw | sgd (momentum 0.9, Nesterov)
    schedule: str = "onecycle"  # onecycle | cosine | none
    weight_decay: float = 5e-4  # decoupled for adamw, L2 for adam and sgd
    l1: float = 0.0  # L1 penalty on weights (not biases or norms), added to the loss
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    early_stopping: int = 0  # patience in epochs on validation loss; 0 = off. Restores the best weights
    augment: list[str] | None = None  # any of AUGMENTATIONS; None: IMAGE_AUGMENT for images, none for tables
    shift: float = 0.1  # max translation, as a fraction of the image size
    rotate: float = 10.0  # max rotation in degrees
    noise: float = 0.05  # Gaussian noise std, in input units
    cutout: float = 0.25  # cutout square side, as a fraction of the image size
    mixup: float = 0.0  # Beta(α, α) mixing; 0 = off
    # Gaussian noise std added to every training input, unclamped, in input units: the noise randomized
    # smoothing certifies with (Cohen et al. 2019 train at the σ they certify at); 0 = off
    noise_sigma: float = 0.0
    adv_train: str = "none"  # none | fgsm (random start, Wong et al. 2020) | pgd (Madry et al. 2018)
    adv_eps: float = 0.1  # L∞ radius of the training attack, in input units (pixels in [0, 1])
    adv_steps: int = 10  # PGD steps, each 2.5·eps/steps
    adv_step: float = 1.25  # FGSM step, as a multiple of adv-eps (Wong et al. 2020; ≥ 2 invites catastrophic overfitting)
    device: str = "auto"
    amp: bool = True  # autocast where the device runs a lower precision natively (xdl.device.autocast_dtype)
    compile: bool = False  # torch.compile the training forward/backward; pays off on GPUs after a slow first epoch
    seed: int = 0
    # Differential privacy (xdl.training.dp, Opacus): off unless dp_epsilon is set.
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
        for name in ("weight_decay", "l1", "grad_clip", "early_stopping", "mixup", "noise", "noise_sigma"):
            if not 0 <= getattr(self, name) < math.inf:
                raise XdlError(f"{name.replace('_', '-')} must be ≥ 0 and finite, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise XdlError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise XdlError(f"unknown optimizer {self.optimizer!r}: choose adam, adamw or sgd")
        if self.schedule not in ("onecycle", "cosine", "none"):
            raise XdlError(f"unknown schedule {self.schedule!r}: choose onecycle, cosine or none")
        unknown = sorted(set(self.augment or []) - set(AUGMENTATIONS))
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
            check_config(self)

    def for_data(self, kind: str) -> "TrainConfig":
        """This config with its augmentation settled for data of ``kind`` ("image" or "tabular")."""
        if self.augment is not None:
            return self
        # DP-SGD's defaults were measured without it (xdl.training.dp.DEFAULTS): they keep that recipe.
        chosen = kind == "image" and self.dp_epsilon is None
        return replace(self, augment=list(IMAGE_AUGMENT) if chosen else [])

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


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
