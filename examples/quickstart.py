"""Quickstart: train, explain, attack, report and audit a model from Python, on digits.

    python examples/quickstart.py                    # writes runs/quickstart/
    python examples/quickstart.py OUT --epochs 2     # anywhere, faster

Every call here is what the CLI runs (``xdl train``, ``xdl explain`` …), so the run
directory it leaves is the same one the commands would leave. Needs no network: the
8×8 digits ship with scikit-learn.
"""

from __future__ import annotations

import argparse

import xdl


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train → explain → attack → report → audit on digits")
    parser.add_argument("out", nargs="?", default="runs/quickstart", help="run directory to write")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=None, help="attack and audit at most this many test samples")
    parser.add_argument("--only", help="audit only these analyzers, comma-separated (default: every one that applies)")
    args = parser.parse_args(argv)

    # 1. Train a small CNN; the run directory holds weights, config and history.
    run = xdl.train("digits", "cnn", args.out, epochs=args.epochs, force=True, quiet=True)
    print(f"trained {run.path}: test accuracy {run.metrics['test_accuracy']:.1%}")

    # 2. Explain: integrated gradients on the first 8 test images (saved under explain/ig/).
    explanation = xdl.explain(run, "ig", samples=8)
    print("explain:", explanation.summary or explanation.metrics)

    # 3. Attack: PGD with eps 0.1 in pixel units (images live in [0, 1]).
    attack = xdl.attack(run, "pgd", params={"eps": 0.1}, samples=args.samples)
    print(f"attack: robust accuracy {attack.metrics['robust_accuracy']:.1%} "
          f"(clean {attack.metrics['clean_accuracy']:.1%})")

    # 4. Report: is the model's confidence worth believing?
    calibration = xdl.report(run, "calibration", samples=args.samples)
    print("report:", calibration.summary)

    # 5. Audit: the three results above are reused (same parameters), the rest computed,
    #    and everything lands in one self-contained page. The slowest analyzers (t-SNE
    #    embedding, activations, the trust ranking) are left to a full `xdl audit RUN`.
    only = args.only.split(",") if args.only else None
    audit = xdl.audit(run, only=only, skip=["embedding", "activations", "trust"], samples=args.samples, progress=False)
    for finding in audit.findings:
        print(f"  {finding.label:<26} {finding.value}")
    reused = [s.key for s in audit.sections if s.status == "reused"]
    print(f"audit reused {', '.join(reused)}; open {audit.html_path.resolve().as_uri()}")


if __name__ == "__main__":
    main()
