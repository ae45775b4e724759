"""The 5,000 real MNIST digits shipped beside the repo (``../shared/data/mnist``), as a folder
xdl's MNIST loader reads: the first ``train`` digits as the training files, the rest as t10k;
and what the benchmarks that time whole processes on them share.

Benchmarks only: the product and the tests never read ``shared/``.
"""

from __future__ import annotations

import gzip
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT.parent / "shared" / "data" / "mnist"
IMAGES, LABELS = "digits5k-images-idx3-ubyte.gz", "digits5k-labels-idx1-ubyte.gz"
HEADER = {IMAGES: 16, LABELS: 8}  # IDX header bytes: magic and one 4-byte size per dimension


def write_real_mnist(out: Path, train: int = 4000, source: Path = DEFAULT) -> Path:
    """Split the real digits into train/t10k IDX files under ``out``; returns ``out``."""
    if not (source / IMAGES).is_file():
        raise SystemExit(f"real MNIST digits not found in {source}: pass --mnist-dir")
    out.mkdir(parents=True, exist_ok=True)
    for name, kind in ((IMAGES, "images-idx3-ubyte"), (LABELS, "labels-idx1-ubyte")):
        raw = gzip.decompress((source / name).read_bytes())
        head, body = bytearray(raw[: HEADER[name]]), raw[HEADER[name]:]
        size = len(body) // int.from_bytes(head[4:8], "big")  # bytes per sample
        for prefix, part in (("train", body[: train * size]), ("t10k", body[train * size:])):
            head[4:8] = (len(part) // size).to_bytes(4, "big")
            (out / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(bytes(head) + part))
    return out


def timed(command: list[str], env: dict | None = None, cwd: Path | None = None,
          check: bool = True) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall and CPU seconds (user + system, all threads) of one child process, and the finished
    process (its output captured as text). With ``check``, a failure raises with its stderr's end;
    without, a benchmark can time a refusal. ``env`` None: this process's environment."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - start
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} failed: {done.stderr.strip()[-800:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done


def command_line(main: Callable[..., list[dict]], doc: str) -> None:
    """Run a benchmark's ``main(quick, mnist_dir, repeats)`` from the shell, a JSON row per line."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a single repeat")
    parser.add_argument("--mnist-dir", default=str(DEFAULT), help="folder with the digits5k IDX files")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    for row in main(args.quick, Path(args.mnist_dir), args.repeats):
        print(json.dumps(row))
