"""Bad input everywhere: every command, malformed arguments and files → one line, exit 2.

One table drives the check (as captum's test_config.py does): each row is a command line
built from a workspace of deliberately broken files and runs. Every row must exit with
code 2, print exactly one line on stderr and no traceback, and leave every file that
existed before it byte-for-byte intact. The CLI runs in-process for speed; one subprocess
proves the installed entry point behaves the same. A hypothesis test then throws random
flag lists at every command and accepts only exit codes 0 and 2.

Startup: `xdl --help` must not wait for torch, and `import xdl` must not pull plotting or SHAP/LIME.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdl.analysis.registry import discover, load_analyzer
from xdl.cli.main import COMMANDS, cli
from xdl.errors import XdlError

# -----------------------------------------------------------------------------------------
# cli matrix
# -----------------------------------------------------------------------------------------


TRAIN = ["train", "-q", "--epochs", "1", "--limit", "60"]


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
    security_workspace(root, w, info)
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
    add("compare", "a single run", "compare", w["run"], "--out", r / "compared")
    add("compare", "a folder that is not a run", "compare", w["run"], r, "--out", r / "compared")
    add("compare", "the same run twice", "compare", w["run"], w["run"], "--out", r / "compared")
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

    # ---- differential privacy (xdl train --dp-epsilon, xdl/training/dp.py) ----
    for flags in (["--dp-epsilon", "0"], ["--dp-epsilon", "-1"], ["--dp-epsilon", "nan"], ["--dp-epsilon", "inf"],
                  ["--dp-epsilon", "3", "--dp-delta", "0.5"],  # δ ≥ 1/N for the ~40 training rows
                  ["--dp-epsilon", "3", "--dp-delta", "0"], ["--dp-epsilon", "3", "--dp-max-grad-norm", "0"],
                  ["--dp-epsilon", "3", "--mixup", "0.2"], ["--dp-epsilon", "3", "--grad-clip", "1"]):
        add("train", " ".join(flags), *TRAIN, *flags, "--out", r / "new-run")
    # ---- end of differential privacy ----

    # ---- issue 17: AutoAttack, APGD, Square, corruptions, --audit-attack, --adv-step ----
    attack = ["attack", w["run"], "-n", "2", "-q", "--method"]
    add("attack", "autoattack norm=l3", *attack, "autoattack", "-p", "norm=l3")
    add("attack", "autoattack steps=0", *attack, "autoattack", "-p", "steps=0")
    add("attack", "autoattack queries=-1", *attack, "autoattack", "-p", "queries=-1")
    add("attack", "apgd loss=mse", *attack, "apgd", "-p", "loss=mse")
    add("attack", "apgd restarts=0", *attack, "apgd", "-p", "restarts=0")
    add("attack", "square queries=0", *attack, "square", "-p", "queries=0")
    add("attack", "square eps beyond the pixel range", *attack, "square", "--eps", "2")
    add("attack", "corruptions unknown type", *attack, "corruptions", "-p", "types=snow")
    add("attack", "corruptions severity 6", *attack, "corruptions", "-p", "severities=6")
    add("audit", "--audit-attack fab", "audit", w["run"], "--audit-attack", "fab")
    add("train", "--adv-step 0", *TRAIN, "--adv-train", "fgsm", "--adv-step", "0", "--out", r / "new-run")

    add("plugins", "extra argument", "plugins", "surplus")
    add("plugins", "unknown option", "plugins", "--bogus")
    add("xdl", "unknown command", "frobnicate")
    add("xdl", "unknown global option", "--bogus")

    # data-quality reports (labels, duplicates, ood) and report --data
    for method, flag, value in [("ood", "--data", r / "no-such.npz"), ("ood", "--data", r / "garbage.npz"),
                                ("ood", "--data", r / "flat_x.npz"), ("labels", "--data", r / "flat_x.npz"),
                                ("labels", "--param", "folds=1"), ("labels", "--param", "rank_by=luck"),
                                ("duplicates", "--param", "feature_threshold=2"), ("duplicates", "--param", "chunk=0"),
                                ("ood", "--param", "temperature=0")]:
        add("report", f"{method} {flag} {value}", "report", w["run"], "--method", method, "-q", flag, value)

    # ---- xdl import (issue 14): models xdl did not train ----
    m = _import_workspace(r)
    imp = ["import", "-q", "--out", r / "new-run"]
    add("import", "unknown MODEL form", *imp, r / "one_class.csv")
    add("import", "missing .pt2", *imp, r / "nowhere.pt2")
    add("import", "hf: folder without config.json", *imp, f"hf:{r / 'no_images'}")
    add("import", "folder without images", *imp, m["logits"], "--data", r / "no_images")
    add("import", "weights that do not fit", *imp, "matrix_models:tiny", "--weights", m["misfit"], "--trust-code")
    add("import", "factory without --trust-code", *imp, "matrix_models:tiny", "--weights", m["misfit"])
    add("import", "--weights with a .pt2", *imp, m["logits"], "--weights", m["misfit"])
    add("import", "output is not class scores", *imp, m["one_output"])
    add("import", "input size the model rejects", *imp, m["sixteen"], "--input-size", "8")
    add("import", "data size differs from the model's", *imp, m["sixteen"])
    add("import", "--normalize bogus", *imp, m["logits"], "--normalize", "bright")
    add("import", "--classes too few", *imp, m["logits"], "--classes", "a,b")
    add("import", "--out holds a run", "import", "-q", m["logits"], "--out", w["run"])

    # Issue 14, streamed image folders: image options and a broken file found by the header probe.
    add("train", "--input-size 0", *TRAIN, "--data", r / "mixed_sizes", "--input-size", "0")
    add("train", "--input-size abc", *TRAIN, "--data", r / "mixed_sizes", "--input-size", "abc")
    add("train", "--color purple", *TRAIN, "--data", r / "mixed_sizes", "--color", "purple")
    add("train", "corrupt image with --input-size", *TRAIN, "--data", r / "corrupt_image", "--input-size", "8")

    # --- provenance (issue 16): a run whose data changed since training is refused, not re-read silently
    for kind in ("explain", "attack", "report"):
        if loadable(kind):
            add(kind, "run: data changed since training", kind, w["changed_data_run"], "--method", loadable(kind), "-n", "2", "-q")
    add("audit", "run: data changed since training", "audit", w["changed_data_run"], "-q")

    security_rows(w, add)
    return rows


# ------------------------------------------------------------------------------ security (issue 15)
# Hostile runs, data that would exhaust memory, and commands that could delete a user's files.
# Every row below is one finding of the security review; each must end in one line and exit 2.


def security_workspace(root: Path, w: dict[str, Path], info: dict) -> None:
    import gzip
    import struct

    good = w["run"]

    def with_model(folder: str, **model) -> None:
        w[folder] = _run_variant(good, root, folder, lambda p: (p / "run.json").write_text(
            json.dumps({**info, "model": {**info["model"], **model}})))

    def with_json(name: str, text: str) -> None:
        w[name] = _run_variant(good, root, name, lambda p: (p / "run.json").write_text(text))

    # The payload: a user factory named by run.json, and variants that pass the schema.
    with_model("payload_run", name="custom", factory="subprocess:call", in_shape=["sh", "-c", f"id > {root}/pwned"])
    with_model("factory_run", name="custom", factory="subprocess:call", kwargs={"shell": True})
    with_model("popen_run", name="custom", factory="subprocess:Popen", kwargs={"shell": True})
    with_model("huge_shape_run", in_shape=[1, 100000, 100000])
    with_model("negative_shape_run", in_shape=[1, -8, 8])
    with_model("float_classes_run", num_classes=1e12)
    with_model("huge_classes_run", num_classes=10**12)
    with_model("path_name_run", name="../../etc")
    with_model("string_hidden_run", hidden="lots")
    with_model("huge_mlp_run", name="mlp", in_shape=[1, 4096, 4096], hidden=[65536])
    with_json("nested_run", '{"format_version": 1, "model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with_json("path_data_run", json.dumps({**info, "data": {**info["data"], "name": "../../etc"}}))
    with_json("negative_seed_run", json.dumps({**info, "train": {**info["train"], "seed": -1}}))

    def nan_weights(p: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(p / "model.safetensors")
        key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
        state[key].view(-1)[0] = float("nan")
        save_file(state, p / "model.safetensors")

    w["nan_weights_run"] = _run_variant(good, root, "nan_weights_run", nan_weights)
    w["explain_file_run"] = _run_variant(
        good, root, "explain_file_run", lambda p: (shutil.rmtree(p / "explain", ignore_errors=True), (p / "explain").write_text("mine\n")))

    def unfinished_factory(p: Path) -> None:
        (p / "run.json").unlink()
        config = json.loads((p / "checkpoint" / "config.json").read_text())
        config["model"] = {"name": "custom", "factory": "subprocess:call", "kwargs": {"shell": True}}
        (p / "checkpoint" / "config.json").write_text(json.dumps(config))

    w["unfinished_factory_run"] = _run_variant(good, root, "unfinished_factory_run", unfinished_factory)
    theirs = root / "thesis"  # a user's folder: --force must not touch it
    (theirs / "report").mkdir(parents=True)
    (theirs / "report" / "thesis.tex").write_text("\\documentclass{article}\n")
    (theirs / "explain").mkdir()
    (theirs / "explain" / "notes.md").write_text("# notes\n")
    stray = root / "stray"  # files named like a run's, but no run
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"their weights")
    (stray / "history.csv").write_text("their,history\n")

    (root / "two_rows.csv").write_text("a,y\n1,0\n2,1\n")
    (root / "target_inf.csv").write_text("a,y\n" + "".join(f"{i},{'inf' if i == 3 else i % 2}\n" for i in range(12)))
    (root / "feature_1e400.csv").write_text("a,y\n" + "".join(f"{'1e400' if i == 3 else i},{i % 2}\n" for i in range(12)))
    for label in "ab":
        for i in range(6):
            _png(root / "one_pixel" / label / f"{i}.png", (1, 1), value=40 * i)
    _npz(root / "labels_1e9.npz", x=np.random.default_rng(0).random((20, 4)), y=np.array([0, 10**9] * 10))
    (root / "five_bytes.npz").write_bytes(b"hello")

    def idx(folder: Path, train_images: bytes, gz: bool = False) -> None:
        folder.mkdir()
        labels = bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(range(10))
        images = bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 4, 4) + bytes(160)
        for name, data in [("train-images-idx3-ubyte", train_images), ("train-labels-idx1-ubyte", labels),
                           ("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)]:
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data, 1) if gz else data)

    idx(root / "idx_huge_header", bytes([0, 0, 8, 4]) + struct.pack(">4I", 65536, 65536, 65536, 65536))
    # A gzip that inflates 160 bytes of images plus 64 MB of zeros: read while streaming, refused early.
    idx(root / "idx_gzip_bomb", bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 4, 4) + bytes(160 + (64 << 20)), gz=True)
    if os.geteuid() != 0:  # root writes through any permission bits
        w["readonly_run"] = _run_variant(good, root, "readonly_run", lambda p: p.chmod(0o555))


def security_rows(w: dict[str, Path], add) -> None:
    r = w["root"]
    readers = {"explain": ["--method", "saliency"], "attack": ["--method", "fgsm"], "report": ["--method", "calibration"],
               "audit": ["--only", "saliency"]}
    for command, extra in readers.items():
        for name in ("payload_run", "factory_run", "popen_run"):
            add(command, f"run: {name.replace('_', ' ')} without --trust-code", command, w[name], *extra, "-n", "2", "-q")
    for name in ("huge_shape_run", "negative_shape_run", "float_classes_run", "huge_classes_run", "path_name_run",
                 "string_hidden_run", "huge_mlp_run", "nested_run", "path_data_run", "negative_seed_run",
                 "nan_weights_run", "explain_file_run"):
        add("explain", f"run: {name.replace('_', ' ')}", "explain", w[name], "-n", "2", "-q")
    add("info", "run: nested brackets", "info", w["nested_run"])
    add("info", "run: path as model name", "info", w["path_name_run"])
    add("audit", "run: explain/ is a file", "audit", w["explain_file_run"], "--only", "saliency", "-n", "2", "-q")
    if "readonly_run" in w:
        add("explain", "read-only run", "explain", w["readonly_run"], "-n", "2", "-q")
        add("audit", "read-only run", "audit", w["readonly_run"], "--only", "saliency", "-n", "2", "-q")
    add("train", "--resume of a run naming a factory, without --trust-code", "train", "--resume", w["unfinished_factory_run"])
    add("train", "--force on a folder that is not a run", *TRAIN, "--out", r / "thesis", "--force")
    add("train", "--out with stray model.safetensors/history.csv", *TRAIN, "--out", r / "stray")
    base = ["-n", "2", "-q"]
    for kind, method, param in [("explain", "ig", "steps=100000000"), ("explain", "ig", "steps=1e30"),
                                ("report", "calibration", "bins=1000000000"), ("attack", "pgd", "step_size=nan"),
                                ("report", "overfit", "gap=nan"), ("explain", "smoothgrad", "stdev=nan"),
                                ("explain", "lime", "num_samples=1000000000"), ("report", "bias", "bootstrap=1e400"),
                                ("explain", "ig", "steps=1180591620717411303424")]:
        add(kind, f"{method} -p {param}", kind, w["run"], "--method", method, "-p", param, *base)
    add("attack", "--eps nan", "attack", w["run"], "--eps", "nan", *base)
    add("attack", "--eps 0.1,nan", "attack", w["run"], "--eps", "0.1,nan", *base)
    add("attack", "--eps inf", "attack", w["run"], "--eps", "inf", *base)
    add("explain", "--indices ''", "explain", w["run"], "--indices", "", *base)
    add("explain", "--indices 2**70", "explain", w["run"], "--indices", str(2**70), *base)
    add("explain", "--seed 2**70", "explain", w["run"], "--seed", str(2**70), *base)
    add("train", "--seed 2**70", *TRAIN, "--seed", str(2**70), "--out", r / "new-run")
    add("train", "--hidden 1000000000", *TRAIN, "--model", "mlp", "--hidden", "1000000000", "--out", r / "new-run")
    add("train", "--hidden 20 layers of 65536 (1.3 TB, over free memory)", *TRAIN, "--model", "mlp",
        "--hidden", ",".join(["65536"] * 20), "--out", r / "new-run")
    add("train", "--adv-eps nan", *TRAIN, "--adv-train", "fgsm", "--adv-eps", "nan", "--out", r / "new-run")
    for name, what in [("two_rows.csv", "2-row csv"), ("target_inf.csv", "csv target inf"),
                       ("feature_1e400.csv", "csv 1e400 feature")]:
        add("train", what, *TRAIN, "--data", r / name, "--target", "y", "--out", r / "new-run")
    add("train", "folder of 1×1 images", *TRAIN, "--data", r / "one_pixel", "--out", r / "new-run")
    add("train", "npz labels up to 1e9", *TRAIN, "--data", r / "labels_1e9.npz", "--out", r / "new-run")
    add("train", "5-byte non-zip npz", *TRAIN, "--data", r / "five_bytes.npz", "--out", r / "new-run")
    add("train", "IDX header 65536⁴", *TRAIN, "--data", "mnist", "--data-dir", r / "idx_huge_header", "--out", r / "new-run")
    add("train", "IDX gzip bomb", *TRAIN, "--data", "mnist", "--data-dir", r / "idx_gzip_bomb", "--out", r / "new-run")


def _import_workspace(root: Path) -> dict[str, Path]:
    """torch.export programs and a user factory for the import rows (written once)."""
    from safetensors.torch import save_file
    from torch import nn

    files = {name: root / f"{name}.pt2" for name in ("logits", "one_output", "sixteen")}
    files["misfit"] = root / "misfit.safetensors"
    if all(p.exists() for p in files.values()):
        return files
    head = lambda k: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, k))
    batch = {0: torch.export.Dim("batch")}
    for name, net, side in (("logits", head(10), 8), ("one_output", head(1), 8), ("sixteen", head(10), 16)):
        program = torch.export.export(net.eval(), (torch.rand(2, 1, side, side),), dynamic_shapes=(batch,))
        if name == "sixteen":  # a model that checks its input size, as ViTs do
            program = torch.export.export(net.eval(), (torch.rand(2, 1, 16, 16),))
        torch.export.save(program, files[name])
    (root / "matrix_models.py").write_text(
        "from torch import nn\n\ndef tiny(in_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))\n"
    )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    save_file(nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10)).state_dict(), files["misfit"])
    return files


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
            code, _, err = run_cli(capsys, *argv)
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
        code, _, err = run_cli(capsys, *argv)
        codes.append(code)
        assert code in (0, 2), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:
            assert len(err.strip().splitlines()) == 1, (argv, err)

    check()
    print(f"\nrandom argument lists: {len(codes)} tried, exit 0: {codes.count(0)}, exit 2: {codes.count(2)}")


@pytest.mark.parametrize("samples", [1, 2])
def test_bias_report_on_one_or_two_samples_refuses(scratch_run, capsys, samples):
    code, _, err = run_cli(capsys, *["report", scratch_run, "--method", "bias", "-n", samples, "-q", "--force"])
    assert code == 2 and "at least 4 samples" in err, err

# -----------------------------------------------------------------------------------------
# startup
# -----------------------------------------------------------------------------------------


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
