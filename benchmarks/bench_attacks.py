"""Attack bars, each measured side by side with its baseline in one run.

(1) FGSM robust accuracy equals torchattacks.FGSM's on the same model and MNIST-format
    test data (benchmarks/mnist_like.py, 8,000 train / 2,000 test) within 0.1 point.
(2) FGSM over 10,000 MNIST-sized images — the analyzer's whole call, ``xdl.attack(model,
    "fgsm", x=..., y=...)``, with its clean and adversarial evaluations — costs ≤ 1.3× one
    batched forward+backward pass over them (same model, same batch size, warmed up, best
    of a few repeats). The
    baseline is a training-style pass, loss.backward() into the parameters; a stricter
    row compares with a pass that backpropagates to the inputs, FGSM's own gradient.
(3) A CNN trained with adv_train="fgsm", adv_eps=0.1 keeps clean accuracy within 1.5
    points of the standard CNN (same epochs and seed) and gains ≥ 20 points of FGSM
    robust accuracy at eps 0.1; the gain under PGD (10 steps) is reported beside it, since
    FGSM training can resist FGSM alone (gradient masking) without being robust.

    python benchmarks/bench_attacks.py [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import xdl  # noqa: E402
from mnist_like import write_mnist_like  # noqa: E402
from xdl.data.idx import read_idx  # noqa: E402

EPS = 0.1
BATCH = 256


def row(workload: str, mine, baseline, target: str, met: bool) -> dict:
    ratio = mine / baseline if isinstance(mine, (int, float)) and baseline else None
    return {"workload": workload, "xdl": mine, "baseline": baseline, "ratio": ratio, "target": target, "met": bool(met)}


def train_pair(folder: Path, quick: bool) -> tuple[xdl.Run, xdl.Run]:
    """The standard CNN and its FGSM-trained twin: same data, epochs and seed."""
    data = write_mnist_like(folder / "mnist", *((2000, 500) if quick else (8000, 2000)))
    common = {"data": "mnist", "model": "cnn", "epochs": 2 if quick else 6, "seed": 0, "quiet": True,
              "data_options": {"data_dir": str(data)}}
    standard = xdl.train(out=folder / "standard", **common)
    adversarial = xdl.train(out=folder / "adversarial", adv_train="fgsm", adv_eps=EPS, **common)
    return standard, adversarial


# -----------------------------------------------------------------------------------------
# (1) agreement with torchattacks
# -----------------------------------------------------------------------------------------


def bench_agreement(standard: xdl.Run) -> list[dict]:
    import torchattacks

    mine = xdl.attack(standard, "fgsm", params={"eps": EPS}, save=False).metrics["robust_accuracy"]
    model, test = standard.model, standard.data.test
    correct = 0
    for start in range(0, len(test), BATCH):
        x, y = test.x[start : start + BATCH], test.y[start : start + BATCH]
        adv = torchattacks.FGSM(model, eps=EPS)(x, y)
        with torch.no_grad():
            correct += int((model(adv).argmax(1) == y).sum())
    theirs = correct / len(test)
    gap = abs(mine - theirs) * 100
    return [row(f"FGSM eps={EPS} robust acc vs torchattacks.FGSM, {len(test)} images (gap {gap:.2f} pt)",
                mine, theirs, "|gap| <= 0.1 pt", gap <= 0.1)]


# -----------------------------------------------------------------------------------------
# (2) cost of FGSM against one forward+backward pass
# -----------------------------------------------------------------------------------------


def best_of(fns: list, repeats: int) -> list[float]:
    """Best time of each function, the repeats interleaved so that load from other processes
    on a shared machine falls on all of them alike instead of on whichever ran during it."""
    for fn in fns:
        fn()  # warm-up: allocator, kernels, lazy initialization
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seen in zip(fns, times):
            start = time.perf_counter()
            fn()
            seen.append(time.perf_counter() - start)
    return [min(seen) for seen in times]


def bench_speed(folder: Path, model: torch.nn.Module, quick: bool) -> list[dict]:
    n = 2000 if quick else 10_000
    images = write_mnist_like(folder / "timing", train=n, test=10, seed=1)
    x = torch.from_numpy(read_idx(images / "train-images-idx3-ubyte.gz").copy()).float().div(255).unsqueeze(1)
    y = torch.from_numpy(read_idx(images / "train-labels-idx1-ubyte.gz").copy()).long()
    model.eval()
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, n, BATCH)]

    def attack():
        xdl.attack(model, "fgsm", x=x, y=y, samples=None, params={"eps": EPS}, batch_size=BATCH, save=False, device="cpu")

    def train_pass():
        for xb, yb in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()

    def input_pass():
        for xb, yb in batches:
            xb = xb.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xb), yb), xb)

    repeats = 2 if quick else 3
    mine, train_s, input_s = best_of([attack, train_pass, input_pass], repeats)
    model.zero_grad(set_to_none=True)
    return [
        row(f"FGSM over {n} 28x28 images vs forward+backward (loss.backward), batch {BATCH}: s",
            mine, train_s, "<= 1.3x", mine <= 1.3 * train_s),
        row(f"FGSM over {n} 28x28 images vs forward+backward to the inputs, batch {BATCH}: s",
            mine, input_s, "<= 1.3x", mine <= 1.3 * input_s),
    ]


# -----------------------------------------------------------------------------------------
# (3) adversarial training
# -----------------------------------------------------------------------------------------


def bench_adversarial_training(standard: xdl.Run, adversarial: xdl.Run) -> list[dict]:
    clean = {r: xdl.attack(r, "fgsm", params={"eps": EPS}, save=False).metrics for r in (standard, adversarial)}
    drop = (clean[standard]["clean_accuracy"] - clean[adversarial]["clean_accuracy"]) * 100
    gain = (clean[adversarial]["robust_accuracy"] - clean[standard]["robust_accuracy"]) * 100
    return [
        row(f"clean acc, adv-train fgsm eps={EPS} vs standard CNN (drop {drop:.2f} pt)",
            clean[adversarial]["clean_accuracy"], clean[standard]["clean_accuracy"], "drop <= 1.5 pt", drop <= 1.5),
        row(f"FGSM eps={EPS} robust acc, adv-train fgsm vs standard CNN (gain {gain:.1f} pt)",
            clean[adversarial]["robust_accuracy"], clean[standard]["robust_accuracy"], "gain >= 20 pt", gain >= 20),
        pgd_gain_row(standard, adversarial),
    ]


def pgd_gain_row(standard: xdl.Run, adversarial: xdl.Run) -> dict:
    """The same gain under PGD: FGSM training that only masks gradients gains nothing here."""
    pgd = {r: xdl.attack(r, "pgd", params={"eps": EPS}, save=False).metrics["robust_accuracy"] for r in (standard, adversarial)}
    gain = (pgd[adversarial] - pgd[standard]) * 100
    return row(f"PGD eps={EPS} robust acc, adv-train fgsm vs standard CNN (gain {gain:.1f} pt)",
               pgd[adversarial], pgd[standard], "gain >= 20 pt", gain >= 20)


def main(quick: bool = False) -> list[dict]:
    torch.set_num_threads(2)  # the bars are stated for 2 cores
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        standard, adversarial = train_pair(folder, quick)
        return (
            bench_agreement(standard)
            + bench_speed(folder, standard.model, quick)
            + bench_adversarial_training(standard, adversarial)
        )


if __name__ == "__main__":
    import rows_cli

    rows_cli.run(main, __doc__)
