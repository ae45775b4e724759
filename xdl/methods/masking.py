"""Gradient-masking checks: signs that a robustness number was bought by hiding gradients.

Athalye et al. 2018 ("Obfuscated Gradients") and Carlini et al. 2019 ("On Evaluating
Adversarial Robustness", §5.2 checklist) list symptoms of an evaluation that gradient
attacks cannot be trusted on. Each check here is one of them, measured on the samples of
an attack, with a named pass/fail and the numbers behind it:

- ``iterative ≥ single-step``: PGD-10 is at least as strong as one step of size eps;
- ``monotone in eps``: robust accuracy does not rise as eps grows (eps/2, eps, 2·eps);
- ``large eps → chance``: an eps as wide as the input range brings accuracy to chance;
- ``black-box ≤ white-box``: Square (no gradients) breaks no more than a point of samples
  that APGD left standing;
- ``converged``: APGD with twice the steps and one more restart lowers accuracy by at most
  a point;
- ``gradients usable``: the input gradient is zero or non-finite on at most 10% of samples;
- ``logits, not probabilities``: the model's outputs are not already softmax (or log-softmax)
  values, which flatten the cross-entropy's gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xdl.methods import robust
from xdl.methods.autoattack import apgd

POINT = 0.01  # "a point" of accuracy: the tolerance of the comparisons between attacks
ZERO_GRADIENT_SHARE = 0.10
CHANCE_MARGIN = 0.05


def run_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    input_range: robust.Box = (0.0, 1.0),
    mask: torch.Tensor | None = None,
    broken_by: torch.Tensor | None = None,
    steps: int = 100,
    restarts: int = 1,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> list[dict]:
    """One row per check: ``check``, ``passed`` (True/False, None when it could not run), ``evidence``.

    ``broken_by`` is :func:`xdl.methods.autoattack.autoattack`'s per-sample record on these samples
    (index 3 = Square); without it the black-box and convergence checks are skipped.
    """
    device = device or torch.device("cpu")
    n = len(y)
    if n == 0:
        return []
    # One sample, or a point, whichever is larger: a smaller difference is noise.
    tol = max(POINT, 1.0 / n) + 1e-9
    num_classes = _outputs(model, x[:batch_size].to(device)).shape[1]

    def accuracy(attack) -> float:
        right = 0
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
            adv = attack(xb, yb)
            with torch.no_grad():
                right += int((model(adv).argmax(1) == yb).sum())
        return right / n

    def pgd(e: float, steps: int = 10, **kw):
        return lambda xb, yb: robust.pgd(model, xb, yb, e, steps, norm=norm, input_range=input_range, mask=mask, **kw)

    rows = []
    single = accuracy(pgd(eps, 1, step_size=eps, random_start=False))
    iterative = accuracy(pgd(eps))
    rows.append(_row("iterative ≥ single-step", iterative <= single + tol,
                     f"PGD-10 {iterative:.1%} vs one step {single:.1%}"))

    width = None if input_range is None else input_range[1] - input_range[0]
    larger = 2 * eps if width is None else min(2 * eps, width)
    curve = [(e, accuracy(pgd(e))) for e in (eps / 2, larger)]
    curve.insert(1, (eps, iterative))
    rising = [f"{a:.1%} at {e:g} → {b:.1%} at {f:g}" for (e, a), (f, b) in zip(curve, curve[1:]) if b > a + tol]
    rows.append(_row("monotone in eps", not rising,
                     "PGD-10 " + ", ".join(f"{a:.1%} at {e:g}" for e, a in curve) + ("; rises: " + "; ".join(rising) if rising else "")))

    # The whole input box (for L2: its diagonal) lets an attacker draw any input at all.
    d = x[0].numel()
    huge = (width if width is not None else 20 * eps) * (1.0 if norm == "linf" else math.sqrt(d))
    big = accuracy(pgd(huge, 10))
    chance = 1.0 / num_classes
    rows.append(_row("large eps → chance", big <= chance + CHANCE_MARGIN + tol,
                     f"PGD-10 {big:.1%} at eps {huge:g}; chance is {chance:.1%}"))

    if broken_by is not None and x.dim() == 4:
        square_only = float((broken_by == 3).double().mean())
        rows.append(_row("black-box ≤ white-box", square_only <= tol,
                         f"Square broke {square_only:.1%} of samples that APGD-CE and APGD-T left robust"))
    else:
        rows.append(_row("black-box ≤ white-box", None, "needs AutoAttack with Square (images, queries > 0)"))

    if broken_by is not None:
        left = (broken_by < 0).nonzero()[:, 0]
        newly = 0
        for start in range(0, len(left), batch_size):
            i = left[start : start + batch_size]
            xb, yb = x[i].to(device), y[i].to(device)
            adv = apgd(model, xb, yb, eps, steps=2 * steps, restarts=restarts + 1, norm=norm, input_range=input_range, mask=mask)
            with torch.no_grad():
                newly += int((model(adv).argmax(1) != yb).sum())
        rows.append(_row("converged", newly / n <= tol,
                         f"APGD-CE with {2 * steps} steps × {restarts + 1} restarts broke {newly} more of {n} samples ({newly / n:.1%})"))
    else:
        rows.append(_row("converged", None, "needs AutoAttack's per-sample record"))

    dead = 0
    for start in range(0, n, batch_size):
        xb = x[start : start + batch_size].to(device).requires_grad_(True)
        yb = y[start : start + batch_size].to(device)
        grad = robust.input_gradient(model, xb, yb)
        if mask is not None:
            grad = grad * mask.to(grad)
        flat = grad.flatten(1)
        dead += int(((flat == 0).all(1) | ~torch.isfinite(flat).all(1)).sum())
    rows.append(_row("gradients usable", dead / n <= ZERO_GRADIENT_SHARE,
                     f"{dead} of {n} samples ({dead / n:.1%}) have an all-zero or non-finite input gradient"))

    out = _outputs(model, x[:batch_size].to(device))
    probabilities = bool((out >= 0).all() and (out <= 1).all() and torch.allclose(out.sum(1), torch.ones(len(out), device=out.device), atol=1e-3))
    log_probabilities = bool((out <= 0).all() and torch.allclose(out.logsumexp(1), torch.zeros(len(out), device=out.device), atol=1e-3))
    kind = "probabilities (rows in [0, 1] summing to 1)" if probabilities else "log-probabilities" if log_probabilities else "logits"
    rows.append(_row("logits, not probabilities", not (probabilities or log_probabilities), f"the model outputs {kind}"))
    return rows


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).float()


def _row(check: str, passed: bool | None, evidence: str) -> dict:
    return {"check": check, "passed": passed, "evidence": evidence}


def failed(rows: list[dict]) -> list[str]:
    """Names of the checks that failed (a check that could not run is not a failure)."""
    return [r["check"] for r in rows if r["passed"] is False]
