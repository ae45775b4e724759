"""Peak memory of the real commands: ``xdl explain --method ig`` and ``xdl attack`` on
10,000 MNIST-sized test images must stay under 2 GB on CPU (issue 8).

Each command runs as its own ``python -m xdl`` process, started by a fresh wrapper process
that reads the child's peak resident set size with ``getrusage(RUSAGE_CHILDREN)`` (the
wrapper has exactly one child, so the figure is that command's alone). The baseline is a
process that only loads the same run's model and its data: the floor any command on this
run pays. Data: ``mnist_like.py``'s offline MNIST-format stand-in; model: a small CNN
trained for one epoch (its size, not its accuracy, sets the memory).

    python benchmarks/bench_memory.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_like import write_mnist_like  # noqa: E402

LIMIT_GB = 2.0
WRAPPER = (
    "import resource, subprocess, sys; "
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"  # KiB on Linux
)
FLOOR = "import sys, xdl; run = xdl.load(sys.argv[1]); run.model; run.data"


def peak_gb(*command: str) -> float:
    out = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True, check=True)
    code, kib = out.stdout.split()
    if code != "0":
        raise RuntimeError(f"{' '.join(command)} exited with {code}")
    return int(kib) / 2**20


def main(quick: bool = False) -> list[dict]:
    n = 1_000 if quick else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        data = write_mnist_like(Path(tmp) / "mnist", train=2_000, test=n)
        run = str(Path(tmp) / "run")
        xdl = [sys.executable, "-m", "xdl"]
        subprocess.run([*xdl, "train", "--data", "mnist", "--data-dir", str(data), "--model", "cnn", "--channels",
                        "16,32", "--hidden", "64", "--epochs", "1", "--device", "cpu", "-q", "--out", run], check=True)
        floor = peak_gb(sys.executable, "-c", FLOOR, run)
        rows = []
        for name, command in (
            ("explain --method ig", ["explain", run, "--method", "ig", "--samples", str(n)]),
            ("attack (fgsm)", ["attack", run, "--samples", str(n)]),
        ):
            peak = peak_gb(*xdl, *command, "--device", "cpu", "-q")
            print(f"xdl {name} on {n} 28x28 images: peak RSS {peak:.2f} GB (loading the run alone: {floor:.2f} GB)",
                  file=sys.stderr)
            rows.append({
                "workload": f"peak RSS of xdl {name}, {n} MNIST-sized images, CPU (GB)",
                "xdl": round(peak, 2),
                "baseline": round(floor, 2),
                "ratio": round(peak / floor, 2),
                "target": f"xdl < {LIMIT_GB:g} GB",
                "met": peak < LIMIT_GB,
            })
    return rows


if __name__ == "__main__":
    import rows_cli

    rows_cli.run(main, __doc__, "1,000 images instead of 10,000")
