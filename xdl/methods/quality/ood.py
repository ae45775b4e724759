"""Out-of-distribution scores: higher = more like the training distribution.

- maximum softmax probability (Hendrycks & Gimpel 2017),
- negative energy, T·logsumexp(logits / T) (Liu, Wang, Owens & Li 2020, NeurIPS),
- negative Mahalanobis distance of the penultimate features to the closest class mean under
  one covariance shared by all classes, both estimated on the training split (Lee, Lee, Lee &
  Shin 2018, NeurIPS; without their input preprocessing and layer ensemble).
AUROC is the probability that a random out-of-distribution input scores lower than a random
in-distribution one (0.5: indistinguishable, 1: perfectly separated).
"""

from __future__ import annotations

import numpy as np
import torch


def msp(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), 1).max(1).values.numpy()


def energy(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    return (temperature * torch.logsumexp(logits.double() / temperature, 1)).numpy()


class Mahalanobis:
    """Class means and the tied (pooled within-class) covariance of training features."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int):
        f, y = features.double(), labels.long()
        counts = torch.bincount(y, minlength=num_classes).double()
        sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64).index_add_(0, y, f)
        self.present = counts > 0
        self.means = sums / counts.clamp(min=1)[:, None]
        centered = f - self.means[y]
        covariance = centered.T @ centered / len(f)
        # The pseudo-inverse: ReLU features often have dead units, a singular covariance.
        self.precision = torch.linalg.pinv(covariance, hermitian=True)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each row to each present class mean (N×K; absent classes inf)."""
        f = features.double()
        # (f − μ)ᵀ P (f − μ) = fᵀPf − 2 fᵀPμ + μᵀPμ, batched for all classes at once.
        fp = f @ self.precision
        d = (fp * f).sum(1, keepdim=True) - 2 * fp @ self.means.T + ((self.means @ self.precision) * self.means).sum(1)
        return torch.where(self.present, d.clamp(min=0), torch.full_like(d, float("inf")))

    def score(self, features: torch.Tensor) -> np.ndarray:
        return (-self.distances(features).min(1).values).numpy()


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """AUROC of telling out-of-distribution inputs (low scores) from in-distribution ones."""
    from sklearn.metrics import roc_auc_score

    truth = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(truth, -np.r_[in_scores, out_scores]))


def fpr_at_95_tpr(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Share of OOD inputs accepted when the threshold keeps 95% of in-distribution inputs."""
    return float((out_scores >= np.quantile(in_scores, 0.05)).mean())
