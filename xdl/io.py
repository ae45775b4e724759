"""Atomic file writes: a reader sees the old complete file or the new complete one, never half."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xdl.errors import XdlError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON: NaN and infinities (which json writes as bare NaN/Infinity, not JSON) become null."""
    atomic_write(path, json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n")


def strict_json(obj: Any) -> Any:
    """``obj`` as plain JSON values, with every non-finite float replaced by None."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int)):
        return obj
    return strict_json(_jsonable(obj))


def _jsonable(obj: Any) -> Any:
    """numpy scalars and arrays, paths and tuples as plain JSON values."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (Path, set, frozenset)):
        return str(obj) if isinstance(obj, Path) else sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# run.json and result.json are kilobytes; a file far beyond this is not one of them.
MAX_JSON_BYTES = 64 << 20


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise XdlError(f"{path} is {path.stat().st_size >> 20} MB; xdl's JSON files are far smaller, so it is not one")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise XdlError(f"file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XdlError(f"{path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise XdlError(f"{path} nests its brackets too deeply to be an xdl file") from None
    except OSError as exc:
        raise XdlError(f"cannot read {path}: {exc.strerror or exc}") from None


# Marks a result folder that held only a cache as claimed by one analysis (xdl.runs.run, Result.save).
CLAIM = ".claimed"

# RFC 4180's line end; with it the csv module also quotes a cell holding a bare "\r",
# which a "\n" terminator would let split the row in two.
CSV_LINE_END = "\r\n"
# Cells a spreadsheet would run as a formula (OWASP, "CSV Injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A CSV cell that opens as text, not a formula: text starting with = + - @ tab or CR gets a leading '.

    Numbers are written as they are (a negative number is not text); lists and dicts go in as JSON.
    """
    if isinstance(value, (list, dict)):
        value = json.dumps(strict_json(value))
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value
