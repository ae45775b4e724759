"""Trust bars on a CNN trained on MNIST-format data, measured with their baselines in one run.

(1) IG's deletion AUC is below the random-order baseline's (same samples, same targets,
    random orders averaged over seeds), and insertion above it.
(2) Gradient saliency on the fully randomized model (cascading randomization, Adebayo et
    al. 2018) has Spearman rank correlation < 0.5 with the trained model's map.
(3) Cost: xdl's deletion curves (every step of a chunk of samples in one forward pass)
    against the obvious loop — one forward pass per sample per step — on the same maps;
    the two must give the same curves.
Also printed: the trust report's full ranking (saliency, IG, SHAP, LIME) and its verdict.

    python benchmarks/bench_trust.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import xdl  # noqa: E402
from mnist_like import write_mnist_like  # noqa: E402
from xdl.analysis.evaluation import STEPS, perturbation_curves, removal_positions, unit_scores  # noqa: E402


def row(workload: str, mine, baseline, target: str, met: bool, ratio=None) -> dict:
    if ratio is None and isinstance(baseline, (int, float)) and isinstance(mine, (int, float)) and mine:
        ratio = mine / baseline
    return {"workload": workload, "xdl": mine, "baseline": baseline, "ratio": ratio, "target": target, "met": None if met is None else bool(met)}


@torch.no_grad()
def looped_deletion(model, x, targets, positions, steps: int) -> np.ndarray:
    """The baseline: one forward pass per sample per step, pixels zeroed in place."""
    units = positions.shape[1]
    out = np.zeros((len(x), steps + 1))
    for i in range(len(x)):
        for k, count in enumerate(torch.linspace(0, units, steps + 1).round().long().tolist()):
            image = x[i : i + 1].clone()
            hidden = (positions[i] < count).view(1, 1, *x.shape[2:]).expand_as(image)
            image[hidden] = 0.0
            out[i, k] = torch.softmax(model(image), 1)[0, targets[i]].item()
    return out


def bench_cost(run: xdl.Run, n: int) -> list[dict]:
    ig = xdl.explain(run, "ig", samples=n, save=False)
    model, x = run.model, run.data.test.x[:n]
    targets = torch.as_tensor(ig.arrays["targets"])
    positions = removal_positions(unit_scores(ig.arrays["attributions"]))
    start = time.perf_counter()
    ours = perturbation_curves(model, x, targets, positions, torch.zeros(1, *x.shape[1:]), STEPS).numpy()
    mine = time.perf_counter() - start
    start = time.perf_counter()
    theirs = looped_deletion(model, x, targets, positions, STEPS)
    base = time.perf_counter() - start
    gap = float(np.abs(ours - theirs).max())
    return [
        row(f"deletion curves, {n} 28×28 images × {STEPS + 1} steps, seconds (batched vs loop)", mine, base, "faster", base > mine),
        row("deletion curves: max |batched - loop| target probability", gap, None, "< 1e-5", gap < 1e-5),
    ]


def bench_bars(run: xdl.Run, n: int, methods: list[str]) -> list[dict]:
    start = time.perf_counter()
    trust = xdl.report(run, "trust", samples=n, save=False, params={"methods": methods})
    seconds = time.perf_counter() - start
    print(trust.summary, file=sys.stderr)
    print(json.dumps(trust.tables["ranking"], indent=1), file=sys.stderr)
    print(json.dumps(trust.metrics["agreement"], indent=1), file=sys.stderr)
    by = {r["method"]: r for r in trust.tables["ranking"]}
    ig, sal = by["ig"], by["saliency"]
    rows = [
        row(f"IG deletion AUC vs random order, {n} images", ig["deletion_auc"], ig["random_deletion_auc"],
            "IG < random", ig["deletion_auc"] < ig["random_deletion_auc"]),
        row(f"IG insertion AUC vs random order, {n} images", ig["insertion_auc"], ig["random_insertion_auc"],
            "report", None),
        row("saliency: Spearman of |map| with the fully randomized model's", sal["randomized_spearman"], None,
            "< 0.5", sal["randomized_spearman"] is not None and sal["randomized_spearman"] < 0.5),
        row(f"trust report, {len(methods)} methods × {n} images incl. cascades, seconds", seconds, None, "report", None),
    ]
    for r in trust.tables["ranking"]:
        rows.append(row(
            f"rank {r['rank']} {r['method']}: deletion {r['deletion_auc']:.3f} (random {r['random_deletion_auc']:.3f}), "
            f"insertion {r['insertion_auc']:.3f}, randomized rho {r['randomized_spearman']}, check {r['randomization_check']}, "
            f"shuffled-label rho {r['label_randomized_spearman']}, agreement {r['mean_agreement']}", r["faithfulness"], None,
            "report", None))
    return rows


def main(quick: bool = False) -> list[dict]:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_mnist_like(folder / "mnist", 2000 if quick else 4000, 500 if quick else 1000)
        run = xdl.train("mnist", "cnn", folder / "cnn", epochs=2 if quick else 5, seed=0, quiet=True,
                        data_options={"data_dir": str(data)}, model_options={"channels": [16, 32], "hidden": 64})
        rows = [row("test accuracy of the CNN", run.metrics["test_accuracy"], None, "report", None)]
        rows += bench_bars(run, 8 if quick else 16, ["saliency", "ig"] if quick else ["saliency", "ig", "shap", "lime"])
        rows += bench_cost(run, 8 if quick else 32)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for r in main(args.quick):
        ratio = "" if r["ratio"] is None else f" ratio {r['ratio']:.2f}"
        print(f"{'    ' if r['met'] is None else 'MET ' if r['met'] else 'MISS'} {r['workload']}: xdl {r['xdl']} baseline {r['baseline']}{ratio} (target {r['target']})")
