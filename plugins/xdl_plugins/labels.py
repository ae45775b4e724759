"""Labels: which given labels look wrong, by confident learning (Northcutt et al. 2021).

Out-of-fold probabilities come from K-fold retraining with the run's own model and train
config (cached in RUN/cache/labels-oof/); per-class thresholds give the confident joint,
which estimates how many samples of each given label truly belong to each other class;
that many are flagged per class pair (prune by noise rate) and ranked by self-confidence or
normalized margin. cleanlab implements the same method; xdl's own numpy version needs no
extra dependency and is tested against it.

>>> result = xdl.report(run, "labels", params={"folds": 3})           # doctest: +SKIP
>>> result.tables["label_issues"][0]                                   # doctest: +SKIP
{'split': 'train', 'source_index': 4127, 'given': '5', 'suggested': '3', ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from xdl.analysis import Analyzer, Context, Finding, Result
from xdl.errors import XdlError
from xdl.training.loop import retrain
from xdl.methods.quality import labels as cl


@dataclass
class LabelsParams:
    folds: int = 3  # K of the K-fold retraining; Northcutt et al. use 4–5, 3 keeps a laptop's wait short
    epochs: int | None = None  # epochs per fold; default: the run's own
    split: Literal["train", "val", "test"] = "train"  # whose labels to check: the ones the model learned from
    rank_by: Literal["self_confidence", "normalized_margin"] = "self_confidence"
    show: int = 24  # most likely mislabeled images in the figure

    def __post_init__(self) -> None:
        if not 2 <= self.folds <= 20:
            raise ValueError(f"folds must be 2..20, got {self.folds}")
        if self.epochs is not None and not 1 <= self.epochs <= 1000:
            raise ValueError(f"epochs must be 1..1000, got {self.epochs}")
        if not 0 <= self.show <= 200:
            raise ValueError(f"show must be 0..200, got {self.show}")


class Labels(Analyzer):
    kind = "report"
    Params = LabelsParams
    samples = None
    sharding = "none"  # the confident joint needs the whole split
    description = "likely mislabeled samples by confident learning on out-of-fold probabilities"
    check_params = {"folds": 2, "epochs": 1, "show": 4}
    inapplicable = "an imported model: the report retrains it on folds of the data, and xdl does not know its recipe"
    needs_xdl_training = True

    def run(self, ctx: Context, params: LabelsParams) -> Result:
        if ctx.run is None or ctx.data is None:
            raise XdlError("the labels report needs a run directory: it retrains the run's model on folds of its data")
        split = ctx.data.split(params.split)
        probs, cache = cl.out_of_fold(ctx.run, ctx.data, split, params.folds, params.epochs, ctx.seed, ctx.device, retrain,
                                      ctx.progress)
        given = split.y.numpy()
        joint = cl.confident_joint(given, probs)
        issues = cl.find_issues(given, probs, joint)
        quality = cl.quality_scores(given, probs, params.rank_by)
        order = np.flatnonzero(issues)[np.argsort(quality[issues], kind="stable")]
        suggested = probs.argmax(1)
        names, source = ctx.class_names, split.source_index
        noise = cl.noise_matrix(joint)

        result = self.result(arrays={"probs": probs, "is_issue": issues, "quality": quality,
                                     "confident_joint": joint, "source_index": source})
        result.tables["label_issues"] = [
            {"split": params.split, "source_index": int(source[i]), "position": int(i), "given": names[given[i]],
             "suggested": names[suggested[i]], "quality": round(float(quality[i]), 5),
             "p_given": round(float(probs[i, given[i]]), 5), "p_suggested": round(float(probs[i, suggested[i]]), 5)}
            for i in order
        ]
        result.tables["noise_rates"] = [
            {"given": names[i], "true": names[j], "count": int(joint[i, j]), "rate": round(float(noise[i, j]), 5)}
            for i, j in zip(*np.nonzero(joint)) if i != j
        ]
        rate = float(issues.mean()) if len(issues) else 0.0
        result.metrics.update(
            issues=int(issues.sum()), samples=len(given), issue_rate=rate, split=params.split,
            oof_accuracy=float((suggested == given).mean()), estimated_noise_rate=float(1 - np.trace(joint) / max(joint.sum(), 1)),
            folds=params.folds, oof_cache=cache,
        )
        result.summary = (f"{int(issues.sum())} of {len(given)} {params.split} labels ({rate:.1%}) look wrong by confident "
                          f"learning on {params.folds}-fold out-of-fold probabilities; see label_issues.csv")
        if ctx.kind == "image" and len(order) and params.show:
            result.add_figure("label_issues", _grid(split.x[order[: params.show]].numpy(), given[order], suggested[order],
                                                    probs[order], source[order], names))
        result.add_figure("noise_rates", _matrix(noise, names))
        return result

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        m = result.metrics
        if "issues" not in m:
            return []
        return [Finding(
            "likely label errors", f"{m['issues']} of {m['samples']} ({m['issue_rate']:.1%})",
            detail=f"{m['split']} split, {m['folds']}-fold out-of-fold probabilities", source=f"report/{result.method}",
            level="warn" if m["issue_rate"] > 0.01 else "info",
            help="Samples whose given label the model, trained without them, confidently places in another class "
                 "(confident learning, Northcutt et al. 2021, JAIR); more than a percent or two is worth a look at "
                 "label_issues.csv, since such labels cap the accuracy a model can reach and reward memorization.",
        )]


def _grid(images: np.ndarray, given: np.ndarray, suggested: np.ndarray, probs: np.ndarray, source: np.ndarray,
          names: list[str]):
    from matplotlib.figure import Figure

    cols = min(8, len(images))
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(1.5 * cols, 1.75 * rows), layout="constrained")
    for k, ax in enumerate(fig.subplots(rows, cols, squeeze=False).ravel()):
        ax.axis("off")
        if k < len(images):
            img = images[k].transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"#{source[k]}\n{names[given[k]]} → {names[suggested[k]]} ({probs[k, suggested[k]]:.2f})",
                         fontsize=7)
    fig.suptitle("most likely mislabeled: given → suggested (probability)", fontsize=9)
    return fig


def _matrix(noise: np.ndarray, names: list[str]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(0.45 * len(names) + 2.5, 0.45 * len(names) + 2), layout="constrained")
    ax = fig.subplots()
    off = noise.copy()
    np.fill_diagonal(off, np.nan)
    shown = ax.imshow(off, cmap="Reds", vmin=0)
    fig.colorbar(shown, ax=ax, label="P(true | given)")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="likely true label", ylabel="given label",
           title="estimated label noise (off-diagonal)")
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    return fig
