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
    if len(y) == 0:
        return []
    c = _Checks(model, x, y, eps, norm, input_range, mask, batch_size, device or torch.device("cpu"))
    iterative, rows = c.iterative_beats_single()
    rows.append(c.monotone(iterative))
    rows.append(c.large_eps_reaches_chance())
    rows.append(c.black_box(broken_by))
    rows.append(c.converged(broken_by, steps, restarts))
    rows.append(c.gradients_usable())
    rows.append(c.logits())
    return rows


class _Checks:
    """The model, samples and attack settings every check shares, and accuracy under an attack."""

    def __init__(self, model, x, y, eps, norm, input_range, mask, batch_size, device):
        self.model, self.x, self.y, self.eps, self.norm = model, x, y, eps, norm
        self.input_range, self.mask, self.batch_size, self.device = input_range, mask, batch_size, device
        self.n = len(y)
        # One sample, or a point, whichever is larger: a smaller difference is noise.
        self.tol = max(POINT, 1.0 / self.n) + 1e-9
        self.width = None if input_range is None else input_range[1] - input_range[0]

    def batches(self, index: torch.Tensor | None = None):
        count = self.n if index is None else len(index)
        for start in range(0, count, self.batch_size):
            part = slice(start, start + self.batch_size) if index is None else index[start : start + self.batch_size]
            yield self.x[part].to(self.device), self.y[part].to(self.device)

    def accuracy(self, attack) -> float:
        right = 0
        for xb, yb in self.batches():
            adv = attack(xb, yb)
            with torch.no_grad():
                right += int((self.model(adv).argmax(1) == yb).sum())
        return right / self.n

    def pgd(self, e: float, steps: int = 10, **kw):
        return lambda xb, yb: robust.pgd(self.model, xb, yb, e, steps, norm=self.norm, input_range=self.input_range,
                                         mask=self.mask, **kw)

    def iterative_beats_single(self) -> tuple[float, list[dict]]:
        single = self.accuracy(self.pgd(self.eps, 1, step_size=self.eps, random_start=False))
        iterative = self.accuracy(self.pgd(self.eps))
        return iterative, [_row("iterative ≥ single-step", iterative <= single + self.tol,
                                f"PGD-10 {iterative:.1%} vs one step {single:.1%}")]

    def monotone(self, iterative: float) -> dict:
        eps = self.eps
        larger = 2 * eps if self.width is None else min(2 * eps, self.width)
        curve = [(e, self.accuracy(self.pgd(e))) for e in (eps / 2, larger)]
        curve.insert(1, (eps, iterative))
        rising = [f"{a:.1%} at {e:g} → {b:.1%} at {f:g}" for (e, a), (f, b) in zip(curve, curve[1:]) if b > a + self.tol]
        return _row("monotone in eps", not rising,
                    "PGD-10 " + ", ".join(f"{a:.1%} at {e:g}" for e, a in curve) + ("; rises: " + "; ".join(rising) if rising else ""))

    def large_eps_reaches_chance(self) -> dict:
        # The whole input box (for L2: its diagonal) lets an attacker draw any input at all.
        d = self.x[0].numel()
        huge = (self.width if self.width is not None else 20 * self.eps) * (1.0 if self.norm == "linf" else math.sqrt(d))
        big = self.accuracy(self.pgd(huge, 10))
        chance = 1.0 / _outputs(self.model, self.x[: self.batch_size].to(self.device)).shape[1]
        return _row("large eps → chance", big <= chance + CHANCE_MARGIN + self.tol,
                    f"PGD-10 {big:.1%} at eps {huge:g}; chance is {chance:.1%}")

    def black_box(self, broken_by: torch.Tensor | None) -> dict:
        if broken_by is None or self.x.dim() != 4:
            return _row("black-box ≤ white-box", None, "needs AutoAttack with Square (images, queries > 0)")
        square_only = float((broken_by == 3).double().mean())
        return _row("black-box ≤ white-box", square_only <= self.tol,
                    f"Square broke {square_only:.1%} of samples that APGD-CE and APGD-T left robust")

    def converged(self, broken_by: torch.Tensor | None, steps: int, restarts: int) -> dict:
        if broken_by is None:
            return _row("converged", None, "needs AutoAttack's per-sample record")
        newly = 0
        for xb, yb in self.batches((broken_by < 0).nonzero()[:, 0]):
            adv = apgd(self.model, xb, yb, self.eps, steps=2 * steps, restarts=restarts + 1, norm=self.norm,
                       input_range=self.input_range, mask=self.mask)
            with torch.no_grad():
                newly += int((self.model(adv).argmax(1) != yb).sum())
        n = self.n
        return _row("converged", newly / n <= self.tol,
                    f"APGD-CE with {2 * steps} steps × {restarts + 1} restarts broke {newly} more of {n} samples ({newly / n:.1%})")

    def gradients_usable(self) -> dict:
        dead = 0
        for xb, yb in self.batches():
            grad = robust.input_gradient(self.model, xb.requires_grad_(True), yb)
            if self.mask is not None:
                grad = grad * self.mask.to(grad)
            flat = grad.flatten(1)
            dead += int(((flat == 0).all(1) | ~torch.isfinite(flat).all(1)).sum())
        n = self.n
        return _row("gradients usable", dead / n <= ZERO_GRADIENT_SHARE,
                    f"{dead} of {n} samples ({dead / n:.1%}) have an all-zero or non-finite input gradient")

    def logits(self) -> dict:
        out = _outputs(self.model, self.x[: self.batch_size].to(self.device))
        ones, zeros = torch.ones(len(out), device=out.device), torch.zeros(len(out), device=out.device)
        probabilities = bool((out >= 0).all() and (out <= 1).all() and torch.allclose(out.sum(1), ones, atol=1e-3))
        log_probabilities = bool((out <= 0).all() and torch.allclose(out.logsumexp(1), zeros, atol=1e-3))
        kind = "probabilities (rows in [0, 1] summing to 1)" if probabilities else "log-probabilities" if log_probabilities else "logits"
        return _row("logits, not probabilities", not (probabilities or log_probabilities), f"the model outputs {kind}")


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).float()


def _row(check: str, passed: bool | None, evidence: str) -> dict:
    return {"check": check, "passed": passed, "evidence": evidence}


def failed(rows: list[dict]) -> list[str]:
    """Names of the checks that failed (a check that could not run is not a failure)."""
    return [r["check"] for r in rows if r["passed"] is False]
