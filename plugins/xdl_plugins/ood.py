"""OOD: how well the model's own signals tell unfamiliar inputs from its test split.

Three scores per input — maximum softmax probability (Hendrycks & Gimpel 2017), energy
(Liu et al. 2020) and the Mahalanobis distance of penultimate features to the nearest class
mean under a tied covariance fitted on the training split (Lee et al. 2018) — each with its
AUROC and FPR at 95% TPR against the run's test split. The other inputs come from
``xdl report RUN --method ood --data SET`` (a dataset name, folder, .npz or, for tabular
runs, a CSV with the run's columns). Without ``--data`` the analyzer makes a synthetic set
from the test split itself — pixels shuffled within each image (tabular: every column
shuffled across rows) — which keeps every marginal value but destroys the structure the
model learned: it always exists, so the audit gets a finding, and a score that cannot
separate it is blind to far-OOD inputs.

>>> result = xdl.report(run, "ood", other="fashion-mnist")        # doctest: +SKIP
>>> result.metrics["auroc"]                                       # doctest: +SKIP
{'msp': 0.91, 'energy': 0.94, 'mahalanobis': 0.99}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xdl.analysis import Analyzer, Context, Finding, Result
from xdl.errors import XdlError
from xdl.methods.quality import ood
from xdl.methods.quality.features import logits_and_features
from xdl.models.layers import score_head

SCORES = {"msp": "maximum softmax probability", "energy": "energy", "mahalanobis": "Mahalanobis"}


@dataclass
class OodParams:
    temperature: float = 1.0  # energy temperature; Liu et al. 2020 use 1
    max_samples: int = 10000  # of each set, seeded subsample beyond this

    def __post_init__(self) -> None:
        if not 0 < self.temperature < 1e4:
            raise ValueError(f"temperature must be in (0, 10000), got {self.temperature}")
        if not 10 <= self.max_samples <= 1_000_000:
            raise ValueError(f"max_samples must be 10..1000000, got {self.max_samples}")


class Ood(Analyzer):
    kind = "report"
    Params = OodParams
    samples = None
    sharding = "none"  # AUROC compares whole sets
    takes_data = True  # reads ``--data`` (Context.other)
    description = "out-of-distribution scores (MSP, energy, Mahalanobis) and their AUROC against the test split"

    def run(self, ctx: Context, params: OodParams) -> Result:
        if ctx.data is None:
            raise XdlError("the ood report needs a run directory: Mahalanobis fits class means on the training split")
        rng = np.random.default_rng(ctx.seed)
        index = _cap_index(len(ctx.data.test), params.max_samples, rng)
        inside = ctx.data.test.x[torch.as_tensor(index)]
        if ctx.other is None:
            outside, origin = _scrambled(inside, ctx.kind, rng), "synthetic: test inputs with " + (
                "pixels shuffled within each image" if ctx.kind == "image" else "every column shuffled across rows")
        else:
            outside = ctx.other.x[torch.as_tensor(_cap_index(len(ctx.other), params.max_samples, rng))]
            origin = ctx.other_name or "--data"
            if outside.shape[1:] != inside.shape[1:]:
                raise XdlError(f"--data holds inputs of shape {list(outside.shape[1:])}, but this run's model takes "
                               f"{list(inside.shape[1:])}")
        desc = "features" if ctx.progress else None
        head = score_head(ctx.model, inside[:2].to(ctx.device))
        _, train_features = logits_and_features(ctx.model, ctx.data.train.x, ctx.device, ctx.batch_size, desc, head)
        mahalanobis = ood.Mahalanobis(train_features, ctx.data.train.y, ctx.num_classes)
        scores = {}
        for name, x in (("in", inside), ("out", outside)):
            logits, features = logits_and_features(ctx.model, x, ctx.device, ctx.batch_size, desc, head)
            scores[name] = {"msp": ood.msp(logits), "energy": ood.energy(logits, params.temperature),
                            "mahalanobis": mahalanobis.score(features)}
        auroc = {k: ood.auroc(scores["in"][k], scores["out"][k]) for k in SCORES}
        fpr = {k: ood.fpr_at_95_tpr(scores["in"][k], scores["out"][k]) for k in SCORES}
        best = max(auroc, key=auroc.get)

        result = self.result(arrays={f"{k}_{side}": scores[side][k] for k in SCORES for side in ("in", "out")})
        result.metrics.update(auroc=auroc, fpr_at_95_tpr=fpr, best_score=best, best_auroc=auroc[best],
                              in_samples=len(inside), out_samples=len(outside), out_data=origin,
                              features_from=head.described)
        result.tables["scores"] = [{"score": SCORES[k], "auroc": round(auroc[k], 5), "fpr_at_95_tpr": round(fpr[k], 5)}
                                   for k in SCORES]
        # The least familiar test samples: a test sample scoring like OOD inputs is worth a look.
        order = np.argsort(scores["in"][best], kind="stable")[:20]
        source = ctx.data.test.source_index[index]
        result.tables["least_familiar_test"] = [
            {"split": "test", "source_index": int(source[i]), "position": int(index[i]), best: float(scores["in"][best][i])}
            for i in order
        ]
        result.summary = (f"{SCORES[best]} separates {origin} from the test split best: AUROC {auroc[best]:.3f} "
                          f"(MSP {auroc['msp']:.3f}, energy {auroc['energy']:.3f}, Mahalanobis {auroc['mahalanobis']:.3f})")
        if head.module is None:
            result.warnings.append("Mahalanobis scored on the logits: no layer of this model produces the class scores "
                                   "alone, so its penultimate features are not reachable (MSP and energy need only logits)")
        if ctx.other is None:
            result.warnings.append("no --data given: scored a synthetic set (test inputs scrambled); pass --data to score real inputs")
        result.add_figure("scores", _histograms(scores, auroc))
        return result

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        m = result.metrics
        if "best_auroc" not in m:
            return []
        return [Finding(
            "Out-of-distribution detection (AUROC)", f"{m['best_auroc']:.3f}",
            detail=f"by {SCORES[m['best_score']]}, against {m['out_data']}", source=f"report/{result.method}",
            level="warn" if m["best_auroc"] < 0.9 else "info",
            help="How well the model's confidence (max softmax, Hendrycks & Gimpel 2017), energy (Liu et al. 2020) or "
                 "feature distance (Mahalanobis, Lee et al. 2018) tells these inputs from its own test split; 0.5 is "
                 "chance, and below ~0.9 the model will confidently answer on inputs it knows nothing about.",
        )]


def _cap_index(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, cap, replace=False))


def _scrambled(x: torch.Tensor, kind: str, rng: np.random.Generator) -> torch.Tensor:
    """Same values, no structure: pixels permuted within each image, or columns permuted across rows."""
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    if kind == "image":
        flat = x.reshape(len(x), -1)
        order = torch.argsort(torch.rand(flat.shape, generator=gen), 1)
        return flat.gather(1, order).reshape(x.shape)
    order = torch.argsort(torch.rand(x.shape, generator=gen), 0)
    return x.gather(0, order)


def _histograms(scores: dict, auroc: dict):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 2.8), layout="constrained")
    for ax, k in zip(fig.subplots(1, 3), SCORES):
        values = np.r_[scores["in"][k], scores["out"][k]]
        finite = values[np.isfinite(values)]
        bins = np.linspace(finite.min(), finite.max(), 40) if finite.size and finite.min() < finite.max() else 10
        ax.hist(scores["in"][k], bins=bins, alpha=0.6, label="test split", density=True)
        ax.hist(scores["out"][k], bins=bins, alpha=0.6, label="other inputs", density=True)
        ax.set_title(f"{SCORES[k]} (AUROC {auroc[k]:.3f})", fontsize=9)
        ax.set_xlabel("score (higher = more familiar)", fontsize=8)
    fig.axes[0].legend(fontsize=7)
    return fig
