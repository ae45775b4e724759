"""The compute card: what a run cost — parameters, FLOPs, time, memory, device, energy.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix
multiplications and convolutions only (2 FLOPs per multiply-add); elementwise work
(activations, normalization, the loss) is not counted, as in most papers' FLOP figures.

Energy is an estimate, never a measurement: an assumed device power × training wall time.
The card states which power figure it assumed and where it came from.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xdl.models.inference import eval_mode

# Assumed power draw while training, in watts, when nothing better is known.
# CPU: roughly a server CPU's TDP per core (280 W / 32 cores ≈ 9 W; a 65 W desktop part
# with 6 cores ≈ 11 W), times the threads torch trains with.
CPU_WATTS_PER_THREAD = 10.0
# CUDA without nvidia-smi: a typical data-centre GPU's board power (A100 PCIe 250–300 W).
CUDA_WATTS = 300.0
# Apple silicon: package power of an M-series chip under sustained GPU load.
MPS_WATTS = 20.0


def count_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """FLOPs per sample of one forward pass and of one training step (forward + backward).

    Counted in eval mode so BatchNorm's running statistics stay untouched (its FLOPs are
    elementwise and not counted either way), and through ``torch.autograd.grad`` so no
    parameter's ``.grad`` changes: counting a run's cost must not alter the run. The
    backward pass computes each weight's gradient and each input gradient that a
    parameter upstream needs; the first layer's input gradient is never computed.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters(), torch.empty(0)).device
    x = x.to(device)
    with eval_mode(model):
        with FlopCounterMode(display=False) as forward, torch.no_grad():
            model(x)
        with FlopCounterMode(display=False) as step:
            logits = model(x)
            if params:
                # Labels do not change the count; zeros make any classifier's loss valid.
                loss = F.cross_entropy(logits.float(), torch.zeros(len(x), dtype=torch.long, device=device))
                torch.autograd.grad(loss, params, allow_unused=True)
    return round(forward.get_total_flops() / len(x)), round(step.get_total_flops() / len(x))


def reset_peak_memory(device: torch.device) -> None:
    """Start the CUDA peak-memory counter afresh (call right before training)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """Peak memory in bytes and what was measured."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated (tensors on the GPU)"
    try:
        import resource
    except ImportError:  # Windows has no getrusage
        return None, "unavailable on this platform"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(rss * scale), "peak resident memory of the whole process (resource.getrusage), data loading included"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).name
    if device.type == "mps":
        return f"Apple {platform.machine()} (MPS)"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def assumed_power(device: torch.device) -> tuple[float, str]:
    """Watts assumed while training, and the assumption in words."""
    if device.type == "cuda":
        limit = _nvidia_power_limit(device)
        if limit is not None:
            return limit, "the GPU's power limit from nvidia-smi (an upper bound: a GPU rarely draws its limit)"
        return CUDA_WATTS, f"{CUDA_WATTS:.0f} W, a typical data-centre GPU's board power (nvidia-smi unavailable)"
    if device.type == "mps":
        return MPS_WATTS, f"{MPS_WATTS:.0f} W, an Apple M-series package under sustained load"
    threads = torch.get_num_threads()
    return (
        CPU_WATTS_PER_THREAD * threads,
        f"{CPU_WATTS_PER_THREAD:.0f} W per CPU thread × {threads} threads (a server CPU's TDP per core)",
    )


def _nvidia_power_limit(device: torch.device) -> float | None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    # The UUID names the same GPU whatever CUDA_VISIBLE_DEVICES renumbered (torch ≥ 2.4 has it).
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=power.limit", "--format=csv,noheader,nounits",
             "-i", f"GPU-{uuid}" if uuid else str(index)],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def compute_card(
    model: nn.Module, x: torch.Tensor, seconds: float, samples: int, device: torch.device, devices: int = 1,
    attack_passes: int = 0, autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """The card saved in run.json under "compute".

    ``x``: a few training inputs to count FLOPs on; ``seconds``: training wall time (the
    epochs' own times, validation included, summed over resumed sessions); ``samples``:
    training samples processed by all ``devices`` together (torchrun ranks, one device each);
    ``attack_passes``: forward+backward passes adversarial training adds per sample, each
    counted as one more training step (its backward runs through every layer too);
    ``autocast``: the dtype training steps were autocast to (None: fp32).
    """
    forward, step = count_flops(model, x)
    memory, memory_source = peak_memory(device)
    watts, power_source = assumed_power(device)
    if devices > 1:
        watts, power_source = watts * devices, f"{power_source}, × {devices} devices"
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "flops_forward_per_sample": forward,
        "flops_train_step_per_sample": step,
        "flops_training_total": step * samples * (1 + attack_passes),
        "attack_passes_per_sample": attack_passes,
        "flops_counted": "matmuls and convolutions by torch.utils.flop_counter, 2 FLOPs per multiply-add",
        "train_seconds": seconds,
        "samples_seen": samples,
        "samples_per_second": samples / seconds if seconds > 0 else None,
        "peak_memory_bytes": memory,
        "peak_memory_source": memory_source,
        "device": str(device),
        "precision": "fp32" if autocast is None else f"{str(autocast).removeprefix('torch.')} autocast",
        "devices": devices,
        "device_name": device_name(device),
        "assumed_watts": watts,
        "power_assumption": power_source,
        "energy_wh": watts * seconds / 3600,
    }


def format_card(card: dict[str, Any]) -> list[str]:
    """The card as aligned terminal lines (``xdl info``, ``xdl audit``)."""

    def si(value: float | None, unit: str) -> str:
        if value is None:
            return "n/a"
        for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {prefix}{unit}"
        return f"{value:.4g} {unit}"

    memory = card.get("peak_memory_bytes")
    rate = card.get("samples_per_second")
    return [
        f"parameters           {card['parameters']:,} ({card['trainable_parameters']:,} trainable)",
        f"forward FLOPs        {si(card['flops_forward_per_sample'], 'FLOP')} per sample",
        f"training-step FLOPs  {si(card['flops_train_step_per_sample'], 'FLOP')} per sample "
        f"({si(card['flops_training_total'], 'FLOP')} in all)",
        f"training time        {card['train_seconds']:.1f} s, {card['samples_seen']:,} samples"
        + (f", {rate:,.0f} samples/s" if rate else ""),
        f"peak memory          {'n/a' if memory is None else f'{memory / 2**20:,.1f} MiB'} — {card['peak_memory_source']}",
        f"device               {card['device']} ({card['device_name']})"
        + (f" × {card['devices']}" if card.get("devices", 1) > 1 else "")
        + (f", {card['precision']}" if "precision" in card else ""),
        f"energy (estimate)    {card['energy_wh']:.3g} Wh at {card['assumed_watts']:.0f} W — {card['power_assumption']}",
    ]
