"""Startup: `xdl --help` must not wait for torch, and `import xdl` must not pull plotting or SHAP/LIME."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("shap", "lime", "matplotlib")


def _xdl() -> list[str]:
    script = Path(sys.executable).with_name("xdl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "xdl"]


def test_help_answers_fast():
    times = []
    for _ in range(3):  # best of three: the CI machine is shared and noisy
        start = time.perf_counter()
        done = subprocess.run([*_xdl(), "--help"], capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - start)
        assert done.returncode == 0 and "Commands" in done.stdout
    print(f"xdl --help: best of 3 {min(times):.3f}s (target < 0.5s)")
    # The target is 0.5 s; the assertion leaves room for a loaded CI machine.
    assert min(times) < 1.0


def test_help_does_not_import_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "xdl", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "xdl.cli.main" in imported  # the measurement saw xdl's own imports
    assert not {"torch", "numpy"} & imported


def test_import_xdl_leaves_heavy_libraries_unloaded():
    code = (
        "import sys, xdl, xdl.api, xdl.analysis, xdl.training.distributed\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
