"""The faster estimators behind shap, lime and ig: known answers, unbiasedness, exactness of the shortcuts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import xdl
from xdl.analysis import Context
from xdl.models.inference import fast_model
from xdl_plugins.shap import expected_gradients, reliability_metrics


class Quadratic(nn.Module):
    """f_k(x) = sum_i a_ki x_i^2, whose expected-gradients values are a_ki (x_i^2 - E[r_i^2]) exactly."""

    def __init__(self, features: int):
        super().__init__()
        self.a = nn.Parameter(torch.randn(2, features))

    def forward(self, x):
        return (x[:, None] ** 2 * self.a).sum(-1)


def test_stratified_expected_gradients_are_exact_on_a_linear_model():
    # Gradients are constant, so only the references matter; drawing each background sample
    # once per cycle makes the mean over references exact: W[t] * (x - mean(background)).
    torch.manual_seed(0)
    model, x, background = nn.Linear(6, 3), torch.randn(5, 6), torch.randn(10, 6)
    target = torch.tensor([0, 1, 2, 0, 1])
    for draws in (10, 30):
        values, _ = expected_gradients(Context(model=model, x=x, seed=3), background, target, draws)
        expected = model.weight.detach()[target] * (x - background.mean(0))
        torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


def test_stratified_expected_gradients_are_unbiased_and_less_noisy_than_iid():
    # 40 draws over 40 references: each reference once, so only the path points add noise.
    torch.manual_seed(1)
    model, x, background = Quadratic(8), torch.randn(4, 8), torch.randn(40, 8)
    target = torch.tensor([0, 1, 1, 0])
    exact = model.a.detach()[target] * (x ** 2 - (background ** 2).mean(0))
    runs = {
        sampling: torch.stack([expected_gradients(Context(model=model, x=x, seed=s), background, target, 40, sampling)[0]
                               for s in range(40)])
        for sampling in ("stratified", "iid")
    }
    scale = exact.abs().mean()
    for values in runs.values():  # the mean over seeds converges to the exact value: no bias
        assert (values.mean(0) - exact).abs().mean() < 0.1 * scale
    rms = {k: float(((v - exact) ** 2).mean().sqrt()) for k, v in runs.items()}
    assert rms["stratified"] < 0.6 * rms["iid"], rms


def test_split_half_reliability_follows_spearman_brown():
    metrics = reliability_metrics(torch.tensor([[0.9, 0.6]]))
    assert metrics["split_half_correlation_median"] == pytest.approx(0.6)
    assert metrics["estimated_correlation_with_converged_min"] == pytest.approx(math.sqrt(2 * 0.6 / 1.6), abs=1e-6)
    assert metrics["estimated_correlation_with_converged_median"] == pytest.approx(math.sqrt(2 * 0.6 / 1.6), abs=1e-6)


def test_shap_reports_its_fidelity_estimate(digits_run):
    result = xdl.explain(digits_run, "shap", samples=3, params={"background": 20}, save=False)
    assert result.metrics["draws"] == 50
    # On a trained CNN the two halves of the draws agree far better than chance.
    assert 0.5 < result.metrics["estimated_correlation_with_converged_median"] <= 1


def test_lime_classifies_each_distinct_mask_once(digits_run):
    result = xdl.explain(digits_run, "lime", samples=3, params={"segmentation": "slic", "n_segments": 4}, save=False)
    superpixels = result.arrays["segments"].reshape(3, -1).max(1) + 1
    # 1,000 masks over S superpixels hold at most 2^S distinct ones (and nearly all of them).
    assert result.metrics["model_evaluations_per_image"] <= np.mean(2.0 ** superpixels)
    assert result.metrics["model_evaluations_per_image"] >= np.mean(2.0 ** superpixels) - 1


def test_fast_model_computes_the_same_function_and_gradients(digits_run):
    model = digits_run.model
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = digits_run.data.test.x[:8].clone().requires_grad_()
    fast = fast_model(model, x[:2].detach())
    assert fast is not model and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    (g1,) = torch.autograd.grad(model(x)[:, 3].sum(), x)
    (g2,) = torch.autograd.grad(fast(x)[:, 3].sum(), x)
    torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)


class ConvNorm(nn.Module):
    """conv → BatchNorm, with the conv's output read as ``how`` says (statistics set, eval mode)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)
        self.bn.running_mean.uniform_(-1, 1), self.bn.running_var.uniform_(0.5, 2), self.bn.weight.data.uniform_(0.5, 2)

    def forward(self, x):
        if x.shape[1] != 1:  # a shape check, as Hugging Face models make: fixed for a given input shape
            raise ValueError("one channel")
        y = self.conv(x)
        if self.how == "branch":  # which reader the conv has depends on the data
            return (self.bn(y) if x.sum() > 0 else y).flatten(1)
        return (self.bn(y) + y if self.how == "shared" else self.bn(y)).flatten(1)


@pytest.mark.parametrize("how, folded", [("plain", True), ("shared", False), ("branch", False)])
def test_fast_model_folds_a_batchnorm_only_where_it_alone_reads_the_convolution(how, folded):
    torch.manual_seed(0)
    model = ConvNorm(how).eval()
    fast = fast_model(model, torch.rand(2, 1, 5, 5))
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) != folded
    for x in (torch.rand(3, 1, 5, 5), -torch.rand(3, 1, 5, 5)):  # both branches of "branch"
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)


def test_fast_model_folds_a_hugging_face_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    from xdl.models.imported import Imported

    torch.manual_seed(0)
    net = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                    layer_type="basic", num_labels=3)).eval()
    for m in net.modules():  # statistics that make a wrong fold show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    model = Imported(net, (3, 32, 32)).eval()
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    fast = fast_model(model, x[:2].detach())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    (g1,) = torch.autograd.grad(model(x)[:, 1].sum(), x)
    (g2,) = torch.autograd.grad(fast(x)[:, 1].sum(), x)
    torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)


def test_fast_model_keeps_a_model_that_cannot_run_channels_last():
    class Viewed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 2, 3), nn.Linear(18, 2)

        def forward(self, x):
            return self.head(self.conv(x).view(len(x), -1))  # view needs the default layout

    model = Viewed().eval()
    assert fast_model(model, torch.rand(2, 1, 5, 5)) is model
