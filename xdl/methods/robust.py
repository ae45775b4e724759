"""Gradient attacks on whole batches: FGSM and PGD (L∞ and L2), as plain tensor code.

One loop serves both: FGSM is one signed-gradient step of size eps (Goodfellow et al.
2015), PGD repeats projected steps from a random point in the eps-ball (Madry et al.
2018). The same functions make the adversarial batches of ``TrainConfig.adv_train`` and
the ``xdl attack`` results, so what the model was trained against is what it is tested on.

Inputs are in the data's natural range (models normalize inside), so eps means the same
for every model: pixels in [0, 1] for images, standardized units for tabular features.
The model's mode is left alone: the caller chooses eval (analysis) or train (adversarial
training), and no parameter gradient is accumulated (``torch.autograd.grad`` on the input).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from xdl.data.types import DataSplits
from xdl.errors import XdlError

NORMS = ("linf", "l2")
ADV_TRAIN = ("none", "fgsm", "pgd")
Box = tuple[float, float] | None
TrainAttack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def default_step_size(eps: float, steps: int) -> float:
    """2.5·eps/steps: enough steps to cross the ball and come back (Madry et al. 2018)."""
    return 2.5 * eps / steps


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    random_start: bool = False,
    step_size: float | None = None,
    input_range: Box = (0.0, 1.0),
    mask: torch.Tensor | None = None,
    first_grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """x + eps·sign(∇ₓ loss), clamped to ``input_range``; ``mask`` (broadcast to x) marks what may move.

    With ``random_start`` and ``step_size=1.25·eps`` this is the "fast" adversarial
    training step of Wong et al. 2020, which avoids catastrophic overfitting.

    >>> adv = fgsm(model, images, labels, eps=0.1)          # doctest: +SKIP
    """
    return pgd(
        model, x, y, eps, steps=1, step_size=eps if step_size is None else step_size,
        random_start=random_start, norm="linf", input_range=input_range, mask=mask, first_grad=first_grad,
    )


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    *,
    random_start: bool = True,
    norm: str = "linf",
    input_range: Box = (0.0, 1.0),
    mask: torch.Tensor | None = None,
    first_grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy within the ``norm`` ball of radius eps.

    Every iterate stays in the ball and in ``input_range``; the result is detached, on
    x's device. The L2 ball is per sample, over all (unmasked) features. ``first_grad`` is
    ∇ₓ of the summed cross-entropy at x when the caller already has it from its own clean
    pass: the first step, which starts at x (no random start), then costs no model call.
    """
    if norm not in NORMS:
        raise XdlError(f"unknown norm {norm!r}: choose linf or l2")
    if steps < 1:
        raise XdlError(f"steps must be ≥ 1, got {steps}")
    if eps < 0:
        raise XdlError(f"eps must be ≥ 0, got {eps}")
    x, y = x.detach(), y.detach()
    step = default_step_size(eps, steps) if step_size is None else step_size
    keep = None if mask is None else mask.to(device=x.device, dtype=x.dtype)
    if first_grad is not None and random_start:
        raise XdlError("first_grad is the gradient at x, and a random start moves the first step away from x")
    adv = _project(x + _random_start(x, eps, norm), x, eps, norm, input_range, keep) if random_start else x.clone()
    for i in range(steps):
        if i == 0 and first_grad is not None:
            grad = first_grad
        else:
            adv.requires_grad_(True)
            grad = input_gradient(model, adv, y)
        with torch.no_grad():
            if keep is not None:
                grad = grad * keep
            adv = _project(adv + step * _direction(grad, norm), x, eps, norm, input_range, keep)
    return adv.detach()


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """∇ₓ of the cross-entropy summed over the batch (``logits``: model(x), when already computed
    from an ``x`` that requires grad). Summed, not averaged: each sample's gradient must not
    shrink with the batch size."""
    logits = model(x) if logits is None else logits
    (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), x)
    return grad


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent unit step for the norm: sign for L∞, grad/‖grad‖₂ for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / _l2(grad).clamp_min(1e-12)


def _project(adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, box: Box, keep: torch.Tensor | None) -> torch.Tensor:
    """The point of the eps-ball around x (and of the input box) that adv is projected to."""
    delta = adv - x
    if keep is not None:
        delta = delta * keep
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
    # Clamping moves each coordinate toward x (x is in the box), so the norm bound still holds.
    return x + delta if box is None else (x + delta).clamp(*box)


def _random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return (torch.rand_like(x) * 2 - 1) * eps
    # Uniform direction, radius uniform in [0, eps] (torchattacks' PGDL2 does the same).
    direction = torch.randn_like(x)
    radius = torch.rand(len(x), *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype) * eps
    return direction / _l2(direction).clamp_min(1e-12) * radius


def _l2(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, shaped to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def attack_passes(method: str, steps: int) -> int:
    """Forward+backward passes adversarial training adds per training sample (0 without it)."""
    return {"none": 0, "fgsm": 1}.get(method, steps)


def train_attack(
    method: str, eps: float, steps: int, data: DataSplits, device: torch.device, fgsm_step: float = 1.25
) -> TrainAttack | None:
    """What adversarial training (``TrainConfig.adv_train``) does to each batch; None for "none".

    The returned function runs in whatever mode the model is in — train mode during
    training, as in both papers — and accumulates no parameter gradients.
    """
    if method == "none":
        return None
    if method not in ADV_TRAIN:
        raise XdlError(f"unknown adversarial training {method!r}: choose {', '.join(ADV_TRAIN)}")
    box = data.input_range
    if box is not None and eps > box[1] - box[0]:
        raise XdlError(f"adv-eps {eps:g} is larger than the whole input range [{box[0]:g}, {box[1]:g}] of {data.kind} data")
    mask = None
    if data.encoding is not None:
        # Only standardized numeric features may move: a one-hot column has no "slightly".
        mask = torch.as_tensor(data.encoding.numeric_mask(), dtype=torch.float32, device=device)
        if not mask.any():
            raise XdlError("adversarial training needs numeric features, and this table has none")

    def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if method == "fgsm":
            # Wong et al. 2020 ("Fast is better than free"): random start, step 1.25·eps by default.
            return fgsm(model, x, y, eps, random_start=True, step_size=fgsm_step * eps, input_range=box, mask=mask)
        return pgd(model, x, y, eps, steps, random_start=True, input_range=box, mask=mask)

    return attack
