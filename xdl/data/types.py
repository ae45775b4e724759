"""The typed hand-over between data loading and everything after it (DESIGN.md)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from xdl.data.stream import batches, is_streamed
from xdl.errors import XdlError

Kind = Literal["image", "tabular"]


@dataclass
class Split:
    """One split: inputs in the data's natural range, integer labels, optional groups.

    Images are ``N×C×H×W`` float32 in [0, 1]; tabular rows are ``N×F`` float32 after
    encoding. ``groups`` maps a sensitive column's name to one string label per row.
    A folder too large to hold decoded is *streamed*: ``x`` is then a
    :class:`xdl.data.stream.LazyImages` that decodes what is indexed, and whole-split
    passes go through :meth:`iter_batches`.
    """

    x: torch.Tensor  # or LazyImages, for a streamed split
    y: torch.Tensor
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    # Each sample's row in the file it was read from (train/val: the training file or the one
    # file; test: the test file when there is one), so a report can name it for fixing.
    source: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def source_index(self) -> np.ndarray:
        """Row numbers in the source file; positions in the split when the loader kept none."""
        return np.arange(len(self)) if self.source is None else self.source

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> "Split":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        groups = {k: v[index.numpy()] for k, v in self.groups.items()}
        return Split(self.x[index], self.y[index], groups, self.source_index[index.numpy()])

    @property
    def streamed(self) -> bool:
        return is_streamed(self.x)

    def iter_batches(self, batch_size: int, device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(x, y, index) batches in order: tensor slices, or images decoded in worker processes."""
        for s, xb in batches(self.x, batch_size, device):
            yield xb, self.y[s], torch.arange(s.start, s.stop)


@dataclass
class ColumnEncoding:
    """How one original CSV column became encoded model inputs.

    numeric: standardized with ``mean``/``std`` (missing values imputed with ``fill``);
    categorical: one-hot over ``categories`` (missing values become their own category
    ``fill``, unseen values map to all zeros).
    """

    name: str
    type: Literal["numeric", "categorical"]
    mean: float = 0.0
    std: float = 1.0
    fill: Any = None
    categories: list[str] = field(default_factory=list)
    missing: int = 0  # how many training rows had this column missing

    @property
    def width(self) -> int:
        return 1 if self.type == "numeric" else len(self.categories)

    def encoded_names(self) -> list[str]:
        if self.type == "numeric":
            return [self.name]
        return [f"{self.name}={c}" for c in self.categories]


@dataclass
class Encoding:
    """The tabular encoding: lets any per-feature result be summed back per original column."""

    columns: list[ColumnEncoding]

    @property
    def feature_names(self) -> list[str]:
        return [n for c in self.columns for n in c.encoded_names()]

    @property
    def original_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column_index(self) -> np.ndarray:
        """For each encoded feature, the index of the original column it came from."""
        return np.concatenate([np.full(c.width, i) for i, c in enumerate(self.columns)]).astype(int)

    def numeric_mask(self) -> np.ndarray:
        """True for encoded features that are standardized numbers (attackable, continuous)."""
        return np.concatenate([np.full(c.width, c.type == "numeric") for c in self.columns])

    def sum_to_columns(self, values: np.ndarray) -> np.ndarray:
        """Sum the last axis (encoded features) back to original columns."""
        values = np.asarray(values)
        index = self.column_index()
        return np.stack([values[..., index == i].sum(-1) for i in range(len(self.columns))], -1)

    def to_json(self) -> list[dict]:
        return [vars(c).copy() for c in self.columns]

    @classmethod
    def from_json(cls, items: list[dict]) -> "Encoding":
        return cls([ColumnEncoding(**c) for c in items])


@dataclass
class DataSplits:
    """train/val/test plus everything downstream needs to interpret them."""

    train: Split
    val: Split
    test: Split
    kind: Kind
    class_names: list[str]
    spec: dict  # JSON-able; ``load_data(spec)`` rebuilds exactly these splits
    feature_names: list[str] = field(default_factory=list)
    encoding: Encoding | None = None
    notes: list[str] = field(default_factory=list)  # e.g. imputation counts, shown to the user

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def group_names(self) -> list[str]:
        return list(self.train.groups)

    @property
    def input_range(self) -> tuple[float, float] | None:
        """The valid input box: [0, 1] for images; unbounded (None) for encoded tabular rows."""
        return (0.0, 1.0) if self.kind == "image" else None

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise XdlError(f"unknown split {name!r}: choose train, val or test")
        return getattr(self, name)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "classes": self.class_names,
            "features": self.feature_names,
            "groups": self.group_names,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
        }
