"""KernelSHAP on tabular rows, side by side with shap.KernelExplainer in one run.

KernelSHAP on 200 tabular rows vs shap.KernelExplainer with the same k-means background,
sample count and seed: time (ratio xdl ÷ shap; xdl also draws shap's bar and waterfall
figures) and agreement. The image bars (SHAP expected gradients and LIME on real 28×28
digits, whole process each) are in bench_explain.py.

    python benchmarks/bench_shap_lime.py [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import xdl  # noqa: E402

ROWS = 200


def row(workload: str, mine, baseline, target: str, met: bool | None, ratio=None) -> dict:
    if ratio is None and isinstance(baseline, (int, float)) and baseline:
        ratio = mine / baseline  # xdl ÷ baseline: lower is better
    return {"workload": workload, "xdl": mine, "baseline": baseline, "ratio": ratio, "target": target,
            "met": None if met is None else bool(met)}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


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
            "report (same library inside)", None),
        row("KernelSHAP vs shap.KernelExplainer, same background/nsamples/seed: max abs diff", gap, None, "<= 1e-4",
            gap <= 1e-4, ratio=None),
    ]


def main(quick: bool = False) -> list[dict]:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        return bench_kernel(Path(tmp), 40 if quick else ROWS, 200 if quick else 500)


if __name__ == "__main__":
    import rows_cli

    rows_cli.run(main, __doc__)
