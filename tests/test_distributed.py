"""torchrun training and sharded analyzers: two CPU processes over gloo must give what one gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import xdl
from xdl.analysis import Result
from xdl.analysis.base import merge
from xdl.training import distributed
from xdl.training.distributed import World


def torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    # One thread per rank: two ranks on the 2-core CI machine, not four threads fighting.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# -----------------------------------------------------------------------------------------
# Shares: exact partitions, no padded duplicates
# -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shares_tile_every_sample_exactly_once(size):
    for n in range(0, 23):
        covered = [i for rank in range(size) for i in range(n)[distributed.shard_range(n, World(rank, size))]]
        assert covered == list(range(n))


def test_batch_shares_weight_the_mean_loss_to_the_global_batch():
    index = torch.arange(13)
    parts = [distributed.shard_batch(index, World(rank, 2)) for rank in range(2)]
    assert [len(p) for p, _ in parts] == [7, 6]
    # DDP averages rank gradients: (7/13·2 + 6/13·2) / 2 = 1, the global batch's weight.
    assert sum(w for _, w in parts) == pytest.approx(2.0)
    assert parts[0][1] == pytest.approx(14 / 13)
    # A last global batch with fewer samples than ranks is dropped, never padded.
    assert distributed.steps_per_epoch(257, 128, World(0, 2)) == 2
    assert distributed.steps_per_epoch(258, 128, World(0, 2)) == 3
    assert distributed.steps_per_epoch(257, 128, World()) == 3


def test_merge_concatenates_per_sample_arrays_and_weights_metrics():
    shares = [
        Result("m", "attack", summary="first", metrics={"accuracy": 1.0, "samples": 2, "eps": 0.1, "sweep": [1.0, 0.5]},
               arrays={"adv": np.zeros((2, 3)), "grid": np.arange(4.0)}, tables={"rows": [{"i": 0}, {"i": 1}]}),
        Result("m", "attack", summary="second", metrics={"accuracy": 0.0, "samples": 1, "eps": 0.1, "sweep": [0.0, 0.5]},
               arrays={"adv": np.ones((1, 3)), "grid": np.arange(4.0)}, tables={"rows": [{"i": 2}]}, warnings=["w"]),
    ]
    merged = merge(shares, [2, 1])
    np.testing.assert_array_equal(merged.arrays["adv"], [[0, 0, 0], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(merged.arrays["grid"], np.arange(4.0))  # not per sample: kept once
    assert merged.tables["rows"] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert merged.metrics["accuracy"] == pytest.approx(2 / 3)
    assert merged.metrics["samples"] == 3 and merged.metrics["eps"] == 0.1
    assert merged.metrics["sweep"] == [pytest.approx(2 / 3), 0.5]
    assert merged.summary == "first" and merged.warnings[0] == "w" and "2 processes" in merged.warnings[1]


# -----------------------------------------------------------------------------------------
# Two processes against one
# -----------------------------------------------------------------------------------------


def test_torchrun_training_equals_single_process(tmp_path):
    """Same seed, global batch = the single batch, no BatchNorm, no augmentation (each rank draws its own), fp32
    (bf16 rounds a half batch's sums differently from the whole's): the same weights."""
    options = ["--model", "mlp", "--hidden", "32", "--epochs", "2", "--optimizer", "adam", "--seed", "3", "--augment", "none",
               "--no-amp"]
    done = torchrun("-m", "xdl", "train", *options, "--out", str(tmp_path / "ddp"), "--quiet", cwd=tmp_path)
    single = xdl.train("digits", "mlp", tmp_path / "single", epochs=2, optimizer="adam", seed=3, quiet=True,
                       augment=[], model_options={"hidden": [32]}, amp=False)

    assert done.stdout.count("run saved to") == 1  # rank 0 speaks and writes; rank 1 is silent
    ddp_weights = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    for name, value in load_file(str(single.path / "model.safetensors")).items():
        torch.testing.assert_close(ddp_weights[name], value, atol=1e-5, rtol=0, msg=name)

    # Metrics are sums over exact shares: digits' 1293 training rows split 647/646, and the
    # last batch of 13 splits 7/6; a padded sampler would count a duplicate and differ.
    info = json.loads((tmp_path / "ddp" / "run.json").read_text())
    for split in ("train", "val", "test"):
        assert info["metrics"][f"{split}_accuracy"] == single.metrics[f"{split}_accuracy"]
        assert info["metrics"][f"{split}_loss"] == pytest.approx(single.metrics[f"{split}_loss"], abs=1e-5)
    rows = xdl.load(tmp_path / "ddp").history
    for mine, theirs in zip(rows, single.history, strict=True):
        assert mine["train_accuracy"] == theirs["train_accuracy"]
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)
        assert mine["val_accuracy"] == theirs["val_accuracy"]


# Each rank joins through xdl, trains a DDP step with torch.optim (whose first use imports
# torch._dynamo) and leaves; it then writes the names of the threads still alive in it.
LEAVES = """
import os, sys, torch
from xdl.training import distributed
world = distributed.join("cpu")
net = torch.nn.Linear(4, 2)
opt = torch.optim.Adam(net.parameters())
step = distributed.wrap(net, torch.device("cpu"), world)
step(torch.ones(3, 4)).sum().backward()
opt.step()
del step
distributed.leave(world)
alive = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
open(f"threads{world.rank}.txt", "w").write(" ".join(sorted(alive)))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through Linux's /proc")
def test_leave_frees_the_gloo_group_and_its_threads(tmp_path):
    """A group that outlives leave() keeps gloo worker threads into interpreter shutdown, where one
    releasing a collective's tensors needs the GIL and aborts the rank now and then (SIGABRT)."""
    (tmp_path / "leaves.py").write_text(LEAVES)
    torchrun(str(tmp_path / "leaves.py"), cwd=tmp_path)
    for rank in range(2):
        alive = (tmp_path / f"threads{rank}.txt").read_text().split()
        assert alive and not [name for name in alive if "gloo" in name], alive


def test_torchrun_attack_shards_samples_and_merges(mlp_run, tmp_path):
    run = shutil.copytree(mlp_run.path, tmp_path / "run")
    sweep = ["-p", "eps=0,0.1,0.3"]
    done = torchrun("-m", "xdl", "attack", str(run), "--method", "fgsm", "--samples", "9", *sweep, "--quiet", cwd=tmp_path)
    single = xdl.attack(mlp_run, "fgsm", samples=9, params={"eps": [0, 0.1, 0.3]}, save=False)

    assert done.stdout.count("results saved to") == 1
    merged = Result.load(run / "attack" / "fgsm", arrays=True)
    assert merged.arrays.keys() == single.arrays.keys()
    for name, value in single.arrays.items():
        np.testing.assert_allclose(merged.arrays[name], value, atol=1e-6, err_msg=name)
    # The attack merges from counts: success_rate is a ratio over the correct samples, which a
    # sample-weighted mean of the shares' rates gets wrong when shares differ in clean accuracy.
    assert merged.metrics["samples"] == 9
    for key in ("clean_accuracy", "robust_accuracy", "success_rate"):
        assert merged.metrics[key] == pytest.approx(single.metrics[key]), key
    for mine, theirs in zip(merged.tables["robustness"], single.tables["robustness"], strict=True):
        assert mine == pytest.approx(theirs)
    assert merged.summary == single.summary
    assert merged.provenance == single.provenance


def test_torchrun_runs_a_whole_split_analyzer_once_on_rank_0(mlp_run, tmp_path):
    """A PCA per rank would give coordinates from two different projections; rank 0 fits one."""
    run = shutil.copytree(mlp_run.path, tmp_path / "run")
    torchrun("-m", "xdl", "explain", str(run), "--method", "embedding", "-p", "tsne=false", "--quiet", cwd=tmp_path)
    single = xdl.explain(mlp_run, "embedding", params={"tsne": False}, save=False)
    merged = Result.load(run / "explain" / "embedding", arrays=True)
    np.testing.assert_allclose(merged.arrays["pca"], single.arrays["pca"], atol=1e-4)
    assert not any("processes" in w for w in merged.warnings)


def test_the_attacks_merge_weighs_success_rate_by_correct_samples():
    from xdl.analysis import load_analyzer

    fgsm = load_analyzer("attack", "fgsm")
    # Share 1: 4 samples, all correct, 1 flipped; share 2: 4 samples, 1 correct, flipped.
    shares = []
    for labels, clean, adv in (([0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]), ([0, 0, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1])):
        labels, clean, adv = np.array(labels), np.array(clean), np.array(adv)
        correct = clean == labels
        metrics = {"eps": 0.1, "robust_accuracy": float((adv == labels).mean()),
                   "success_rate": float((adv[correct] != labels[correct]).mean()), "mean_linf": 0.1, "mean_l2": 0.5,
                   "mean_confidence_drop": 0.2, "clean_accuracy": float(correct.mean()), "samples": 4,
                   "perturbed": "all inputs, clamped to [0, 1]"}
        shares.append(Result("fgsm", "attack", metrics=metrics, params={"eps": 0.1},
                             arrays={"labels": labels, "clean_predictions": clean, "predictions": adv}))
    merged = fgsm.merge(shares, [4, 4])
    assert merged.metrics["success_rate"] == pytest.approx(2 / 5)  # 2 of the 5 correct samples flipped
    assert merged.metrics["clean_accuracy"] == pytest.approx(5 / 8)
    assert merged.metrics["robust_accuracy"] == pytest.approx(3 / 8)
    assert merge(shares, [4, 4]).metrics["success_rate"] == pytest.approx(0.625)  # the generic mean is not
