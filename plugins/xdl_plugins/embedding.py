"""The penultimate-layer representation of the whole split, projected to 2-D.

A forward pre-hook on the layer that produces the class scores (an ``nn.Linear``, a Keras
``Dense``, a Hugging Face head; :func:`xdl.models.layers.score_head`) captures its input —
the features the classifier head separates — batch by batch; a model with no such layer
is projected from its logits, and the result says which. scikit-learn projects them with PCA (all
points) and t-SNE (a seeded subsample, since t-SNE grows quadratically with the points).
Well-separated class clusters mean the head has an easy job; misclassified points
sitting inside another class's cluster are errors of the representation, not the head.

    >>> result = xdl.explain(model, "embedding", x=x_test, y=y_test)   # doctest: +SKIP
    >>> result.arrays["pca"].shape                                     # doctest: +SKIP
    (360, 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from xdl.analysis.base import Analyzer, Context, Result
from xdl.errors import XdlError
from xdl.limits import at_most
from xdl.methods.quality.features import logits_and_features
from xdl.models.layers import Head, score_head

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TITLES = {"pca": "PCA", "tsne": "t-SNE"}


@dataclass
class Params:
    tsne: bool = True
    tsne_points: int = 2000  # t-SNE on at most this many points (seeded subsample) to bound time
    perplexity: float = 30.0

    def __post_init__(self) -> None:
        if self.tsne_points < 2:
            raise ValueError(f"tsne_points must be ≥ 2, got {self.tsne_points}")
        if self.perplexity <= 0:
            raise ValueError(f"perplexity must be > 0, got {self.perplexity}")
        at_most("tsne_points", self.tsne_points, 100_000)
        at_most("perplexity", self.perplexity, 10_000)


class Embedding(Analyzer):
    kind = "explain"
    Params = Params
    samples = None  # the whole split: a projection of a handful of points shows nothing
    description = "penultimate-layer features projected to 2-D (PCA, t-SNE), by class and group"
    guide = (
        "The model's last internal representation, projected to 2-D. Well-separated class clusters mean the "
        "model has learnt distinct features; clusters organised by a sensitive group instead of the class are"
        " a warning. t-SNE distances between clusters are not meaningful."
    )

    def run(self, ctx: Context, params: Params) -> Result:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        features, predicted, head = penultimate(ctx)
        if len(features) < 3:
            raise XdlError(f"an embedding needs at least 3 samples, got {len(features)}")
        labels = ctx.y.numpy() if ctx.y is not None else predicted
        wrong = labels != predicted
        result = self.result(arrays={"labels": labels, "predicted": predicted})

        pca = PCA(2, random_state=ctx.seed).fit(features)
        projections = {"pca": pca.transform(features)}
        result.metrics["pca_explained_variance"] = pca.explained_variance_ratio_.tolist()
        if params.tsne:
            rng = np.random.default_rng(ctx.seed)
            keep = np.sort(rng.choice(len(features), min(params.tsne_points, len(features)), replace=False))
            # sklearn requires perplexity < points; a third of them keeps neighbourhoods local.
            perplexity = min(params.perplexity, (len(keep) - 1) / 3)
            if perplexity < params.perplexity:
                result.warnings.append(f"t-SNE perplexity lowered to {perplexity:.1f} for {len(keep)} points")
            tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=ctx.seed)
            projections["tsne"] = tsne.fit_transform(features[keep])
            result.arrays["tsne_index"] = keep
            result.metrics["tsne_points"] = len(keep)

        names = ctx.class_names or [str(c) for c in range(int(labels.max()) + 1)]
        index = {"pca": np.arange(len(features)), "tsne": result.arrays.get("tsne_index")}
        for method, points in projections.items():
            result.arrays[method] = points
            rows = index[method]
            colour = "true class" if ctx.y is not None else "predicted class"
            title = TITLES[method]
            result.add_figure(f"{method}_class", scatter(points, labels[rows], names, wrong[rows], f"{title} by {colour}"))
            for group, values in ctx.groups.items():
                kinds, codes = np.unique(values[rows].astype(str), return_inverse=True)
                result.add_figure(f"{method}_{group}", scatter(points, codes, list(kinds), wrong[rows], f"{title} by {group}"))

        result.metrics.update(samples=len(features), features=int(features.shape[1]), misclassified=int(wrong.sum()),
                              features_from=head.described)
        if head.module is None:
            result.warnings.append("projected from the logits: no layer of this model produces the class scores alone, so "
                                   "its penultimate features are not reachable")
        if ctx.y is None:
            result.warnings.append("no labels: points are coloured by predicted class and errors cannot be marked")
        result.summary = (
            f"{features.shape[1]}-dimensional penultimate features of {len(features)} samples projected to 2-D "
            f"({', '.join(TITLES[m] for m in projections)}); {int(wrong.sum())} misclassified marked ×"
        )
        return result


def penultimate(ctx: Context) -> tuple[np.ndarray, np.ndarray, Head]:
    """The penultimate features of every sample, the predicted classes, and the head they were read at."""
    head, features, logits = None, [], []
    for _, xb in ctx.stream():
        head = head or score_head(ctx.model, xb[:2].to(ctx.device))
        lo, fe = logits_and_features(ctx.model, xb, ctx.device, len(xb), head=head)
        features.append(fe)
        logits.append(lo)
    if head is None:
        raise XdlError("an embedding needs at least 3 samples, got 0")
    return torch.cat(features).numpy(), torch.cat(logits).argmax(-1).numpy(), head


def scatter(points: np.ndarray, codes: np.ndarray, names: list[str], marked: np.ndarray, title: str) -> "Figure":
    """Points coloured by category, ``marked`` ones ringed with a black ×."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    cmap = "tab10" if len(names) <= 10 else "tab20"
    for code, name in enumerate(names):
        mask = codes == code
        if mask.any():
            ax.scatter(*points[mask].T, s=10, alpha=0.75, label=name, color=_colour(cmap, code))
    if marked.any():
        ax.scatter(*points[marked].T, s=28, marker="x", color="black", linewidths=0.9, label="misclassified")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig


def _colour(cmap: str, code: int):
    from matplotlib import colormaps

    colours = colormaps[cmap]
    return colours(code % colours.N)
