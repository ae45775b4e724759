"""The audit against the first round's code (issue 28): the same 16 analyzers, whole processes.

The first round's tree (``FIRST_ROUND``, the last commit of 2026-11-28) is checked out with
``git archive`` into a temporary folder and installed, editable and without dependencies,
into a venv that borrows this venv's packages (a ``.pth`` line): the same torch, captum and
shap on both sides, only xdl differs. Each side trains its own default CNN on the same real
MNIST digits (3,600 train / 400 validation / 1,000 test, same epochs and seed; training is
not timed) and then runs ``xdl audit RUN --only <the first round's 16 analyzers>`` as a
fresh process (today's with ``--budget 0``: the first round had no time budget), interleaved
over ``--repeats``. Bar: ≤ 0.6× the first round's wall time.

    python benchmarks/bench_audit_rounds.py [--quick] [--mnist-dir ../shared/data/mnist]
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_mnist import DEFAULT, command_line, timed, write_real_mnist  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIRST_ROUND = "73d5f08"
# Every analyzer the first round registered (its pyproject's entry points).
ANALYZERS = ("saliency,ig,smoothgrad,gradcam,occlusion,deeplift,shap,lime,activations,embedding,"
             "fgsm,pgd,bias,overfit,calibration,trust")
EPOCHS = 4


def first_round(folder: Path) -> Path:
    """A venv whose ``python`` imports the first round's xdl beside this venv's other packages."""
    tree = folder / "xdl-first-round"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", FIRST_ROUND], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    venv = folder / "venv"
    # No pip or setuptools of its own (3.11's bundled setuptools is older than the tree asks
    # for): this venv's pip installs into it, building with this venv's setuptools.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # Listed after the venv's own site-packages: its editable first-round xdl (and its entry
    # points) are found first; this venv's editable xdl hook is not run (a .pth names a folder only).
    (Path(purelib) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", "-e", str(tree)], check=True, capture_output=True)
    return python


def main(quick: bool = False, mnist_dir: Path = DEFAULT, repeats: int | None = None) -> list[dict]:
    repeats = repeats or (1 if quick else 2)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_real_mnist(tmp / "mnist", train=4000, source=Path(mnist_dir))
        sides = {"xdl": Path(sys.executable), "first round": first_round(tmp)}
        # An empty working folder: ``python -m`` puts it first on sys.path, where a folder named
        # xdl (this checkout, or a run) would shadow the first round's package.
        work = tmp / "work"
        work.mkdir()
        runs = {}
        for name, python in sides.items():
            runs[name] = tmp / "runs" / name.replace(" ", "_")
            timed([str(python), "-m", "xdl", "train", "--data", "mnist", "--data-dir", str(data), "--epochs", str(EPOCHS),
                   "--seed", "0", "--out", str(runs[name]), "--quiet"], env, work)
        # The first round had no time budget; --budget 0 lifts today's, which would otherwise
        # explain fewer trust samples than the first round's fixed 16 (8-10 here): the same work.
        extra = {"xdl": ["--budget", "0"], "first round": []}
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        sections: dict[str, dict] = {}
        for _ in range(repeats):
            for name, python in sides.items():
                seconds[name].append(timed([str(python), "-m", "xdl", "audit", str(runs[name]), "--only", ANALYZERS,
                                            "--recompute", "--quiet", *extra[name]], env, work)[0])
                audit = json.loads((runs[name] / "audit.json").read_text())
                failed = [s for s in audit.get("sections", []) if s.get("status") == "failed"]
                if failed:  # a section that failed took no time: the comparison would be void
                    raise RuntimeError(f"{name}: {len(failed)} sections failed, e.g. {failed[0]}")
                sections[name] = {f"{s['kind']}/{s['method']}": (s.get("status"), s.get("samples")) for s in audit["sections"]}
    mine, theirs = statistics.median(seconds["xdl"]), statistics.median(seconds["first round"])
    # Same work: each section computed on as many samples on both sides; any difference is named.
    differ = {k: (sections["xdl"].get(k), v) for k, v in sections["first round"].items() if sections["xdl"].get(k) != v}
    return [{"workload": f"xdl audit --only the first round's 16 analyzers vs the first round's code ({FIRST_ROUND}), "
                         f"real MNIST default CNN, {EPOCHS} epochs: wall s",
             "xdl": round(mine, 1), "baseline": round(theirs, 1), "ratio": round(mine / theirs, 3),
             "target": "<= 0.6x", "met": mine / theirs <= 0.6,
             "note": f"xdl {[round(s, 1) for s in seconds['xdl']]}, first round {[round(s, 1) for s in seconds['first round']]} "
                     f"({len(sections['first round'])} sections; (status, samples) that differ, xdl vs first round: "
                     f"{differ or 'none'}); "
                     f"load average {os.getloadavg()[0]:.1f} at the end"}]


if __name__ == "__main__":
    command_line(main, __doc__)
