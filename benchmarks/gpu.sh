#!/usr/bin/env bash
# The GPU path end to end on one CUDA device, in under 5 minutes:
#   1. MNIST-format data (benchmarks/mnist_like.py: 60,000 train / 10,000 test, offline);
#   2. the CNN trained with bf16/fp16 autocast, channels_last, data resident on the GPU
#      (add --compile for torch.compile);
#   3. explain (ig) and attack (fgsm) on the 10,000 test images.
# Prints throughput (samples/s) and model FLOP utilization for each: FLOPs counted by
# torch.utils.flop_counter on a small batch of the same work, over the peak of a bf16
# matmul measured in this run on this GPU.
#
#   benchmarks/gpu.sh [--compile] [--epochs N]
#
# Setup: the Makefile's torch==2.13.0 is the CPU wheel. On a GPU machine use the CUDA
# torch already installed there (PYTHON=/path/to/python benchmarks/gpu.sh), or install
# one from the registry first: `pip install torch` (PyPI's Linux x86-64 wheels bundle
# CUDA) and `pip install -e .` for xdl. XDL_BENCH_DEVICE=cpu runs the same steps on tiny
# sizes to check the script on a machine without a GPU; its figures mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${XDL_BENCH_DEVICE:-cuda}
COMPILE=0
EPOCHS=5
while [ $# -gt 0 ]; do
    case "$1" in
        --compile) COMPILE=1 ;;
        --epochs) EPOCHS="$2"; shift ;;
        *) echo "gpu.sh: unknown option $1 (use --compile, --epochs N)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$DEVICE" = cuda ]; then
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu.sh: error: no CUDA device visible to $PYTHON (torch $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing)); run it on a GPU machine with a CUDA build of torch" >&2
        exit 2
    fi
    TRAIN=60000 TEST=10000
else
    TRAIN=1000 TEST=200 EPOCHS=1
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" benchmarks/mnist_like.py "$WORK/mnist" --train "$TRAIN" --test "$TEST" >/dev/null

DEVICE="$DEVICE" COMPILE="$COMPILE" EPOCHS="$EPOCHS" WORK="$WORK" timeout 290 "$PYTHON" - <<'EOF'
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import xdl
from xdl.analysis import Context, analyze, load_analyzer

device = torch.device(os.environ["DEVICE"])
work, epochs, compile_ = os.environ["WORK"], int(os.environ["EPOCHS"]), os.environ["COMPILE"] == "1"


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops() -> float:
    """Dense bf16 matmul FLOP/s on this device: the ceiling MFU is measured against."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    reps, start = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


peak = peak_flops()
name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
print(f"device {name}; bf16 matmul peak {peak / 1e12:.1f} TFLOP/s (measured); torch {torch.__version__}")
print(f"{'workload':<34}{'samples/s':>12}{'TFLOP/s':>10}{'MFU':>8}")


def report(label: str, samples: int, seconds: float, flops_per_sample: float) -> None:
    rate = samples / seconds
    achieved = rate * flops_per_sample
    print(f"{label:<34}{rate:>12,.0f}{achieved / 1e12:>10.2f}{achieved / peak:>8.1%}")


# Train: the run's compute is epochs × N × (forward + backward) of one sample.
started = time.perf_counter()
run = xdl.train({"name": "mnist", "data_dir": f"{work}/mnist"}, "cnn", f"{work}/run", epochs=epochs,
                device=str(device), amp=True, compile=compile_, quiet=True)
train_wall = time.perf_counter() - started
splits = run.data
model = run.model.to(device).to(memory_format=torch.channels_last) if device.type == "cuda" else run.model
xb, yb = splits.train.x[:256].to(device), splits.train.y[:256].to(device)


def train_step() -> None:
    torch.nn.functional.cross_entropy(model(xb), yb).backward()


per_sample = counted(train_step) / len(xb)
model.zero_grad(set_to_none=True)
seen = run.metrics["epochs_run"] * len(splits.train)
report(f"train cnn ({'compiled, ' if compile_ else ''}amp)", seen, run.metrics["train_seconds"], per_sample)
print(f"  test accuracy {run.metrics['test_accuracy']:.4f}; train wall {train_wall:.1f}s incl. data load and save")

forward = counted(lambda: model(xb).sum()) / len(xb)

# Explain and attack the whole test split. IG's FLOPs are counted on 64 samples of the same
# work; FlopCounterMode cannot follow autograd.grad to a leaf input (torch raises), so
# FGSM's are one forward+backward for the gradient plus two forwards (clean, adversarial).
for kind, method in (("explain", "ig"), ("attack", "fgsm")):
    if method == "fgsm":
        per_sample = counted(train_step) / len(xb) + 2 * forward
        model.zero_grad(set_to_none=True)
    else:
        small = Context(model=run.model, x=splits.test.x[:64], y=splits.test.y[:64], kind="image",
                        class_names=splits.class_names, device=device, batch_size=64)
        per_sample = counted(lambda: analyze(load_analyzer(kind, method)(), small)) / 64
    xdl.analyze(kind, run, method, samples=8, device=str(device), save=False)  # warm-up: kernels, caches
    sync()
    start = time.perf_counter()
    xdl.analyze(kind, run, method, samples=len(splits.test), device=str(device), batch_size=1000, save=False)
    sync()
    report(f"{kind} {method} on {len(splits.test):,} images", len(splits.test), time.perf_counter() - start, per_sample)
EOF
