"""APGD, Square and AutoAttack over a whole split (Croce & Hein 2020), with gradient-masking checks.

The attacks themselves are :mod:`xdl.methods.autoattack` (batched tensor code); the checks are
:mod:`xdl.methods.masking`. Like FGSM and PGD, eps is in the input's natural range and may be a
sweep; the last eps is the headline, and the one the checks run at.

    >>> xdl.attack(run, "autoattack", params={"eps": 0.3}).metrics["robust_accuracy"]   # doctest: +SKIP
    >>> xdl.attack(run, "apgd", params={"eps": 0.5, "norm": "l2", "loss": "dlr"})      # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from xdl.methods import autoattack

from xdl.methods import masking

from xdl.methods import robust
from xdl.analysis.base import Context, Finding, Result
from xdl.errors import XdlError
from xdl_plugins.attacks import FgsmParams, _Attack

MAX_STEPS = 10_000
MAX_QUERIES = 100_000
MAX_RESTARTS = 100


def _bounded(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


# The audit's AutoAttack budget (APGD steps, APGD-T targets, Square queries) keeps the digits
# audit under 2 minutes on a CPU; `xdl attack` runs the full one.
AUDIT_BUDGET = {"steps": "25", "targets": "3", "queries": "300"}


@dataclass
class ApgdParams(FgsmParams):
    steps: int = 100
    restarts: int = 1
    loss: Literal["ce", "dlr"] = "ce"
    norm: Literal["linf", "l2"] = "linf"

    def __post_init__(self) -> None:
        super().__post_init__()
        _bounded("steps", self.steps, 1, MAX_STEPS)
        _bounded("restarts", self.restarts, 1, MAX_RESTARTS)
        if self.norm not in robust.NORMS:
            raise ValueError(f"unknown norm {self.norm!r}: choose linf or l2")
        if self.loss not in ("ce", "dlr"):
            raise ValueError(f"unknown loss {self.loss!r}: choose ce or dlr")


@dataclass
class SquareParams(FgsmParams):
    queries: int = 5000
    norm: Literal["linf", "l2"] = "linf"

    def __post_init__(self) -> None:
        super().__post_init__()
        _bounded("queries", self.queries, 1, MAX_QUERIES)
        if self.norm not in robust.NORMS:
            raise ValueError(f"unknown norm {self.norm!r}: choose linf or l2")


@dataclass
class AutoAttackParams(FgsmParams):
    norm: Literal["linf", "l2"] = "linf"
    steps: int = 100  # APGD iterations, per restart and per target
    restarts: int = 1
    targets: int = 9  # APGD-T's target classes: the most likely ones after the top
    queries: int = 5000  # Square's budget; 0 leaves Square out
    checks: bool = True  # run the gradient-masking checks at the last eps

    def __post_init__(self) -> None:
        super().__post_init__()
        _bounded("steps", self.steps, 1, MAX_STEPS)
        _bounded("restarts", self.restarts, 1, MAX_RESTARTS)
        _bounded("targets", self.targets, 0, 1000)
        _bounded("queries", self.queries, 0, MAX_QUERIES)
        if self.norm not in robust.NORMS:
            raise ValueError(f"unknown norm {self.norm!r}: choose linf or l2")


def _norm(params) -> str:
    return "L∞" if params.norm == "linf" else "L2"


class Apgd(_Attack):
    """Auto-PGD (Croce & Hein 2020): momentum and a self-halving step size, CE or DLR loss."""

    Params: ClassVar[type] = ApgdParams

    @classmethod
    def steps(cls, params) -> float:
        return float(params.steps * params.restarts)
    description: ClassVar[str] = "APGD: PGD with momentum and an adaptive step size (CE or DLR loss)"
    check_params: ClassVar[dict] = {"steps": 5}
    sharding: ClassVar[str] = "samples"

    def perturb(self, ctx, x, y, eps, params, mask, first_grad=None):
        if params.loss == "dlr" and ctx.num_classes < 3:
            raise XdlError("the DLR loss needs at least 3 classes; use loss=ce")
        return autoattack.apgd(ctx.fast_model(), x, y, eps, steps=params.steps, restarts=params.restarts, loss=params.loss,
                               norm=params.norm, input_range=ctx.input_range, mask=mask)

    def label(self, params) -> str:
        return f"APGD-{params.loss.upper()}-{params.steps} {_norm(params)}"


class Square(_Attack):
    """Square Attack (Andriushchenko et al. 2020): score-based random search, no gradients."""

    Params: ClassVar[type] = SquareParams

    @classmethod
    def steps(cls, params) -> float:
        return params.queries / 3  # forward passes only
    description: ClassVar[str] = "Square: score-based random-search attack that needs no gradients"
    applies_to: ClassVar[frozenset[str]] = frozenset({"image"})
    check_params: ClassVar[dict] = {"queries": 20}
    sharding: ClassVar[str] = "samples"

    def perturb(self, ctx, x, y, eps, params, mask, first_grad=None):
        return autoattack.square(ctx.fast_model(), x, y, eps, queries=params.queries, norm=params.norm, input_range=ctx.input_range)

    def label(self, params) -> str:
        return f"Square-{params.queries} {_norm(params)}"


class AutoAttack(_Attack):
    """AutoAttack: APGD-CE, targeted APGD-DLR, Square in sequence; a sample is robust only if all fail."""

    Params: ClassVar[type] = AutoAttackParams
    includes: ClassVar[tuple[str, ...]] = ("apgd", "square")
    headline: ClassVar[int] = 2  # the audit's default headline attack

    @classmethod
    def audit_params(cls, data_kind: str, eps: float) -> dict[str, str]:
        return {"eps": str(eps), **AUDIT_BUDGET}

    @classmethod
    def steps(cls, params) -> float:
        """Every attack on every sample (an upper bound: later ones see only the unbroken ones);
        the masking checks' own attacks about double it."""
        return (params.steps * (params.restarts + params.targets) + params.queries / 3) * (2 if params.checks else 1)
    description: ClassVar[str] = "AutoAttack: APGD-CE, APGD-T and Square, per-sample worst case, masking checks"
    check_params: ClassVar[dict] = {"steps": 3, "targets": 1, "queries": 5, "checks": False}
    sharding: ClassVar[str] = "samples"

    def perturb(self, ctx, x, y, eps, params, mask, first_grad=None):
        adv, broken_by = autoattack.autoattack(
            ctx.fast_model(), x, y, eps, norm=params.norm, steps=params.steps, restarts=params.restarts,
            targets=params.targets, queries=params.queries, input_range=ctx.input_range, mask=mask,
        )
        self._broken.append(broken_by.cpu())
        return adv

    def label(self, params) -> str:
        return f"AutoAttack {_norm(params)}"

    def run(self, ctx: Context, params) -> Result:
        self._broken: list[torch.Tensor] = []
        start = time.perf_counter()
        result = super().run(ctx, params)
        seconds = {"attacks": time.perf_counter() - start}
        # perturb ran batch by batch for each eps in turn: the last len(x) records are the headline eps.
        broken_by = torch.cat(self._broken)[-len(ctx.x):] if self._broken else torch.empty(0, dtype=torch.long)
        result.arrays["broken_by"] = broken_by.numpy()
        counts = {name: int((broken_by == code).sum()) for code, name in enumerate(autoattack.ATTACKS)}
        counts["robust"] = int((broken_by < 0).sum())
        # Shares, not counts: under torchrun the merge averages metrics weighted by share size.
        result.metrics["broken_by"] = {k: v / max(len(broken_by), 1) for k, v in counts.items()}
        result.tables["broken_by"] = [{"attack": k, "samples": v} for k, v in counts.items()]
        if params.checks and len(ctx.x):
            labels = torch.as_tensor(result.arrays["labels"])
            mask = None
            if ctx.kind == "tabular" and ctx.encoding is not None:
                mask = torch.as_tensor(ctx.encoding.numeric_mask(), dtype=torch.float32)
            start = time.perf_counter()
            rows = masking.run_checks(
                ctx.fast_model(), ctx.x, labels, params.sweep[-1], norm=params.norm, input_range=ctx.input_range, mask=mask,
                broken_by=broken_by if params.queries > 0 else None, steps=params.steps, restarts=params.restarts,
                batch_size=ctx.batch_size, device=ctx.device,
            )
            seconds["masking checks"] = time.perf_counter() - start
            failed = masking.failed(rows)
            result.tables["masking_checks"] = rows
            result.metrics["masking_checks_failed"] = failed
            result.metrics["masking_checks_run"] = sum(r["passed"] is not None for r in rows)
            if failed:
                result.summary += f"; gradient-masking checks FAILED ({', '.join(failed)}): evaluation may be unreliable"
                result.warnings.append(f"gradient-masking checks failed: {', '.join(failed)}; the evaluation may be unreliable")
            else:
                result.summary += f"; all {result.metrics['masking_checks_run']} gradient-masking checks passed"
        # What the evaluation and what the checks cost, apart: a table, not metrics, which two
        # runs with one seed must give alike.
        result.tables["seconds"] = [{"part": k, "seconds": round(v, 3)} for k, v in seconds.items()]
        result.summary += " (" + ", ".join(f"{r['part']} {r['seconds']:.1f} s" for r in result.tables["seconds"]) + ")"
        return result

    @classmethod
    def findings(cls, result: Result) -> list[Finding]:
        m = result.metrics
        value, eps = m.get("robust_accuracy"), m.get("eps")
        if not isinstance(value, (int, float)) or eps is None:
            return []
        clean = m.get("clean_accuracy")
        source = f"{result.kind}/{result.method}"
        failed = m.get("masking_checks_failed")
        out = [Finding(
            f"AutoAttack robust accuracy (eps {eps:g})", f"{100 * value:.1f}%",
            f"worst case of APGD-CE, APGD-T and Square on {m.get('samples', '?')} samples"
            + (f"; clean {100 * clean:.1f}%" if isinstance(clean, (int, float)) else ""),
            source, "warn" if failed else "info",
            help="The share of samples that no attack in the AutoAttack ensemble could flip within eps; it is a "
                 "lower bound-seeking estimate that is usually below PGD's, and a large drop from the clean accuracy "
                 "means the model is not robust at this eps (Croce & Hein 2020).",
        )]
        if failed is not None:
            run_count = m.get("masking_checks_run", 0)
            out.append(Finding(
                "Gradient-masking checks",
                f"{len(failed)} of {run_count} failed" if failed else f"all {run_count} passed",
                ("evaluation may be unreliable: " + ", ".join(failed)) if failed else "no sign of obfuscated gradients",
                source, "warn" if failed else "info",
                help="Each check is a symptom of gradients that hide rather than lack adversarial examples "
                     "(e.g. a black-box attack beating white-box ones, accuracy not falling at huge eps); any failure "
                     "means the robust accuracy may be overstated (Athalye et al. 2018; Carlini et al. 2019).",
            ))
        return out
