"""Common corruptions: exact values where the corruption has one, the analyzer's table and heat map."""

from __future__ import annotations

import pytest
import torch

import xdl
from xdl.methods.corruptions import TYPES, corrupt
from xdl.errors import XdlError


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 28, 28, generator=g) * 0.6 + 0.2


def test_brightness_and_contrast_exact(images):
    assert torch.allclose(corrupt(images, "brightness", 1), (images + 0.1).clamp(0, 1))
    assert torch.allclose(corrupt(images, "brightness", 5), (images + 0.5).clamp(0, 1))
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(corrupt(images, "contrast", 2), (images - mean) * 0.5 + mean, atol=1e-6)


def test_translate_moves_whole_pixels_and_rotation_keeps_a_centred_disk():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 12:16, 12:16] = 1.0
    out = corrupt(x, "translate", 3, torch.Generator().manual_seed(1))
    # Whole-pixel shift: the same 16 bright pixels, elsewhere, no blur.
    assert torch.isclose(out.sum(), torch.tensor(16.0), atol=1e-4) and ((out - 0.5).abs() > 0.49).all()
    assert not torch.equal(out, x)
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    disk = (((rows - 13.5) ** 2 + (cols - 13.5) ** 2) < 36).float().view(1, 1, 28, 28)
    assert (corrupt(disk, "rotate", 5) - disk).abs().mean() < 0.02


def test_every_type_and_severity_stays_in_range_and_grows_with_severity(images):
    for kind in TYPES:
        changes = []
        for severity in (1, 5):
            out = corrupt(images, kind, severity, torch.Generator().manual_seed(0))
            assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1, kind
            changes.append(float((out - images).abs().mean()))
        assert changes[0] > 0, kind
        assert changes[1] >= changes[0] * 0.9, kind


def test_corruptions_are_reproducible_and_refuse_bad_input(images):
    a = corrupt(images, "glass_blur", 3, torch.Generator().manual_seed(5))
    b = corrupt(images, "glass_blur", 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(XdlError, match="unknown corruption"):
        corrupt(images, "snow", 1)
    with pytest.raises(XdlError, match="severity"):
        corrupt(images, "fog", 6)


def test_analyzer_table_heatmap_and_findings(digits_run):
    result = xdl.attack(digits_run, "corruptions", indices=range(40), params={"types": ["brightness", "impulse_noise"]})
    rows = result.tables["corruptions"]
    assert len(rows) == 10 and "heatmap" in result.figures
    mean = sum(r["accuracy"] for r in rows) / len(rows)
    assert result.metrics["mean_corruption_accuracy"] == pytest.approx(mean)
    # Brightness is deterministic: its accuracy is the model's on x + 0.3 (severity 3), clipped.
    test = digits_run.data.test
    with torch.no_grad():
        expected = float((digits_run.model.eval()((test.x[:40] + 0.3).clamp(0, 1)).argmax(1) == test.y[:40]).double().mean())
    assert [r["accuracy"] for r in rows if r["corruption"] == "brightness" and r["severity"] == 3] == [pytest.approx(expected)]
    from xdl_plugins.corruptions import Corruptions

    (finding,) = Corruptions.findings(result)
    assert finding.label == "Mean corruption accuracy" and finding.help
