"""``xdl audit``: selection, reuse, failures, a third party's section, and the page itself.

The audit page as a person sees it: numbers for people, only what applies, and a layout
measured in a real browser (element geometry, not just 'nothing overflows').
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import copy_run

import xdl
from xdl.analysis.base import Result
from xdl.analysis.registry import PluginInfo
from xdl.auditing.audit import Audit, Section, findings, select
from xdl.errors import XdlError
from xdl.render import render_audit
from xdl.render.cards import applicable_training, human, run_cards
from xdl.render.layout import chromium, measure, templates_digest

# -----------------------------------------------------------------------------------------
# audit
# -----------------------------------------------------------------------------------------


# A third-party package, installed the way pip would leave it: a module and a dist-info
# folder whose entry points register one analyzer that works and one that crashes.
THIRD_PARTY = '''
from dataclasses import dataclass

import numpy as np
from xdl.analysis.base import Analyzer


@dataclass
class WideParams:
    mode: str = "auto"


class Wide(Analyzer):
    kind = "report"
    samples = 6
    Params = WideParams

    def run(self, ctx, params):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot(np.arange(len(ctx.x)))
        result = self.result(summary="<b>not bold</b> & counted", metrics={"rows": len(ctx.x), "nested": {"a": 0.5}})
        result.add_figure("curve", fig)
        # 40 columns and one long unbroken word: the page must still fit a laptop screen.
        result.tables["wide"] = [{f"column_{i}": i * row for i in range(40)} for row in range(30)]
        result.warnings.append("x" * 400)
        result.params["mode"] = "fast"  # what "auto" resolved to: the saved params differ from the asked ones
        return result


class Broken(Analyzer):
    kind = "explain"

    def run(self, ctx, params):
        raise RuntimeError("boom")


class Picky(Analyzer):
    kind = "attack"

    @classmethod
    def applies(cls, ctx):
        raise ValueError("cannot tell")
'''


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    (site / "xdl_thirdparty_fake.py").write_text(THIRD_PARTY)
    info = site / "xdl_thirdparty_fake-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xdl-thirdparty-fake\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[xdl.report]\nwide = xdl_thirdparty_fake:Wide\n\n[xdl.explain]\nbroken = xdl_thirdparty_fake:Broken\n"
        "\n[xdl.attack]\npicky = xdl_thirdparty_fake:Picky\n"
    )
    sys.path.insert(0, str(site))
    yield site
    sys.path.remove(str(site))
    sys.modules.pop("xdl_thirdparty_fake", None)


@pytest.fixture(scope="module")
def audited(digits_run, third_party, tmp_path_factory):
    path = copy_run(digits_run, tmp_path_factory.mktemp("audit") / "run")
    return xdl.audit(path, only=["saliency", "pgd", "wide", "broken", "picky"], samples=8, progress=False)


@pytest.fixture(scope="module")
def html(audited) -> str:
    """The page as first written (later tests audit the same run again and replace it)."""
    return audited.html_path.read_text()


@pytest.fixture(scope="module")
def audit_json(audited, html) -> str:
    return audited.json_path.read_text()


def images(html: str) -> list[str]:
    return re.findall(r'<img[^>]*\bsrc="([^"]*)"', html)


def test_audit_writes_one_self_contained_page(audited, html):
    assert [s.key for s in audited.sections] == ["explain/broken", "explain/saliency", "attack/pgd", "attack/picky",
                                                 "report/wide"]
    assert not re.search(r"<script|<link|@import|url\(|https?://", html, re.I)
    sources = images(html)
    # saliency's grid, PGD's examples, the third party's curve: every figure, inlined.
    assert len(sources) == sum(len(s.result.figures) for s in audited.sections if s.result) >= 3
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for section in audited.sections:
        assert f'id="{section.anchor}"' in html
    # The header comes from run.json.
    assert "cnn" in html and "digits" in html and audited.run.info["versions"]["torch"] in html


def test_audit_json_is_the_page_without_images(audited, audit_json):
    data = json.loads(audit_json)
    assert "base64" not in audit_json
    by_key = {f"{s['kind']}/{s['method']}": s for s in data["sections"]}
    pgd = by_key["attack/pgd"]
    assert pgd["status"] == "computed" and pgd["samples"] == 8 and pgd["params"]["eps"] == 0.1
    assert pgd["computed_on"] == "8 samples of the test split" and pgd["provenance"]["samples"] == 8
    for figure in pgd["figures"]:
        assert (audited.run.path / figure).is_file()
    assert data["settings"]["eps"] == 0.1
    robust = [f for f in data["findings"] if f["source"] == "attack/pgd"][0]
    assert robust["value"] == f"{100 * pgd['metrics']['robust_accuracy']:.1f}%"


def test_a_failing_analyzer_is_a_failed_section(audited, html):
    broken = audited.sections[0]
    assert broken.status == "failed" and broken.error == "RuntimeError: boom"
    assert 'raise RuntimeError("boom")' in broken.traceback
    picky = audited.sections[3]  # even a crash in applies() costs only its own section
    assert picky.status == "failed" and picky.error == "ValueError: cannot tell"
    assert "RuntimeError: boom" in html and "2 of 5 analyzers failed" in " ".join(html.split())


def test_third_party_section_is_rendered_and_escaped(audited, html):
    wide = audited.sections[4]
    assert wide.package == "xdl-thirdparty-fake" and wide.samples == 6  # its own default, under --samples 8
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; counted" in html and "<b>not bold" not in html
    assert "nested.a" in html and "first 12 of 30 rows" in html and "column_39" in html


def test_saved_results_are_reused_only_for_what_they_were_computed_on(audited, audit_json):
    run = audited.run
    pgd = run.path / "attack" / "pgd" / "result.json"
    before = pgd.stat().st_mtime_ns
    saved = json.loads(pgd.read_text())["provenance"]
    assert saved["split"] == "test" and saved["samples"] == 8 and len(saved["indices"]) == 8
    assert saved["params"]["eps"] == 0.1 and saved["seed"] == run.seed and saved["target"] == "predicted"
    again = xdl.audit(run, only=["pgd"], samples=8, progress=False)
    assert again.sections[0].status == "reused" and pgd.stat().st_mtime_ns == before
    assert again.sections[0].computed_on == "8 samples of the test split"
    # The 8-sample result does not stand for the whole test split's robust accuracy.
    whole = xdl.audit(run, only=["pgd"], progress=False)
    assert whole.sections[0].status == "computed" and whole.sections[0].result.path.name == "pgd-2"
    assert whole.sections[0].result.provenance["samples"] == len(run.data.test)
    # Nor does one the user made on another split with the same parameters.
    shutil.rmtree(run.path / "attack" / "pgd-2")
    xdl.attack(run, "pgd", samples=len(run.data.test), split="train", params={"eps": 0.1})
    assert (run.path / "attack" / "pgd-2").is_dir()
    other = xdl.audit(run, only=["pgd"], progress=False)
    assert other.sections[0].status == "computed" and other.sections[0].result.path.name == "pgd-3"
    redo = xdl.audit(run, only=["pgd"], samples=8, recompute=True, progress=False)
    assert redo.sections[0].status == "computed" and redo.sections[0].result.path.name == "pgd"
    assert pgd.stat().st_mtime_ns != before and not (run.path / "attack" / "pgd-4").exists()


def test_reuse_needs_the_same_weights(audited, audit_json, tmp_path):
    run = copy_run(audited.run, tmp_path / "run")
    shutil.copytree(audited.run.path / "attack" / "pgd", run / "attack" / "pgd")
    assert xdl.audit(run, only=["pgd"], samples=8, progress=False).sections[0].status == "reused"
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "model.safetensors"))
    first = next(iter(state))
    state[first] = state[first] + 0.01
    save_file(state, str(run / "model.safetensors"))
    assert xdl.audit(run, only=["pgd"], samples=8, progress=False).sections[0].status == "computed"


def test_only_and_skip_choose_analyzers():
    plugins = [PluginInfo(n, k, "", "xdl", "0") for k, n in [("explain", "ig"), ("explain", "shap"), ("attack", "pgd")]]
    assert [p.name for p in select(plugins, ["explain"], ["shap"])] == ["ig"]
    assert [p.name for p in select(plugins, None, ["explain/ig", "pgd"])] == ["shap"]
    with pytest.raises(XdlError, match="no analyzer called 'nope'"):
        select(plugins, ["nope"], None)


def test_each_attack_quotes_its_own_eps_and_a_failed_section_has_no_findings(digits_run):
    fgsm = Result("fgsm", "attack", metrics={"clean_accuracy": 0.9, "robust_accuracy": 0.3, "eps": 0.3, "samples": 50},
                  tables={"robustness": [{"eps": 0.0, "robust_accuracy": 0.9}, {"eps": 0.3, "robust_accuracy": 0.3}]})
    pgd = Result("pgd", "attack", metrics={"clean_accuracy": 0.9, "robust_accuracy": 0.6, "eps": 0.05, "samples": 8})
    sections = [Section("attack", "fgsm", "computed", fgsm), Section("attack", "pgd", "reused", pgd),
                Section("report", "bias", "failed", error="no groups")]
    found = findings(digits_run, sections)
    assert [f.label for f in found] == ["Test accuracy", "Robust accuracy (FGSM, eps 0.3)", "Robust accuracy (PGD, eps 0.05)"]
    assert found[0].value == f"{100 * digits_run.metrics['test_accuracy']:.1f}%"
    assert (found[1].value, found[1].level, found[1].source) == ("30.0%", "warn", "attack/fgsm")
    assert "sweep 90% at 0, 30% at 0.3" in found[1].detail and "on 50 samples" in found[1].detail
    assert (found[2].value, found[2].level) == ("60.0%", "info") and "Madry" in found[2].help
    assert all(f.help for f in found)


def test_findings_come_from_the_analyzers_own_classes(digits_run):
    worst = {"class": "yes", "demographic_parity_difference": 0.25, "disparate_impact": 0.6, "flagged": True}
    results = [
        Result("bias", "report", metrics={"worst_class": "8", "worst_class_f1": 0.8, "worst_class_gap": 0.15,
                                          "groups": {"sex": {"groups": 2, "worst": worst}}}),
        Result("overfit", "report", metrics={"diagnosis": "overfitting", "generalization_gap": {"accuracy": 0.12}}),
        Result("calibration", "report", metrics={"ece": 0.042, "ece_scaled": 0.011}),
    ]
    found = findings(digits_run, [Section(r.kind, r.method, "computed", r) for r in results])
    got = {f.label: (f.value, f.level) for f in found}
    assert got == {
        "Test accuracy": (f"{100 * digits_run.metrics['test_accuracy']:.1f}%", "info"),
        "Worst-class gap": ("0.15", "warn"),
        "Worst-group gap (sex)": ("0.25", "warn"),
        "Overfitting": ("overfitting", "warn"),
        "Calibration (ECE)": ("0.042", "info"),
    }
    assert "disparate impact 0.60 (below 4/5)" in found[2].detail and "0.011 after temperature" in found[4].detail
    assert "four-fifths" in found[2].help and "Guo et al. 2017" in found[4].help


def test_the_audit_module_names_no_plugin_metric_key():
    import inspect

    import xdl.analysis.evaluation
    import xdl.auditing.audit

    for module in (xdl.auditing.audit, xdl.analysis.evaluation):
        source = inspect.getsource(module)
        for key in ("robust_accuracy", "worst_class", "demographic_parity", '"ece"', "diagnosis", "most_trusted",
                    '"shap"', '"weights"', '"segments"'):
            assert key not in source, (module.__name__, key)


def test_render_any_result_from_an_unknown_kind(digits_run):
    result = Result("fancy", "custom", summary="a new kind", metrics={"score": 0.25, "per": [1, 2, 3]},
                    tables={"t": [{"a": 1}, {"b": "<i>"}]})
    page = render_audit(Audit(digits_run, [Section("custom", "fancy", "computed", result)], []))
    assert 'id="custom-fancy"' in page and "a new kind" in page and "1, 2, 3" in page and "&lt;i&gt;" in page


def test_cli_says_where_the_audit_is(audited, audit_json):
    from xdl.cli.main import cli

    out = CliRunner().invoke(cli, ["audit", str(audited.run.path), "--only", "saliency", "-q"])
    assert out.exit_code == 0, out.output
    assert f"written to {audited.html_path}" in out.output and audited.html_path.resolve().as_uri() in out.output


def test_a_time_budget_cuts_expensive_methods_and_says_so(digits_run, tmp_path, monkeypatch):
    import shutil as sh

    from xdl.auditing.audit import Pace

    run = tmp_path / "run"
    sh.copytree(digits_run.path, run)
    # 10 ms per model pass: LIME's 1000/3 passes take ~3.3 s a sample, so a 5 s budget fits one; saliency fits all.
    monkeypatch.setattr(Pace, "seconds_per_pass", lambda self: 0.01)
    result = xdl.audit(run, only=["lime", "saliency"], samples=4, budget=5, progress=False)
    lime, saliency = (next(s for s in result.sections if s.method == name) for name in ("lime", "saliency"))
    assert lime.samples == 1 and len(lime.result.arrays["weights"]) == 1
    assert any("the audit explained 1 of the 4 samples" in w for w in lime.result.warnings)
    assert saliency.samples == 4
    unlimited = xdl.audit(run, only=["lime"], samples=4, budget=0, recompute=True, progress=False)
    assert unlimited.sections[0].samples == 4 and not any("audit explained" in w for w in unlimited.sections[0].result.warnings)


def test_the_budget_counts_work_outside_the_model(digits_run, monkeypatch):
    """LIME's segmentation is not a model pass: at 224 px it took 69 s against a 30 s budget."""
    from xdl_plugins.lime import Lime

    from xdl.auditing.audit import Pace, _probe

    pace = Pace(_probe(digits_run), budget=30.0)
    assert pace.samples(Lime, {}, 4) == (4, "")  # 8×8 digits: segmentation and passes are milliseconds
    monkeypatch.setattr(Lime, "seconds_beside_model", classmethod(lambda cls, params, sample: 10.0))
    count, note = pace.samples(Lime, {}, 4)
    assert count == 2 and "the audit explained 2 of the 4 samples" in note  # 30 s / (10 s + ~0 s) → 2 (floor of 2.99…)
    # One sample beyond twice the budget: the section is skipped and says how to run it, not run on one sample.
    monkeypatch.setattr(Lime, "seconds_beside_model", classmethod(lambda cls, params, sample: 61.0))
    count, note = pace.samples(Lime, {}, 4)
    assert count == 0 and note.startswith("skipped: one sample would take about 61 s") and "xdl explain RUN --method lime" in note


def test_a_method_far_over_the_budget_is_skipped_and_the_page_says_so(digits_run, tmp_path, monkeypatch):
    from xdl_plugins.lime import Lime

    run = copy_run(digits_run, tmp_path / "run")  # no lime result another test saved, to reuse
    monkeypatch.setattr(Lime, "seconds_beside_model", classmethod(lambda cls, params, sample: 1e6))
    audit = xdl.audit(run, only=["lime", "saliency"], samples=4, progress=False)
    lime = next(s for s in audit.sections if s.method == "lime")
    assert lime.status == "skipped" and not audit.failed and not (run / "explain" / "lime").exists()
    page = audit.html_path.read_text()
    assert "skipped: one sample would take about 1000000 s" in page
    saved = json.loads(audit.json_path.read_text())
    assert next(s for s in saved["sections"] if s["method"] == "lime")["status"] == "skipped"


@pytest.mark.parametrize("args, message", [
    (["--skip", "nope"], "no analyzer called 'nope'; registered: "),
    (["--eps", "1.5"], "--eps 1.5 is larger than the whole input range [0, 1] of image data"),
    (["--budget", "-1"], "xdl audit: Invalid value for '--budget'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(audited, audit_json, capsys, args, message):
    from xdl.cli.main import main

    before = audited.json_path.read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", str(audited.run.path), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"xdl: error: {message}")
    assert audited.json_path.read_text() == before  # nothing rewritten


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK = textwrap.dedent("""
    <script>
    addEventListener("load", () => {
      const imgs = [...document.images];
      const out = document.createElement("pre");
      out.id = "xdl-check";
      out.textContent = JSON.stringify({
        images: imgs.length,
        decoded: imgs.every(i => i.complete && i.naturalWidth > 0),
        scrollWidth: document.documentElement.scrollWidth,
        innerWidth: window.innerWidth,
      });
      document.body.appendChild(out);
    });
    </script>
""")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)")
def test_page_renders_in_headless_chromium(html, tmp_path):
    page = tmp_path / "page.html"
    page.write_text(html.replace("</body>", CHECK + "</body>"))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--hide-scrollbars", "--window-size=1280,900", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60,
    ).stdout
    found = re.search(r'<pre id="xdl-check">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["images"] >= 3 and check["decoded"], check
    assert check["innerWidth"] == 1280 and check["scrollWidth"] <= check["innerWidth"], check

# -----------------------------------------------------------------------------------------
# page
# -----------------------------------------------------------------------------------------


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
def page(digits_run, third_party, tmp_path_factory):
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
