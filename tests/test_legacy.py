"""Runs written before the third round's layout change still load, reuse their results and audit the same.

``tests/data/legacy-v1/`` was written by the commit named in its WRITTEN_BY file (the
layout with 31 loose modules): ``trained/`` by ``xdl train --model cnn --channels 4,8
--epochs 1 --limit 300`` then ``xdl audit --only saliency,fgsm,calibration,bias --samples
6``; ``imported/`` by ``xdl import mlp.pt2 --data digits --limit 300`` then ``xdl audit
--only saliency,calibration --samples 6`` (audit.html left out: it is rewritten).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import xdl

LEGACY = Path(__file__).parent / "data" / "legacy-v1"


def _copy(name: str, tmp_path: Path) -> Path:
    run = tmp_path / name
    shutil.copytree(LEGACY / name, run)
    return run


def _audit_json(run: Path) -> dict:
    return json.loads((run / "audit.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name, only", [("trained", ["saliency", "fgsm", "calibration", "bias"]),
                                        ("imported", ["saliency", "calibration"])])
def test_an_old_run_reuses_every_saved_result_and_audits_identically(tmp_path, name, only):
    run = _copy(name, tmp_path)
    before = _audit_json(run)
    page = xdl.audit(run, only=only, samples=6, progress=False)
    after = _audit_json(run)
    assert [s.status for s in page.sections] == ["reused"] * len(only)  # provenance matched: nothing recomputed
    old = {(s["kind"], s["method"]): s for s in before["sections"]}
    for section in after["sections"]:
        saved = old[(section["kind"], section["method"])]
        for key in ("metrics", "params", "provenance", "summary", "tables", "figures"):
            assert section[key] == saved[key], (section["method"], key)
    assert after["findings"] == before["findings"]
    assert after["run"]["metrics"] == before["run"]["metrics"]


def test_an_old_run_recomputes_the_same_numbers(tmp_path):
    run = _copy("trained", tmp_path)
    before = {(s["kind"], s["method"]): s["metrics"] for s in _audit_json(run)["sections"]}
    page = xdl.audit(run, only=["fgsm", "calibration", "bias"], samples=6, recompute=True, progress=False)
    for section in page.sections:
        assert section.status == "computed"
        _assert_close(section.result.metrics, before[(section.kind, section.method)])


def _assert_close(got, saved) -> None:
    # Floats may differ in the last bits across BLAS builds; everything else (names, counts, segments) is exact.
    if isinstance(saved, dict):
        assert got.keys() == saved.keys()
        for key in saved:
            _assert_close(got[key], saved[key])
    elif isinstance(saved, float):
        assert got == pytest.approx(saved, rel=1e-6, abs=1e-9)
    else:
        assert got == saved


def test_an_old_imported_run_loads_its_model_and_data(tmp_path):
    run = xdl.load(_copy("imported", tmp_path))
    x = run.data.test.x[:4]
    assert run.model(x).shape == (4, 10)
    assert run.info["format_version"] == 1 and run.info["imported"]["format"] == "pt2"
    assert torch.isfinite(run.model(x)).all()
