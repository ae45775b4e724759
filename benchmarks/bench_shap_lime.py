"""SHAP and LIME bars, each measured side by side with the library's own explainer in one run.

(1) SHAP (expected gradients) on 100 MNIST-sized images vs
    shap.GradientExplainer(model, background).shap_values(x) with its defaults (200 draws,
    every class): ≥ 10× faster; per-image correlation with shap's values for the same
    class ≥ 0.9 (min and median reported). Same model, same background.
(2) LIME on 100 MNIST-sized images vs lime_image.LimeImageExplainer().explain_instance(...)
    with its default 1,000 samples and the same segmentation: ≥ 10× faster; given the same
    masks (lime's random_state = xdl's per-image seed), the fitted weights match.
(3) KernelSHAP on 200 tabular rows vs shap.KernelExplainer with the same k-means
    background and sample count: time, and agreement.

The baselines loop over samples in Python and are slow on 2 cores, so they are timed on
the first ``--baseline-images`` images and extrapolated linearly to 100 (printed as such).

    python benchmarks/bench_shap_lime.py [--quick] [--baseline-images 10]
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
from xdl.analyzers import Context, Result  # noqa: E402

IMAGES, ROWS = 100, 200


def row(workload: str, mine, baseline, target: str, met: bool, ratio=None) -> dict:
    if ratio is None and isinstance(baseline, (int, float)) and mine:
        ratio = baseline / mine  # speed-up: baseline seconds over xdl seconds
    return {"workload": workload, "xdl": mine, "baseline": baseline, "ratio": ratio, "target": target, "met": bool(met)}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_shap(run: xdl.Run, n: int, subset: int) -> list[dict]:
    import shap

    from xdl_plugins.shap import draw_background

    ours, seconds = timed(lambda: xdl.explain(run, "shap", samples=n, params={"background": 100}, save=False))
    model, x = run.model, run.data.test.x[:subset]
    background = draw_background(Context(model=model, x=x, data=run.data, seed=run.seed), 100, Result("shap", "explain"))
    theirs, base = timed(lambda: shap.GradientExplainer(model, background).shap_values(x))
    base *= n / subset
    theirs = theirs[np.arange(subset), ..., ours.arrays["target"][:subset]].reshape(subset, -1)
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(ours.arrays["shap"][:subset].reshape(subset, -1), theirs)]
    note = f"baseline timed on {subset} images, extrapolated ×{n / subset:g}" if subset < n else "baseline on all"
    return [
        row(f"SHAP expected gradients, {n} 28×28 images, seconds ({note})", seconds, base, ">= 10x", base / seconds >= 10),
        row(f"SHAP per-image correlation with shap.GradientExplainer, min (median {np.median(corr):.3f}) over {subset}",
            float(np.min(corr)), None, ">= 0.9", np.min(corr) >= 0.9, ratio=None),
        row(f"SHAP additivity: mean |sum φ - (f(x) - E f(b))| relative, {n} images",
            ours.metrics["additivity_relative_gap"], None, "report", True),
    ]


def bench_lime(run: xdl.Run, n: int, subset: int) -> list[dict]:
    from lime.lime_image import LimeImageExplainer

    ours, seconds = timed(lambda: xdl.explain(run, "lime", samples=n, save=False))
    model = run.model

    def classify(images: np.ndarray) -> np.ndarray:  # lime hands over RGB copies of the gray digit
        with torch.no_grad():
            x = torch.as_tensor(images[..., :1], dtype=torch.float32).permute(0, 3, 1, 2)
            return torch.softmax(model(x), 1).numpy()

    diffs, base = [], 0.0
    for i in range(subset):
        segments, target = ours.arrays["segments"][i], int(ours.arrays["target"][i])
        # Defaults (1,000 samples, top_labels=5, batch_size=10); the seed only fixes the masks.
        explanation, took = timed(lambda: LimeImageExplainer(random_state=run.seed + i).explain_instance(
            run.data.test.x[i, 0].double().numpy(), classify, segmentation_fn=lambda image: segments, random_seed=0))
        base += took
        theirs = np.zeros(segments.max() + 1)
        for feature, weight in explanation.local_exp[target]:
            theirs[feature] = weight
        diffs.append(np.abs(ours.arrays["weights"][i, : len(theirs)] - theirs).max())
    base *= n / subset
    note = f"baseline timed on {subset} images, extrapolated ×{n / subset:g}" if subset < n else "baseline on all"
    return [
        row(f"LIME quickshift, 1000 samples, {n} 28×28 images, seconds ({note})", seconds, base, ">= 10x", base / seconds >= 10),
        row(f"LIME weights vs lime's on identical masks, max abs diff over {subset} images",
            float(max(diffs)), None, "<= 1e-4", max(diffs) <= 1e-4, ratio=None),
    ]


def bench_kernel(folder: Path, rows: int, nsamples: int) -> list[dict]:
    import pandas as pd
    import shap

    rng = np.random.default_rng(0)
    n = 1500
    table = pd.DataFrame({
        "age": rng.integers(18, 70, n), "hours": rng.normal(40, 10, n).round(1),
        "education": rng.choice(["school", "college", "degree", "phd"], n), "job": rng.choice(["clerk", "sales", "tech"], n),
    })
    score = 0.05 * (table.age - 40) + 0.08 * (table.hours - 40) + (table.education == "phd") + rng.normal(0, 0.7, n)
    table["income"] = np.where(score > 0.3, ">50K", "<=50K")
    table.to_csv(folder / "table.csv", index=False)
    run = xdl.train(str(folder / "table.csv"), "mlp", folder / "tab", epochs=5, quiet=True,
                    data_options={"target": "income"}, model_options={"hidden": [32]})
    params = {"method": "kernel", "clusters": 10, "nsamples": nsamples}
    # Ours includes what the baseline does not: shap's bar and waterfall figures, additivity.
    ours, seconds = timed(lambda: xdl.explain(run, "shap", samples=rows, seed=0, params=params, save=False))
    model, x = run.model, run.data.test.x[:rows].numpy()

    def logits(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(a, dtype=torch.float32)).numpy()

    background = shap.kmeans(run.data.train.x.numpy().astype(np.float64), 10)
    np.random.seed(0)
    theirs, base = timed(lambda: shap.KernelExplainer(logits, background).shap_values(x, nsamples=nsamples, silent=True))
    theirs = theirs[np.arange(len(x)), :, ours.arrays["target"]]
    gap = float(np.abs(ours.arrays["shap"] - theirs).max())
    return [
        row(f"KernelSHAP {len(x)} rows × {x.shape[1]} features, {nsamples} coalitions, seconds", seconds, base,
            "report (same library inside)", True),
        row("KernelSHAP vs shap.KernelExplainer, same background/nsamples/seed: max abs diff", gap, None, "<= 1e-4",
            gap <= 1e-4, ratio=None),
    ]


def main(quick: bool = False, baseline_images: int | None = None) -> list[dict]:
    torch.set_num_threads(2)
    subset = baseline_images or (3 if quick else 10)
    n = 20 if quick else IMAGES
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = write_mnist_like(folder / "mnist", 2000, 500)
        run = xdl.train("mnist", "cnn", folder / "cnn", epochs=2, seed=0, quiet=True,
                        data_options={"data_dir": str(data)}, model_options={"channels": [16, 32], "hidden": 64})
        rows = bench_shap(run, n, min(subset, n)) + bench_lime(run, n, min(subset, n))
        rows += bench_kernel(folder, 40 if quick else ROWS, 200 if quick else 500)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--baseline-images", type=int, help="images the slow baselines are timed on (extrapolated)")
    args = parser.parse_args()
    for r in main(args.quick, args.baseline_images):
        print(json.dumps(r))
