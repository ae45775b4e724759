"""The catastrophic-overfitting guard of FGSM adversarial training (Wong et al. 2020).

FGSM training can, within an epoch or two, learn to defeat the single-step attack while its
robustness to PGD collapses to ~0% ("catastrophic overfitting"). Wong et al. watch PGD
accuracy on a small fixed batch each epoch and stop when it falls; this does the same on a
fixed held-out subset (the validation split, so no training sample grades itself) and keeps
the weights of the epoch with the best PGD accuracy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from xdl.methods import robust
from xdl.data.types import DataSplits

SAMPLES = 512
# Wong et al. 2020 stop on a 20-point fall; for a weak model a halving is the same alarm.
DROP = 0.20
HALVING = 0.5


class CatastrophicOverfitGuard:
    """Measures PGD-10 accuracy each epoch; ``update`` says when it has collapsed."""

    def __init__(self, data: DataSplits, eps: float, device: torch.device, samples: int = SAMPLES, seed: int = 0):
        split = data.val if len(data.val) else data.train
        pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:samples]
        self.x, self.y = split.x[pick].to(device), split.y[pick].to(device)
        self.eps, self.box = eps, data.input_range
        self.mask = None
        if data.encoding is not None:
            self.mask = torch.as_tensor(data.encoding.numeric_mask(), dtype=torch.float32, device=device)
        self.peak, self.best_epoch, self.best_state = -1.0, 0, None
        self.message = ""

    def measure(self, model: nn.Module) -> float:
        """PGD-10 accuracy in eval mode; the model's mode is restored after."""
        was_training = model.training
        model.eval()
        adv = robust.pgd(model, self.x, self.y, self.eps, 10, input_range=self.box, mask=self.mask)
        with torch.no_grad():
            accuracy = float((model(adv).argmax(1) == self.y).double().mean())
        model.train(was_training)
        return accuracy

    def update(self, model: nn.Module, epoch: int, accuracy: float) -> bool:
        """Record this epoch; True when PGD accuracy has collapsed from its peak (then stop)."""
        if accuracy > self.peak:
            self.peak, self.best_epoch = accuracy, epoch
            self.best_state = copy.deepcopy(model.state_dict())
            return False
        if self.peak - accuracy > DROP or accuracy < HALVING * self.peak:
            self.message = (
                f"catastrophic overfitting: PGD-10 accuracy fell from {self.peak:.1%} (epoch {self.best_epoch}) "
                f"to {accuracy:.1%} at epoch {epoch}; training stopped and the weights of epoch {self.best_epoch} kept"
            )
            return True
        return False
