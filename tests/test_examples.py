"""Each script in examples/ runs start to finish, with small sizes, into a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Small sizes keep each script to seconds; the defaults are what a reader runs.
# script → (arguments, lines it must print). The audits take only what the script computed
# before, so they reuse it and add no work.
CASES = {
    "quickstart.py": (
        ["--epochs", "1", "--samples", "8", "--only", "ig,pgd,calibration"],
        ["Robust accuracy (PGD, eps 0.1)", "Calibration (ECE)", "audit reused explain/ig, attack/pgd, report/calibration"],
    ),
    "tabular_walkthrough.py": (
        ["--rows", "300", "--epochs", "3", "--samples", "40", "--only", "shap,bias"],
        ["Worst-group gap (sex)", "Worst-class gap"],
    ),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script, tmp_path):
    out = tmp_path / "run"
    args, expected = CASES[script]
    # One thread: the models are tiny, and a second thread only adds spinning on a busy 2-core machine.
    done = subprocess.run([sys.executable, str(EXAMPLES / script), str(out), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "audit.html").is_file() and (out / "audit.json").is_file()
    for line in ["Test accuracy", f"open {(out / 'audit.html').resolve().as_uri()}", *expected]:
        assert line in done.stdout, done.stdout


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


def test_tabular_walkthrough_finds_the_group_gap(tmp_path):
    """The planted bias (labels favour one sex, hours is a proxy) shows up as a group gap."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from tabular_walkthrough import write_loans
    finally:
        sys.path.remove(str(EXAMPLES))
    import pandas as pd

    frame = pd.read_csv(write_loans(tmp_path / "loans.csv", 4000))
    rates = frame.assign(yes=frame.approved == "yes").groupby("sex")["yes"].mean()
    assert rates["male"] - rates["female"] > 0.1
    assert frame.groupby("sex")["hours"].mean().diff().iloc[-1] > 2
