"""A tabular walkthrough: a loan-approval CSV with a sensitive column, trained and audited.

    python examples/tabular_walkthrough.py                   # writes runs/loans/
    python examples/tabular_walkthrough.py OUT --rows 600    # anywhere, smaller

The script writes its own CSV. The historical labels favour one group directly, and
``hours`` (a model input) differs by group, so a model that never sees ``sex`` can still
learn the difference through that proxy. ``sex`` is kept as a group label only
(``sensitive``), which is what lets the bias report measure the gap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

import xdl


def write_loans(path: Path, rows: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sex = rng.choice(["female", "male"], rows)
    age = rng.integers(21, 70, rows)
    income = rng.lognormal(10.5, 0.4, rows).round(-2)
    hours = (rng.normal(38, 8, rows) + np.where(sex == "male", 4, 0)).clip(5, 80).round(1)
    education = rng.choice(["school", "college", "degree", "masters"], rows, p=[0.3, 0.3, 0.3, 0.1])
    degree = np.isin(education, ["degree", "masters"])
    score = (np.log(income) - 10.5) * 2 + 0.04 * (hours - 40) + 0.6 * degree + 0.01 * (age - 40)
    # The historical bias the audit should find: the same applicant scored higher when male.
    score += np.where(sex == "male", 0.5, 0.0) + rng.normal(0, 0.5, rows)
    approved = np.where(score > 0.4, "yes", "no")
    frame = pd.DataFrame({"age": age, "income": income, "hours": hours, "education": education,
                          "sex": sex, "approved": approved})
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a tabular CSV with a sensitive column, trained and audited")
    parser.add_argument("out", nargs="?", default="runs/loans", help="run directory to write")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=None, help="report and audit at most this many test rows")
    parser.add_argument("--only", help="audit only these analyzers, comma-separated (default: every one that applies)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    csv = write_loans(out.parent / f"{out.name}.csv", args.rows)
    print(f"wrote {csv} ({args.rows} rows)")

    run = xdl.train(str(csv), "mlp", out, epochs=args.epochs, force=True, quiet=True,
                    data_options={"target": "approved", "sensitive": "sex"}, model_options={"hidden": [32, 16]})
    print(f"trained {run.path}: test accuracy {run.metrics['test_accuracy']:.1%}")

    # SHAP's attributions on encoded features are summed back to the original columns.
    print("explain:", xdl.explain(run, "shap", samples=16).summary)

    # Per-group rates from fairlearn: demographic parity and equalized odds between sexes.
    bias = xdl.report(run, "bias", samples=args.samples)
    print("report:", bias.summary)

    only = args.only.split(",") if args.only else None
    # The slowest two (t-SNE embedding, the trust ranking) are left to a full `xdl audit RUN`.
    audit = xdl.audit(run, only=only, skip=["embedding", "trust"], samples=args.samples, progress=False)
    for finding in audit.findings:
        print(f"  {finding.label:<26} {finding.value:>8}  {finding.detail}")
    failed = [f"{s.key}: {s.error}" for s in audit.failed]
    if failed:
        print("failed:", *failed, sep="\n  ")
    print(f"open {audit.html_path.resolve().as_uri()}")


if __name__ == "__main__":
    main()
