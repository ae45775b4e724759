"""Overfit: learning curves, the generalization gap and a diagnosis from a run's history.

Reads ``history.csv`` (one row per epoch) and the final eval-mode metrics in run.json;
touches no data. The diagnosis rests on two textbook signals — validation loss climbing
back above its minimum while training loss keeps falling, and a train−validation
accuracy gap — and its suggestions quote the run's own configuration.

>>> result = xdl.report(run, "overfit")                    # doctest: +SKIP
>>> result.metrics["diagnosis"], result.metrics["suggestions"]   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xdl.analysis import Analyzer, Context, Result
from xdl.analysis.base import Finding, is_number
from xdl.errors import XdlError


@dataclass
class OverfitParams:
    rise: float = 0.25  # validation loss this fraction above its minimum has "risen"
    gap: float = 0.05  # train − validation accuracy this large is a generalization gap
    fit: float = 0.9  # training accuracy below this: the model has not fit its own data

    def __post_init__(self) -> None:
        for name in ("rise", "gap", "fit"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class Overfit(Analyzer):
    """Diagnose overfitting or underfitting from the learning curves of a run."""

    kind = "report"
    Params = OverfitParams
    samples = None
    description = "learning curves, generalization gap, over/underfitting diagnosis"
    guide = (
        "Training against validation loss and accuracy by epoch. A validation loss that rises while training "
        "loss falls is overfitting; both high is underfitting. The gap is measured on clean, eval-mode "
        "passes."
    )

    inapplicable = "an imported model: it has no training history"
    needs_xdl_training = True

    def run(self, ctx: Context, params: OverfitParams) -> Result:
        if ctx.run is None:
            raise XdlError("the overfit report needs a run directory: it reads the run's history.csv and metrics")
        curves = _curves(ctx.run)
        metrics = ctx.run.metrics
        train_cfg, model_cfg = ctx.run.info.get("train", {}), ctx.run.info.get("model", {})
        epochs, tl, vl = curves["epoch"], curves["train_loss"], curves["val_loss"]
        best = int(np.argmin(vl))
        flagged = np.flatnonzero(curves["best"])
        kept = int(flagged[-1]) if flagged.size else len(epochs) - 1  # early stopping restores its best epoch
        rise = float(vl[kept] / vl[best] - 1) if vl[best] > 0 else 0.0
        accuracy = {s: metrics.get(f"{s}_accuracy", curves[f"{s}_accuracy"][kept] if s != "test" else np.nan)
                    for s in ("train", "val", "test")}
        loss = {s: metrics.get(f"{s}_loss", curves[f"{s}_loss"][kept] if s != "test" else np.nan)
                for s in ("train", "val", "test")}
        gap = float(accuracy["train"] - accuracy["val"])
        quarter = len(epochs) - 1 - max(1, len(epochs) // 4)  # the epoch a quarter of the run before the last

        # The classic sign first; an accuracy gap means overfitting only once the model fits
        # its training data — before that, the gap is a model still learning.
        evidence: list[str] = []
        if rise >= params.rise and tl[kept] < tl[best]:
            evidence.append(
                f"validation loss rose {rise:.0%} above its minimum at epoch {epochs[best]} "
                f"({vl[best]:.3f} → {vl[kept]:.3f}) while training loss kept falling ({tl[best]:.3f} → {tl[kept]:.3f})"
            )
        if gap >= params.gap and (evidence or accuracy["train"] >= params.fit):
            evidence.append(f"train accuracy {accuracy['train']:.3f} vs validation {accuracy['val']:.3f} (gap {gap:.3f})")
        if evidence:
            diagnosis = "overfitting"
        elif accuracy["train"] < params.fit:
            diagnosis = "underfitting"
            evidence.append(f"train accuracy {accuracy['train']:.3f} is below {params.fit}: the model does not fit its own data")
        elif best == len(epochs) - 1 and len(epochs) >= 4 and vl[quarter] > vl[best] * (1 + params.rise / 5):
            diagnosis = "underfitting"
            evidence.append(
                f"validation loss was still falling when training stopped ({vl[quarter]:.3f} → {vl[best]:.3f} "
                f"over the last quarter of the epochs)"
            )
        else:
            diagnosis = "fine"
            where = (f"the kept weights (epoch {epochs[kept]}, restored by early stopping) are at the validation minimum"
                     if kept == best and kept != len(epochs) - 1
                     else f"validation loss ends within {rise:.0%} of its minimum (epoch {epochs[best]})")
            evidence.append(f"{where}; train−validation accuracy gap {gap:.3f}")
        suggestions = _suggestions(diagnosis, train_cfg, model_cfg, epochs[best], vl[best], vl[kept], best, kept, len(epochs))

        result = self.result()
        if not curves["clean"]:
            result.warnings.append("history.csv has no clean training pass (an older xdl wrote it): the training "
                                   "curve is the loss logged during training, of augmented batches in train mode")
        result.metrics.update(
            diagnosis=diagnosis, evidence=evidence, suggestions=suggestions,
            best_epoch=int(epochs[best]), kept_epoch=int(epochs[kept]), epochs_run=len(epochs),
            val_loss_min=float(vl[best]), val_loss_rise=rise,
            generalization_gap={"accuracy": gap, "loss": float(loss["val"] - loss["train"]),
                                "test_accuracy": float(accuracy["train"] - accuracy["test"])},
        )
        result.tables["gap"] = [{"split": s, "loss": float(loss[s]), "accuracy": float(accuracy[s])} for s in loss]
        result.add_figure("learning_curves", _plot(curves, best, kept, accuracy["test"]))
        result.summary = "; ".join([f"{diagnosis}: {evidence[0]}", *suggestions])
        return result

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        diagnosis = result.metrics.get("diagnosis")
        if not isinstance(diagnosis, str):
            return []
        gap = (result.metrics.get("generalization_gap") or {}).get("accuracy")
        detail = f"train − validation accuracy {gap:.1%}" if is_number(gap) else ""
        return [Finding(
            "Overfitting", diagnosis, detail, f"{result.kind}/{result.method}", "info" if diagnosis == "fine" else "warn",
            "Read from the learning curves, comparing clean eval-mode losses on training and validation data; "
            "overfitting (validation loss rising while training loss falls) or underfitting both mean the "
            "model's accuracy can still be improved by the suggested change.",
        )]


def _curves(run) -> dict[str, np.ndarray]:
    if not (run.path / "history.csv").is_file():
        raise XdlError(f"{run.path} has no history.csv: the overfit report needs the per-epoch history that training writes")
    rows = run.history
    if not rows:
        raise XdlError(f"{run.path}/history.csv has no epochs: nothing to diagnose")
    columns = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
    lacking = [c for c in columns if c not in rows[0]]
    if lacking:
        raise XdlError(f"{run.path}/history.csv lacks the column {lacking[0]!r}; it needs {', '.join(columns)}")
    curves = {c: np.array([float(r[c]) for r in rows]) for c in columns}
    # Compare like with like: the clean eval-mode pass over a training subset that xdl logs each
    # epoch, not the loss of augmented/mixed/adversarial batches in train mode logged while training.
    curves["clean"] = all(r.get("train_eval_loss") not in (None, "") for r in rows)
    if curves["clean"]:
        curves["train_loss"] = np.array([float(r["train_eval_loss"]) for r in rows])
        curves["train_accuracy"] = np.array([float(r["train_eval_accuracy"]) for r in rows])
    curves["epoch"] = curves["epoch"].astype(int)
    curves["best"] = np.array([str(r.get("best", "")) == "True" for r in rows])
    return curves


def _suggestions(diagnosis: str, train: dict, model: dict, best_epoch: int, best_loss: float, kept_loss: float,
                 best: int, kept: int, n_epochs: int) -> list[str]:
    """What to change, quoting the run's own settings."""
    dropout, decay, patience = model.get("dropout", 0.0), train.get("weight_decay", 0.0), train.get("early_stopping", 0)
    at_end = kept == n_epochs - 1
    out = []
    if diagnosis == "overfitting":
        if not dropout and "dropout" in model:
            out.append("dropout is 0; try --dropout 0.3")
        if decay < 1e-3:
            out.append(f"weight decay is {decay:g}; try --weight-decay 0.05")
        if not patience and best != kept:
            out.append(f"early stopping is off; early stopping would have kept epoch {best_epoch} "
                       f"(validation loss {best_loss:.3f} instead of {kept_loss:.3f})")
        if not train.get("augment") and "channels" in model:
            out.append("no augmentation; try --augment shift,rotate")
        if "hidden" in model:
            out.append(f"hidden layers are {model['hidden']}; fewer units memorize less")
    elif diagnosis == "underfitting":
        if at_end:
            out.append(f"epochs is {train.get('epochs')}; train longer")
        if dropout >= 0.3:
            out.append(f"dropout is {dropout}; try a lower one")
        if decay >= 1e-2:
            out.append(f"weight decay is {decay:g}; try --weight-decay 5e-4")
        if "hidden" in model:
            out.append(f"hidden layers are {model['hidden']}; try wider ones")
    return out


def _plot(curves: dict, best: int, kept: int, test_accuracy: float):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    epochs = curves["epoch"]
    for ax, what in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, curves[f"train_{what}"], label="train (eval mode)" if curves["clean"] else "train (as logged)")
        ax.plot(epochs, curves[f"val_{what}"], label="validation")
        ax.axvline(epochs[best], color="grey", ls="--", lw=1, label=f"best validation (epoch {epochs[best]})")
        if kept != len(epochs) - 1:
            ax.axvline(epochs[kept], color="black", ls=":", lw=1, label=f"kept (epoch {epochs[kept]})")
        ax.set_xlabel("epoch")
        ax.set_title(what)
    axes[0].set_yscale("log")
    if np.isfinite(test_accuracy):
        axes[1].scatter([epochs[kept]], [test_accuracy], color="black", zorder=3, label="test (final)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig
