"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): certified L2 radii, and an attack on the smoothed classifier.

The smoothed classifier g(x) = argmax_c P(f(x + ε) = c), ε ~ N(0, σ²I), answers the class
the base model f gives most often under Gaussian noise. If that class has probability
p_A ≥ ½, g is constant within L2 radius σ·Φ⁻¹(p_A) of x (Cohen et al., theorem 1).
CERTIFY guesses the class from n0 draws, then bounds p_A from below with n fresh draws
(one-sided Clopper–Pearson at level α), so a certificate is wrong with probability ≤ α;
a bound below ½ abstains.

Noise comes in seeded blocks of :data:`BLOCK` draws, each block's generator keyed by the
seed, the sample's position, the phase and the block: the counts do not depend on the
batch size, on how many samples share a model call, or on the memory that sized them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from xdl.methods import robust

BLOCK = 100  # noise draws per seeded block: n0 = 100 is one block, n = 10,000 a hundred
SELECT, ESTIMATE, PREDICT, ATTACK = range(4)  # phases: independent noise for each use (Cohen's proof needs it)


@dataclass
class Certified:
    """Per sample: the smoothed prediction (-1: abstained), its certified L2 radius (0 when
    abstained) and the lower confidence bound on its class probability."""

    prediction: torch.Tensor
    radius: torch.Tensor
    p_lower: torch.Tensor


def block_seed(seed: int, position: int, phase: int, block: int) -> int:
    """The generator seed of one noise block: SeedSequence mixes the four into independent streams."""
    return int(np.random.SeedSequence([seed % 2**63, position, phase, block]).generate_state(1, np.uint64)[0])


def class_counts(model: nn.Module, x: torch.Tensor, draws: int, sigma: float, *, seed: int, positions, phase: int,
                 rows: int, num_classes: int) -> torch.Tensor:
    """counts[i, c]: of ``draws`` noisy copies x[i] + σε, how many ``model`` assigns to class c.

    ``x`` is on the model's device; ``positions`` (one per sample) key its noise; a model call
    takes at most ``rows`` inputs, whole blocks from one or several samples (or a block in parts
    when ``rows`` < BLOCK).
    """
    blocks = [(i, b, min(BLOCK, draws - b * BLOCK)) for i in range(len(x)) for b in range(-(-draws // BLOCK))]
    counts = torch.zeros(len(x) * num_classes, dtype=torch.long, device=x.device)
    per_call = max(1, rows // BLOCK)
    generator = torch.Generator(device=x.device)
    with torch.no_grad():
        for first in range(0, len(blocks), per_call):
            group = blocks[first:first + per_call]
            noise = []
            for i, b, size in group:
                generator.manual_seed(block_seed(seed, int(positions[i]), phase, b))
                noise.append(torch.randn((size, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype))
            owner = torch.cat([torch.full((size,), i, device=x.device) for i, _, size in group])
            inputs = x[owner] + sigma * torch.cat(noise)
            for part in range(0, len(inputs), rows):
                predicted = model(inputs[part:part + rows]).argmax(1)
                counts.index_add_(0, owner[part:part + rows] * num_classes + predicted, torch.ones_like(predicted))
    return counts.view(len(x), num_classes)


def lower_bound(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided (1 - α) Clopper–Pearson lower bound on a binomial proportion (0 for no success)."""
    from scipy.stats import beta

    k = np.asarray(successes, dtype=float)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(alpha, k, trials - k + 1)
    return np.where(k > 0, bound, 0.0)


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius ``n`` draws can certify: every draw agreeing gives p̲ = α^(1/n)."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(alpha ** (1 / n)))


def certify(model: nn.Module, x: torch.Tensor, sigma: float, n0: int, n: int, alpha: float, *, seed: int, positions,
            rows: int, num_classes: int) -> Certified:
    """Cohen et al.'s CERTIFY for each sample of ``x`` (on the model's device); results on CPU."""
    from scipy.stats import norm

    common = dict(seed=seed, positions=positions, rows=rows, num_classes=num_classes)
    top = class_counts(model, x, n0, sigma, phase=SELECT, **common).argmax(1)
    counts = class_counts(model, x, n, sigma, phase=ESTIMATE, **common)
    hits = counts.gather(1, top[:, None])[:, 0].cpu().numpy()
    p_lower = lower_bound(hits, n, alpha)
    certified = p_lower >= 0.5
    radius = np.where(certified, sigma * norm.ppf(np.clip(p_lower, 0.5, 1.0)), 0.0)
    prediction = torch.where(torch.as_tensor(certified), top.cpu(), torch.tensor(-1))
    return Certified(prediction, torch.as_tensor(radius, dtype=torch.float64), torch.as_tensor(p_lower))


def predict(model: nn.Module, x: torch.Tensor, sigma: float, n: int, alpha: float, *, seed: int, positions, rows: int,
            num_classes: int, phase: int = PREDICT) -> torch.Tensor:
    """Cohen et al.'s PREDICT: the top class of ``n`` draws, or -1 (abstain) unless a two-sided
    binomial test says it beats the runner-up at level α; wrong with probability ≤ α."""
    from scipy.stats import binom

    counts = class_counts(model, x, n, sigma, seed=seed, positions=positions, phase=phase, rows=rows,
                          num_classes=num_classes)
    top2 = counts.topk(2, dim=1)
    first, second = top2.values.cpu().numpy().T
    # The test's two-sided p-value, by symmetry of Binomial(nA + nB, ½).
    p_value = np.minimum(1.0, 2 * binom.cdf(np.minimum(first, second), first + second, 0.5))
    return torch.where(torch.as_tensor(p_value <= alpha), top2.indices[:, 0].cpu(), torch.tensor(-1))


class SoftSmoothed(nn.Module):
    """log E_ε[softmax f(x + ε)] over ``draws`` fresh draws per call: the smoothed classifier's soft
    version, whose gradient an attack on g can follow (Salman et al. 2019, SmoothAdv). Each call's
    noise for a sample is keyed by its position and the call's number, as in :func:`class_counts`."""

    def __init__(self, model: nn.Module, sigma: float, draws: int, seed: int, positions):
        super().__init__()
        self.model, self.sigma, self.draws, self.seed, self.positions = model, sigma, draws, seed, positions
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=x.device)
        noise = []
        for position in self.positions:
            generator.manual_seed(block_seed(self.seed, int(position), ATTACK, self.calls))
            noise.append(torch.randn((self.draws, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype))
        self.calls += 1
        outputs = self.model((x[:, None] + self.sigma * torch.stack(noise)).flatten(0, 1)).float()
        probs = torch.softmax(outputs, 1).view(len(x), self.draws, -1).mean(1)
        # Cross-entropy of these log-probabilities is -log of the smoothed probability of the label.
        return probs.clamp_min(1e-12).log()


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, sigma: float, *, steps: int, draws: int,
           seed: int, positions, rows: int, input_range: robust.Box = (0.0, 1.0)) -> torch.Tensor:
    """PGD-L2 within radius ``eps`` against the smoothed classifier (its soft version), from x.

    From x, not from a random start, which would draw from the global generator and so depend
    on the batching; ``rows // draws`` samples per model call.
    """
    out = []
    size = max(1, rows // draws)
    for first in range(0, len(x), size):
        part = slice(first, first + size)
        soft = SoftSmoothed(model, sigma, draws, seed, positions[part])
        out.append(robust.pgd(soft, x[part], y[part], eps, steps, random_start=False, norm="l2", input_range=input_range))
    return torch.cat(out) if out else x.clone()


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, radii) -> np.ndarray:
    """The share of samples predicted correctly and certified at least to each radius (abstentions count as wrong)."""
    radius, correct = np.asarray(radius), np.asarray(correct, dtype=bool)
    if not len(radius):
        return np.full(len(radii), math.nan)
    return np.array([float((correct & (radius >= r)).mean()) for r in radii])
