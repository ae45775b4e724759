"""Security and data safety (issue 15): code named by a run, hostile run.json, lost files, misuse.

The bad-input matrix (test_cli.py) holds the CLI rows; this file holds what a row
cannot show: that a factory named by run.json is never imported without trust (and is with
it), random mutations of a real run.json, the Python API's misuse sentences, the files that
survive ``--force`` and ``out=``, and the peak memory of refused huge requests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_run, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import xdl
from xdl.analysis import Result
from xdl.errors import XdlError
from xdl.runs.run import Run


def strict_loads(text: str):
    """json.loads as a strict parser (JavaScript, Go, jq) reads it: NaN and Infinity are errors."""
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------ code named by run.json


PAYLOAD = '''
from pathlib import Path
Path({marker!r}).write_text("imported")  # the side effect an attacker wants: any code at import


def build(in_shape, num_classes):
    from xdl.models.builders import build_model
    return build_model({config!r}, in_shape, num_classes)
'''


@pytest.fixture
def factory_run(digits_run, tmp_path, monkeypatch):
    """A copy of the digits run whose model is a user factory in a module that marks its import."""
    monkeypatch.delenv("XDL_TRUST_CODE", raising=False)
    module = f"xdl_payload_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    marker = tmp_path / "IMPORTED"
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{module}.py").write_text(PAYLOAD.format(marker=str(marker), config=digits_run.info["model"]))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    run = Path(copy_run(digits_run, tmp_path / "run"))
    info = json.loads((run / "run.json").read_text())
    info["model"] = {**info["model"], "name": "custom", "factory": f"{module}:build"}
    (run / "run.json").write_text(json.dumps(info))
    yield run, module, marker
    sys.modules.pop(module, None)


def test_a_factory_in_run_json_is_never_imported_without_trust(factory_run, capsys):
    run, module, marker = factory_run
    results_before = sorted(run.glob("*/*/result.json"))
    for argv in (["explain", run, "-n", "2", "-q"], ["attack", run, "-n", "2", "-q"],
                 ["report", run, "--method", "calibration", "-q"], ["audit", run, "--only", "saliency", "-n", "2", "-q"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{module}:build" in err and "--trust-code" in err, err
    with pytest.raises(XdlError, match="trust_code=True"):
        xdl.load(run).model
    with pytest.raises(XdlError, match="names code to import"):
        xdl.explain(str(run), "saliency", samples=2, save=False)
    assert not marker.exists() and module not in sys.modules
    assert sorted(run.glob("*/*/result.json")) == results_before

    # Trusted, the same run works: the gate is the only thing that stopped it.
    result = xdl.explain(str(run), "saliency", samples=2, save=False, trust_code=True)
    assert marker.exists() and result.arrays["attributions"].shape == (2, 1, 8, 8)
    code, out, err = run_cli(capsys, *["explain", run, "-n", "2", "-q", "--trust-code"])
    assert code == 0, err


def test_trust_by_environment(factory_run, monkeypatch):
    run, _, marker = factory_run
    monkeypatch.setenv("XDL_TRUST_CODE", "1")
    assert isinstance(xdl.load(run).model, nn.Module) and marker.exists()


def test_the_issue_payload_runs_no_shell_in_a_real_process(digits_run, tmp_path):
    """The reported run.json (subprocess:call with a shell command as in_shape), through `python -m xdl`.

    Trusted or not, it is refused by the schema; the Popen variant, which passes it, is a matrix row."""
    run = Path(copy_run(digits_run, tmp_path / "run"))
    pwned = tmp_path / "pwned"
    info = json.loads((run / "run.json").read_text())
    model = {"name": "custom", "factory": "subprocess:call", "in_shape": ["sh", "-c", f"id > {pwned}"], "num_classes": 10}
    (run / "run.json").write_text(json.dumps({**info, "model": model}))
    env = {k: v for k, v in os.environ.items() if k != "XDL_TRUST_CODE"}
    proc = subprocess.run([sys.executable, "-m", "xdl", "explain", str(run), "-n", "2", "-q"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not pwned.exists()


def test_resume_of_a_run_naming_a_factory_needs_trust(factory_run):
    run, module, marker = factory_run
    (run / "run.json").unlink()  # an unfinished run: only its checkpoint config remains
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    config["model"] = {"name": "custom", "factory": f"{module}:build"}
    (run / "checkpoint" / "config.json").write_text(json.dumps(config))
    with pytest.raises(XdlError, match="--trust-code"):
        xdl.train(out=run, resume=True, quiet=True)
    assert not marker.exists()


# ------------------------------------------------------------------------------ run.json mutations


def json_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from json_paths(item, (*prefix, i))


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.just(1e12),
    st.sampled_from(["", "../../etc", "/etc/passwd", "custom", "mlp", "cnn", "subprocess:call", "os:system",
                     "npz", "csv", "folder", "digits", "relu", "bogus"]),
    st.text(max_size=6),
    st.lists(st.integers(-2, 100_000), max_size=4),
    st.dictionaries(st.sampled_from(["name", "factory", "path", "seed", "x"]), st.integers(-1, 3), max_size=2),
)


def test_mutated_run_json_exits_0_or_2(digits_run, tmp_path_factory, capsys):
    """Random edits of a real run.json: every command ends in a result or one line, never a traceback."""
    original = json.loads((digits_run.path / "run.json").read_text())
    paths = [p for p in json_paths(original) if p and p[0] not in ("versions",)]
    codes = []

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(path=st.sampled_from(paths), value=JSON_VALUES, delete=st.booleans())
    def check(path, value, delete):
        info = json.loads(json.dumps(original))
        parent = info
        for key in path[:-1]:
            parent = parent[key]
        if delete and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        run = Path(copy_run(digits_run, tmp_path_factory.mktemp("mutant") / "run"))
        (run / "run.json").write_text(json.dumps(info))
        for argv in (["info", run], ["explain", run, "-n", "2", "-q"]):
            code, _, err = run_cli(capsys, *argv)
            codes.append(code)
            assert code in (0, 2), (path, value, err)
            assert "Traceback" not in err and (code == 0 or len(err.strip().splitlines()) == 1), (path, value, err)

    check()
    print(f"\nrun.json mutations: {len(codes)} commands, exit 0: {codes.count(0)}, exit 2: {codes.count(2)}")


# ------------------------------------------------------------------------------ Python API misuse


class Linear(nn.Module):
    def __init__(self, features: int = 4, classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _meta_model():
    with torch.device("meta"):
        return Linear()


MISUSE = [
    ("x of rank 0", Linear, torch.tensor(1.0), None, None, "x has shape"),
    ("x of rank 1", Linear, torch.rand(4), None, None, "x has shape"),
    ("x of rank 5", Linear, torch.rand(2, 1, 1, 2, 2), None, None, "x has shape"),
    # x of rank 3 is not misuse: N×H×W is taken as grayscale images (a Keras Flatten-first model wants them).
    ("empty x", Linear, torch.rand(0, 4), None, None, "x holds no samples"),
    ("strings as x", Linear, np.array([["a", "b", "c", "d"]] * 2), None, None, "x must hold numbers"),
    ("ragged x", Linear, [[1.0, 2.0], [3.0]], None, None, "x must be an array of numbers"),
    ("NaN in x", Linear, torch.tensor([[0.0, float("nan"), 0.0, 0.0]]), None, None, "NaN or infinite"),
    ("int64 0-255 pixels", lambda: Linear(16), torch.randint(0, 256, (2, 1, 4, 4)), None, None, r"x / 255\.0"),
    ("y of the wrong length", Linear, torch.rand(3, 4), torch.tensor([0, 1]), None, "one label per sample"),
    ("y out of range", Linear, torch.rand(3, 4), torch.tensor([0, 1, 7]), None, "label 7"),
    ("negative y", Linear, torch.rand(3, 4), torch.tensor([0, -1, 2]), None, "label -1"),
    ("fractional y", Linear, torch.rand(2, 4), torch.tensor([0.5, 1.0]), None, "non-integer"),
    ("params=5", Linear, torch.rand(2, 4), None, 5, "params must be a dict"),
    ("NaN param", Linear, torch.rand(2, 4), None, {"stdev": float("nan")}, "not a finite number"),
    ("lambda as model", lambda: (lambda x: x), torch.rand(2, 4), None, None, "got function"),
    ("None as model", lambda: None, torch.rand(2, 4), None, None, "got NoneType"),
    ("model on the meta device", _meta_model, torch.rand(2, 4), None, None, "meta device"),
    ("float16 model", lambda: Linear().half(), torch.rand(2, 4), None, None, "float16 weights"),
]


@pytest.mark.parametrize("what,model,x,y,params,message", MISUSE, ids=[m[0] for m in MISUSE])
def test_python_api_misuse_is_one_clear_sentence(what, model, x, y, params, message):
    method = "smoothgrad" if isinstance(params, dict) else "saliency"
    with pytest.raises(XdlError, match=message) as info:
        xdl.explain(model(), method, x=x, y=y, params=params, save=False)
    assert "\n" not in str(info.value)


def test_huge_indices_and_seeds_from_python(digits_run):
    for options, message in [({"indices": [2**70]}, "out of range"), ({"indices": []}, "indices is empty"),
                             ({"seed": 2**70}, "64 bits"), ({"seed": "x"}, "seed must be an integer")]:
        with pytest.raises(XdlError, match=message):
            xdl.explain(digits_run, "saliency", save=False, **options)


# ------------------------------------------------------------------------------ files that must survive


def test_out_never_deletes_a_users_files(tmp_path):
    model, x = Linear(), torch.rand(3, 4)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(XdlError, match="not an xdl result"):
        xdl.explain(model, "saliency", x=x, out=mine)
    assert (mine / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(XdlError, match="is a file"):
        xdl.explain(model, "saliency", x=x, out=a_file)
    assert a_file.read_text() == "keep"
    first = xdl.explain(model, "saliency", x=x, out=tmp_path / "result")  # new folder
    again = xdl.explain(model, "saliency", x=x[:2], out=tmp_path / "result")  # an earlier result: replaced
    assert first.path == again.path and Result.load(again.path, arrays=True).arrays["attributions"].shape[0] == 2


def test_force_replaces_only_what_xdl_wrote(digits_run, tmp_path):
    run = Path(copy_run(digits_run, tmp_path / "run"))
    xdl.explain(run, "saliency", samples=2)
    (run / "explain" / "notes.md").write_text("my notes")
    (run / "report").mkdir(exist_ok=True)
    (run / "report" / "thesis.tex").write_text("my thesis")
    (run / "README.txt").write_text("my readme")
    xdl.train("digits", "mlp", run, force=True, quiet=True, epochs=1, data_options={"limit": 60},
              model_options={"hidden": [8]})
    assert (run / "explain" / "notes.md").read_text() == "my notes"
    assert (run / "report" / "thesis.tex").read_text() == "my thesis"
    assert (run / "README.txt").read_text() == "my readme"
    assert not (run / "explain" / "saliency").exists()  # the old run's result went with it
    assert Run(run).info["model"]["name"] == "mlp"


def test_concurrent_claims_get_distinct_folders(digits_run, tmp_path):
    run = Run(copy_run(digits_run, tmp_path / "run"))
    claimed, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        claimed.append(run.claim_result_dir("explain", "saliency"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed)) == 8
    assert {p.name for p in claimed} == {"saliency", *(f"saliency-{n}" for n in range(2, 9))}


def test_two_concurrent_explains_keep_both_results(digits_run, tmp_path):
    """Two explains of one method at once: each saves its own folder (the mkdir claim decides)."""
    run = copy_run(digits_run, tmp_path / "run")
    before = {p.parent.name for p in (run / "explain").glob("*/result.json")}
    barrier, results, errors = threading.Barrier(2), [], []

    def explain():
        barrier.wait()
        try:
            results.append(xdl.explain(str(run), "saliency", samples=2))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=explain) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({r.path for r in results}) == 2
    after = {p.parent.name for p in (run / "explain").glob("*/result.json")}
    assert len(after - before) == 2


def test_read_only_run_fails_before_the_work(digits_run, tmp_path, monkeypatch):
    run = Run(copy_run(digits_run, tmp_path / "run"))
    if os.geteuid() != 0:
        run.path.chmod(0o555)
        try:
            with pytest.raises(XdlError, match="read-only"):
                xdl.explain(run, "saliency", samples=2)
        finally:
            run.path.chmod(0o755)
    monkeypatch.setattr("xdl.runs.run.os.access", lambda path, mode: False)  # root writes anywhere: pretend
    with pytest.raises(XdlError, match="read-only"):
        xdl.explain(run, "saliency", samples=2)
    with pytest.raises(XdlError, match="read-only"):
        xdl.audit(run, only=["saliency"], samples=2, progress=False)


def test_a_failed_save_is_one_line(digits_run, tmp_path, monkeypatch):
    run = Run(copy_run(digits_run, tmp_path / "run"))

    def full_disk(self, folder):
        raise OSError(28, "No space left on device", str(folder))

    monkeypatch.setattr(Result, "save", full_disk)
    with pytest.raises(XdlError, match="No space left on device"):
        xdl.explain(run, "saliency", samples=2)


# ------------------------------------------------------------------------------ what xdl writes


def test_csv_cells_cannot_be_formulas(tmp_path):
    hostile = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]
    result = Result("m", "explain", tables={"t": [{"name": h, "value": -1.5} for h in hostile] + [{"=col": "plain"}]})
    result.save(tmp_path / "r")
    import csv

    rows = list(csv.reader((tmp_path / "r" / "t.csv").open(newline="")))
    assert rows[0] == ["name", "value", "'=col"]
    assert [r[0] for r in rows[1:-1]] == ["'" + h for h in hostile]
    assert all(r[1] == "-1.5" for r in rows[1:-1])  # numbers stay numbers


def test_json_is_strict_and_nan_is_null(tmp_path):
    result = Result("m", "explain", metrics={"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32("nan"), "d": 2.5})
    result.save(tmp_path / "r")
    saved = strict_loads((tmp_path / "r" / "result.json").read_text())
    assert saved["metrics"] == {"a": None, "b": [1.0, None], "c": None, "d": 2.5}


def test_nan_weights_are_refused(digits_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run = Path(copy_run(digits_run, tmp_path / "run"))
    state = load_file(run / "model.safetensors")
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 3)
    state[name].view(-1)[3] = float("inf")
    save_file(state, run / "model.safetensors")
    with pytest.raises(XdlError, match=f"non-finite weights.*{name}"):
        xdl.load(run).model


# ------------------------------------------------------------------------------ memory


def test_available_memory_is_read_without_psutil():
    from xdl.limits import available_memory

    free = available_memory()
    assert free is None or 1 << 20 < free < 1 << 50


def test_a_request_larger_than_free_memory_is_chunked_to_fit_or_refused(monkeypatch):
    model, x = Linear(64 * 64), torch.rand(4, 1, 64, 64)
    expected = xdl.explain(model, "ig", x=x, params={"steps": 50}, save=False).arrays["attributions"]
    # A machine with 1 MB free: IG's passes shrink to the rows that fit (16 KB each), same result.
    monkeypatch.setattr("xdl.limits.available_memory", lambda: 1 << 20)
    got = xdl.explain(model, "ig", x=x, params={"steps": 50}, save=False).arrays["attributions"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # With 16 KB free not even one row fits: refused before it allocates.
    monkeypatch.setattr("xdl.limits.available_memory", lambda: 16 << 10)
    with pytest.raises(XdlError, match=r"ig with steps=5000 on \d+ samples would need about .* lower steps"):
        xdl.explain(model, "ig", x=x, params={"steps": 5000}, save=False)


REFUSALS = r'''
import json, re, sys
import xdl.api
from xdl.cli.main import main


def peak():
    # VmHWM is this process image's own high-water mark. ru_maxrss is not: Linux carries the
    # forking parent's peak (here a pytest process of ~1 GB) across exec into the child's.
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


peaks = [["(imports, before any request)", peak()]]
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 2, (argv, exc.code)
    peaks.append([" ".join(argv[:1] + argv[2:])[:70], peak()])
print(json.dumps(peaks))
'''


def test_peak_memory_of_refused_huge_requests(digits_run, tmp_path):
    """Each huge request is refused well under 1 GB (VmHWM: the process's high-water mark so far)."""
    import gzip
    import struct

    run = copy_run(digits_run, tmp_path / "run")
    info = json.loads((Path(run) / "run.json").read_text())
    big = shutil.copytree(run, tmp_path / "big")
    (big / "run.json").write_text(json.dumps({**info, "model": {**info["model"], "name": "mlp",
                                                                "in_shape": [1, 4096, 4096], "hidden": [65536]}}))
    np.savez(tmp_path / "labels.npz", x=np.random.default_rng(0).random((20, 4)), y=np.array([0, 10**9] * 10))
    labels = bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(10)
    images = bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 4, 4) + bytes(160)
    for name, header in (("header", bytes([0, 0, 8, 4]) + struct.pack(">4I", *[65536] * 4)), ("bomb", images)):
        folder = tmp_path / name
        folder.mkdir()
        for file, data in [("train-images-idx3-ubyte", header), ("train-labels-idx1-ubyte", labels),
                           ("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)]:
            with gzip.open(folder / f"{file}.gz", "wb", compresslevel=1) as fh:
                fh.write(data)
                if name == "bomb" and file.startswith("train-images"):
                    for _ in range(16):  # 1 GB of zeros after the promised bytes, ~1 MB on disk
                        fh.write(bytes(64 << 20))
    out = ["--out", str(tmp_path / "never")]
    requests = [
        ["explain", str(run), "-m", "ig", "-p", "steps=100000000", "-q"],
        ["report", str(run), "-m", "calibration", "-p", "bins=1000000000", "-q"],
        ["explain", str(run), "-m", "lime", "-p", "num_samples=1000000000", "-q"],
        ["explain", str(big), "-q"],
        ["train", "-q", "--data", str(tmp_path / "labels.npz"), *out],
        ["train", "-q", "--data", "mnist", "--data-dir", str(tmp_path / "header"), *out],
        ["train", "-q", "--data", "mnist", "--data-dir", str(tmp_path / "bomb"), *out],
    ]
    proc = subprocess.run([sys.executable, "-c", REFUSALS, json.dumps(requests)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\npeak RSS after each refused request (cumulative high-water mark):")
    for what, peak in peaks:
        print(f"  {peak / 2**20:7.0f} MB  {what}")
    assert len(peaks) == len(requests) + 1 and max(p for _, p in peaks) < 1 << 30
