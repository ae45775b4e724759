"""Bias report bootstrap: xdl's batched resampling vs calling fairlearn once per resample.

Both sides compute demographic parity difference/ratio and equalized odds difference on
the same resamples (xdl takes them as counts per row), so the script also checks that
they agree. The issue names no speed bar; the target here (10×) is this script's own.

    python benchmarks/bench_reports.py [--quick]
"""

from __future__ import annotations

import sys
import time

import numpy as np

TARGET = 10.0


def _workload(n: int, resamples: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = rng.choice(["a", "b", "c"], n, p=[0.5, 0.4, 0.1])
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.8, y, 1 - y)
    index = rng.integers(0, n, (resamples, n))  # the classic bootstrap: rows drawn with replacement
    return groups, y, p, index


def _fairlearn(groups, y, p, index) -> np.ndarray:
    from fairlearn.metrics import demographic_parity_difference, demographic_parity_ratio, equalized_odds_difference

    out = []
    for rows in index:
        g, yt, yp = groups[rows], y[rows], p[rows]
        out.append([demographic_parity_difference(yt, yp, sensitive_features=g),
                    demographic_parity_ratio(yt, yp, sensitive_features=g),
                    equalized_odds_difference(yt, yp, sensitive_features=g)])
    return np.array(out)


def _xdl(groups, y, p, index) -> np.ndarray:
    from xdl_plugins.bias import fairness_measures, group_rates

    n = len(y)
    names, codes = np.unique(groups, return_inverse=True)
    counts = np.stack([np.bincount(rows, minlength=n) for rows in index]).astype(float)
    m = fairness_measures(group_rates(counts, codes, len(names), y[:, None] * 1.0, p[:, None] * 1.0))
    return np.stack([m["demographic_parity_difference"][:, 0], m["demographic_parity_ratio"][:, 0],
                     m["equalized_odds_difference"][:, 0]], 1)


def _time(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main(quick: bool = False) -> list[dict]:
    import fairlearn.metrics  # noqa: F401  imports are not part of either side's time
    import xdl_plugins.bias  # noqa: F401

    n, resamples = (2000, 20) if quick else (5000, 50)
    groups, y, p, index = _workload(n, resamples)
    t_base, base = _time(_fairlearn, groups, y, p, index)
    t_xdl, ours = _time(_xdl, groups, y, p, index)
    if not np.allclose(base, ours, atol=1e-9, equal_nan=True):
        raise AssertionError("xdl's bootstrap measures differ from fairlearn's on the same resamples")
    ratio = t_xdl / t_base  # xdl ÷ fairlearn: lower is better
    return [{"workload": f"bias bootstrap: {resamples} resamples of {n} rows, 3 groups (DP diff/ratio, EO diff)",
             "xdl": t_xdl, "baseline": t_base, "ratio": ratio, "target": f"ratio ≤ {1 / TARGET:.3g} (≥ {TARGET:g}× faster than fairlearn per resample)",
             "met": ratio <= 1 / TARGET}]


if __name__ == "__main__":
    for row in main(quick="--quick" in sys.argv):
        print(f"{row['workload']}: xdl {row['xdl']:.3f}s, fairlearn loop {row['baseline']:.3f}s, "
              f"ratio {row['ratio']:.3f} ({row['target']}: {'met' if row['met'] else 'NOT met'}); results agree to 1e-9")
