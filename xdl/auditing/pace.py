"""How many samples of a method fit the audit's time budget on this model."""

from __future__ import annotations

import time

import torch

from xdl.analysis.base import Analyzer, Context, parse_params
from xdl.methods.robust import input_gradient


# A method whose single sample would take more than this many budgets is skipped, not run on one.
SKIP_BEYOND = 2.0


class Pace:
    """How many samples of a method fit the audit's time budget on this model: seconds per
    forward+backward pass, timed once on a few test samples when a method first asks."""

    def __init__(self, probe: Context, budget: float):
        self.probe, self.budget, self._seconds = probe, budget, None

    def seconds_per_pass(self) -> float:
        if self._seconds is None:
            ctx = self.probe
            x = ctx.x[: min(8, ctx.rows(), len(ctx.x))].to(ctx.device)
            for _ in range(2):  # the first pass pays one-off set-up (kernels chosen for the shape)
                started = time.perf_counter()
                with torch.enable_grad():
                    xg = x.detach().requires_grad_()
                    input_gradient(ctx.model, xg, ctx.model(xg).argmax(1).detach())
                self._seconds = (time.perf_counter() - started) / len(x)
        return self._seconds

    def samples(self, cls: type[Analyzer], params: dict[str, str], count: int | None) -> tuple[int | None, str]:
        """The sample count to use, and a note when the budget cut it."""
        if not self.budget or not count or not self.probe.kind == "image":
            return count, ""
        parsed = parse_params(cls.Params, params)
        passes = cls.passes(parsed, tuple(self.probe.x.shape[1:]))
        if passes is None:
            return count, ""
        each = passes * self.seconds_per_pass() + cls.seconds_beside_model(parsed, self.probe.x[:1][0])
        if each > SKIP_BEYOND * self.budget:
            return 0, (f"skipped: one sample would take about {each:.0f} s on this model, over {SKIP_BEYOND:g}× the "
                       f"audit's budget of {self.budget:g} s per method (xdl audit --budget; xdl {cls.kind} RUN "
                       f"--method {cls.name} runs it)")
        fits = max(1, int(self.budget / each))
        if fits >= count:
            return count, ""
        return fits, (f"the audit explained {fits} of the {count} samples asked for: at about {each:.1f} s "
                      f"per sample on this model, more would exceed its budget of {self.budget:g} s per method "
                      "(xdl audit --budget; xdl explain takes any number)")
