"""Several processes, one training run: torchrun's process group, shards and exact sums.

``torchrun --nproc-per-node N -m xdl train …`` (or any launcher that sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) starts N copies of the same command.
Each joins one process group — nccl between GPUs, gloo between CPUs — and the copies then
differ in one thing only: which contiguous share of the samples they work on.

Shares partition the samples exactly. DistributedSampler pads every rank to the same length
by repeating samples, which double-counts those samples in any metric summed over ranks;
here ranks may differ by one sample, and sums carry their true counts.

With a single process every function here is a cheap no-op, and nothing needs a launcher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from xdl.device import resolve_device
from xdl.errors import XdlError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; ``owned`` when :func:`join` created the group."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def main(self) -> bool:
        """Rank 0 logs and writes; the others compute and stay silent."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise XdlError(f"environment variable {name}={value!r} is not an integer") from None


def current() -> World:
    """The process group in use (one process when none is initialized)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World()


def join(device: str | torch.device = "auto") -> World:
    """Join the process group torchrun describes in the environment; a no-op without one.

    A group that already exists (the caller's own DDP script) is used as it is and left
    for its owner to destroy. nccl carries GPU tensors and gloo CPU tensors, so the backend
    follows the device this rank trains on.
    """
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise XdlError("WORLD_SIZE > 1 asks for distributed training, but this torch build has no torch.distributed")
    local = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device)
    # torch._dynamo keeps references to any process group that exists when it is first
    # imported (torch.optim and DDP import it lazily), so destroy_process_group then cannot
    # free the group and its gloo worker threads outlive the interpreter: one that releases
    # a finished collective's tensors during shutdown needs the GIL and aborts the process
    # ("terminate called without an active exception"). Imported first, it holds none.
    import torch._dynamo  # noqa: F401
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise XdlError(
                f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()}; "
                "start at most that many processes per node"
            )
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size(), local, owned=True)


def leave(world: World) -> None:
    """Destroy the group if :func:`join` created it; every rank must call this."""
    if world.owned and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_device(name: str | torch.device = "auto", world: World | None = None) -> torch.device:
    """The device this rank computes on: a plain ``cuda`` means this rank's own GPU."""
    dev = resolve_device(name)
    world = world or current()
    if dev.type == "cuda" and dev.index is None and world.size > 1:
        return torch.device("cuda", world.local_rank)
    return dev


# -----------------------------------------------------------------------------------------
# Shards
# -----------------------------------------------------------------------------------------


def shard_range(n: int, world: World) -> slice:
    """This rank's contiguous share of ``n`` items: ranks below ``n % size`` take one more.

    The shares of all ranks tile ``range(n)`` exactly once, in rank order, so concatenating
    per-rank outputs restores the original order.
    """
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (world.rank < extra))


def steps_per_epoch(n: int, batch_size: int, world: World) -> int:
    """Global batches per epoch. A last global batch smaller than the number of ranks is
    dropped: some rank would get no sample, and an empty batch has no mean loss."""
    full, tail = divmod(n, batch_size)
    return full + (tail >= world.size)


def shard_batch(index: torch.Tensor, world: World) -> tuple[torch.Tensor, float]:
    """This rank's part of one global batch, and the factor its mean loss is scaled by.

    DDP averages gradients over ranks. Scaling each rank's mean loss by its share of the
    global batch times the number of ranks makes that average the gradient of the global
    batch's mean loss, also when the ranks' parts differ by a sample; the factors sum to
    ``size`` so a term every rank adds alike (an L1 penalty) keeps its weight too.
    """
    part = index[shard_range(len(index), world)]
    return part, len(part) * world.size / len(index)


# -----------------------------------------------------------------------------------------
# Collectives
# -----------------------------------------------------------------------------------------


def _comm_device() -> torch.device:
    # nccl moves only CUDA tensors; gloo only CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(*values: float | torch.Tensor) -> list[float]:
    """Sum scalars over ranks in float64 (exact for counts below 2**53); returns floats."""
    world = current()
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().reshape(()).cpu() for v in values])
    if world.size > 1:
        packed = packed.to(_comm_device())
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed.cpu().tolist()


def broadcast(value: Any, world: World | None = None) -> Any:
    """Rank 0's value on every rank (a picklable object: a path, a config)."""
    world = world or current()
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, world: World | None = None) -> list[Any] | None:
    """Every rank's value, in rank order, on rank 0; None on the other ranks."""
    world = world or current()
    if world.size == 1:
        return [value]
    box = [None] * world.size if world.main else None
    dist.gather_object(value, box, dst=0)
    return box


def barrier(world: World | None = None) -> None:
    if (world or current()).size > 1:
        dist.barrier()


def wrap(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """The module to train: DistributedDataParallel across ranks, the model itself alone.

    DDP broadcasts rank 0's weights at construction, so ranks start identical even if
    their initialisation differed. BatchNorm becomes SyncBatchNorm on GPUs, so its
    statistics are those of the global batch (SyncBatchNorm has no CPU kernel; on CPU
    each rank normalizes by its own part, and buffers follow rank 0).
    """
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index], output_device=device.index)
    return DistributedDataParallel(model)
