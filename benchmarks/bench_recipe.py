"""The default training recipe on real MNIST against the loop a tutorial writes, whole process each.

Bar (issue 16): ``xdl train --data mnist`` with its defaults reaches at least the test accuracy
of a hand-written loop — DataLoader over a TensorDataset, batch 32, Adam 1e-3, the classic
conv32-conv64-fc128 CNN, 3 epochs — in at most 0.5× its time, on the same real digits and split
(4,000 training files: 3,600 train / 400 validation, 1,000 test). Each side is a fresh Python
process, timed from start to exit, interleaved over ``--repeats`` so load from other processes
falls on both alike; CPU seconds (user + system, all threads) are reported beside wall seconds.

    python benchmarks/bench_recipe.py [--quick] [--mnist-dir ../shared/data/mnist]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_mnist import DEFAULT, write_real_mnist  # noqa: E402

LOOP_EPOCHS = 3
# The loop is what a tutorial writes; it reads the same split through xdl's loader so both
# sides train and test on exactly the same digits.
LOOP = """
import json, sys, torch, torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from xdl.data import load_data
torch.set_num_threads(2)
torch.manual_seed(0)
splits = load_data("mnist", data_dir=sys.argv[1])
net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                    nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
loader = DataLoader(TensorDataset(splits.train.x, splits.train.y), batch_size=32, shuffle=True)
for _ in range(int(sys.argv[2])):
    net.train()
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        opt.step()
net.eval()
with torch.no_grad():
    accuracy = (net(splits.test.x).argmax(1) == splits.test.y).float().mean().item()
print(json.dumps({"test_accuracy": accuracy}))
"""


def timed(command: list[str], env: dict) -> tuple[float, float, str]:
    """Wall and CPU seconds of one child process, and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.stdout


def main(quick: bool = False, mnist_dir: Path = DEFAULT, repeats: int | None = None) -> list[dict]:
    repeats = repeats or (1 if quick else 2)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_real_mnist(Path(tmp) / "mnist", train=4000, source=Path(mnist_dir))
        mine, theirs = [], []
        for i in range(repeats):
            out = Path(tmp) / f"run{i}"
            wall, cpu, _ = timed([sys.executable, "-m", "xdl", "train", "--data", "mnist", "--data-dir", str(data),
                                  "--out", str(out), "--quiet"], env)
            accuracy = json.loads((out / "run.json").read_text())["metrics"]["test_accuracy"]
            mine.append((wall, cpu, accuracy))
            wall, cpu, printed = timed([sys.executable, "-c", LOOP, str(data), str(LOOP_EPOCHS)], env)
            theirs.append((wall, cpu, json.loads(printed.strip().splitlines()[-1])["test_accuracy"]))
    rows = []
    for i, unit in ((0, "wall s"), (1, "CPU s")):
        x, b = statistics.median(m[i] for m in mine), statistics.median(t[i] for t in theirs)
        accurate = min(m[2] for m in mine) >= max(t[2] for t in theirs)
        rows.append({"workload": f"default recipe vs batch-32 loop ({LOOP_EPOCHS} epochs), real MNIST 3,600/1,000: {unit}",
                     "xdl": round(x, 2), "baseline": round(b, 2), "ratio": round(x / b, 3),
                     "target": "<= 0.5x and test acc >= loop's", "met": x / b <= 0.5 and accurate,
                     "note": f"test acc xdl {[round(m[2], 4) for m in mine]} vs loop {[round(t[2], 4) for t in theirs]}; "
                             f"load average {load:.1f} at start"})
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of two")
    parser.add_argument("--mnist-dir", default=str(DEFAULT), help="folder with the digits5k IDX files")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    for row in main(args.quick, Path(args.mnist_dir), args.repeats):
        print(json.dumps(row))
