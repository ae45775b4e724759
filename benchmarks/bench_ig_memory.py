"""IG memory: 10,000 images at 50 steps must run on a 24 GB CPU machine (issue 3).

Each workload runs in its own process so that its peak resident set size (ru_maxrss) is
its own. xdl chunks IG's steps through captum's ``internal_batch_size`` and batches the
samples; the baseline is a plain ``captum IntegratedGradients.attribute`` call on a slice
of the same images without either, whose growth above an idle process is extrapolated
linearly to the full count (running it on all images would need hundreds of GB).

    python benchmarks/bench_ig_memory.py [--quick] [--size 8|28]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

LIMIT_GB = 24.0
STEPS = 50


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(which: str, n: int, size: int) -> dict:
    import torch

    import xdl
    from xdl.models.builders import build_model, model_config

    torch.manual_seed(0)
    # The default digits/MNIST CNN (32 and 64 channels); untrained weights use the same memory.
    model = build_model(model_config("cnn", "image"), (1, size, size), 10).eval()
    x = torch.rand(n, 1, size, size)
    idle = _peak_gb()
    start = time.perf_counter()
    if which == "xdl":
        result = xdl.explain(model, "ig", x=x, samples=None, save=False, device="cpu", params={"steps": STEPS})
        assert result.arrays["attributions"].shape == (n, 1, size, size)
    else:
        from captum.attr import IntegratedGradients

        target = model(x).argmax(1)
        IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=STEPS)
    return {"idle_gb": idle, "peak_gb": _peak_gb(), "seconds": time.perf_counter() - start}


def measure(which: str, n: int, size: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", which, "--n", str(n), "--size", str(size)],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(quick: bool = False, size: int = 8) -> list[dict]:
    n = 1_000 if quick else 10_000
    sample = 200 if quick else 1_000
    ours = measure("xdl", n, size)
    naive = measure("captum", sample, size)
    # Unchunked IG holds activations for samples × steps images at once: linear in samples.
    naive_full = naive["idle_gb"] + (naive["peak_gb"] - naive["idle_gb"]) * n / sample
    print(
        f"IG, {n} images {size}x{size}, {STEPS} steps: xdl peak RSS {ours['peak_gb']:.2f} GB "
        f"(idle {ours['idle_gb']:.2f} GB) in {ours['seconds']:.0f}s; unchunked captum on {sample} images "
        f"peaks at {naive['peak_gb']:.2f} GB → {naive_full:.1f} GB extrapolated to {n}",
        file=sys.stderr,
    )
    return [{
        "workload": f"IG peak RSS, {n} images {size}x{size}, {STEPS} steps (GB); baseline: captum at its default "
                    f"(no internal_batch_size), extrapolated from {sample} images",
        "xdl": round(ours["peak_gb"], 2),
        "baseline": round(naive_full, 2),
        "ratio": round(ours["peak_gb"] / naive_full, 3),
        "target": f"xdl < {LIMIT_GB:.0f} GB",
        "met": ours["peak_gb"] < LIMIT_GB,
    }]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=8, help="image side: 8 (digits) or 28 (MNIST)")
    parser.add_argument("--worker", choices=["xdl", "captum"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.size)))
    else:
        for row in main(args.quick, args.size):
            print(" | ".join(f"{k}: {v}" for k, v in row.items()))
