"""Limits that keep a hostile or careless request from exhausting the machine.

A request is sized before it allocates: its estimated bytes are checked against the memory
the machine (or its container) has free, so a huge parameter ends in one clear line instead
of the kernel's out-of-memory killer. No psutil: /proc/meminfo, the cgroup limit and sysconf.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from xdl.errors import XdlError

# Refuse a request that would take more than this share of the free memory: the rest is
# for the model, the data and everything the estimate leaves out.
HEADROOM = 0.8


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """What a container's memory limit (cgroup v2, else v1) still leaves, when there is one."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 1 << 60:  # no limit set
                return None
            return max(0, int(text) - int(Path(usage).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate, or None where the platform does not say."""
    found = [m for m in (_meminfo_available(), _cgroup_room()) if m is not None]
    return min(found) if found else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"  # pragma: no cover - the loop always returns


def require_memory(nbytes: float, what: str, hint: str = "") -> None:
    """Refuse ``what`` before it allocates when it would need more memory than is free."""
    free = available_memory()
    if free is None or nbytes <= HEADROOM * free:
        return
    raise XdlError(
        f"{what} would need about {human_bytes(nbytes)} of memory but only {human_bytes(free)} is free"
        + (f"; {hint}" if hint else "")
    )


def check_finite(value: float, name: str) -> None:
    """NaN passes every comparison a bound check makes, so it is refused on its own."""
    if isinstance(value, int) and not isinstance(value, bool):
        return
    if not isinstance(value, float) or not math.isfinite(value):
        raise XdlError(f"{name} must be a finite number, got {value!r}")


def at_most(name: str, value: float | None, top: float) -> None:
    """A Params bound: ValueError, which parse_params turns into one XdlError line."""
    if value is not None and value > top:
        raise ValueError(f"{name} must be at most {top:,}, got {value:,}")
