"""Which explanation can be trusted for this model? Several explain methods on the same samples, ranked.

Each method (default: saliency, IG, SHAP, LIME, with their own defaults) explains the
same samples for the same target classes; :mod:`xdl.analysis.evaluation` then measures how
faithful each map is (deletion/insertion against random order), whether it survives the
cascading randomization of the model (Adebayo et al., 2018), and how far the methods
agree (Spearman rank correlation of |attribution|, sample by sample).

Ranking: methods that pass the randomization check come first, then those whose check
was undefined, then those that fail it; within each group, by insertion AUC minus
deletion AUC (higher: the map orders the evidence better than the others).

    >>> result = xdl.report(run, "trust", samples=16)                     # doctest: +SKIP
    >>> result.tables["ranking"][0]["method"], result.summary             # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from xdl.analysis.base import Analyzer, Context, Finding, Result, is_number, parse_params
from xdl.analysis.registry import load_analyzer
from xdl.errors import XdlError
from xdl.limits import at_most
from xdl.analysis.evaluation import (
    RANDOM_ORDERS, SANITY_THRESHOLD, STEPS, cascading_randomization, evaluation_figure, explainer, faithfulness, fill_value,
    map_similarity, mean_or_none, passes_sanity, spearman,
)

# Below this mean rank correlation with the other methods, a method's maps are called out as
# disagreeing: the pixels it ranks high are largely not those the others rank high.
LOW_AGREEMENT = 0.3
# Label randomization retrains the run's architecture on permuted labels; "auto" does so only
# up to this many training rows, where a few epochs cost seconds, not minutes.
SMALL_RUN_ROWS = 5000
PERMUTED_LABEL_EPOCHS = 3


@dataclass
class TrustParams:
    methods: list[str] = field(default_factory=lambda: ["saliency", "ig", "shap", "lime"])
    steps: int = STEPS  # points on each deletion/insertion curve
    orders: int = RANDOM_ORDERS  # random orders averaged into the baseline
    randomization: bool = True  # the cascading randomization check (one explanation per step)
    cascade: int = 8  # its steps at most: deeper models' layers are randomized in that many top-down groups
    label_randomization: Literal["auto", "on", "off"] = "auto"  # auto: on runs of at most SMALL_RUN_ROWS training rows

    def __post_init__(self) -> None:
        if len(set(self.methods)) < 2:
            raise ValueError("methods needs at least two different explain methods to compare")
        if self.steps < 1 or self.orders < 1 or self.cascade < 1:
            raise ValueError(f"steps, orders and cascade must be >= 1, got {self.steps}, {self.orders} and {self.cascade}")
        at_most("steps", self.steps, 10_000)
        at_most("orders", self.orders, 1_000)
        at_most("cascade", self.cascade, 10_000)


class Trust(Analyzer):
    """Faithfulness, randomization check and agreement of several explain methods, ranked."""

    kind = "report"
    Params = TrustParams
    samples = 16
    description = "which explain method to trust: deletion/insertion vs random, randomization check, agreement"
    guide = (
        "Which explanation reflects what the model really uses: a faithful map deletes the evidence faster "
        "than a random order, and must change when the model's weights are randomized (Adebayo et al. 2018). "
        "A method that fails the randomization check is explaining the input, not the model."
    )
    check_params = {"methods": ["saliency", "deeplift"], "steps": 4, "orders": 1}  # one backward pass each

    @classmethod
    def passes(cls, params: TrustParams, shape) -> float | None:
        """Each method's passes on the trained model and at every cascade step, plus the
        deletion/insertion curves' forward passes (label randomization's retraining aside)."""
        each = 0.0
        for name in params.methods:
            try:
                method = load_analyzer("explain", name)
                cost = method.passes(parse_params(method.Params, {}), shape)
            except Exception:  # noqa: BLE001 - an unknown method fails in run(), with its own message
                return None
            if cost is None:
                return None
            each += cost
        return each * (1 + (params.cascade if params.randomization else 0)) + 2 * params.steps * (1 + params.orders) / 3

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        """The explain method ranked first, and whether it passes the randomization check."""
        best = result.metrics.get("most_trusted")
        stats = (result.metrics.get("methods") or {}).get(best) if isinstance(best, str) else None
        if not isinstance(stats, dict) or not (is_number(stats.get("deletion_auc")) and is_number(stats.get("random_deletion_auc"))):
            return []
        check = stats.get("randomization_check")
        detail = (f"deletion AUC {stats['deletion_auc']:.2f} (random order {stats['random_deletion_auc']:.2f}); "
                  f"randomization check: {check}")
        return [Finding(
            "Most trustworthy explanation", best, detail, f"{result.kind}/{result.method}",
            "info" if check == "pass" else "warn",
            "The explain method whose maps best track the model: deleting its top-ranked inputs lowers the "
            "prediction faster than a random order, and its maps change when the weights are randomized "
            "(Adebayo et al. 2018, Sanity Checks for Saliency Maps); a failed check means its maps do not "
            "depend on what the model learned.",
        )]

    def run(self, ctx: Context, params: TrustParams) -> Result:
        targets = ctx.targets()
        result = self.result()
        maps, curves, cascades = {}, {}, {}
        classes = {name: load_analyzer("explain", name) for name in params.methods}  # a typo fails before any work
        for name, cls in classes.items():
            if not cls.applies(ctx):
                result.warnings.append(f"{name} does not apply to {ctx.kind} data; left out")
                continue
            explain = explainer(cls(), ctx, parse_params(cls.Params, {}))
            maps[name] = explain(ctx.model, ctx.x, targets)
            curves[name] = faithfulness(ctx.model, ctx.x, targets, maps[name], fill_value(ctx, ctx.x), params.steps,
                                        params.orders, ctx.seed, budget=4 * ctx.batch_size)
            if params.randomization:
                cascades[name] = cascading_randomization(ctx.model, explain, ctx.x, targets, maps[name], ctx.seed,
                                                         params.cascade)
        if len(maps) < 2:
            raise XdlError(f"fewer than two of the methods {', '.join(params.methods)} apply to {ctx.kind} data")
        permuted = permuted_label_model(ctx, params.label_randomization, result)
        label_rho = {}
        if permuted is not None:
            for name, cls in classes.items():
                if name in maps:
                    explain = explainer(cls(), ctx, parse_params(cls.Params, {}))
                    label_rho[name] = mean_or_none(map_similarity(maps[name], explain(permuted, ctx.x, targets)))
        agreement = {a: {b: mean_or_none(spearman(np.abs(maps[a]), np.abs(maps[b]))) for b in maps} for a in maps}
        rows = ranking(curves, cascades, agreement)
        for r in rows:
            r["label_randomized_spearman"] = label_rho.get(r["method"])
        result.tables["ranking"] = rows
        result.tables["agreement"] = [{"method": a, **row} for a, row in agreement.items()]
        for name, steps in cascades.items():
            result.tables[f"randomization_{name}"] = steps
        result.metrics.update(
            samples=len(ctx.x), most_trusted=rows[0]["method"], agreement=agreement,
            methods={r["method"]: {k: v for k, v in r.items() if k not in ("rank", "method")} for r in rows},
        )
        result.summary = verdict(rows, bool(cascades))
        result.add_figure("faithfulness", evaluation_figure(curves, cascades))
        result.add_figure("agreement", agreement_figure(agreement))
        return result


def permuted_label_model(ctx: Context, when: str, result: Result) -> nn.Module | None:
    """The run's architecture trained a few epochs on shuffled training labels (Adebayo et al.'s
    data randomization test), or None with a note in ``result.warnings`` when it is skipped."""
    import dataclasses

    from xdl.device import seed_everything
    from xdl.models.builders import build_model, set_normalization
    from xdl.training.config import TrainConfig
    from xdl.training.loop import fit

    if when == "off":
        return None
    if ctx.run is None or ctx.data is None:
        result.warnings.append("label randomization skipped: it retrains the run's model, and a bare model has no run")
        return None
    from xdl.models.imported import is_imported

    if is_imported(ctx.run):
        result.warnings.append("label randomization skipped: it retrains the model, and xdl does not know how an "
                               "imported model was trained")
        return None
    data = ctx.data
    if when == "auto" and len(data.train.y) > SMALL_RUN_ROWS:
        result.warnings.append(f"label randomization skipped: {len(data.train.y)} training rows is more than "
                               f"{SMALL_RUN_ROWS} (pass label_randomization=on to retrain anyway)")
        return None
    shuffled = data.train.y[torch.randperm(len(data.train.y), generator=torch.Generator().manual_seed(ctx.seed))]
    permuted = dataclasses.replace(data, train=dataclasses.replace(data.train, y=shuffled))
    seed_everything(ctx.seed)  # the initial weights too follow from the seed, not from what ran before
    model = build_model(ctx.run.info["model"], data.input_shape, data.num_classes)
    set_normalization(model, data.train.x)
    config = TrainConfig(epochs=PERMUTED_LABEL_EPOCHS, device=str(ctx.device), seed=ctx.seed)
    fit(model, permuted, config, log=lambda line: None, progress=False)
    return model.eval()


def ranking(curves: dict, cascades: dict[str, list[dict]], agreement: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per method, best first (see the module docstring for the order)."""
    rows = []
    for name, c in curves.items():
        aucs = c.aucs()
        others = [v for b, v in agreement[name].items() if b != name and v is not None]
        passed = passes_sanity(cascades.get(name, []))
        rows.append({
            "method": name, **aucs, "faithfulness": aucs["insertion_auc"] - aucs["deletion_auc"],
            "randomized_spearman": cascades[name][-1]["spearman"] if cascades.get(name) else None,
            "randomization_check": {True: "pass", False: "fail", None: "not run" if name not in cascades else "undefined"}[passed],
            "mean_agreement": float(np.mean(others)) if others else None,
        })
    group = {"pass": 0, "undefined": 1, "not run": 1, "fail": 2}
    rows.sort(key=lambda r: (group[r["randomization_check"]], -r["faithfulness"]))
    return [{"rank": i + 1, **row} for i, row in enumerate(rows)]


def verdict(rows: list[dict[str, Any]], checked: bool) -> str:
    """Plain words: which method to trust, and what is wrong with the others."""
    best = rows[0]
    auc = f"deletion AUC {best['deletion_auc']:.2f} vs random {best['random_deletion_auc']:.2f}"
    if not checked:
        lead = f"{best['method']} is the most faithful method for this model ({auc}); the randomization check was not run"
    elif best["randomization_check"] == "pass":
        lead = f"{best['method']} is the method to trust for this model: it passes the randomization check ({auc})"
    else:
        lead = f"no method passes the randomization check; {best['method']} is the most faithful ({auc})"
    notes = []
    for row in rows:
        parts = []
        if row is not best and row["randomization_check"] == "pass":
            parts.append("passes the randomization check")
        elif row is not best and row["randomization_check"] == "fail":
            parts.append(f"fails the randomization check (rank correlation {row['randomized_spearman']:.2f} with the randomized model)")
        if row["deletion_auc"] >= row["random_deletion_auc"]:
            parts.append("is no better than a random order at deletion")
        elif row is not best and row["faithfulness"] > best["faithfulness"]:
            parts.append(f"is more faithful (deletion AUC {row['deletion_auc']:.2f})")
        label = row.get("label_randomized_spearman")
        if label is not None and label >= SANITY_THRESHOLD:
            parts.append(f"barely changes for a model trained on shuffled labels (rank correlation {label:.2f})")
        if row["mean_agreement"] is not None and row["mean_agreement"] < LOW_AGREEMENT:
            parts.append(f"disagrees with the others (agreement {row['mean_agreement']:.2f})")
        if parts:
            notes.append(f"{row['method']} " + ", ".join(parts))
    return "; ".join([lead, *notes])


def agreement_figure(agreement: dict[str, dict]):
    """The Spearman matrix of |attribution| between methods, values written in the cells."""
    from matplotlib.figure import Figure

    names = list(agreement)
    matrix = np.array([[np.nan if agreement[a][b] is None else agreement[a][b] for b in names] for a in names])
    fig = Figure(figsize=(1.2 * len(names) + 1.5, 1.1 * len(names) + 0.8), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, "n/a" if np.isnan(matrix[i, j]) else f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title("Agreement: Spearman of |attribution|")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
