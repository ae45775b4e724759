"""The audit page as a person sees it: numbers for people, only what applies, and a layout
measured in a real browser (element geometry, not just 'nothing overflows')."""

from __future__ import annotations

from pathlib import Path

import pytest

import xdl
from xdl.render.cards import applicable_training, human, run_cards
from xdl.render.layout import chromium, measure, templates_digest

from test_audit import copy_run, third_party  # noqa: F401  (third_party is a fixture)


@pytest.mark.parametrize("key, value, shown", [
    ("parameters", 421_738, "422 k"),
    ("flops_forward_per_sample", 8_482_304, "8.48 MFLOP"),
    ("peak_memory_bytes", 817_500_160, "780 MiB"),
    ("train_seconds", 8.275, "8.28 s"),
    ("train_seconds", 754.0, "12 min 34 s"),
    ("samples_per_second", 3056.99, "3,057 /s"),
    ("test_accuracy", 0.9861111, "0.9861"),
    ("samples", 19_395, "19,395"),
    ("amp", True, "yes"),
])
def test_numbers_are_formatted_for_people(key, value, shown):
    assert human(key, value) == shown


def test_training_card_lists_only_what_this_run_used():
    plain = {"epochs": 15, "lr": 0.003, "augment": [], "shift": 0.1, "rotate": 10.0, "noise": 0.05, "cutout": 0.25,
             "mixup": 0.0, "adv_train": "none", "adv_eps": 0.1, "adv_steps": 10, "amp": True, "l1": 0.0,
             "dp_epsilon": None, "seed": 0}
    assert applicable_training(plain) == {"epochs": 15, "lr": 0.003, "seed": 0}
    augmented = {**plain, "augment": ["shift", "flip"], "adv_train": "fgsm", "l1": 1e-4, "dp_epsilon": 3.0}
    assert applicable_training(augmented) == {"epochs": 15, "lr": 0.003, "augment": ["shift", "flip"], "shift": 0.1,
                                              "adv_train": "fgsm", "adv_eps": 0.1, "l1": 1e-4, "dp_epsilon": 3.0, "seed": 0}
    assert "adv_steps" in applicable_training({**plain, "adv_train": "pgd"})


def test_long_explanations_become_footnotes_and_imported_runs_show_their_source(digits_run):
    header = {"model": digits_run.info["model"], "data": digits_run.info["data"], "train": digits_run.info["train"],
              "metrics": digits_run.metrics, "compute": digits_run.info["compute"], "versions": {}}
    cards = run_cards(header)
    compute = next(c for c in cards.cards if c.title == "Compute")
    assert any("flop_counter" in note for note in cards.notes)
    assert any("resident memory" in note or "memory" in note for note in cards.notes)
    assert all(len(row.value) <= 40 for card in cards.cards for row in card.rows)
    assert [r.label for r in compute.rows][:2] == ["parameters", "FLOPs / sample"]
    imported = run_cards({**header, "train": {}, "imported": {"format": "hf", "source": "/models/resnet"}})
    assert [c.title for c in imported.cards] == ["Model", "Data", "Source", "Final metrics", "Compute", "Versions"]


@pytest.fixture(scope="module")
def page(digits_run, third_party, tmp_path_factory):  # noqa: F811
    """A real audit of the test run: built-in sections, the Run cards, and a third party's wide table."""
    path = copy_run(digits_run, tmp_path_factory.mktemp("page") / "run")
    return xdl.audit(path, only=["saliency", "fgsm", "calibration", "overfit", "wide"], samples=8, progress=False)


@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)")
def test_layout_holds_in_a_real_browser(page):
    pytest.importorskip("playwright")
    geometry = measure(page.html_path)
    # No text squeezed to a character per line, and no card or cell stretched by one value.
    assert geometry["squeezed"] == [], geometry["squeezed"]
    assert geometry["run_height"] < 1200, geometry
    assert geometry["tallest_card"]["height"] < 700, geometry["tallest_card"]
    assert geometry["tallest_cell"]["height"] < 200, geometry["tallest_cell"]
    assert geometry["tallest_finding"]["height"] < 400, geometry["tallest_finding"]
    # About a laptop screen and a half per section, whatever the analyzer: the digits demo's
    # 22 sections measure ~26,000 px (docs/screenshot.py prints it), under 1,500 + 22 × 1,300.
    assert geometry["page_height"] < 1500 + 1300 * geometry["sections"], geometry["page_height"]
    assert geometry["scroll_width"] <= geometry["inner_width"] == 1280
    assert geometry["images"] >= 3 and geometry["images_decoded"]
    assert geometry["toc_sticky"]
    # Each section is collapsible and every figure has a caption.
    html = page.html_path.read_text()
    assert html.count("<details open>\n  <summary><h2>") == geometry["sections"] + 1  # + the Run section
    assert html.count("<figure>") == html.count("<figcaption>")


def test_the_readme_screenshot_is_of_the_current_templates():
    from PIL import Image

    png = Path(__file__).resolve().parent.parent / "docs" / "audit.png"
    with Image.open(png) as image:
        stamped = image.text.get("xdl-templates-sha256")
    assert stamped == templates_digest(), (
        "docs/audit.png was taken before the page templates last changed: run `python docs/screenshot.py`"
    )
