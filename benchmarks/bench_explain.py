"""Explanation speed at equal fidelity: `xdl explain` against shap, lime and captum, whole process each.

Workload: 100 real MNIST digits (28×28) from ``--data-dir`` (default ``../shared/data/mnist``
from the repo root: 5,000 real digits, the first 4,000 written as the train files and the
last 1,000 as the t10k files of a temporary MNIST folder), explained with the default CNN
that ``xdl train --data mnist`` trains on them. The images are the first 100 of the test
split (``--indices 0..99``), the target is the predicted class, and every side runs as its
own process (`xdl explain RUN ...` for xdl; ``python bench_explain.py --library ...`` for
the library, which loads the same model file and the same images, saved beforehand as .npy),
so interpreter start, imports, model loading and writing results are all timed.

Bars (issue 21):
- SHAP: ≥ 10× faster than ``shap.GradientExplainer(model, background).shap_values(x)`` at its
  defaults (200 draws, every class), with per-image Pearson correlation to shap's values for
  the target class ≥ 0.95 median and ≥ 0.9 min. Also shown: shap with ``ranked_outputs=1``
  (one class, as xdl computes) and with xdl's number of draws; and shap against a rerun of
  itself, which is the noise floor of the reference.
- LIME: ≥ 5× faster than ``LimeImageExplainer().explain_instance(image, classify)`` at its
  defaults (1,000 samples, quickshift, batch 10) with top-5 superpixel agreement ≥ 0.8 and
  surrogate R² within 0.05 of lime's. Also shown: lime with xdl's batch size.
- IG: ≥ 2× faster than ``captum IntegratedGradients(model).attribute(x, n_steps=50,
  internal_batch_size=B)`` at equal (not larger) mean |convergence delta|.

xdl runs with ``--no-figures``: the library scripts draw no figure, so that is the same work;
a second row per bar times ``xdl explain`` with its figure (its default) against the same
library process. Ratios are xdl ÷ library (lower is better). Each pair is timed in interleaved repeats; the
table gives the median wall seconds and the processes' CPU seconds (user + system, all
threads) — on a machine shared with other jobs CPU time is the steadier figure, and the
load average is printed beside every repeat.

    python benchmarks/bench_explain.py [--quick] [--images 100] [--repeats 1] [--methods shap,lime,ig]
                                       [--data-dir ../shared/data/mnist] [--work DIR (kept, reused)]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_mnist import timed  # noqa: E402
ROOT = HERE.parent
IMAGES, BACKGROUND, IG_BATCH = 100, 100, 1024


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


# -----------------------------------------------------------------------------------------
# The library side: one process per call (``--library KIND``)
# -----------------------------------------------------------------------------------------


def library(kind: str, work: Path, options: dict) -> None:
    """Run one library explanation on the saved images; save its target-class attributions."""
    import torch

    from xdl.runs.run import Run

    torch.set_num_threads(2)
    model = Run(work / "run").model
    x = torch.from_numpy(np.load(work / "x.npy"))
    targets = np.load(work / "targets.npy")
    out: dict = {}
    if kind == "shap":
        import shap

        explainer = shap.GradientExplainer(model, torch.from_numpy(np.load(work / "background.npy")))
        if options.get("ranked"):
            values, ranks = explainer.shap_values(x, ranked_outputs=1, **options.get("kwargs", {}))
            assert (ranks[:, 0].numpy() == targets).all()
            values = np.asarray(values)[..., 0]
        else:
            values = np.asarray(explainer.shap_values(x, **options.get("kwargs", {})))  # N×C×H×W×K
            values = np.moveaxis(values, -1, 1)[np.arange(len(x)), targets]
    elif kind == "lime":
        from lime.lime_image import LimeImageExplainer

        def classify(images: np.ndarray) -> np.ndarray:  # lime hands over RGB copies of the gray digit
            with torch.inference_mode():
                return torch.softmax(model(torch.as_tensor(images[..., :1], dtype=torch.float32).permute(0, 3, 1, 2)), 1).numpy()

        seed = options["seed"]
        values, segments, scores = [], [], []
        for i, image in enumerate(x[:, 0].double().numpy()):
            # random_state: the masks xdl draws for image i; random_seed: quickshift's, as xdl's.
            found = LimeImageExplainer(random_state=seed + i).explain_instance(
                image, classify, random_seed=seed, **options.get("kwargs", {}))
            weights = np.zeros(found.segments.max() + 1)
            for feature, weight in found.local_exp[int(targets[i])]:
                weights[feature] = weight
            values.append(np.pad(weights, (0, 256 - len(weights))))
            segments.append(found.segments)
            scores.append(found.score)
        values = np.stack(values)
        np.save(work / f"lib-{options['tag']}-segments.npy", np.stack(segments))
        out["r2"] = scores
    else:
        from captum.attr import IntegratedGradients

        attr, delta = IntegratedGradients(model).attribute(
            x.requires_grad_(), baselines=torch.zeros_like(x), target=torch.as_tensor(targets), n_steps=50,
            internal_batch_size=IG_BATCH, return_convergence_delta=True)
        values = attr.detach().numpy()
        out["delta"] = delta.detach().numpy().tolist()
    np.save(work / f"lib-{options['tag']}.npy", values)
    (work / f"lib-{options['tag']}.json").write_text(json.dumps(out))


# -----------------------------------------------------------------------------------------
# The benchmark side
# -----------------------------------------------------------------------------------------


def prepare(work: Path, data_dir: Path, n: int) -> None:
    """MNIST files from the real digits, the default CNN trained on them, the images saved."""
    from mnist_like import _write_idx

    from xdl.data.idx import read_idx

    mnist = work / "mnist"
    if not (work / "run" / "run.json").is_file():
        x = read_idx(data_dir / "digits5k-images-idx3-ubyte.gz")
        y = read_idx(data_dir / "digits5k-labels-idx1-ubyte.gz")
        mnist.mkdir(parents=True, exist_ok=True)
        for name, part in (("train", slice(0, 4000)), ("t10k", slice(4000, None))):
            _write_idx(mnist / f"{name}-images-idx3-ubyte.gz", x[part])
            _write_idx(mnist / f"{name}-labels-idx1-ubyte.gz", y[part])
        print(f"training the default CNN on 4,000 real digits ({load()})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "xdl", "train", "--data", "mnist", "--data-dir", str(mnist),
                        "--out", str(work / "run"), "--quiet", "--force"], check=True)
    import torch

    import xdl
    from xdl.analysis import Context, Result
    from xdl_plugins.shap import draw_background

    run = xdl.load(work / "run")
    x = run.data.test.x[:n]
    with torch.no_grad():
        targets = run.model(x).argmax(1)
    # The background xdl draws (seeded by the run), handed to shap too: same references.
    context = Context(model=run.model, x=x, data=run.data, seed=run.seed)
    np.save(work / "background.npy", draw_background(context, BACKGROUND, Result("shap", "explain")).numpy())
    np.save(work / "x.npy", x.numpy())
    np.save(work / "targets.npy", targets.numpy())
    (work / "seed").write_text(str(run.seed))


def xdl_command(work: Path, method: str, n: int, params: list[str], figures: bool = False) -> list[str]:
    """``xdl explain``; without figures by default, as the library scripts draw none (the same work)."""
    xdl_bin = Path(sys.executable).with_name("xdl")
    command = [str(xdl_bin) if xdl_bin.is_file() else sys.executable, *([] if xdl_bin.is_file() else ["-m", "xdl"])]
    command += ["explain", str(work / "run"), "-m", method, "--indices", ",".join(map(str, range(n))), "--force", "-q"]
    command += [] if figures else ["--no-figures"]
    return command + [a for p in params for a in ("-p", p)]


def figure_rows(label: str, times: dict, theirs: str, bar: float, fidelity_ok: bool) -> list[dict]:
    """The same pair with xdl also drawing its PNG figure (its default), which the library does not."""
    return speed_rows(f"{label}, xdl also drawing its figure (its default)", times, "xdl + figure", theirs, bar,
                      fidelity_ok, "same arrays")


def library_command(work: Path, kind: str, options: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--library", kind, "--work", str(work),
            "--options", json.dumps(options)]


def xdl_arrays(work: Path, method: str) -> tuple[dict, dict]:
    folder = work / "run" / "explain" / method
    with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
        arrays = dict(npz)
    return arrays, json.loads((folder / "result.json").read_text())["metrics"]


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return np.array([np.corrcoef(u, v)[0, 1] for u, v in zip(a, b)])


def measure(sides: dict[str, list[str]], repeats: int) -> dict[str, dict]:
    """Interleaved repeats of each side's whole process; median wall and CPU seconds."""
    seen: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(repeats):
        for name, command in sides.items():
            wall, cpu, _ = timed(command)
            seen[name].append({"wall": wall, "cpu": cpu, "load": os.getloadavg()[0]})
            t = seen[name][-1]
            print(f"  repeat {r + 1} {name}: wall {t['wall']:.1f}s cpu {t['cpu']:.1f}s ({load()})", file=sys.stderr)
    return {name: {k: float(np.median([t[k] for t in times])) for k in ("wall", "cpu", "load")} for name, times in seen.items()}


def row(workload: str, mine: float, baseline: float, target: str, met: bool | None, **extra) -> dict:
    ratio = mine / baseline if baseline else None
    return {"workload": workload, "xdl": mine, "baseline": baseline, "ratio": ratio, "target": target,
            "met": met, **extra}


def speed_rows(label: str, times: dict, mine: str, theirs: str, bar: float, fidelity_ok: bool, fidelity: str) -> list[dict]:
    """Wall and CPU rows of one pair; the bar is on wall time (and fidelity), CPU is shown beside."""
    a, b = times[mine], times[theirs]
    return [
        row(f"{label}: whole-process wall s ({fidelity}; load {a['load']:.1f}/{b['load']:.1f})", a["wall"], b["wall"],
            f"ratio <= {1 / bar:.3g} (>= {bar:g}x faster) at equal fidelity", a["wall"] <= b["wall"] / bar and fidelity_ok),
        row(f"{label}: whole-process CPU s (user+sys)", a["cpu"], b["cpu"], f"ratio <= {1 / bar:.3g}",
            a["cpu"] <= b["cpu"] / bar and fidelity_ok),
    ]


def bench_shap(work: Path, n: int, repeats: int) -> list[dict]:
    from xdl_plugins.shap import STRATIFIED_DRAWS as draws

    sides = {
        "xdl": xdl_command(work, "shap", n, []),
        "xdl + figure": xdl_command(work, "shap", n, [], figures=True),
        "shap defaults": library_command(work, "shap", {"tag": "shap-defaults"}),
        "shap ranked_outputs=1": library_command(work, "shap", {"tag": "shap-ranked", "ranked": True, "kwargs": {"rseed": 1}}),
        f"shap ranked_outputs=1, nsamples={draws}": library_command(
            work, "shap", {"tag": "shap-same", "ranked": True, "kwargs": {"nsamples": draws, "rseed": 2}}),
    }
    times = measure(sides, repeats)
    ours, metrics = xdl_arrays(work, "shap")
    reference = np.load(work / "lib-shap-defaults.npy")
    corr = correlations(ours["shap"], reference)
    floor = correlations(np.load(work / "lib-shap-ranked.npy"), reference)
    same = correlations(np.load(work / "lib-shap-same.npy"), reference)
    fidelity_ok = bool(np.median(corr) >= 0.95 and corr.min() >= 0.9)
    fid = f"xdl vs shap defaults: per-image r median {np.median(corr):.3f} min {corr.min():.3f}"
    rows = speed_rows(f"SHAP, {n} real 28x28 digits, xdl ({draws} stratified draws) vs shap defaults (200 draws, 10 classes)",
                      times, "xdl", "shap defaults", 10, fidelity_ok, fid)
    rows += figure_rows("SHAP vs shap defaults", times, "shap defaults", 10, fidelity_ok)
    rows += speed_rows("SHAP, same, vs shap ranked_outputs=1 (200 draws, target class only)", times, "xdl",
                       "shap ranked_outputs=1", 1, fidelity_ok,
                       f"shap rerun vs shap defaults: r median {np.median(floor):.3f} min {floor.min():.3f}")
    rows += speed_rows(f"SHAP, same, vs shap ranked_outputs=1 nsamples={draws}", times, "xdl",
                       f"shap ranked_outputs=1, nsamples={draws}", 1, fidelity_ok,
                       f"that shap vs shap defaults: r median {np.median(same):.3f} min {same.min():.3f}")
    rows += [
        row("SHAP per-image correlation with shap defaults (target class), median", float(np.median(corr)),
            float(np.median(floor)), ">= 0.95 (baseline: shap's own rerun)", bool(np.median(corr) >= 0.95)),
        row("SHAP per-image correlation with shap defaults (target class), min", float(corr.min()), float(floor.min()),
            ">= 0.9 (baseline: shap's own rerun)", bool(corr.min() >= 0.9)),
        row(f"SHAP xdl's own fidelity estimate (split-half, Spearman-Brown): r with converged, median "
            f"(min {metrics['estimated_correlation_with_converged_min']:.3f})",
            metrics["estimated_correlation_with_converged_median"], None, ">= 0.95",
            metrics["estimated_correlation_with_converged_median"] >= 0.95),
    ]
    return rows


def bench_lime(work: Path, n: int, repeats: int) -> list[dict]:
    seed = int((work / "seed").read_text())
    sides = {
        "xdl": xdl_command(work, "lime", n, []),
        "xdl + figure": xdl_command(work, "lime", n, [], figures=True),
        "lime defaults": library_command(work, "lime", {"tag": "lime-defaults", "seed": seed}),
        "lime batch 256": library_command(work, "lime", {"tag": "lime-batch", "seed": seed, "kwargs": {"batch_size": 256}}),
    }
    times = measure(sides, repeats)
    ours, metrics = xdl_arrays(work, "lime")
    segments = np.load(work / "lib-lime-defaults-segments.npy")
    same_segments = bool((segments == ours["segments"]).all())
    theirs = np.load(work / "lib-lime-defaults.npy")
    r2 = np.array(json.loads((work / "lib-lime-defaults.json").read_text())["r2"])
    agreement = []
    for i in range(n):
        count = int(segments[i].max()) + 1
        top = min(5, count)
        mine, ref = ours["weights"][i, :count], theirs[i, :count]
        agreement.append(len(set(np.argsort(-mine)[:top]) & set(np.argsort(-ref)[:top])) / top)
    agreement = np.array(agreement)
    r2_gap = abs(metrics["mean_r2"] - float(r2.mean()))
    fidelity_ok = bool(same_segments and agreement.mean() >= 0.8 and r2_gap <= 0.05)
    fid = (f"top-5 agreement mean {agreement.mean():.3f} min {agreement.min():.2f}; R2 xdl {metrics['mean_r2']:.3f} vs lime "
           f"{r2.mean():.3f}; {metrics['mean_superpixels']:.2f} superpixels/image, "
           f"{metrics['model_evaluations_per_image']:.1f} model evaluations/image in xdl")
    rows = speed_rows(f"LIME, {n} real 28x28 digits, lime defaults (quickshift, 1000 samples)", times, "xdl",
                      "lime defaults", 5, fidelity_ok, fid)
    rows += figure_rows("LIME vs lime defaults", times, "lime defaults", 5, fidelity_ok)
    rows += speed_rows("LIME, same, vs lime with batch_size=256", times, "xdl", "lime batch 256", 1, fidelity_ok, "same fits")
    rows += [
        row("LIME top-5 superpixel agreement with lime defaults, mean over images", float(agreement.mean()), None, ">= 0.8",
            bool(agreement.mean() >= 0.8)),
        row("LIME surrogate R2, xdl vs lime defaults (mean over images)", metrics["mean_r2"], float(r2.mean()),
            "|gap| <= 0.05", bool(r2_gap <= 0.05)),
    ]
    return rows


def bench_ig(work: Path, n: int, repeats: int) -> list[dict]:
    sides = {
        "xdl": xdl_command(work, "ig", n, []),
        "xdl + figure": xdl_command(work, "ig", n, [], figures=True),
        "captum": library_command(work, "ig", {"tag": "ig"}),
    }
    times = measure(sides, repeats)
    ours, metrics = xdl_arrays(work, "ig")
    theirs = np.load(work / "lib-ig.npy")
    delta = np.abs(json.loads((work / "lib-ig.json").read_text())["delta"])
    corr = correlations(ours["attributions"], theirs)
    mine_delta = metrics["convergence_delta_mean_abs"]
    fidelity_ok = bool(mine_delta <= delta.mean() and np.median(corr) >= 0.99)
    fid = (f"mean |delta| xdl {mine_delta:.2e} vs captum {delta.mean():.2e}; r with captum median {np.median(corr):.4f} "
           f"min {corr.min():.4f}")
    rows = speed_rows(f"IG, {n} real 28x28 digits, vs captum IG 50 steps internal_batch_size={IG_BATCH}", times, "xdl",
                      "captum", 2, fidelity_ok, fid)
    rows += figure_rows("IG vs captum", times, "captum", 2, fidelity_ok)
    rows.append(row("IG mean |convergence delta|, xdl vs captum 50 steps", mine_delta, float(delta.mean()),
                    "<= 1x (equal or smaller)", bool(mine_delta <= delta.mean())))
    return rows


def main(quick: bool = False, images: int | None = None, repeats: int = 1, methods: str = "shap,lime,ig",
         data_dir: str | None = None, work: str | None = None) -> list[dict]:
    n = images or (20 if quick else IMAGES)
    data = Path(data_dir) if data_dir else ROOT.parent / "shared" / "data" / "mnist"
    print(f"bench_explain: {n} images, {repeats} interleaved repeat(s); {load()} on {os.cpu_count()} CPUs", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(work) if work else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        prepare(folder, data, n)
        benches = {"shap": bench_shap, "lime": bench_lime, "ig": bench_ig}
        rows = []
        for name in methods.split(","):
            rows += benches[name.strip()](folder, n, repeats)
    for r in rows:
        r["load_at_end"] = round(os.getloadavg()[0], 2)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 images instead of 100")
    parser.add_argument("--images", type=int)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--methods", default="shap,lime,ig")
    parser.add_argument("--data-dir", help="folder with digits5k-*-ubyte.gz (default ../shared/data/mnist)")
    parser.add_argument("--work", help="keep the run and arrays here (reused when it holds a run)")
    parser.add_argument("--library", choices=["shap", "lime", "ig"], help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.library:
        library(args.library, Path(args.work), json.loads(args.options))
    else:
        for r in main(args.quick, args.images, args.repeats, args.methods, args.data_dir, args.work):
            print(json.dumps(r))
