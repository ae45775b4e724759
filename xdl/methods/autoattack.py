"""AutoAttack on whole batches: APGD (CE and DLR), Square, and the sequence of both.

Croce & Hein 2020 ("Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks") showed that a fixed-step PGD overstates robustness; their
remedy is an ensemble that needs no tuning:

- **APGD**: PGD with momentum 0.75 and a step size that starts at 2·eps and is halved at
  checkpoints (at 22%, then ever shorter intervals, of the budget) whenever the loss has
  stopped rising often enough, restarting from the best point found so far.
- **DLR loss**: the logit margin divided by the spread of the top logits, so it does not
  vanish when a model's logits are rescaled (a temperature, a saturated softmax).
- **Square** (Andriushchenko et al. 2020): random square patches accepted when they lower
  the logit margin; it uses only the model's outputs, so masked gradients cannot stop it.
- **AutoAttack**: APGD-CE, targeted APGD-DLR against the top-k other classes, then Square,
  each on the samples the earlier ones left unbroken; a sample is robust only if all fail.

The code follows the papers' description (and the reference implementation's constants);
torchattacks' versions serve as a test reference only. Inputs are in the data's natural
range as in :mod:`xdl.methods.robust`, whose projection and random start are reused here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from xdl.errors import XdlError
from xdl.methods.robust import NORMS, Box, _l2, _project

MOMENTUM = 0.75  # weight of the new step against the previous one (Croce & Hein 2020, eq. 3)
RHO = 0.75  # a step size survives a checkpoint if the loss rose in ≥ 75% of its steps
P_INIT = 0.8  # Square's initial share of the image changed per query
# Which attack broke a sample; "clean" = misclassified before any attack, "" = robust.
ATTACKS = ("clean", "apgd-ce", "apgd-t", "square")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y − max_{j≠y} z_j per sample: negative exactly when the sample is misclassified."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], -math.inf)
    return true - others.amax(1)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of Logits Ratio, per sample, to be maximized (Croce & Hein 2020, eqs. 4–5).

    Untargeted: −(z_y − max_{j≠y} z_j) / (z_π1 − z_π3); targeted at t:
    −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2), with π the logits sorted in decreasing order.
    """
    top = logits.sort(1, descending=True).values
    if target is None:
        return -margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)
    gap = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, target[:, None])[:, 0]
    return -gap / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _loss(loss: str, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return dlr_loss(logits, y, target)


def checkpoints(steps: int) -> list[int]:
    """The iterations after which APGD may halve its step: p₀=0, p₁=0.22, p_{j+1}=p_j+max(p_j−p_{j−1}−0.03, 0.06).

    In whole iterations as the reference code counts them: a first interval of ⌊0.22·N⌋,
    each next one ⌊0.03·N⌋ shorter, but never under ⌊0.06·N⌋ (each at least 1).
    """
    interval, shrink, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    marks, at = [], interval
    while at <= steps:
        marks.append(at)
        interval = max(interval - shrink, shortest)
        at += interval
    return marks


def _start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A random point on the surface of the eps-ball (AutoAttack's start, unlike PGD's uniform one)."""
    if norm == "linf":
        t = torch.rand_like(x) * 2 - 1
        return eps * t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    t = torch.randn_like(x)
    return eps * t / _l2(t).clamp_min(1e-12)


def _step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    return grad.sign() if norm == "linf" else grad / _l2(grad).clamp_min(1e-12)


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 100,
    restarts: int = 1,
    loss: str = "ce",
    target: torch.Tensor | None = None,
    norm: str = "linf",
    input_range: Box = (0.0, 1.0),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """APGD: the misclassified iterate where one was found, else the highest-loss point.

    Each restart runs only on the samples that no earlier restart broke. ``target`` makes
    the DLR loss targeted (APGD-T); success is still any misclassification.
    """
    _check(eps, steps, norm)
    if loss not in ("ce", "dlr"):
        raise XdlError(f"unknown APGD loss {loss!r}: choose ce or dlr")
    x, y = x.detach(), y.detach()
    best = x.clone()
    with torch.no_grad():
        todo = model(x).argmax(1) == y
    for _ in range(restarts):
        idx = todo.nonzero()[:, 0]
        if not len(idx):
            break
        t = None if target is None else target[idx]
        adv, fooled = _apgd_run(model, x[idx], y[idx], eps, steps, loss, t, norm, input_range, mask)
        best[idx] = adv
        todo[idx[fooled]] = False
    return best


def _apgd_run(model, x, y, eps, steps, loss, target, norm, box, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """One run of APGD on a batch; returns the points kept and which of them are misclassified.

    A sample leaves the batch at its first misclassified iterate, which is what it keeps
    whatever later steps do: its further forward and backward passes would be wasted.
    """
    keep = None if mask is None else mask.to(device=x.device, dtype=x.dtype)
    shape = (-1, *[1] * (x.dim() - 1))
    out = torch.empty_like(x)
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    live = torch.arange(len(x), device=x.device)  # batch positions of the samples still being attacked

    def value_and_grad(point: torch.Tensor):
        point = point.clone().requires_grad_(True)
        logits = model(point).float()
        values = _loss(loss, logits, y, target)
        (grad,) = torch.autograd.grad(values.sum(), point)
        if keep is not None:
            grad = grad * keep
        return values.detach(), grad, logits.detach().argmax(1) != y

    adv = _project(x + _start(x, eps, norm), x, eps, norm, box, keep)
    values, grad, now = value_and_grad(adv)
    out[now], fooled[now] = adv[now], True
    best_value, best_adv, best_grad = values.clone(), adv.clone(), grad.clone()
    step = torch.full((len(x),), 2.0 * eps, device=x.device, dtype=x.dtype)
    marks = set(checkpoints(steps))
    last_mark, rises = 0, torch.zeros_like(values)
    value_at_mark, halved_at_mark = best_value.clone(), torch.ones_like(now)
    prev = adv
    for i in range(steps + 1):
        if now.any():
            with torch.no_grad():
                stay = ~now
                live, x, y, adv, prev, grad, values = live[stay], x[stay], y[stay], adv[stay], prev[stay], grad[stay], values[stay]
                best_value, best_adv, best_grad, step = best_value[stay], best_adv[stay], best_grad[stay], step[stay]
                rises, value_at_mark, halved_at_mark = rises[stay], value_at_mark[stay], halved_at_mark[stay]
                target = None if target is None else target[stay]
            if not len(live):
                return out, fooled
        if i == steps:
            break
        with torch.no_grad():
            a = MOMENTUM if i > 0 else 1.0
            z = _project(adv + step.view(shape) * _step(grad, norm), x, eps, norm, box, keep)
            adv, prev = _project(adv + a * (z - adv) + (1 - a) * (adv - prev), x, eps, norm, box, keep), adv
        last_value = values
        values, grad, now = value_and_grad(adv)
        with torch.no_grad():
            out[live[now]], fooled[live[now]] = adv[now], True
            rises += (values > last_value).to(rises.dtype)
            better = values > best_value
            best_value = torch.where(better, values, best_value)
            best_adv[better], best_grad[better] = adv[better], grad[better]
            if i + 1 in marks:
                # Halve where the loss rose too rarely, or where the last checkpoint kept the
                # step and the best loss has not improved since (Croce & Hein 2020, §3.2).
                stalled = rises <= RHO * (i + 1 - last_mark)
                stuck = ~halved_at_mark & (value_at_mark >= best_value)
                halve = stalled | stuck
                step[halve] /= 2
                adv[halve], grad[halve] = best_adv[halve], best_grad[halve]
                halved_at_mark, value_at_mark = halve, best_value.clone()
                last_mark, rises = i + 1, torch.zeros_like(rises)
    out[live] = best_adv
    return out, fooled


def square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    queries: int = 5000,
    norm: str = "linf",
    input_range: Box = (0.0, 1.0),
) -> torch.Tensor:
    """Square Attack: random square updates kept when they lower the margin; no gradients.

    Works on images (N, C, H, W). Each query evaluates the model once on the samples that
    are still classified correctly; the rest stop at their first misclassified point.
    """
    _check(eps, max(queries, 1), norm)
    if x.dim() != 4:
        raise XdlError("the Square attack needs images (N, C, H, W)")
    x, y = x.detach(), y.detach()
    lo, hi = input_range if input_range is not None else (-math.inf, math.inf)
    make = _linf_candidate if norm == "linf" else _l2_candidate
    with torch.no_grad():
        adv = (x + _square_init(x, eps, norm)).clamp(lo, hi)
        m = margin(model(adv).float(), y)
        # The still-robust samples, gathered once and again only when one falls: with few left,
        # a query's forward pass is cheap and re-indexing every query would cost as much.
        live = (m > 0).nonzero()[:, 0]
        xl, yl, al, ml = x[live], y[live], adv[live], m[live]
        for i in range(1, queries):
            if not len(live):
                break
            candidate = make(xl, al, eps, _p_schedule(i, queries), lo, hi)
            m_new = margin(model(candidate).float(), yl)
            better = m_new < ml
            al = torch.where(better.view(-1, *[1] * (x.dim() - 1)), candidate, al)
            ml = torch.where(better, m_new, ml)
            fallen = ml <= 0
            if fallen.any():
                adv[live[fallen]] = al[fallen]
                stay = ~fallen
                live, xl, yl, al, ml = live[stay], xl[stay], yl[stay], al[stay], ml[stay]
        adv[live] = al
    return adv


def _p_schedule(i: int, queries: int) -> float:
    """Share of pixels changed at query i: halved at fixed points of a 10,000-query budget, rescaled to ours."""
    it = int(i / queries * 10000)
    for bound, divisor in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16), (200, 8), (50, 4), (10, 2)):
        if it > bound:
            return P_INIT / divisor
    return P_INIT


def _square_init(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    n, c, h, w = x.shape
    if norm == "linf":
        # Vertical stripes of ±eps: a strong first guess for L∞ (Andriushchenko et al. 2020).
        return eps * _signs((n, c, 1, w), x)
    # A grid of ±"pseudo-Gaussian" blocks, scaled to the eps sphere.
    s = max(h // 5, 1)
    delta = torch.zeros_like(x)
    top, left = (h - 5 * s) // 2, (w - 5 * s) // 2
    for r in range(top, h - s + 1, s):
        for col in range(left, w - s + 1, s):
            delta[:, :, r : r + s, col : col + s] += _block(s, x) * _signs((n, c, 1, 1), x)
    return eps * delta / _l2(delta).clamp_min(1e-12)


def _signs(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, shape, device=like.device).to(like.dtype) * 2 - 1


def _linf_candidate(x, adv, eps, p, lo, hi) -> torch.Tensor:
    """Each sample gets one square of side √(p·H·W), at its own position, set to ±eps per channel."""
    n, c, h, w = x.shape
    s = min(max(round(math.sqrt(p * h * w)), 1), h - 1, w - 1) if min(h, w) > 1 else 1
    top = torch.randint(0, h - s + 1, (n, 1, 1, 1), device=x.device)
    left = torch.randint(0, w - s + 1, (n, 1, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    window = (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)
    delta = adv - x
    sign = _signs((n, c, 1, 1), x)
    candidate = (x + torch.where(window, eps * sign, delta)).clamp(lo, hi)
    # A square that changes nothing wastes a query: flip its sign (the reference resamples).
    same = ((candidate - adv).abs() < 1e-7).flatten(1).all(1).view(-1, 1, 1, 1)
    if not same.any():
        return candidate
    flipped = (x + torch.where(window, -eps * sign, delta)).clamp(lo, hi)
    return torch.where(same, flipped, candidate)


def _l2_candidate(x, adv, eps, p, lo, hi) -> torch.Tensor:
    """Move the perturbation's mass from one square into another, with a fresh ±pseudo-Gaussian bump."""
    n, c, h, w = x.shape
    s = max(round(math.sqrt(p * h * w)), 3)
    s = min(s + 1 if s % 2 == 0 else s, h, w)
    # One pair of positions for the whole batch, as in the reference L2 attack.
    r1, r2 = torch.randint(0, h - s + 1, (2,)).tolist()
    c1, c2 = torch.randint(0, w - s + 1, (2,)).tolist()
    delta = adv - x
    win1 = delta[:, :, r1 : r1 + s, c1 : c1 + s]
    union = torch.zeros_like(delta)
    union[:, :, r1 : r1 + s, c1 : c1 + s] = 1
    union[:, :, r2 : r2 + s, c2 : c2 + s] = 1
    image_norm = _l2(delta)
    window_norm = (delta * union).pow(2).sum((-2, -1), keepdim=True).sqrt()
    new = _block(s, x) * _signs((n, c, 1, 1), x) + win1 / (win1.pow(2).sum((-2, -1), keepdim=True).sqrt() + 1e-12)
    budget = ((eps**2 - image_norm**2).clamp_min(0) / c + window_norm**2).sqrt()
    new = new / new.pow(2).sum((-2, -1), keepdim=True).sqrt().clamp_min(1e-12) * budget
    delta = delta.clone()
    delta[:, :, r2 : r2 + s, c2 : c2 + s] = 0
    delta[:, :, r1 : r1 + s, c1 : c1 + s] = new
    return (x + eps * delta / _l2(delta).clamp_min(1e-12)).clamp(lo, hi)


def _block(s: int, like: torch.Tensor) -> torch.Tensor:
    """An s×s bump, positive in one half and negative in the other, unit L2 norm, randomly transposed."""
    half = s // 2
    block = torch.cat([_bump(half, s, like), -_bump(s - half, s, like)], 0)
    block = block / block.norm().clamp_min(1e-12)
    return block.T if torch.rand(()) > 0.5 else block


def _bump(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """Nested rectangles around the centre, the k-th ring weighted 1/(k+1)²: a cheap Gaussian-like bump."""
    if rows == 0:
        return torch.zeros(0, cols, dtype=like.dtype, device=like.device)
    r = torch.arange(rows, device=like.device).view(-1, 1)
    c = torch.arange(cols, device=like.device).view(1, -1)
    ring = torch.maximum((r - rows // 2).abs(), (c - cols // 2).abs())
    # Cell (r, c) lies in every rectangle of radius ≥ ring, up to the largest one drawn.
    largest = max(rows // 2 + 1, cols // 2 + 1)
    k = torch.arange(largest, device=like.device, dtype=like.dtype)
    weights = torch.cumsum((1.0 / (k + 1) ** 2).flip(0), 0).flip(0)
    bump = weights[ring.clamp(max=largest - 1)]
    return bump / bump.norm().clamp_min(1e-12)


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    targets: int = 9,
    queries: int = 5000,
    input_range: Box = (0.0, 1.0),
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APGD-CE, APGD-T over the top ``targets`` other classes, then Square, on what is left.

    Returns the worst-case points and, per sample, the index into :data:`ATTACKS` of what
    broke it (0 = misclassified already) or −1 where every attack failed. Square runs on
    images only, and is skipped with ``queries=0``.
    """
    _check(eps, steps, norm)
    x, y = x.detach(), y.detach()
    with torch.no_grad():
        logits = model(x).float()
    broken_by = torch.where(logits.argmax(1) == y, -1, 0)
    adv = x.clone()
    num_classes = logits.shape[1]
    order = logits.argsort(1, descending=True)
    stages: list[tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = [
        (1, lambda i: apgd(model, x[i], y[i], eps, steps=steps, restarts=restarts, norm=norm, input_range=input_range, mask=mask)),
    ]
    if num_classes >= 4:  # the targeted DLR loss needs the 4th-largest logit
        for k in range(1, min(targets, num_classes - 1) + 1):
            # The k-th most likely class other than the top one, as ranked on the clean input.
            stages.append((2, lambda i, k=k: apgd(
                model, x[i], y[i], eps, steps=steps, restarts=restarts, loss="dlr", target=order[i, k],
                norm=norm, input_range=input_range, mask=mask)))
    if queries > 0 and x.dim() == 4:
        stages.append((3, lambda i: square(model, x[i], y[i], eps, queries=queries, norm=norm, input_range=input_range)))
    for code, attack in stages:
        idx = (broken_by < 0).nonzero()[:, 0]
        if not len(idx):
            break
        out = attack(idx)
        with torch.no_grad():
            fooled = model(out).argmax(1) != y[idx]
        adv[idx[fooled]] = out[fooled]
        broken_by[idx[fooled]] = code
    return adv, broken_by


def _check(eps: float, steps: int, norm: str) -> None:
    if norm not in NORMS:
        raise XdlError(f"unknown norm {norm!r}: choose linf or l2")
    if steps < 1:
        raise XdlError(f"steps must be ≥ 1, got {steps}")
    if not 0 <= eps < math.inf:
        raise XdlError(f"eps must be ≥ 0 and finite, got {eps}")
