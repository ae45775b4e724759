"""Bad input everywhere: every command, malformed arguments and files → one line, exit 2.

One table drives the check (as captum's test_config.py does): each row is a command line
built from a workspace of deliberately broken files and runs. Every row must exit with
code 2, print exactly one line on stderr and no traceback, and leave every file that
existed before it byte-for-byte intact. The CLI runs in-process for speed; one subprocess
proves the installed entry point behaves the same. A hypothesis test then throws random
flag lists at every command and accepts only exit codes 0 and 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdl.analyzers.registry import discover, load_analyzer
from xdl.cli.main import COMMANDS, cli
from xdl.errors import XdlError

TRAIN = ["train", "-q", "--epochs", "1", "--limit", "60"]


def run_cli(capsys, argv: list) -> tuple[int, str, str]:
    from xdl.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def loadable(kind: str) -> str | None:
    """A method of ``kind`` that imports now (analyzers are added by others over time)."""
    for info in discover(kind):
        try:
            load_analyzer(kind, info.name)
            return info.name
        except XdlError:
            continue
    return None


# ------------------------------------------------------------------------------ workspace


def _png(path: Path, size: tuple[int, int], value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _run_variant(good: Path, root: Path, name: str, edit) -> Path:
    target = shutil.copytree(good, root / name)
    edit(target)
    return target


def build_workspace(root: Path, good_run: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    y = np.arange(40) % 2
    w = {"root": root, "run": shutil.copytree(good_run, root / "run")}

    (root / "empty.csv").write_bytes(b"")
    (root / "empty.npz").write_bytes(b"")
    (root / "latin1.csv").write_bytes("name,y\ncaf\xe9,1\nna\xefve,0\n".encode("latin-1"))
    (root / "nan_target.csv").write_text("a,b,y\n1,2,1\n3,4,\n5,6,0\n7,8,1\n")
    (root / "one_class.csv").write_text("a,y\n1,1\n2,1\n3,1\n")
    (root / "header_only.csv").write_text("a,y\n")
    (root / "garbage.npz").write_bytes(os.urandom(256))
    (root / "pickled.npz").write_bytes(pickle.dumps({"x": x, "y": y}))
    for name, arrays in {
        "flat_x": {"x": np.arange(40.0), "y": y},
        "string_x": {"x": np.array(["a"] * 40).reshape(40, 1), "y": y},
        "float_pixels": {"x": x.astype(np.float32) * 3.0, "y": y},
        "nan_pixels": {"x": np.where(x > 200, np.nan, x / 255.0), "y": y},
        "negative_labels": {"x": x, "y": y - 1},
        "fractional_labels": {"x": x, "y": y + 0.5},
        "labels_beyond_names": {"x": x, "y": y * 5, "class_names": np.array(["a", "b"])},
        "short_labels": {"x": x, "y": y[:-3]},
        "two_d_labels": {"x": x, "y": y.reshape(20, 2)},
        "no_y": {"x": x},
        "one_class": {"x": x, "y": np.zeros(40, dtype=int)},
        "five_channels": {"x": rng.random((40, 5, 8, 9)), "y": y},
        "test_shape_mismatch": {"x": x, "y": y, "x_test": x[:, :4], "y_test": y},
    }.items():
        w[name] = _npz(root / f"{name}.npz", **arrays)

    mixed = root / "mixed_sizes"
    for i in range(3):
        _png(mixed / "a" / f"{i}.png", (8, 8))
        _png(mixed / "b" / f"{i}.png", (8, 8) if i else (9, 7))
    looped = root / "symlink_loop"
    for i in range(3):
        _png(looped / "a" / f"{i}.png", (8, 8))
        _png(looped / "b" / f"{i}.png", (8, 8))
    (looped / "a" / "again").symlink_to(looped / "a", target_is_directory=True)  # a directory cycle
    (looped / "b" / "self.png").symlink_to(looped / "b" / "self.png")  # ELOOP on open
    broken = root / "corrupt_image"
    for i in range(4):  # enough good images to split, so the corrupt one is read
        _png(broken / "a" / f"{i}.png", (8, 8))
        _png(broken / "b" / f"{i + 1}.png", (8, 8))
    (broken / "b" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    one = root / "one_class_folder"
    _png(one / "a" / "0.png", (8, 8))
    (root / "no_images").mkdir()
    (root / "no_images" / "a").mkdir()
    (root / "a_file").write_text("not a directory\n")

    good = w["run"]
    info = json.loads((good / "run.json").read_text())
    w["newer_run"] = _run_variant(
        good, root, "newer_run", lambda p: (p / "run.json").write_text(json.dumps({**info, "format_version": 99}))
    )
    w["not_json_run"] = _run_variant(good, root, "not_json_run", lambda p: (p / "run.json").write_text("{not json"))
    w["binary_json_run"] = _run_variant(good, root, "binary_json_run", lambda p: (p / "run.json").write_bytes(b"\xff\xfe\x00{"))
    w["list_json_run"] = _run_variant(good, root, "list_json_run", lambda p: (p / "run.json").write_text("[1, 2]"))
    w["bare_json_run"] = _run_variant(good, root, "bare_json_run", lambda p: (p / "run.json").write_text('{"format_version": 1}'))
    w["truncated_run"] = _run_variant(
        good, root, "truncated_run",
        lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:300]),
    )
    w["no_weights_run"] = _run_variant(good, root, "no_weights_run", lambda p: (p / "model.safetensors").unlink())
    w["pickle_weights_run"] = _run_variant(
        good, root, "pickle_weights_run", lambda p: torch.save({"w": torch.zeros(1)}, p / "model.safetensors")
    )
    w["wrong_weights_run"] = _run_variant(
        good, root, "wrong_weights_run",
        lambda p: (p / "run.json").write_text(json.dumps({**info, "model": {**info["model"], "hidden": 7}})),
    )
    w["lost_data_run"] = _run_variant(
        good, root, "lost_data_run",
        lambda p: (p / "run.json").write_text(json.dumps({**info, "data": {"name": "npz", "path": str(root / "gone.npz"), "seed": 0}})),
    )
    w["changed_data_run"] = _run_variant(  # data that no longer matches the digest stored at training
        good, root, "changed_data_run",
        lambda p: (p / "run.json").write_text(json.dumps({**info, "data_sha256": "0" * 64})),
    )
    (root / "no_run").mkdir()
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 3)}, root / "other.safetensors")
    (root / "text.pt").write_text("not a checkpoint")
    return w


# ------------------------------------------------------------------------------ the table

BAD_RUNS = ["missing", "no_run", "a_file", "newer_run", "not_json_run", "binary_json_run", "list_json_run", "bare_json_run"]
BAD_WEIGHTS = ["truncated_run", "no_weights_run", "pickle_weights_run", "wrong_weights_run"]


def cases(w: dict[str, Path]) -> list[tuple[str, str, list]]:
    """(command, what is wrong, argv) rows."""
    r = w["root"]
    rows: list[tuple[str, str, list]] = []

    def add(command: str, what: str, *argv) -> None:
        rows.append((command, what, list(argv)))

    # train: data files
    add("train", "empty csv", *TRAIN, "--data", r / "empty.csv", "--target", "y")
    add("train", "csv header only", *TRAIN, "--data", r / "header_only.csv", "--target", "y")
    add("train", "non-UTF-8 csv", *TRAIN, "--data", r / "latin1.csv", "--target", "y")
    add("train", "csv NaN targets", *TRAIN, "--data", r / "nan_target.csv", "--target", "y")
    add("train", "csv one class", *TRAIN, "--data", r / "one_class.csv", "--target", "y")
    add("train", "csv missing target column", *TRAIN, "--data", r / "one_class.csv", "--target", "nope")
    add("train", "csv without --target", *TRAIN, "--data", r / "one_class.csv")
    add("train", "missing csv", *TRAIN, "--data", r / "nowhere.csv", "--target", "y")
    add("train", "empty npz", *TRAIN, "--data", r / "empty.npz")
    add("train", "random bytes npz", *TRAIN, "--data", r / "garbage.npz")
    add("train", "pickle disguised as npz", *TRAIN, "--data", r / "pickled.npz")
    for name in ("flat_x", "string_x", "float_pixels", "nan_pixels", "negative_labels", "fractional_labels",
                 "labels_beyond_names", "short_labels", "two_d_labels", "no_y", "one_class", "five_channels",
                 "test_shape_mismatch"):
        add("train", f"npz {name.replace('_', ' ')}", *TRAIN, "--data", w[name])
    add("train", "--sensitive on npz", *TRAIN, "--data", w["negative_labels"], "--sensitive", "a")
    add("train", "images of mixed sizes", *TRAIN, "--data", r / "mixed_sizes")
    add("train", "symlink loop in image folder", *TRAIN, "--data", r / "symlink_loop")
    add("train", "corrupt image", *TRAIN, "--data", r / "corrupt_image")
    add("train", "one class folder", *TRAIN, "--data", r / "one_class_folder")
    add("train", "folder without images", *TRAIN, "--data", r / "no_images")
    add("train", "unknown dataset name", *TRAIN, "--data", "imagenet")
    # train: arguments
    for flag, value in [("--epochs", "0"), ("--epochs", "-3"), ("--epochs", "x"), ("--lr", "0"), ("--lr", "nan"),
                        ("--lr", "inf"), ("--batch-size", "0"), ("--dropout", "1.5"), ("--hidden", "0"),
                        ("--hidden", "a,b"), ("--channels", "-3"), ("--augment", "bogus"), ("--activation", "bogus"),
                        ("--model", "nonsense"), ("--model", ".relative:factory"), ("--model", ":"),
                        ("--model", "os:getcwd"), ("--optimizer", "bogus"), ("--schedule", "bogus"),
                        ("--device", "quantum"), ("--limit", "0"), ("--label-smoothing", "1"), ("--mixup", "-1"),
                        ("--weight-decay", "nan"), ("--seed", "abc"), ("--no-such-flag", "1")]:
        add("train", f"{flag} {value}", *TRAIN, flag, value, "--out", r / "new-run")
    if not torch.cuda.is_available():
        add("train", "--device cuda without a GPU", *TRAIN, "--device", "cuda")
    add("train", "--out is a file", *TRAIN, "--out", r / "a_file")
    add("train", "--out holds a run", *TRAIN, "--out", w["run"])
    add("train", "--init-weights missing", *TRAIN, "--init-weights", r / "nowhere.pt", "--out", r / "new-run")
    add("train", "--init-weights text as .pt", *TRAIN, "--init-weights", r / "text.pt", "--out", r / "new-run")
    add("train", "--init-weights of another model", *TRAIN, "--init-weights", r / "other.safetensors", "--out", r / "new-run")
    add("train", "--init-weights not weights", *TRAIN, "--init-weights", r / "one_class.csv", "--out", r / "new-run")
    add("train", "--resume a finished run", "train", "--resume", w["run"])
    add("train", "--resume no run", "train", "--resume", r / "no_run")
    add("train", "--resume with another --out", "train", "--resume", r / "no_run", "--out", r / "x")

    # every command that reads a run: broken run directories
    readers = {"info": [], "audit": ["--only", "saliency", "-n", "2", "-q"]}
    for kind in ("explain", "attack", "report"):
        method = loadable(kind)
        if method:
            readers[kind] = ["--method", method, "-n", "2", "-q"]
    for command, extra in readers.items():
        for name in BAD_RUNS:
            add(command, f"run: {name.replace('_', ' ')}", command, w.get(name, r / name), *extra)
        if command != "info":  # info shows a run's record, which needs no weights
            for name in BAD_WEIGHTS + ["lost_data_run"]:
                add(command, f"run: {name.replace('_', ' ')}", command, w[name], *extra)
    add("audit", "--samples 0", "audit", w["run"], "--samples", "0")
    add("audit", "--eps 0", "audit", w["run"], "--eps", "0")
    add("audit", "--only unknown analyzer", "audit", w["run"], "--only", "nothing-at-all")
    add("audit", "--device bogus", "audit", w["run"], "--device", "bogus")
    add("info", "extra argument", "info", w["run"], "surplus")

    # analyzer arguments on a good run
    for kind in ("explain", "attack", "report"):
        method = loadable(kind)
        if not method:
            continue
        base = [kind, w["run"], "--method", method, "-q"]
        add(kind, "unknown method", kind, w["run"], "--method", "no-such-method")
        for flag, value in [("--samples", "0"), ("--samples", "-4"), ("--samples", "many"), ("--indices", "99999"),
                            ("--indices", "-1"), ("--indices", "a,b"), ("--target", "99"), ("--target", "-1"),
                            ("--target", "best"), ("--split", "everything"), ("--param", "no-equals-sign"),
                            ("--param", "no_such_param=1"), ("--device", "bogus"), ("--seed", "x"),
                            ("--batch-size", "0")]:
            add(kind, f"{flag} {value}", *base, flag, value)
        if kind == "attack":
            add(kind, "--eps -1", *base, "--eps", "-1")
            add(kind, "--eps abc", *base, "--eps", "abc")

    add("plugins", "extra argument", "plugins", "surplus")
    add("plugins", "unknown option", "plugins", "--bogus")
    add("xdl", "unknown command", "frobnicate")
    add("xdl", "unknown global option", "--bogus")

    # --- provenance (issue 16): a run whose data changed since training is refused, not re-read silently
    for kind in ("explain", "attack", "report"):
        if loadable(kind):
            add(kind, "run: data changed since training", kind, w["changed_data_run"], "--method", loadable(kind), "-n", "2", "-q")
    add("audit", "run: data changed since training", "audit", w["changed_data_run"], "-q")
    return rows


# ------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def workspace(digits_run, tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("matrix"), digits_run.path)


def test_every_command_is_in_the_matrix(workspace):
    covered = {command for command, _, _ in cases(workspace)}
    assert set(COMMANDS) <= covered


def test_bad_input_matrix(workspace, capsys):
    """Every row: exit 2, one stderr line, no traceback, no existing file changed."""
    rows = cases(workspace)
    before = digest(workspace["root"])
    failures = []
    per_command: dict[str, list[int]] = {}
    for command, what, argv in rows:
        problems = []
        try:
            code, _, err = run_cli(capsys, argv)
        except Exception as exc:  # noqa: BLE001 - a crash is this row's failure, not the matrix's
            code, err = None, ""
            problems.append(f"uncaught {type(exc).__name__}: {exc}")
            capsys.readouterr()
        after = digest(workspace["root"])
        damaged = [k for k, v in before.items() if after.get(k) != v]
        if code is not None and code != 2:
            problems.append(f"exit {code}")
        if code is not None and (len(err.strip().splitlines()) != 1 or "Traceback" in err):
            problems.append(f"stderr {err.strip()[:300]!r}")
        if damaged:
            problems.append(f"changed {damaged[:3]}")
        tally = per_command.setdefault(command, [0, 0])
        tally[0] += 1
        tally[1] += not problems
        if problems:
            failures.append(f"{command} [{what}]: {'; '.join(problems)}")
        # A fresh --out may be created by a row that fails late; it must not leak into the next.
        shutil.rmtree(workspace["root"] / "new-run", ignore_errors=True)
    passing = len(rows) - len(failures)
    table = ", ".join(f"{c} {p}/{t}" for c, (t, p) in per_command.items())
    print(f"\nbad-input matrix: {len(rows)} cases tried, {passing} passing ({table})")
    assert not failures, "\n".join(failures)


def test_one_error_line_from_the_installed_entry_point(tmp_path):
    """The real process (``python -m xdl``) refuses a hostile .pt with one line and exit 2."""
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"payload": Payload()}, evil)
    argv = [*TRAIN, "--init-weights", str(evil), "--out", str(tmp_path / "r")]
    proc = subprocess.run([sys.executable, "-m", "xdl", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("xdl: error: refusing"), proc.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------ property test


def option_specs(name: str) -> list[tuple[str, bool]]:
    """(flag, takes a value) for each option of a command, read from its click definition."""
    command = cli.get_command(None, name)
    specs = []
    for param in command.params:
        if param.param_type_name != "option":
            continue
        for flag in param.opts + param.secondary_opts:
            specs.append((flag, not param.is_flag))
    return specs


VALUES = st.one_of(
    st.sampled_from(["0", "-1", "1", "2", "0.5", "nan", "inf", "-inf", "1e9", "", "a,b", "1,2", ",", "auto", "cpu",
                     "mlp", "cnn", "x:y", ".x:y", "eps=0.1", "eps=", "=", "steps=-1", "predicted", "true", "test",
                     "saliency", "fgsm", "bias", "\x00", "é", "../..", "/dev/null"]),
    st.integers(-3, 40).map(str),
    st.text(max_size=8),
)
# Flags that could make a random example train or analyze for long are pinned at the end
# (click keeps the last value given for an option).
PINNED = {
    "train": ["--data", "digits", "--limit", "50", "--epochs", "1", "--batch-size", "64", "-q", "--hidden", "8",
              "--channels", "4", "--force"],
    "explain": ["-n", "2", "-q"],
    "attack": ["-n", "2", "-q"],
    "report": ["-n", "8", "-q"],
    "audit": ["--only", "saliency", "-n", "2", "-q"],
}


@st.composite
def argument_lists(draw, run: str, out: str) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMANDS)))
    specs = option_specs(command)
    argv = [command]
    if command in ("explain", "attack", "report", "audit", "info"):
        argv.append(draw(st.sampled_from([run, run, "/nonexistent", "", "-"])))
    for _ in range(draw(st.integers(0, 5))):
        flag, takes_value = draw(st.sampled_from(specs)) if specs and draw(st.integers(0, 9)) else ("--junk", True)
        if flag in ("--help", "-h", "--version", "--resume", "--out", "--data-dir"):
            continue
        argv.append(flag)
        if takes_value or draw(st.booleans()):
            argv.append(draw(VALUES))
    if command == "train":
        argv += ["--out", out]
    return argv + PINNED.get(command, [])


@pytest.fixture(scope="module")
def scratch_run(digits_run, tmp_path_factory):
    return shutil.copytree(digits_run.path, tmp_path_factory.mktemp("property") / "run")


def test_random_arguments_never_crash(scratch_run, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("property-train") / "run"
    codes = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(argv=argument_lists(str(scratch_run), str(out)))
    def check(argv):
        code, _, err = run_cli(capsys, argv)
        codes.append(code)
        assert code in (0, 2), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:
            assert len(err.strip().splitlines()) == 1, (argv, err)

    check()
    print(f"\nrandom argument lists: {len(codes)} tried, exit 0: {codes.count(0)}, exit 2: {codes.count(2)}")


@pytest.mark.parametrize("samples", [1, 2])
def test_bias_report_on_one_or_two_samples_refuses(scratch_run, capsys, samples):
    code, _, err = run_cli(capsys, ["report", scratch_run, "--method", "bias", "-n", samples, "-q", "--force"])
    assert code == 2 and "at least 4 samples" in err, err
