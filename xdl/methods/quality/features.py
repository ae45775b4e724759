"""Logits and penultimate features of a model, in one batched pass."""

from __future__ import annotations

import sys

import torch
from torch import nn

from xdl.errors import XdlError


def head(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear``: its input is the representation the classifier separates."""
    found = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
    if found is None:
        raise XdlError("this report needs a model whose classifier head is an nn.Linear layer; this model has none")
    return found


@torch.no_grad()
def logits_and_features(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 512,
                        desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits (N×K) and penultimate features (N×D) on CPU; the hook is removed even on error."""
    captured: list[torch.Tensor] = []
    handle = head(model).register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach().flatten(1).float().cpu()))
    logits = []
    starts = range(0, len(x), batch_size)
    if desc is not None and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)
    try:
        for start in starts:
            logits.append(model(x[start:start + batch_size].to(device)).float().cpu())
    finally:
        handle.remove()
    if not logits:
        return torch.empty(0, head(model).out_features), torch.empty(0, head(model).in_features)
    return torch.cat(logits), torch.cat(captured)
