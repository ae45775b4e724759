"""The plugin system: discovery from metadata, loading, the switch, the CLI, a real install.

Discovery is tested as flake8 tests it: fake ``*.dist-info`` folders on ``sys.path``,
nothing installed and nothing imported. Then every registered analyzer runs the same
contract that ``xdl.testing`` gives plugin authors.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from xdl.analysis import Analyzer, discover, load_analyzer
from xdl.analysis.registry import DISABLE_AUTOLOAD
from xdl.cli.main import cli
from xdl.errors import XdlError
from xdl.testing import check_analyzer

REPO = Path(__file__).resolve().parents[1]
BUILTIN_EXPLAIN = {"saliency", "ig", "smoothgrad", "gradcam", "occlusion", "deeplift"}


def fake_dist(root: Path, name: str, version: str, entry_points: str) -> None:
    """A minimal installed distribution: METADATA and entry_points.txt, as pip leaves them."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Two fake packages: one good-looking plugin whose module does not exist, one that raises."""
    monkeypatch.delenv(DISABLE_AUTOLOAD, raising=False)
    fake_dist(tmp_path, "xdl-fake", "1.2.3", "[xdl.explain]\nfakemethod = xdl_fake_never_imported:Thing\n")
    fake_dist(tmp_path, "xdl-broken", "0.0.1", "[xdl.attack]\nbroken = xdl_broken_plugin:Attack\n")
    (tmp_path / "xdl_broken_plugin.py").write_text("raise ImportError('needs libfoo 9, which is not installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("xdl_broken_plugin", None)


def test_discovery_reads_metadata_only(third_party):
    found = {(p.kind, p.name): p for p in discover()}
    fake = found[("explain", "fakemethod")]
    assert (fake.package, fake.version, fake.builtin, fake.value) == ("xdl-fake", "1.2.3", False, "xdl_fake_never_imported:Thing")
    assert found[("attack", "broken")].package == "xdl-broken"
    assert {n for k, n in found if k == "explain"} >= BUILTIN_EXPLAIN
    assert found[("explain", "ig")].builtin and found[("explain", "ig")].package == "xdl"
    assert "xdl_fake_never_imported" not in sys.modules and "xdl_broken_plugin" not in sys.modules
    # Sorted by kind (explain, attack, report), then name: the order `xdl plugins` prints.
    order = [(("explain", "attack", "report").index(p.kind), p.name) for p in discover()]
    assert order == sorted(order)


def test_listing_imports_no_analyzer():
    code = (
        "import sys\nfrom xdl.analysis.registry import discover\nfound = discover()\n"
        "print(len(found), sorted(m for m in sys.modules if m.startswith('xdl_plugins.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert int(out[0]) >= len(BUILTIN_EXPLAIN) and out[1].strip() == "[]"


def test_unknown_method_lists_available():
    with pytest.raises(XdlError, match="unknown explain method 'nope'; available: .*deeplift.*gradcam.*ig.*saliency"):
        load_analyzer("explain", "nope")
    with pytest.raises(XdlError, match="unknown analyzer kind 'explian'"):
        load_analyzer("explian", "ig")


def test_broken_plugin_is_reported_with_its_package_and_breaks_nothing_else(third_party):
    with pytest.raises(XdlError, match=r"'broken' from package xdl-broken 0\.0\.1 failed to load: ImportError: needs libfoo 9"):
        load_analyzer("attack", "broken")
    with pytest.raises(XdlError, match="from package xdl-fake 1.2.3 failed to load: ModuleNotFoundError"):
        load_analyzer("explain", "fakemethod")
    assert load_analyzer("explain", "ig").name == "ig"
    assert ("attack", "broken") in {(p.kind, p.name) for p in discover()}


def test_disable_autoload_hides_third_party(third_party, monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD, "1")
    found = discover()
    assert all(p.builtin for p in found)
    assert {p.name for p in found if p.kind == "explain"} >= BUILTIN_EXPLAIN
    with pytest.raises(XdlError, match="unknown explain method 'fakemethod'"):
        load_analyzer("explain", "fakemethod")


def test_plugins_command_lists_name_kind_package_version_origin(third_party):
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    assert rows[0] == ["name", "kind", "package", "version", "origin"]
    assert ["fakemethod", "explain", "xdl-fake", "1.2.3", "third-party"] in rows
    assert ["broken", "attack", "xdl-broken", "0.0.1", "third-party"] in rows
    assert ["ig", "explain", "xdl", "0.1.0", "built-in"] in rows
    assert len(rows) == 1 + len(discover())


def test_method_help_comes_from_the_registry(third_party):
    result = CliRunner().invoke(cli, ["explain", "--help"], terminal_width=1000)
    assert result.exit_code == 0, result.output
    help_line = next(line for line in result.output.splitlines() if "--method" in line)
    for name in [p.name for p in discover("explain")]:
        assert name in help_line
    assert "fakemethod" in help_line
    attack_help = CliRunner().invoke(cli, ["attack", "--help"], terminal_width=1000).output
    assert "broken" in attack_help and "fakemethod" not in attack_help


def test_installed_example_plugin_runs_through_the_cli(digits_run, tmp_path):
    """pip-installs examples/custom_analyzer for real and runs it as ``xdl explain --method``."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pip is not available in this environment, so the example plugin cannot be installed")
    source = tmp_path / "src"
    shutil.copytree(REPO / "examples" / "custom_analyzer", source)  # the build leaves files; keep the tree clean
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, capture_output=True,
    )
    run = tmp_path / "run"
    shutil.copytree(digits_run.path, run, ignore=shutil.ignore_patterns("explain", "attack", "report"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    env.pop(DISABLE_AUTOLOAD, None)
    done = subprocess.run(
        [sys.executable, "-m", "xdl", "explain", str(run), "--method", "gradxinput", "-n", "3", "-q"],
        capture_output=True, text=True, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert f"explain results saved to {run / 'explain' / 'gradxinput'}" in done.stdout
    assert {p.name for p in (run / "explain" / "gradxinput").iterdir()} == {"result.json", "grid.png", "arrays.npz"}


# -----------------------------------------------------------------------------------------
# The contract: it catches what it promises to catch, and every registered analyzer passes
# -----------------------------------------------------------------------------------------


class _Base(Analyzer):
    kind = "explain"
    applies_to = frozenset({"image"})

    def run(self, ctx, params):
        return self.result(metrics={"n": len(ctx.x)}, arrays={"p": ctx.predict().numpy()})


class LeavesHook(_Base):
    def run(self, ctx, params):
        ctx.model.register_forward_hook(lambda *args: None)
        return super().run(ctx, params)


class ChangesWeights(_Base):
    def run(self, ctx, params):
        with torch.no_grad():
            next(ctx.model.parameters()).add_(1.0)
        return super().run(ctx, params)


class Unseeded(_Base):
    def run(self, ctx, params):
        result = super().run(ctx, params)
        result.metrics["noise"] = float(np.random.default_rng().random())  # ignores ctx.seed
        return result


class ReturnsDict(_Base):
    def run(self, ctx, params):
        return {"n": len(ctx.x)}


class UnsavableMetric(_Base):
    def run(self, ctx, params):
        result = super().run(ctx, params)
        result.metrics["model"] = ctx.model
        return result


@pytest.mark.parametrize(
    "cls, message",
    [
        (LeavesHook, "1 hook\\(s\\) left behind"),
        (ChangesWeights, "the model's weights changed"),
        (Unseeded, "two runs with the same seed gave different metrics"),
        (UnsavableMetric, "metrics, params or tables are not JSON-able"),
    ],
)
def test_contract_catches_violations(cls, message):
    with pytest.raises(AssertionError, match=f"{cls.__name__} on image data: {message}"):
        check_analyzer(cls)


def test_an_analyzer_must_return_a_result():
    with pytest.raises(TypeError, match="explain method 'returnsdict' returned dict, not a Result"):
        check_analyzer(ReturnsDict)


def test_contract_passes_a_well_behaved_analyzer_and_returns_its_results():
    results = check_analyzer(_Base)
    assert list(results) == ["image"] and results["image"].metrics == {"n": 4}
    assert results["image"].arrays["p"].shape == (4, 10)


@pytest.mark.parametrize("plugin", discover(), ids=lambda p: f"{p.kind}:{p.name}")
def test_every_registered_analyzer_passes_the_contract(plugin):
    # A mistyped entry point (no such module or class) fails here: it must never pass unseen.
    check_analyzer(load_analyzer(plugin.kind, plugin.name))
