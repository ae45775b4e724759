"""Privacy bars, each measured side by side in one run, on 5,000 real MNIST digits.

(a) Opacus' MNIST example recipe (its SampleConvNet, SGD lr 0.1, batch 64, 10 epochs,
    per-sample clip 1.0, δ = 1e-5; ε = 3 reached through make_private_with_epsilon and the
    RDP accountant, as xdl uses) vs ``xdl train --data mnist --dp-epsilon 3`` on the same
    real digits and split: xdl's test accuracy ≥ the example's, wall time ≤ 1.5×.
(b) A deliberately overfit run (an MLP on a few hundred digits, many epochs, no weight
    decay): LiRA (the report's defaults: online, 8 reference models) AUC ≥ 0.7 and
    TPR@1%FPR ≥ 5%, and TPR@0.1%FPR, each with its 95% bootstrap interval (or "not
    resolvable" where too few non-members allow no false positive); the same run with
    --dp-epsilon 1: AUC ≤ 0.55. ``--lira-train N`` trains on N digits instead (≥ 1,000
    scores ≥ 1,000 members and non-members, so 0.1% FPR resolves).
(c) ``xdl report RUN --method privacy`` (8 reference models) on a default digits run: < 2 min.

The digits come from ``--mnist DIR`` (default ../shared/data/mnist from the repo root);
an xdl-readable MNIST folder (train-/t10k- IDX files) is written to a temporary folder.
The machine's load average is printed with every row: other agents share these 2 cores.
On a loaded machine run it with OMP_NUM_THREADS=1: two intra-op threads per process spin
against the other jobs and multiply both wall and CPU time (seen here: one reference
model took 7 minutes at load 25 with two threads, seconds with one).

    python benchmarks/bench_privacy.py [--quick] [--mnist DIR] [--only report,lira,dp] [--lira-train N]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from mnist_like import _write_idx  # noqa: E402
from xdl.data.idx import read_idx  # noqa: E402

DEFAULT_MNIST = HERE.parent.parent / "shared" / "data" / "mnist"


def row(workload: str, mine, baseline, target: str, met: bool, **extra) -> dict:
    ratio = mine / baseline if isinstance(mine, (int, float)) and baseline else None
    return {"workload": workload, "xdl": mine, "baseline": baseline, "ratio": ratio, "target": target,
            "met": bool(met), "load": os.getloadavg()[0], **extra}


def mnist_folder(source: Path, folder: Path, train: int) -> Path:
    """The 5,000 digits as an xdl ``mnist`` folder: the first ``train`` as train-*, the rest as t10k-*."""
    x = read_idx(source / "digits5k-images-idx3-ubyte.gz")
    y = read_idx(source / "digits5k-labels-idx1-ubyte.gz")
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, part in (("train", slice(0, train)), ("t10k", slice(train, None))):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", np.ascontiguousarray(x[part]))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.ascontiguousarray(y[part]))
    return folder


def xdl_cli(*argv: str) -> tuple[float, float]:
    """Run the installed CLI; (wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "xdl", *argv], check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# -----------------------------------------------------------------------------------------
# (a) Opacus' MNIST example vs xdl train --dp-epsilon 3
# -----------------------------------------------------------------------------------------


class SampleConvNet(nn.Module):
    """The model of Opacus' examples/mnist.py (layer for layer)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def opacus_example(splits, epsilon: float, delta: float = 1e-5, epochs: int = 10) -> tuple[float, float, float, float]:
    """Opacus' recipe on xdl's train split; (test accuracy, ε spent, wall s, CPU s)."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    start, cpu = time.perf_counter(), time.process_time()
    normalize = lambda x: (x - 0.1307) / 0.3081  # noqa: E731 — the example's MNIST statistics
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(normalize(splits.train.x), splits.train.y),
                                         batch_size=64)
    model = SampleConvNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        model, opt, loader = engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0), data_loader=loader,
            target_epsilon=epsilon, target_delta=delta, epochs=epochs, max_grad_norm=1.0,
        )
        for _ in range(epochs):
            model.train()
            for xb, yb in loader:
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
        spent = engine.get_epsilon(delta)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    model.eval()
    with torch.no_grad():
        accuracy = (model(normalize(splits.test.x)).argmax(1) == splits.test.y).float().mean().item()
    return accuracy, spent, wall, cpu


def example_process(data: Path, epsilon: float) -> tuple[float, float, float, float]:
    """The example as the script it is: a fresh interpreter that imports torch and Opacus, reads
    the digits and trains, as ``xdl train`` does; (test accuracy, ε spent, wall s, CPU s)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from bench_privacy import opacus_example; "
            "from xdl.data import load_data; "
            "print(json.dumps(opacus_example(load_data('mnist', data_dir=sys.argv[2]), float(sys.argv[3]))))")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(HERE), str(data), str(epsilon)], check=True,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    accuracy, spent, _, _ = json.loads(done.stdout.strip().splitlines()[-1])
    return accuracy, spent, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_dp(folder: Path, source: Path, quick: bool) -> list[dict]:
    from xdl.data import load_data

    train = 2000 if quick else 4000
    data = mnist_folder(source, folder / "mnist-dp", train)
    splits = load_data("mnist", data_dir=str(data))
    theirs, their_eps, their_wall, their_cpu = example_process(data, 3.0)
    out = folder / "dp3"
    wall, cpu = xdl_cli("train", "--data", "mnist", "--data-dir", str(data), "--dp-epsilon", "3", "--out", str(out), "-q")
    info = json.loads((out / "run.json").read_text())
    mine, eps = info["metrics"]["test_accuracy"], info["metrics"]["dp_epsilon"]
    size = f"{len(splits.train)} train / {len(splits.test)} test real digits"
    return [
        row(f"dp ε=3 test accuracy vs Opacus MNIST example, {size}", mine, theirs, ">= 1.0x baseline",
            mine >= theirs, note=f"ε spent: xdl {eps:.3f}, example {their_eps:.3f}"),
        row(f"dp ε=3 wall time vs Opacus MNIST example, {size}", wall, their_wall, "<= 1.5x baseline",
            wall <= 1.5 * their_wall,
            note=f"CPU s: xdl {cpu:.1f} vs example {their_cpu:.1f}, each a fresh process incl. imports and data"),
    ]


# -----------------------------------------------------------------------------------------
# (b) LiRA on a deliberately overfit run, and on the same run trained with DP ε = 1
# -----------------------------------------------------------------------------------------


def bench_lira(folder: Path, source: Path, quick: bool, train: int | None = None) -> list[dict]:
    data = mnist_folder(source, folder / "mnist-lira", 4000)
    limit = str(train or (200 if quick else 300))
    overfit = ["--data", "mnist", "--data-dir", str(data), "--limit", limit, "--model", "mlp", "--epochs", "60",
               "--batch-size", "32", "--weight-decay", "0", "-q"]
    rows = []
    for label, extra in (("overfit", []), ("overfit, --dp-epsilon 1", ["--dp-epsilon", "1"])):
        out = folder / label.replace(" ", "").replace(",", "-")
        xdl_cli("train", *overfit, *extra, "--out", str(out))
        wall, cpu = xdl_cli("report", str(out), "--method", "privacy", "-q")
        m = json.loads((out / "report" / "privacy" / "result.json").read_text())["metrics"]
        lira, refs = m["attacks"]["lira"], m["references"]
        lo, hi = lira["auc_ci95"]
        note = (f"{refs['mode']} LiRA, {refs['count']} reference models, {refs['variance']} variance; "
                f"{lira['members']} members vs {lira['non_members']} non-members (lowest resolvable FPR "
                f"{lira['lowest_fpr']:.2%}), AUC 95% bootstrap interval [{lo:.3f}, {hi:.3f}]; test accuracy "
                f"{json.loads((out / 'run.json').read_text())['metrics']['test_accuracy']:.3f}; "
                f"report {wall:.0f}s wall, {cpu:.0f}s CPU")
        if extra:
            rows.append(row(f"LiRA AUC, MLP on {limit} digits trained with DP ε=1", lira["auc"], None, "<= 0.55",
                            lira["auc"] <= 0.55, note=note + f"; ε spent {m['dp']['epsilon']:.3f}"))
            continue
        rows.append(row(f"LiRA AUC, MLP overfit on {limit} digits", lira["auc"], None, ">= 0.7", lira["auc"] >= 0.7,
                        note=note))
        for rate, bar in (("0.01", 0.05), ("0.001", None)):
            tpr, interval = lira["tpr_at_fpr"][rate]["tpr"], lira["tpr_at_fpr_ci95"][rate]
            said = (f"95% bootstrap interval [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else
                    f"not resolvable: {lira['non_members']} non-members allow no false positive at {float(rate):.1%}")
            rows.append(row(f"LiRA TPR at {float(rate):.1%} FPR, MLP overfit on {limit} digits", tpr, None,
                            f">= {bar}" if bar else "reported, or said to be unresolvable",
                            bar is None or (tpr is not None and tpr >= bar),
                            note=f"{said}; {note}"))
    return rows


# -----------------------------------------------------------------------------------------
# (c) the 8-shadow report on a default digits run
# -----------------------------------------------------------------------------------------


def bench_report(folder: Path) -> list[dict]:
    run = folder / "digits"
    xdl_cli("train", "--out", str(run), "-q")
    wall, cpu = xdl_cli("report", str(run), "--method", "privacy", "-q")
    return [row("privacy report, 8 reference models, default digits run: seconds", wall, None, "< 120 s", wall < 120,
                note=f"{cpu:.0f} CPU s over 2 cores")]


def main(quick: bool = False, mnist: Path = DEFAULT_MNIST) -> list[dict]:
    source = Path(mnist)
    if not (source / "digits5k-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"no real MNIST digits in {source}: pass --mnist DIR")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        return bench_report(folder) + bench_lira(folder, source, quick) + bench_dp(folder, source, quick)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer training digits")
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST, help="folder with digits5k-*-ubyte.gz")
    parser.add_argument("--only", help="comma list of report, lira, dp")
    parser.add_argument("--lira-train", type=int, help="training digits of row (b)'s overfit run (default 300, quick 200)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else {"report", "lira", "dp"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = []
        if "report" in only:
            rows += bench_report(folder)
        if "lira" in only:
            rows += bench_lira(folder, args.mnist, args.quick, args.lira_train)
        if "dp" in only:
            rows += bench_dp(folder, args.mnist, args.quick)
    for r in rows:
        print(json.dumps(r), flush=True)
