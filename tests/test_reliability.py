"""Nothing lost, nothing executed: hostile weights, kill -9 during training, resume, divergence.

The kill test drives the real entry point (``python -m xdl``) in subprocesses; everything
else calls the CLI in-process for speed.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import xdl
from xdl.runs import checkpoint
from xdl.errors import XdlError
from xdl.models.builders import load_user_weights
from xdl.runs.run import Run
from xdl.training.steps import TrainingDiverged

# Small enough for ~1 s of training, long enough (many epochs) for a kill to land mid-run.
TINY = ["--data", "digits", "--limit", "300", "--model", "mlp", "--hidden", "16", "--batch-size", "32", "-q"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    from xdl.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


class Payload:
    """Unpickling this runs a shell command: what a hostile checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


# ---------------------------------------------------------------------------- no code from files


def test_hostile_pt_weights_are_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    torch.save({"0.weight": torch.zeros(2), "payload": Payload(marker)}, evil)

    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--init-weights", evil, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "refusing to load", "evil.pt")
    assert not marker.exists()
    assert not (tmp_path / "run" / "run.json").exists()

    # The payload is real: an unrestricted unpickler would have run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_run_whose_model_file_is_a_pickle_is_refused(digits_run, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    run_dir = shutil.copytree(digits_run.path, tmp_path / "run")
    (run_dir / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))

    with pytest.raises(XdlError, match="cannot read weights"):
        Run(run_dir).model
    code, _, err = run_cli(capsys, "explain", run_dir, "--method", "saliency", "-n", "2", "-q")
    assert_one_line_error(code, err, "model.safetensors")
    assert not marker.exists()
    assert not (run_dir / "explain").exists()


def test_user_weights_load_from_safetensors_and_pt(digits_run, tmp_path):
    state = digits_run.model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        fresh = xdl.build_model(digits_run.info["model"], digits_run.info["model"]["in_shape"], 10)
        load_user_weights(fresh, tmp_path / name)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    other = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(XdlError, match="do not fit the model"):
        load_user_weights(other, tmp_path / "w.pt")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(XdlError, match="expected a .safetensors"):
        load_user_weights(other, tmp_path / "w.bin")


# ---------------------------------------------------------------------------- crash safety


def assert_every_file_complete(folder: Path) -> None:
    """Every visible file parses; a run.json means a run that loads, with its full history."""
    for path in folder.rglob("*"):
        if path.is_dir() or path.name.startswith("."):  # .NAME.tmp: an unfinished atomic write
            continue
        if path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            assert list(csv.DictReader(path.open()))
    if (folder / "run.json").exists():
        run = Run(folder)
        run.model
        assert len(run.history) == run.info["train"]["epochs"]
    if checkpoint.exists(folder / checkpoint.FOLDER):
        state = json.loads((folder / checkpoint.FOLDER / checkpoint.STATE).read_text())
        load_file(folder / checkpoint.FOLDER / state["tensors"])


# Forks ``xdl train`` processes on request. Imports are paid once here, before torch has
# started any thread pool, so each forked child is a fresh CLI process costing only its
# training, and the test can afford several kills.
FORK_SERVER = r"""
import json, os, sys
import torch
torch.set_num_threads(1)  # one thread: no thread pool exists to break in the forked children
import xdl.api, xdl.runs.checkpoint, xdl.cli.main, xdl.cli.train, xdl.data
# The lazy imports a training run makes (sklearn's splitter; torch._dynamo, which the first
# optimizer pulls in), paid once here instead of in every child.
xdl.data.load_data("digits", limit=10)
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
for line in sys.stdin:
    command, arg = line.split(" ", 1)
    if command == "wait":
        print(os.waitpid(int(arg), 0)[1], flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            xdl.cli.main.main(json.loads(arg))
        except SystemExit as exc:
            os._exit(exc.code or 0)
        os._exit(1)
    print(pid, flush=True)
"""


def test_kill9_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path, capsys):
    args = ["train", *TINY, "--epochs", "8", "--seed", "3"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the forked trainers use one thread: the same float arithmetic
    try:
        code, _, err = run_cli(capsys, *args, "--out", tmp_path / "reference")
        assert code == 0, err
        # The epochs' own time, doubled to cover checkpoint writes and the final save.
        window = 2 * sum(row["seconds"] for row in Run(tmp_path / "reference").history)
        reference = load_file(tmp_path / "reference" / "model.safetensors")
        server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def ask(line: str) -> int:
            server.stdin.write(line + "\n")
            server.stdin.flush()
            return int(server.stdout.readline())

        seed = random.SystemRandom().randrange(10**6)  # printed below, to replay a failure
        rng = random.Random(seed)
        outcomes = []
        try:
            for i in range(5):
                out = tmp_path / f"killed-{i}"
                pid = ask("run " + json.dumps([*args, "--out", str(out)]))
                # Kill somewhere between the first checkpoint and a little after a normal finish.
                deadline = time.monotonic() + 120
                while not checkpoint.exists(out / checkpoint.FOLDER) and time.monotonic() < deadline:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, window))
                os.kill(pid, signal.SIGKILL)
                ask(f"wait {pid}")
                assert_every_file_complete(out)
                if (out / "run.json").exists():
                    outcomes.append("finished")
                else:
                    state = json.loads((out / checkpoint.FOLDER / checkpoint.STATE).read_text())
                    outcomes.append(f"killed after epoch {state['epoch']}")
                    code, _, err = run_cli(capsys, "train", "--resume", out, "-q")
                    assert code == 0, err
                    assert_every_file_complete(out)
                weights = load_file(out / "model.safetensors")
                assert weights.keys() == reference.keys()
                assert all(torch.equal(weights[k], reference[k]) for k in reference), f"run {i} (random seed {seed})"
        finally:
            server.stdin.close()
            server.wait()
    finally:
        torch.set_num_threads(threads)
    print(f"kill -9 outcomes (random seed {seed}): {outcomes}")


def test_unfinished_and_finished_runs_refuse_the_wrong_restart(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    original = checkpoint.save

    def save_then_crash(folder, epoch, *args):
        original(folder, epoch, *args)
        if epoch == 2:
            raise KeyboardInterrupt  # stands in for a kill right after the epoch-2 checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            xdl.train("digits", "mlp", out, epochs=3, quiet=True, data_options={"limit": 100}, model_options={"hidden": [8]})
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "3", "--out", out)
    assert_one_line_error(code, err, "unfinished run", "--resume")
    code, _, err = run_cli(capsys, "train", "--resume", out, "-q")
    assert code == 0, err
    assert len(Run(out).history) == 3
    code, _, err = run_cli(capsys, "train", "--resume", out, "-q")
    assert_one_line_error(code, err, "nothing to resume")
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "nowhere", "-q")
    assert_one_line_error(code, err, "no checkpoint")


# ---------------------------------------------------------------------------- divergence


class NanAfter(nn.Module):
    """A linear model whose training forward returns NaN from its ``after``-th call on."""

    def __init__(self, in_shape, num_classes, after: int):
        super().__init__()
        self.linear = nn.Linear(int(torch.tensor(in_shape).prod()), num_classes)
        self.after, self.calls = after, 0

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                return logits * float("nan")
        return logits


def nan_after(in_shape, num_classes, after: int = 5):
    return NanAfter(in_shape, num_classes, after)


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    # --limit 72 → 72 training rows → 3 steps of 32 per epoch; the 5th step is epoch 2, step 2.
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 2 of 3.*epoch 1\) is kept") as info:
        xdl.train("digits", {"name": f"{__name__}:nan_after", "kwargs": {"after": 5}}, out, epochs=4,
                  batch_size=32, quiet=True, data_options={"limit": 72})
    assert (info.value.epoch, info.value.step) == (2, 2)
    assert not (out / "run.json").exists()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint" / state["tensors"]).values())


def test_huge_lr_exits_2_with_epoch_and_step(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "3", "--lr", "1e6", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "diverged", "epoch", "step")
    assert not (tmp_path / "run" / "run.json").exists()


# ---------------------------------------------------------------------------- outputs


def test_results_are_never_silently_overwritten(digits_run, tmp_path):
    run = Run(shutil.copytree(digits_run.path, tmp_path / "run"))
    first = xdl.explain(run, "saliency", samples=2)
    second = xdl.explain(run, "saliency", samples=3)
    assert (first.path.name, second.path.name) == ("saliency", "saliency-2")
    before = (first.path / "result.json").read_bytes()
    assert (second.path / "result.json").read_bytes() != before
    assert (first.path / "result.json").read_bytes() == before  # the first result is intact
    forced = xdl.explain(run, "saliency", samples=3, force=True)
    assert forced.path == first.path
    assert xdl.Result.load(first.path, arrays=True).arrays["attributions"].shape[0] == 3
    assert sorted(run.results("explain")) == ["explain/saliency", "explain/saliency-2"]
