"""One analyzer's part of a page: its Result, or why there is none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xdl.runs.provenance import describe


@dataclass
class Section:
    """One analyzer's part of the audit: its Result, or the error that stopped it."""

    kind: str
    method: str
    status: str  # "computed" | "reused" | "failed" | "skipped" (one sample would far exceed the time budget)
    result: Any = None  # an xdl.analysis.Result
    error: str = ""
    traceback: str = ""  # for an unexpected exception (a bug, not bad input): where it came from
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time, all threads: what a busy machine does not inflate
    samples: int | None = None  # how many samples the audit gave it (None: reused or whole split)
    package: str = "xdl"
    guide: str = ""  # the analyzer's reading guide for the page

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.method}"

    @property
    def anchor(self) -> str:
        return f"{self.kind}-{self.method}"

    @property
    def computed_on(self) -> str:
        """``"8 samples of the test split"``, from the result's provenance."""
        return describe(self.result.provenance) if self.result is not None else ""
