"""The comparison bar: ``xdl compare`` of two audited real-MNIST runs costs at most 1.2× the slower audit.

Two runs of the real digits beside the repo (``../shared/data/mnist``, 4,000 train / 1,000
test): the default CNN, and the same with PGD adversarial training at eps 0.1. Each is
audited (``xdl audit RUN``, every analyzer), then ``xdl compare`` is timed as a user meets
it — a fresh process, imports included — when both audits exist, so it reads them instead
of auditing again. The rows also give both runs' AutoAttack robust accuracy with the paired
95% interval of their difference (adversarial training should be better, and the interval
say so), and check that a run on other data (another --limit) is refused with exit code 2
and one line on stderr.

    python benchmarks/bench_compare.py [--quick] [--mnist-dir ../shared/data/mnist]
    # --quick: 1,000 training digits, 1 epoch, audits of autoattack, saliency and calibration on 64 samples
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_mnist import DEFAULT, timed, write_real_mnist  # noqa: E402

BAR_RATIO = 1.2
QUICK_AUDIT = ["--only", "autoattack,saliency,calibration", "--samples", "64"]


def xdl(*args: str) -> list[str]:
    return [sys.executable, "-m", "xdl", *map(str, args)]


def train(data: Path, out: Path, env: dict[str, str], quick: bool, *extra: str) -> Path:
    size = ["--limit", "1000", "--epochs", "1"] if quick else []
    timed(xdl("train", "--data", "mnist", "--data-dir", data, "--out", out, "--quiet", *size, *extra), env)
    return out


def main(quick: bool = False, mnist_dir: Path = DEFAULT) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}  # 2 cores unless told
    load = os.getloadavg()[0]
    audit_args = QUICK_AUDIT if quick else []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_real_mnist(root / "mnist", train=4000, source=Path(mnist_dir))
        plain = train(data, root / "plain", env, quick)
        robust = train(data, root / "robust", env, quick, "--adv-train", "pgd", "--adv-eps", "0.1")
        audits = [timed(xdl("audit", run, "-q", *audit_args), env)[:2] for run in (plain, robust)]
        wall, cpu, _ = timed(xdl("compare", plain, robust, "--out", root / "compare", "-q"), env)
        summary = json.loads((root / "compare" / "compare.json").read_text())["summary"]
        other = train(data, root / "other", env, False, "--limit", "300", "--epochs", "1")
        refused = timed(xdl("compare", plain, other, "--out", root / "refused", "-q"), env, check=False)[2]
    slower = max(audits)
    rows = [{
        "workload": f"xdl compare of two audited real-MNIST runs vs the slower audit, wall s (load {load:.1f})",
        "xdl": round(wall, 2), "baseline": round(slower[0], 2), "ratio": round(wall / slower[0], 3),
        "target": f"<= {BAR_RATIO}x", "met": wall <= BAR_RATIO * slower[0],
        "note": f"CPU s: compare {cpu:.1f}, slower audit {slower[1]:.1f}",
    }]
    rows.append(_robust_row(summary))
    lines = refused.stderr.strip().splitlines()
    rows.append({"workload": "runs on other data (--limit 300) refused", "xdl": refused.returncode, "baseline": 2,
                 "ratio": 1.0, "target": "exit 2, one line naming the data digest",
                 "met": refused.returncode == 2 and len(lines) == 1 and "data digest" in lines[0],
                 "note": lines[-1] if lines else ""})
    return rows


def _robust_row(summary: list[dict]) -> dict:
    """AutoAttack robust accuracy of both runs and the paired interval of robust − plain."""
    found = next((r for r in summary if r["label"].startswith("AutoAttack robust accuracy")), None)
    row = {"workload": "AutoAttack robust accuracy, PGD-trained − default CNN (pp, paired 95% interval)",
           "baseline": 0.0, "ratio": None, "target": "interval excludes 0, in the PGD-trained run's favour"}
    if found is None or found["why"] or not found["differences"] or not found["differences"][0]["interval"]:
        return {**row, "xdl": None, "met": False, "note": found["why"] if found else "no AutoAttack row"}
    d = found["differences"][0]
    interval = d["interval"]
    test = f"; McNemar p {d['test']['p_exact']:.3g} (mid-p {d['test']['p_mid']:.3g})" if d.get("test") else ""
    return {**row, "xdl": round(100 * interval["difference"], 2), "met": d["better"] == 1,
            "note": f"default {found['values'][0]}, PGD-trained {found['values'][1]}; interval "
                    f"[{100 * interval['low']:+.1f}, {100 * interval['high']:+.1f}] pp{test}"}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 training digits, 1 epoch, three analyzers on 64 samples")
    parser.add_argument("--mnist-dir", default=str(DEFAULT), help="folder with the digits5k IDX files")
    args = parser.parse_args()
    for r in main(args.quick, Path(args.mnist_dir)):
        print(json.dumps(r))
        print(f"{r['workload']}: {r['xdl']} (bar {r['target']}) -> {'met' if r['met'] else 'NOT met'}", file=sys.stderr)
