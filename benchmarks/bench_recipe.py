"""xdl's training defaults on real MNIST against what a user writes by hand, whole process each.

Three rows, on the same real digits and split (4,000 training files: 3,600 train / 400
validation, 1,000 test; xdl's loader makes the split, the baselines read it from an .npz):

* **CNN time to accuracy** (issue 28): ``xdl train --data mnist`` with its defaults against
  the loop a tutorial writes — DataLoader over a TensorDataset, batch 32, Adam 1e-3, the
  classic conv32-conv64-fc128 CNN — that tests itself after every epoch and stops as soon as
  it reaches xdl's test accuracy or 98%, whichever is lower (the loop's best case; a loop that
  never does within ``LOOP_CAP`` epochs counts only the time it ran, which favours the loop).
  Bar: xdl ≥ 98% in ≤ 0.5× the loop's time.
* **Defaults' accuracy** (issue 28): ``xdl train --data mnist`` (the CNN) ≥ 0.985 and ``--model mlp`` ≥ 0.97.
  ``--amp`` (the default) trains in bf16 on CPUs that run it natively, so the CNN is also
  trained with ``--no-amp`` (fp32) — its time against the same loop, and its accuracy.
  The issue sets these bars on 8,000 training digits and only 3,600 are here, so the MLP is also
  trained on ``--limit`` 900 and 1,800 of them, and a power law ``error = a·n^-b`` fitted to the
  three mean errors estimates its accuracy at 8,000 — an extrapolation, reported as one.
* **The seed's recipe** (issue 28): Dense 128, 5 epochs — ``xdl train --model mlp --hidden 128
  --epochs 5`` against Keras 3 (torch backend) ``fit`` of the same network for 5 epochs with
  its defaults. Bar: accuracy ≥ 0.95 in ≤ 0.25× Keras' time. Beside it, the **floor** of any
  PyTorch training process — ``import torch`` and one ``torch.optim.Adam`` step, whose first call
  imports ``torch._dynamo`` — as a share of Keras' time: where it is above 0.25×, no program that
  trains with ``torch.optim`` can meet the time half of that bar.

Each side is a fresh Python process, timed from start to exit, interleaved over
``--repeats`` so load from other processes falls on both alike; CPU seconds (user + system,
all threads) are reported beside wall seconds. Repeat ``i`` trains every side with seed ``i``:
one seed's test accuracy on 1,000 digits moves by a point (the default CNN gave 0.977 to 0.988
over seeds 0-2), so the accuracy bars hold for the mean over seeds, the times are medians.

    python benchmarks/bench_recipe.py [--quick] [--mnist-dir ../shared/data/mnist]
"""

from __future__ import annotations

import json
import os
import statistics
from statistics import mean
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_mnist import DEFAULT, command_line, timed, write_real_mnist  # noqa: E402

LOOP_CAP = 30  # epochs after which the loop gives up on reaching xdl's accuracy
SEED_EPOCHS, SEED_HIDDEN = 5, 128
CURVE, ISSUE_TRAIN = (900, 1800), 8000  # the MLP learning curve's extra sizes; the size the issue sets bars at

# What a tutorial writes; it stops the first time its test accuracy reaches argv[2].
BAR_ACCURACY = 0.98
LOOP = """
import json, sys, numpy as np, torch, torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
torch.set_num_threads(2)
torch.manual_seed(int(sys.argv[4]))
d = np.load(sys.argv[1])
x, y = torch.tensor(d["x_train"]).float().div(255).unsqueeze(1), torch.tensor(d["y_train"]).long()
xt, yt = torch.tensor(d["x_test"]).float().div(255).unsqueeze(1), torch.tensor(d["y_test"]).long()
net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                    nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
best = (0.0, 0)
for epoch in range(1, int(sys.argv[3]) + 1):
    net.train()
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(xt).argmax(1) == yt).float().mean().item()
    best = max(best, (accuracy, epoch))
    if accuracy >= float(sys.argv[2]):
        break
print(json.dumps({"test_accuracy": accuracy, "epochs": epoch, "reached": accuracy >= float(sys.argv[2]), "best": best}))
"""

# Keras 3's own defaults (batch 32, Adam 1e-3) for the seed's network, on the same digits.
KERAS = """
import json, os, sys
os.environ["KERAS_BACKEND"] = "torch"
import numpy as np, keras
keras.utils.set_random_seed(int(sys.argv[4]))
d = np.load(sys.argv[1])
x, xv, xt = (d[k].astype("float32") / 255 for k in ("x_train", "x_val", "x_test"))
model = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Dense(int(sys.argv[3]), activation="relu"),
                          keras.layers.Dense(10)])
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
model.fit(x, d["y_train"], epochs=int(sys.argv[2]), validation_data=(xv, d["y_val"]), verbose=0)
print(json.dumps({"test_accuracy": float(model.evaluate(xt, d["y_test"], verbose=0)[1])}))
"""

# The least a process that trains with torch.optim costs: torch 2.13's Optimizer imports
# torch._dynamo (about a second) the first time add_param_group runs.
FLOOR = """
import torch
net = torch.nn.Linear(784, 128)
opt = torch.optim.Adam(net.parameters())
net(torch.zeros(1, 784)).sum().backward()
opt.step()
"""


def export_split(data: Path, out: Path) -> Path:
    """xdl's own split of the digits as uint8 arrays, so the baselines train and test on exactly them."""
    from xdl.data import load_data

    splits = load_data("mnist", data_dir=str(data))
    arrays = {}
    for name in ("train", "val", "test"):
        part = getattr(splits, name)
        arrays[f"x_{name}"] = (part.x[:, 0] * 255).round().byte().numpy()
        arrays[f"y_{name}"] = part.y.numpy()
    np.savez(out, **arrays)
    return out


def xdl_train(data: Path, out: Path, env: dict, seed: int, *options: str) -> tuple[float, float, float, int, int]:
    """Wall and CPU seconds of one ``xdl train`` process, its test accuracy, the epochs it ran and
    the training digits it had."""
    wall, cpu, _ = timed([sys.executable, "-m", "xdl", "train", "--data", "mnist", "--data-dir", str(data),
                          "--out", str(out), "--quiet", "--seed", str(seed), *options], env)
    run = json.loads((out / "run.json").read_text())
    return (wall, cpu, run["metrics"]["test_accuracy"], len((out / "history.csv").read_text().splitlines()) - 1,
            run["dataset"]["sizes"]["train"])


def learning_curve(sizes: list[list[tuple]]) -> dict:
    """The MLP defaults' mean accuracy at each training size, and a power law's estimate at the issue's."""
    n = np.array([runs[0][4] for runs in sizes], dtype=float)
    error = np.array([1 - mean(r[2] for r in runs) for runs in sizes])
    slope, intercept = np.polyfit(np.log(n), np.log(error), 1)
    estimate = 1 - float(np.exp(intercept + slope * np.log(ISSUE_TRAIN)))
    return {"workload": f"MLP defaults extrapolated to {ISSUE_TRAIN:,} training digits (estimate, not a measurement)",
            "xdl": round(estimate, 4), "baseline": None, "ratio": None, "target": ">= 0.97", "met": estimate >= 0.97,
            "note": f"mean test accuracy {dict(zip(n.astype(int).tolist(), (1 - error).round(4).tolist()))}; "
                    f"error ~ n^{slope:.2f}"}


def timing_rows(workload: str, mine: list[tuple], theirs: list[tuple], bound: float, accuracy_bar: str, accurate: bool,
                note: str) -> list[dict]:
    """A wall-seconds and a CPU-seconds row from (wall, cpu, …) per repeat of each side: medians, xdl ÷ baseline."""
    rows = []
    for i, unit in ((0, "wall s"), (1, "CPU s")):
        x, b = statistics.median(m[i] for m in mine), statistics.median(t[i] for t in theirs)
        rows.append({"workload": f"{workload}: {unit}", "xdl": round(x, 2), "baseline": round(b, 2), "ratio": round(x / b, 3),
                     "target": f"<= {bound}x and {accuracy_bar}", "met": x / b <= bound and accurate, "note": note})
    return rows


def main(quick: bool = False, mnist_dir: Path = DEFAULT, repeats: int | None = None) -> list[dict]:
    repeats = repeats or (1 if quick else 3)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    load = os.getloadavg()[0]
    cnn, fp32, loop, mlp, seed, keras, floor, curve = [], [], [], [], [], [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_real_mnist(Path(tmp) / "mnist", train=4000, source=Path(mnist_dir))
        arrays = export_split(data, Path(tmp) / "split.npz")
        for i in range(repeats):
            cnn.append(xdl_train(data, Path(tmp) / f"cnn{i}", env, i))
            fp32.append(xdl_train(data, Path(tmp) / f"fp32-{i}", env, i, "--no-amp"))
            goal = min(cnn[-1][2], BAR_ACCURACY)
            wall, cpu, printed = timed([sys.executable, "-c", LOOP, str(arrays), str(goal), str(LOOP_CAP), str(i)], env)
            loop.append((wall, cpu, json.loads(printed.stdout.strip().splitlines()[-1])))
            mlp.append(xdl_train(data, Path(tmp) / f"mlp{i}", env, i, "--model", "mlp"))
            for n in CURVE:
                curve.setdefault(n, []).append(
                    xdl_train(data, Path(tmp) / f"mlp{i}-{n}", env, i, "--model", "mlp", "--limit", str(n)))
            seed.append(xdl_train(data, Path(tmp) / f"seed{i}", env, i, "--model", "mlp", "--hidden", str(SEED_HIDDEN),
                                  "--epochs", str(SEED_EPOCHS)))
            wall, cpu, printed = timed([sys.executable, "-c", KERAS, str(arrays), str(SEED_EPOCHS), str(SEED_HIDDEN),
                                        str(i)], env)
            keras.append((wall, cpu, json.loads(printed.stdout.strip().splitlines()[-1])["test_accuracy"]))
            floor.append(timed([sys.executable, "-c", FLOOR], env)[:2])

    reached = all(t[2]["reached"] for t in loop)
    rows = timing_rows(
        "default CNN vs batch-32 loop stopping at xdl's test accuracy or 98%, real MNIST 3,600/1,000", cnn, loop, 0.5,
        "xdl mean test acc >= 0.98", mean(c[2] for c in cnn) >= BAR_ACCURACY,
        f"xdl test acc {[round(c[2], 4) for c in cnn]} after {[c[3] for c in cnn]} epochs; loop reached it: {reached}, "
        f"epochs {[t[2]['epochs'] for t in loop]}, acc {[round(t[2]['test_accuracy'], 4) for t in loop]}, "
        f"best (acc, epoch) {[(round(t[2]['best'][0], 4), t[2]['best'][1]) for t in loop]}"
        f"{'' if reached else f' (cap {LOOP_CAP} epochs: its true time is longer)'}; load average {load:.1f} at start")
    rows += timing_rows(
        "the same with --no-amp (fp32, what CPUs without native bf16 train in)", fp32, loop, 0.5,
        "xdl mean test acc >= 0.98", mean(c[2] for c in fp32) >= BAR_ACCURACY,
        f"xdl test acc {[round(c[2], 4) for c in fp32]} after {[c[3] for c in fp32]} epochs")
    for name, runs, bar in (("CNN", cnn, 0.985), ("CNN --no-amp", fp32, 0.985), ("MLP", mlp, 0.97)):
        accuracy = mean(r[2] for r in runs)
        rows.append({"workload": f"{name} defaults, real MNIST 3,600/1,000: mean test accuracy over seeds 0-{repeats - 1}",
                     "xdl": round(accuracy, 4), "baseline": None, "ratio": None, "target": f">= {bar}", "met": accuracy >= bar,
                     "note": f"per seed {[round(r[2], 4) for r in runs]}, epochs {[r[3] for r in runs]}, "
                             f"wall s {[round(r[0], 1) for r in runs]}"})
    rows.append(learning_curve([*(curve[n] for n in CURVE), mlp]))
    rows += timing_rows(
        f"seed recipe Dense {SEED_HIDDEN}, {SEED_EPOCHS} epochs vs Keras 3 fit (torch backend)", seed, keras, 0.25,
        "mean test acc >= 0.95", mean(s[2] for s in seed) >= 0.95,
        f"test acc xdl {[round(s[2], 4) for s in seed]} vs Keras {[round(k[2], 4) for k in keras]}")
    lowest, mine, theirs = (statistics.median(r[0] for r in runs) for runs in (floor, seed, keras))
    rows.append({"workload": "floor of a torch.optim process (import torch, one Adam step) vs Keras 3 fit: wall s",
                 "xdl": None, "floor": round(lowest, 2), "baseline": round(theirs, 2), "ratio": round(lowest / theirs, 3),
                 "target": "<= 0.25x, or the seed recipe's time bar is out of reach for torch.optim",
                 "met": lowest / theirs <= 0.25,
                 "note": f"xdl's seed recipe {mine:.2f} s is {mine - lowest:.2f} s above this floor"})
    return rows


if __name__ == "__main__":
    command_line(main, __doc__)
