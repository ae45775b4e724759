"""A model's loss and accuracy on a split, the figures run.json keeps for every run."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xdl.data import stream
from xdl.data.types import DataSplits, Split
from xdl.training import distributed


STREAM_EVAL_BATCH = 256  # evaluation batch of a streamed split: decoded images, not tensor slices


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, device: torch.device, batch_size: int = 1024) -> dict[str, float]:
    """Loss, the standard error of that mean loss, and accuracy over a split, in eval mode; the
    model's mode is restored after.

    Inside a process group each rank evaluates its own share and the sums are reduced, so
    every rank gets the same exact figures; all ranks must call it together.
    """
    was_training = model.training
    model.eval()
    loss, squares, correct = 0.0, 0.0, 0
    share = distributed.shard_range(len(split), distributed.current())
    if stream.is_streamed(split.x):
        batch_size = min(batch_size, STREAM_EVAL_BATCH)
    for rows, xb in stream.batches(split.x, batch_size, device, share):
        yb = split.y[rows].to(device, non_blocking=True)
        logits = model(xb).float()
        losses = F.cross_entropy(logits, yb, reduction="none")
        loss += losses.sum().item()
        squares += losses.square().sum().item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train(was_training)
    loss, squares, correct = distributed.all_reduce_sum(loss, squares, correct)
    n = max(len(split), 1)
    variance = max(squares / n - (loss / n) ** 2, 0.0)
    return {"loss": loss / n, "loss_se": math.sqrt(variance / n), "accuracy": correct / n}


def final_metrics(model: nn.Module, data: DataSplits, device, splits: tuple[str, ...] = ("train", "val", "test")) -> dict:
    """Loss and accuracy on each of ``splits`` (default all), in eval mode (the overfitting report compares them)."""
    metrics = {}
    for name in splits:
        result = evaluate(model, data.split(name), device)
        metrics[f"{name}_loss"] = result["loss"]
        metrics[f"{name}_accuracy"] = result["accuracy"]
    return metrics
