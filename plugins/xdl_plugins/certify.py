"""Certified robustness by randomized smoothing (Cohen, Rosenfeld & Kolter 2019).

Every robust accuracy an attack reports is an upper bound: an attack that fails proves
nothing. This report gives a lower bound, for the Gaussian-smoothed model g rather than the
model itself: per sample, g's class and an L2 radius within which g provably keeps it
(:mod:`xdl.methods.certify`), each certificate wrong with probability at most alpha. The
certified accuracy at radius r is the share of samples g gets right and certifies to ≥ r;
abstentions count as wrong. Radii are in the attacks' units (pixels in [0, 1]); an attack's
L∞ eps is matched by the L2 radius eps·√d, the smallest L2 ball containing its L∞ ball.

With ``attack_steps`` > 0, PGD-L2 attacks g itself at each radius: the empirical upper bound
beside the certified lower one, on the same classifier and norm. A sample certified beyond
the perturbation that broke it would be a bug; ``violations`` counts them.

    >>> result = xdl.report(run, "certify", params={"sigma": 0.25, "n": 10_000})   # doctest: +SKIP
    >>> result.metrics["certified_accuracy"]["0.5"]                                # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from xdl.analysis.base import Analyzer, Context, Finding, Result, figures_wanted, is_number
from xdl.limits import at_most
from xdl.methods import certify as smoothing
from xdl_plugins.attacks import FgsmParams

DEFAULT_SIGMA = 0.25  # Cohen et al.'s middle noise level, a good one for [0, 1] pixels
HEADLINE = 0.5  # the L2 radius the audit's finding quotes (MNIST-scale images; Cohen et al. fig. 7)
CALL_BATCHES = 2  # rows per model call, in --batch-size multiples: 512 was the fastest on a 2-core CPU


@dataclass
class CertifyParams(FgsmParams):
    # eps (inherited): the attacks' eps, reported as L2 radii and, via eps·√d, as L∞ balls.
    sigma: float | None = None  # noise std in input units; None: the run's --noise-sigma, else 0.25
    n0: int = 100  # draws that choose the class (Cohen et al.)
    n: int = 10_000  # fresh draws that bound its probability
    alpha: float = 0.001  # each certificate (and each attack verdict) is wrong with probability ≤ alpha
    radii: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # L2 radii in the metrics
    attack_steps: int = 0  # PGD-L2 steps against the smoothed model at each radius; 0: no attack
    attack_draws: int = 16  # noise draws per attack step (the gradient of the smoothed soft classifier)
    attack_n: int = 1000  # draws that decide the smoothed prediction at each adversarial input

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sigma is not None and not 0 < self.sigma <= 100:
            raise ValueError(f"sigma must be in (0, 100], got {self.sigma}")
        for name in ("n0", "n", "attack_draws", "attack_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
            at_most(name, getattr(self, name), 10_000_000)
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")
        if not self.radii or min(self.radii) < 0:
            raise ValueError(f"radii must be one or more values ≥ 0, got {self.radii}")
        at_most("the number of radii", len(self.radii), 100)
        if self.attack_steps < 0:
            raise ValueError(f"attack_steps must be ≥ 0, got {self.attack_steps}")
        at_most("attack_steps", self.attack_steps, 10_000)


class Certify(Analyzer):
    """Certified L2 radii of the Gaussian-smoothed model, and certified accuracy over radius."""

    kind = "report"
    Params = CertifyParams
    samples = 100
    applies_to = frozenset({"image"})
    description = "certified robustness: randomized smoothing's L2 radii, certified accuracy by radius"
    guide = (
        "A lower bound on robustness, for the Gaussian-smoothed model (Cohen et al. 2019): the share of samples it "
        "gets right and provably keeps within each L2 radius. Attacks give upper bounds; the truth lies between. "
        "A model trained without --noise-sigma usually certifies little."
    )
    check_params = {"n0": 10, "n": 50, "radii": [0.1, 0.25], "attack_steps": 1, "attack_draws": 2, "attack_n": 20}
    help = (
        "A lower bound: the share of samples whose Gaussian-smoothed prediction is right and provably unchanged by "
        "any perturbation of this size (Cohen et al. 2019), each certificate wrong with probability at most alpha. "
        "An attack's robust accuracy is an upper bound; a large gap between them leaves the true robustness open."
    )

    @classmethod
    def audit_params(cls, data_kind: str, eps: float) -> dict[str, str]:
        # A tenth of the draws: radius 0.5 stays certifiable at σ = 0.25 (up to 0.61 with n = 1,000),
        # and a short attack on the smoothed model gives the upper bound beside it.
        return {"eps": str(eps), "n": "1000", "radii": "0.25,0.5", "attack_steps": "10", "attack_draws": "8",
                "attack_n": "500"}

    @classmethod
    def passes(cls, params: CertifyParams, shape) -> float | None:
        attack = params.attack_steps * params.attack_draws + params.attack_n / 3 if params.attack_steps else 0.0
        return (params.n0 + params.n + 1) / 3 + len(params.radii) * attack

    def run(self, ctx: Context, params: CertifyParams) -> Result:
        result = self.result()
        sigma = _sigma(ctx, params, result)
        clean = ctx.predict()
        labels = ctx.y.long().cpu() if ctx.y is not None else clean.argmax(1)
        if ctx.y is None:
            result.warnings.append("no labels: accuracy is measured against the model's own clean predictions")
        positions = ctx.indices if ctx.indices is not None else np.arange(len(ctx.x))
        rows = min(CALL_BATCHES * ctx.batch_size, ctx.rows())
        common = dict(seed=ctx.seed, rows=rows, num_classes=clean.shape[1])
        model = ctx.fast_model()
        found, attacked = [], []
        for s, xb in ctx.stream(batch_size=max(1, rows // smoothing.BLOCK), desc="certify"):
            at = positions[s]
            found.append(smoothing.certify(model, xb, sigma, params.n0, params.n, params.alpha, positions=at, **common))
            if params.attack_steps:
                attacked.append(_attack(model, xb, labels[s], found[-1].prediction, sigma, params, ctx, at, common))
        cert = smoothing.Certified(*(torch.cat([getattr(c, k) for c in found]) for k in ("prediction", "radius", "p_lower")))
        result.arrays = {"prediction": cert.prediction.numpy(), "radius": cert.radius.numpy(),
                         "p_lower": cert.p_lower.numpy(), "labels": labels.numpy(),
                         "clean_predictions": clean.argmax(1).numpy()}
        if attacked:
            result.arrays["attack_distance"] = torch.cat([a[0] for a in attacked], 1).numpy()  # radii × samples
            result.arrays["attack_prediction"] = torch.cat([a[1] for a in attacked], 1).numpy()
        _measure(result, params, sigma, int(np.prod(ctx.x.shape[1:])), clean.argmax(1) == labels)
        return result

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        m, p = result.metrics, result.params
        table, linf = m.get("certified_accuracy"), m.get("linf_certified_accuracy") or {}
        if not isinstance(table, dict) or not table:
            return []
        key = f"{HEADLINE:g}" if f"{HEADLINE:g}" in table else next(iter(table))
        source = f"{result.kind}/{result.method}"
        detail = (f"lower bound (randomized smoothing, σ {p.get('sigma')}, n {p.get('n')}, α {p.get('alpha')}) on "
                  f"{m.get('samples', '?')} samples; smoothed accuracy {_pct(m.get('smoothed_accuracy'))}, "
                  f"{_pct(m.get('abstain_rate'))} abstained")
        upper = (m.get("attack_accuracy") or {}).get(key)
        if is_number(upper):
            detail += f"; PGD-L2 on the smoothed model {_pct(upper)} (upper bound)"
        violations = m.get("violations") or 0
        if violations:
            detail += f"; {violations} certified sample(s) broken within their radius: a bug"
        out = [Finding(f"Certified accuracy (smoothed, L2 radius {key})", _pct(table[key]), detail, source,
                       "warn" if violations else "info", cls.help)]
        for eps, value in linf.items():
            if is_number(value):
                out.append(Finding(
                    f"Certified accuracy (smoothed, L∞ eps {eps})", _pct(value),
                    f"via the L2 radius {float(eps) * math.sqrt(m.get('dimension', 0)):.3g} that contains the L∞ ball; "
                    "the L∞ attacks' robust accuracy is an upper bound, for the model without smoothing", source,
                    help=cls.help))
        return out


def _sigma(ctx: Context, params: CertifyParams, result: Result) -> float:
    """The noise σ: as asked, else the run's training noise, else DEFAULT_SIGMA; recorded in params."""
    info = getattr(ctx.run, "info", None)
    trained = (info.get("train") or {}).get("noise_sigma") if isinstance(info, dict) else None
    sigma = params.sigma or trained or DEFAULT_SIGMA
    if ctx.run is not None and not trained:
        result.warnings.append(f"the model was trained without noise (xdl train --noise-sigma {sigma:g}): its smoothed "
                               "classifier is usually far less accurate, and certifies little")
    elif trained and sigma != trained:
        result.warnings.append(f"σ {sigma:g} differs from the training noise σ {trained:g}: certified radii suffer")
    result.params["sigma"] = sigma
    return float(sigma)


def _attack(model, x, y, predicted, sigma: float, params: CertifyParams, ctx: Context, positions, common) -> tuple:
    """For each radius: the L2 size of the PGD-L2 perturbation found against the smoothed model,
    and the smoothed model's prediction there (-1: abstained)."""
    distances, predictions = [], []
    for radius in params.radii:
        with torch.enable_grad():
            adv = smoothing.attack(model, x, y.to(x.device), radius, sigma, steps=params.attack_steps,
                                   draws=params.attack_draws, seed=ctx.seed, positions=positions, rows=common["rows"],
                                   input_range=ctx.input_range)
        distances.append((adv - x).flatten(1).norm(dim=1).cpu())
        predictions.append(smoothing.predict(model, adv, sigma, params.attack_n, params.alpha, positions=positions,
                                             **common))
    return torch.stack(distances), torch.stack(predictions)


def _measure(result: Result, params: CertifyParams, sigma: float, dimension: int, base_correct: torch.Tensor) -> None:
    """Metrics, the bounds table, the curve and the summary, from the per-sample arrays."""
    a = result.arrays
    correct = a["prediction"] == a["labels"]
    l2 = sorted({float(r) for r in params.radii} | set(params.sweep))
    reach = smoothing.max_radius(sigma, params.n, params.alpha)
    m = result.metrics
    m.update(samples=len(correct), dimension=dimension, clean_accuracy=_mean(base_correct.numpy()),
             smoothed_accuracy=_mean(correct), abstain_rate=_mean(a["prediction"] < 0), max_radius=reach,
             # Zhai et al. 2020's average certified radius: a wrong or abstained sample counts 0.
             average_certified_radius=_mean(np.where(correct, a["radius"], 0.0)))
    m["certified_accuracy"] = dict(zip((f"{r:g}" for r in l2), smoothing.certified_accuracy(a["radius"], correct, l2).tolist()))
    balls = [e * math.sqrt(dimension) for e in params.sweep]
    m["linf_certified_accuracy"] = dict(zip((f"{e:g}" for e in params.sweep),
                                            smoothing.certified_accuracy(a["radius"], correct, balls).tolist()))
    rows = [{"norm": "L2", "eps": r, "l2_radius": r, "certified_accuracy": v} for r, v in zip(l2, m["certified_accuracy"].values())]
    rows += [{"norm": "L∞", "eps": e, "l2_radius": b, "certified_accuracy": v}
             for e, b, v in zip(params.sweep, balls, m["linf_certified_accuracy"].values())]
    if "attack_distance" in a:
        _attack_metrics(result, params, correct, rows)
    result.tables["bounds"] = rows
    if any(r > reach for r in l2):
        result.warnings.append(f"n={params.n:,} draws certify radii up to {reach:.3g} at σ {sigma:g}: larger radii "
                               "show 0 by construction (raise n)")
    headline = m["certified_accuracy"].get(f"{HEADLINE:g}")
    quoted = f"{_pct(headline)} at L2 radius {HEADLINE:g}" if headline is not None else \
        ", ".join(f"{_pct(v)} at {k}" for k, v in m["certified_accuracy"].items())
    result.summary = (f"randomized smoothing σ={sigma:g} on {len(correct)} samples: certified accuracy {quoted} "
                      f"(smoothed accuracy {_pct(m['smoothed_accuracy'])}, {_pct(m['abstain_rate'])} abstained, "
                      f"base model {_pct(m['clean_accuracy'])})")
    if figures_wanted() and len(correct):
        result.add_figure("certified_accuracy", _curve(a["radius"], correct, m, reach, sigma))


def _attack_metrics(result: Result, params: CertifyParams, correct: np.ndarray, rows: list[dict]) -> None:
    """The smoothed model's accuracy under PGD-L2 at each radius (an upper bound) and the
    samples certified beyond the perturbation that broke them (violations; 0 unless there is a bug)."""
    a, m = result.arrays, result.metrics
    broken = (a["attack_prediction"] >= 0) & (a["attack_prediction"] != a["labels"])
    violated = (a["prediction"] >= 0) & (a["attack_prediction"] >= 0) & (a["attack_prediction"] != a["prediction"]) \
        & (a["radius"] > a["attack_distance"])
    m["attack_accuracy"] = {f"{r:g}": _mean(correct & ~b) for r, b in zip(params.radii, broken)}
    m["violations"] = int(violated.any(0).sum())
    for row in rows:
        if row["norm"] == "L2" and f"{row['eps']:g}" in m["attack_accuracy"]:
            row["attack_accuracy"] = m["attack_accuracy"][f"{row['eps']:g}"]
            row["violations"] = int(violated[list(params.radii).index(row["eps"])].sum())
    if m["violations"]:
        result.warnings.append(f"{m['violations']} sample(s) certified at a radius larger than the perturbation that "
                               "broke the smoothed model: the certificate or the attack's verdict is wrong")


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _pct(value) -> str:
    return f"{100 * value:.1f}%" if is_number(value) and math.isfinite(value) else "—"


def _curve(radius: np.ndarray, correct: np.ndarray, metrics: dict, reach: float, sigma: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4), layout="constrained")
    ax = fig.subplots()
    grid = np.linspace(0, max(reach, float(radius.max(initial=0))) * 1.05, 200)
    ax.plot(grid, 100 * smoothing.certified_accuracy(radius, correct, grid), label=f"certified (σ = {sigma:g})")
    ax.axhline(100 * metrics["clean_accuracy"], color="gray", linestyle="--", linewidth=1, label="base model, clean")
    ax.axvline(reach, color="gray", linestyle=":", linewidth=1, label="most n draws certify")
    ax.set_xlabel("L2 radius (input units)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    return fig
