"""Logits and penultimate features of a model, in one batched pass."""

from __future__ import annotations

import sys

import torch
from torch import nn

from xdl.models.layers import Head, score_head


@torch.no_grad()
def logits_and_features(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 512,
                        desc: str | None = None, head: Head | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (N×K) and penultimate features (N×D) on CPU: the input of ``head``'s module
    (found on the first rows when not given), else the logits themselves; the hook is removed even on error."""
    if head is None:
        head = score_head(model, x[:2].to(device)) if len(x) else Head("", None)
    captured: list[torch.Tensor] = []
    handle = None if head.module is None else head.module.register_forward_pre_hook(
        lambda _m, inputs: captured.append(inputs[0].detach().flatten(1).float().cpu()))
    logits = []
    starts = range(0, len(x), batch_size)
    if desc is not None and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
    try:
        for start in starts:
            logits.append(model(x[start:start + batch_size].to(device)).float().cpu())
    finally:
        if handle is not None:
            handle.remove()
    if not logits:
        return torch.empty(0, 0), torch.empty(0, 0)
    logits = torch.cat(logits)
    return logits, (torch.cat(captured) if handle is not None else logits.clone())
