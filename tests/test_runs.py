"""What a number was computed on: provenance, changed data, --seed, --limit and --samples.

Runs written before the third round's layout change still load, reuse their results and audit the same.

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

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli, write_tabular_csv
from torch import nn

import xdl
from xdl.data import load_data
from xdl.runs import provenance

# -----------------------------------------------------------------------------------------
# provenance
# -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sorted_csv_run(tmp_path_factory):
    """A run on a CSV stored sorted by its label, as exported tables often are."""
    folder = tmp_path_factory.mktemp("sorted")
    path = write_tabular_csv(folder / "adult.csv", n=300)
    frame = pd.read_csv(path).sort_values("income", kind="stable")
    frame.to_csv(path, index=False)
    run = xdl.train(str(path), "mlp", folder / "run", epochs=2, quiet=True, data_options={"target": "income"},
                    model_options={"hidden": [8]})
    return run, path


def test_samples_are_a_seeded_class_stratified_sample_and_recorded(sorted_csv_run):
    run, _ = sorted_csv_run
    test_y = run.data.test.y.numpy()
    assert len(set(test_y[:6])) == 1  # the first rows of the split are one class: a first-N "sample" would be too
    result = xdl.explain(run, "saliency", samples=6, save=False)
    index = np.array(result.provenance["indices"])
    assert len(set(index)) == 6 and set(test_y[index]) == {0, 1}
    assert np.bincount(test_y[index]).tolist() == np.round(6 * np.bincount(test_y) / len(test_y)).astype(int).tolist()
    np.testing.assert_array_equal(result.arrays["indices"], index)
    again = xdl.explain(run, "saliency", samples=6, save=False)
    assert again.provenance == result.provenance  # same seed, same sample, same digests
    other = xdl.explain(run, "saliency", samples=6, seed=1, save=False)
    assert other.provenance["indices"] != result.provenance["indices"] and other.provenance["seed"] == 1


def test_provenance_of_a_bare_model_digests_weights_and_inputs():
    model = nn.Linear(4, 3)
    x = torch.arange(20.0).reshape(5, 4)
    first = xdl.explain(model, "saliency", x=x, params={"abs": False})
    p = first.provenance
    assert (p["split"], p["samples"], p["indices"], p["target"], p["seed"]) == ("given", 5, [0, 1, 2, 3, 4], "predicted", 0)
    assert p["params"] == {"abs": False} and p["xdl_version"] == xdl.__version__
    assert p["model_sha256"] == provenance.model_digest(model) and p["data_sha256"] == provenance.data_digest(x, None)
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert xdl.explain(model, "saliency", x=x, params={"abs": False}).provenance["model_sha256"] != p["model_sha256"]
    assert xdl.explain(model, "saliency", x=x + 1, params={"abs": False}).provenance["data_sha256"] != p["data_sha256"]


def test_many_indices_are_kept_as_their_digest():
    index = np.arange(provenance.INDEX_LIST_MAX + 1)
    p = provenance.record(split="test", index=index, target=1, seed=0, params={}, model="m", data="d")
    assert p["indices"] == p["indices_sha256"] == provenance.digest_arrays(index.astype(np.int64))
    assert provenance.record(split="test", index=index[:-1], target=1, seed=0, params={}, model="m", data="d")["indices"] == index[:-1].tolist()


def test_a_changed_data_file_is_refused_unless_reencoded(sorted_csv_run, tmp_path, capsys):
    import shutil

    run, path = sorted_csv_run
    assert json.loads((run.path / "run.json").read_text())["data_sha256"] == provenance.splits_digest(run.data)
    copy = shutil.copytree(run.path, tmp_path / "run", ignore=shutil.ignore_patterns("explain", "attack", "report"))
    original = path.read_text()
    frame = pd.read_csv(path)
    frame.loc[0, "hours"] = 99.0  # one edited cell
    try:
        frame.to_csv(path, index=False)
        code, _, err = run_cli(capsys, "explain", copy, "--method", "saliency", "-n", "4", "-q")
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert "changed since" in err and "--reencode" in err and not (copy / "explain").exists()
        code, out, err = run_cli(capsys, "explain", copy, "--method", "saliency", "-n", "4", "-q", "--reencode")
        assert code == 0 and "encoded with the run's saved encoding" in err
        saved = json.loads((copy / "explain" / "saliency" / "result.json").read_text())
        assert any("changed since training" in w for w in saved["warnings"])
        # The saved encoding, not one refitted on the edited rows.
        fresh = load_data(run.info["data"])
        reencoded = xdl.Run(copy, reencode=True).data
        assert reencoded.encoding.to_json() == run.info["encoding"]
        assert fresh.encoding.to_json() != run.info["encoding"]
    finally:
        path.write_text(original)
    assert xdl.load(copy).data.encoding.to_json() == run.info["encoding"]  # unchanged again: accepted


def test_seed_reaches_the_split(tmp_path):
    options = {"epochs": 1, "quiet": True, "model_options": {"hidden": [4]}, "data_options": {"limit": 80}}
    zero = xdl.train("digits", "mlp", tmp_path / "a", **options)
    five = xdl.train("digits", "mlp", tmp_path / "b", seed=5, **options)
    assert zero.info["data"]["seed"] == 0 and five.info["data"]["seed"] == 5
    assert not torch.equal(zero.data.test.x, five.data.test.x)


def test_limit_caps_training_rows_for_every_format_and_keeps_splits_nested(tmp_path):
    path = write_tabular_csv(tmp_path / "t.csv", n=500)
    for source, options in (("digits", {}), (str(path), {"target": "income"})):
        full, limited = load_data(source, **options), load_data(source, limit=50, **options)
        assert len(limited.train) == 50, source
        assert len(limited.test) == round(50 / len(full.train) * len(full.test)), source
        for name in ("train", "val", "test"):
            rows = {tuple(r) for r in full.split(name).x.flatten(1).tolist()} if source == "digits" else None
            if rows is not None:  # a limited split takes its rows from the same split of the full data
                assert all(tuple(r) in rows for r in limited.split(name).x.flatten(1).tolist()), name
        assert len(set(limited.train.y.tolist())) == len(set(full.train.y.tolist()))  # stratified, not the first rows

# -----------------------------------------------------------------------------------------
# legacy
# -----------------------------------------------------------------------------------------


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
