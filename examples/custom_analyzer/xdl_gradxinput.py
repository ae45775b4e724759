"""Gradient × input (Shrikumar et al., 2016) as an xdl analyzer: the template to copy.

An analyzer is one class with one verb. xdl has already seeded, moved the model to
``ctx.device`` and put it in eval mode before ``run`` is called, and restores it after;
``run`` only computes and returns a Result. Test it with the contract the built-ins pass::

    from xdl.testing import check_analyzer
    from xdl_gradxinput import GradientTimesInput

    def test_contract():
        check_analyzer(GradientTimesInput)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xdl.analysis import Analyzer, Context, Result


@dataclass
class Params:
    abs: bool = False  # keep the sign: positive pixels pushed towards the target class


class GradientTimesInput(Analyzer):
    kind = "explain"
    Params = Params
    description = "gradient × input attributions (an example third-party plugin)"

    def run(self, ctx: Context, params: Params) -> Result:
        from captum.attr import InputXGradient

        from xdl.plotting import attribution_grid, bar_chart

        targets = ctx.targets()
        method = InputXGradient(ctx.model)
        maps = [
            method.attribute(ctx.x[s].to(ctx.device).requires_grad_(), target=targets[s].to(ctx.device)).detach().cpu()
            for s in ctx.batches(desc=self.name)
        ]
        attributions = torch.cat(maps).numpy()
        if params.abs:
            attributions = np.abs(attributions)
        result = self.result(
            summary=f"gradient × input for {len(attributions)} samples",
            metrics={"mean_abs_attribution": float(np.abs(attributions).mean())},
            arrays={"attributions": attributions, "targets": targets.numpy()},
        )
        if ctx.kind == "image":
            result.add_figure("grid", attribution_grid(ctx.x.numpy(), attributions, cmap="hot" if params.abs else "bwr"))
        else:
            names = ctx.encoding.original_names if ctx.encoding else [str(i) for i in range(attributions.shape[1])]
            per_column = ctx.encoding.sum_to_columns(attributions) if ctx.encoding else attributions
            result.add_figure("columns", bar_chart(names, np.abs(per_column).mean(0), "gradient × input", "mean |attribution|"))
        return result
