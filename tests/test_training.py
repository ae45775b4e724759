"""Core: training determinism, the run directory, and the CLI's bad-input contract.

The default training recipe: an epoch count that fits the data, recorded in the run.

The catastrophic-overfitting guard of --adv-train fgsm: when it stops, what it keeps, what it records.

Nothing lost, nothing executed: hostile weights, kill -9 during training, resume, divergence.

The kill test drives the real entry point (``python -m xdl``) in subprocesses; everything
else calls the CLI in-process for speed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import copy_run, run_cli, run_process
from safetensors.torch import load_file, save_file
from torch import nn

import xdl
from xdl.errors import XdlError
from xdl.models.builders import build_model, load_user_weights, model_config
from xdl.runs import checkpoint
from xdl.runs.run import Run
from xdl.training.coguard import CatastrophicOverfitGuard
from xdl.training.config import DECAY_FRACTION, IMAGE_AUGMENT, PATIENCE, TrainConfig
from xdl.training.steps import PlateauSchedule, TrainingDiverged

# -----------------------------------------------------------------------------------------
# core
# -----------------------------------------------------------------------------------------


def test_run_directory_rebuilds_the_model(digits_run):
    info = json.loads((digits_run.path / "run.json").read_text())
    assert info["format_version"] == 1
    assert info["model"]["in_shape"] == [1, 8, 8]
    assert {"torch", "python"} <= set(info["versions"])
    again = xdl.load(digits_run.path)
    assert not again.model.training
    assert len(again.history) == 4
    # The reloaded net on the reloaded splits gives the metrics the trained net gave at training time.
    from xdl.training.metrics import evaluate

    for split in ("train", "val", "test"):
        measured = evaluate(again.model, again.data.split(split), torch.device("cpu"))
        assert measured["accuracy"] == digits_run.metrics[f"{split}_accuracy"], split
        assert measured["loss"] == pytest.approx(digits_run.metrics[f"{split}_loss"], rel=1e-6), split


def test_a_saved_run_reloads_as_the_trained_net(tmp_path):
    from xdl.models.builders import set_normalization
    from xdl.runs.run import save_run
    from xdl.training.config import TrainConfig
    from xdl.training.loop import fit

    data = xdl.load_data("digits", limit=60)
    cfg = model_config("cnn", "image", channels=[4], hidden=8)
    net = build_model(cfg, data.input_shape, data.num_classes)
    set_normalization(net, data.train.x)
    history = fit(net, data, TrainConfig(epochs=1), progress=False, log=lambda line: None)
    save_run(tmp_path / "run", net, data, cfg, {}, history, {})
    x = data.test.x
    with torch.no_grad():
        torch.testing.assert_close(xdl.load(tmp_path / "run").model(x), net.eval()(x), rtol=0, atol=0)


def test_training_is_deterministic_on_cpu(tmp_path):
    kwargs = dict(epochs=2, quiet=True, model_options={"hidden": [16]}, augment=["noise"], mixup=0.2)
    a = xdl.train("digits", "mlp", tmp_path / "a", **kwargs)
    b = xdl.train("digits", "mlp", tmp_path / "b", **kwargs)
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(wa, wb), name


def test_amp_trains_in_bf16_where_the_device_has_it_and_evaluates_in_fp32(tmp_path, monkeypatch):
    """Forced to bf16 here whatever this CPU runs natively: training steps autocast, evaluation and the saved
    weights stay fp32, the compute card says which; --no-amp is fp32 throughout."""
    from xdl.training import loop

    monkeypatch.setattr(loop, "autocast_dtype", lambda device: torch.bfloat16)
    seen = set()
    forward = nn.Linear.forward

    def recorded(self, x):
        out = forward(self, x)
        seen.add((torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    monkeypatch.setattr(nn.Linear, "forward", recorded)
    options = dict(epochs=1, quiet=True, model_options={"hidden": [16]})
    run = xdl.train("digits", "mlp", tmp_path / "amp", **options)
    assert seen == {(True, torch.bfloat16), (False, torch.float32)}
    assert run.info["compute"]["precision"] == "bfloat16 autocast"
    assert {w.dtype for w in load_file(str(run.path / "model.safetensors")).values()} == {torch.float32}

    seen.clear()
    fp32 = xdl.train("digits", "mlp", tmp_path / "fp32", amp=False, **options)
    assert seen == {(False, torch.float32)} and fp32.info["compute"]["precision"] == "fp32"


def test_model_takes_natural_range_inputs(digits_run):
    from xdl.models.builders import Normalize

    norm = digits_run.model[0]
    assert isinstance(norm, Normalize)
    x = digits_run.data.train.x
    assert torch.allclose(norm.mean.flatten(), x.mean().reshape(1), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_cnn_fits_every_image_size(shape):
    model = build_model(model_config("cnn"), shape, 10)
    assert model(torch.rand(2, *shape)).shape == (2, 10)


def test_augmentations_do_what_they_say():
    from xdl.training.config import TrainConfig
    from xdl.training.steps import augment

    torch.manual_seed(0)
    x = torch.rand(64, 3, 16, 16) * 0.5 + 0.25  # away from the clamp at 0 and 1
    # flip: every image is itself or its mirror, both happen
    out = augment(x, TrainConfig(augment=["flip"]))
    same, mirrored = (out == x).flatten(1).all(1), (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    # a shift by s of the width moves content by at most s·16 pixels; zero shift is the identity
    still = augment(x, TrainConfig(augment=["shift"], shift=0.0))
    torch.testing.assert_close(still, x, atol=1e-5, rtol=0)
    dot = torch.zeros(64, 1, 16, 16)
    dot[:, :, 8, 8] = 1.0
    moved = augment(dot, TrainConfig(augment=["shift"], shift=0.1))
    grid = torch.arange(16.0)
    mass = moved.sum((1, 2, 3))
    centre = torch.stack([(moved.sum(3)[:, 0] * grid).sum(1), (moved.sum(2)[:, 0] * grid).sum(1)], 1) / mass[:, None]
    offset = (centre - torch.tensor([8.0, 8.0])).abs()
    assert (offset <= 0.1 * 16 + 1e-4).all() and (offset > 0.05).any()
    # cutout: one square of side round(f·16) set to 0 (smaller where it meets the border), the rest untouched
    cfg = TrainConfig(augment=["cutout"], cutout=0.25)
    out = augment(x, cfg)
    holes = (out == 0).all(1)  # all channels
    assert ((out == 0) | (out == x)).all() and (holes.flatten(1).sum(1) <= 25).all() and holes.any()
    # noise: zero-mean Gaussian of the configured standard deviation
    out = augment(x, TrainConfig(augment=["noise"], noise=0.05))
    delta = out - x
    assert abs(float(delta.mean())) < 2e-3 and float(delta.std()) == pytest.approx(0.05, rel=0.05)


def test_existing_run_is_not_overwritten(digits_run):
    before = (digits_run.path / "model.safetensors").read_bytes()
    with pytest.raises(XdlError, match="already holds a run"):
        xdl.train("digits", "mlp", digits_run.path, epochs=1, quiet=True)
    assert (digits_run.path / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "nope"], "unknown dataset"),
        (["--model", "resnet"], "unknown model"),
        (["--epochs", "0"], "epochs must be > 0"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--dropout", "1.0"], "dropout must be in [0, 1)"),
        (["--model", "no.such.module:factory"], "cannot resolve model factory"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
        (["--augment", "warp"], "unknown augmentation"),
    ],
)
def test_train_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = run_process("train", "--out", tmp_path / "r", "--epochs", "1", *args) if "--epochs" not in args else run_process(
        "train", "--out", tmp_path / "r", *args
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "r" / "run.json").exists()


def test_load_refuses_newer_format(digits_run, tmp_path):
    copy = copy_run(digits_run, tmp_path / "future")
    info = json.loads((copy / "run.json").read_text())
    info["format_version"] = 99
    (copy / "run.json").write_text(json.dumps(info))
    with pytest.raises(XdlError, match="newer xdl"):
        xdl.load(copy)


def test_few_steps_train_without_a_one_cycle_crash(tmp_path):
    # 60 rows in batches of 128: one step per epoch, too few for one-cycle's phases.
    run = xdl.train("digits", "mlp", tmp_path / "r", epochs=2, quiet=True, data_options={"limit": 60},
                    model_options={"hidden": [8]})
    assert run.metrics["epochs_run"] == 2


def test_forced_result_replaces_the_whole_folder(tmp_path):
    from xdl.analysis import Result

    first = Result("m", "explain", figures={"old": b"png"}, metrics={"a": 1})
    first.save(tmp_path / "m")
    Result("m", "explain", metrics={"a": 2}).save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["result.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no partial or old folder left behind

# -----------------------------------------------------------------------------------------
# recipe
# -----------------------------------------------------------------------------------------


def test_the_plateau_schedule_warms_up_holds_decays_to_zero_and_survives_json():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = PlateauSchedule(opt, steps_per_epoch=4)
    rates = []
    for _ in range(10):  # warm-up over the first epoch, then the peak held
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(0.04) and rates[:4] == sorted(rates[:4]) and rates[4:] == [1.0] * 6
    assert not sched.decaying
    sched.decay(2, "plateau")  # two epochs of four steps: 1 - k/8 after k steps
    state = json.loads(json.dumps(sched.state_dict()))  # a checkpoint keeps it as JSON
    again = PlateauSchedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), steps_per_epoch=4)
    again.load_state_dict(state)
    for k in range(1, 9):
        for s_ in (sched, again):
            s_.optimizer.step()
            s_.step()
        assert sched.optimizer.param_groups[0]["lr"] == again.optimizer.param_groups[0]["lr"] == pytest.approx(1 - k / 8)
        assert sched.finished == again.finished == (k == 8)
    assert again.why == "plateau"


def test_evaluate_gives_the_standard_error_of_the_mean_loss():
    from xdl.data.types import Split
    from xdl.training.metrics import evaluate

    # Logits are the inputs themselves, so each row's loss is log(1 + e^(other - own)) by hand.
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 0, 0, 1])
    own, other = x[torch.arange(5), y], x[torch.arange(5), 1 - y]
    losses = torch.log1p(torch.exp(other - own)).double()
    result = evaluate(nn.Identity(), Split(x, y), torch.device("cpu"), batch_size=2)  # three batches summed
    assert result["loss"] == pytest.approx(float(losses.mean()))
    assert result["loss_se"] == pytest.approx(float(losses.std(unbiased=False)) / math.sqrt(5))
    assert result["accuracy"] == pytest.approx(3 / 5)  # the tie of row 3 goes to class 0, its label


def test_without_epochs_training_stops_at_the_validation_plateau_and_says_why(tmp_path):
    run = xdl.train("digits", "mlp", tmp_path / "run", quiet=True, data_options={"limit": 300},
                    model_options={"hidden": [16]}, batch_size=32)
    history, stopped = run.history, run.info["stopped"]
    assert run.info["train"]["epochs"] is None  # the count was the plateau's, not a setting
    val = [float(row["val_loss"]) for row in history]
    # The decay began PATIENCE epochs after the best validation loss up to then, and lasted
    # DECAY_FRACTION of the epochs before it; the rate ends at zero.
    began = next(e for e in range(PATIENCE + 1, len(val) + 1) if e - 1 - min(range(e), key=val.__getitem__) >= PATIENCE)
    assert len(history) == began + math.ceil(DECAY_FRACTION * began)
    assert float(history[-1]["lr"]) == 0.0
    assert f"since epoch {min(range(began), key=val.__getitem__) + 1}" in stopped
    # The annealed last weights are kept unless an earlier epoch's validation loss was lower by
    # more than the last one's standard error.
    lowest = min(range(len(val)), key=val.__getitem__) + 1
    se = float(history[-1]["val_loss_se"])
    kept = lowest if val[lowest - 1] < val[-1] - se else len(val)
    assert se > 0 and (f"weights of epoch {kept} are kept" in stopped if kept != len(val) else "the last epoch's weights are kept" in stopped)
    assert [row["epoch"] for row in history if row.get("best")] == [kept]
    # The weights in the saved run are the kept epoch's: their validation loss is that epoch's.
    assert run.info["metrics"]["val_loss"] == pytest.approx(val[kept - 1], rel=1e-5)
    fixed = xdl.train("digits", "mlp", tmp_path / "fixed", quiet=True, epochs=3, data_options={"limit": 300},
                      model_options={"hidden": [16]})
    assert len(fixed.history) == 3 and fixed.info["stopped"] == "ran the 3 epochs --epochs asked for"


def test_images_get_small_shifts_by_default_and_tables_none():
    assert TrainConfig().for_data("image").augment == IMAGE_AUGMENT
    assert TrainConfig().for_data("tabular").augment == []
    assert TrainConfig(augment=[]).for_data("image").augment == []  # a choice, even "none", is kept
    assert TrainConfig(dp_epsilon=3.0).for_data("image").augment == []  # DP's measured recipe has none


def test_augment_none_on_the_command_line_turns_the_default_off(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--augment", "none", "--out", tmp_path / "a")
    assert code == 0, err
    assert Run(tmp_path / "a").info["train"]["augment"] == []
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", tmp_path / "b")
    assert code == 0, err
    assert Run(tmp_path / "b").info["train"]["augment"] == IMAGE_AUGMENT  # digits are images, whatever the model

# -----------------------------------------------------------------------------------------
# coguard
# -----------------------------------------------------------------------------------------


def test_guard_keeps_the_peak_and_stops_on_collapse():
    data = xdl.load_data("digits", limit=120)
    guard = CatastrophicOverfitGuard(data, 0.1, torch.device("cpu"))
    model = torch.nn.Linear(1, 1)
    stops = []
    for epoch, accuracy in enumerate([0.30, 0.52, 0.45, 0.40, 0.25], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        stops.append(guard.update(model, epoch, accuracy))
    # 0.45 and 0.40 are within 20 points of the 0.52 peak; 0.25 is a collapse (and under half).
    assert stops == [False, False, False, False, True]
    assert guard.best_epoch == 2 and guard.best_state["weight"].item() == 2
    assert "epoch 2 kept" in guard.message


def test_fgsm_training_records_pgd_accuracy_and_stops_on_collapse(tmp_path, monkeypatch):
    # A scripted collapse: PGD accuracy 0.4 → 0.6 → 0.05, as Wong et al. 2020 saw with α = 2·eps.
    scripted = iter([0.4, 0.6, 0.05, 0.05, 0.05])
    monkeypatch.setattr(CatastrophicOverfitGuard, "measure", lambda self, model: next(scripted))
    weights = {}

    real_update = CatastrophicOverfitGuard.update

    def update(self, model, epoch, accuracy):
        weights[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_update(self, model, epoch, accuracy)

    monkeypatch.setattr(CatastrophicOverfitGuard, "update", update)
    run = xdl.train("digits", "mlp", tmp_path / "r", epochs=5, quiet=True, adv_train="fgsm", adv_eps=0.1, adv_step=2.0,
                    data_options={"limit": 200}, model_options={"hidden": [16]})
    history = run.history
    assert [r["epoch"] for r in history] == [1, 2, 3]  # stopped at the collapse
    assert [r["pgd_accuracy"] for r in history] == [0.4, 0.6, 0.05]
    kept = run.model.state_dict()
    assert all(torch.equal(kept[k].cpu(), weights[2][k].cpu()) for k in kept)  # the peak epoch's weights


def test_adv_step_is_validated():
    with pytest.raises(xdl.XdlError, match="adv-step"):
        TrainConfig(adv_train="fgsm", adv_step=0)

# -----------------------------------------------------------------------------------------
# reliability
# -----------------------------------------------------------------------------------------


# Small enough for ~1 s of training, long enough (many epochs) for a kill to land mid-run.
TINY = ["--data", "digits", "--limit", "300", "--model", "mlp", "--hidden", "16", "--batch-size", "32", "-q"]


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
    run_dir = copy_run(digits_run, tmp_path / "run")
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
    run = Run(copy_run(digits_run, tmp_path / "run"))
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


def test_a_plateau_run_resumed_mid_decay_ends_as_the_uninterrupted_run(tmp_path, monkeypatch):
    options = {"quiet": True, "data_options": {"limit": 300}, "model_options": {"hidden": [16]}, "batch_size": 32}
    reference = xdl.train("digits", "mlp", tmp_path / "reference", **options)
    decay_began = next(e for e, row in enumerate(reference.history, 1) if e < len(reference.history)
                       and float(reference.history[e]["lr"]) < float(row["lr"]) and e > 1)
    original = checkpoint.save

    def save_then_crash(folder, epoch, *args):
        original(folder, epoch, *args)
        if epoch == decay_began + 1:  # the schedule's decay is part of what the checkpoint must carry
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            xdl.train("digits", "mlp", tmp_path / "resumed", **options)
    resumed = xdl.train(out=tmp_path / "resumed", resume=True, quiet=True)
    assert resumed.info["stopped"] == reference.info["stopped"]
    assert len(resumed.history) == len(reference.history)
    a, b = load_file(tmp_path / "reference" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
