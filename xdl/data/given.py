"""Data a Python caller hands over directly: tensors, arrays, a torch Dataset or DataLoader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from xdl.data import load_data
from xdl.data.types import DataSplits
from xdl.errors import XdlError


def tensors_of(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a pair of tensors/arrays, a torch Dataset of (x, y) items or a DataLoader."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (torch.as_tensor(v) for v in data)
    elif isinstance(data, (Dataset, DataLoader)):
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=256)
        xs, ys = [], []
        for batch in loader:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise XdlError("a Dataset/DataLoader for xdl must yield (input, label) pairs")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        x, y = torch.cat(xs), torch.cat(ys)
    else:
        raise XdlError(
            f"data must be a data spec (name, path or dict), DataSplits, (x, y) tensors or a torch Dataset/DataLoader, "
            f"not {type(data).__name__}"
        )
    return x.detach().cpu(), y.detach().cpu().long()


def live_samples(data: Any, split: str = "test") -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """Samples for a live model: (x, y, DataSplits) from a spec, (x, y, None) from tensors or a Dataset."""
    if isinstance(data, (str, dict, Path, DataSplits)):
        splits = data if isinstance(data, DataSplits) else load_data(str(data) if isinstance(data, Path) else data)
        part = splits.split(split)
        return part.x, part.y, splits
    x, y = tensors_of(data)
    return x, y, None
