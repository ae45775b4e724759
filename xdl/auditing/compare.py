"""``xdl compare``: two or more audited runs side by side, with how sure each difference is.

Each run is audited first where it has no audit (or where audit options are given) — by
:func:`xdl.auditing.audit.audit` itself, so saved results are reused exactly when their
provenance matches. The comparison then reads every run's audit: its findings (what each
analyzer says about its own result), and the per-sample outcomes behind them
(:meth:`Analyzer.outcomes`), which it pairs across runs by sample. Only results computed on
the same data, split, samples, parameters, seed and target are put side by side; any other
row says why not. The statistics are :mod:`xdl.methods.paired`'s; the page is
:mod:`xdl.render`'s, in the audit page's look.
"""

from __future__ import annotations

import dataclasses
import io
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdl.analysis.base import Context, Finding, Result
from xdl.analysis.registry import load_analyzer
from xdl.auditing.audit import audit
from xdl.device import resolve_device
from xdl.errors import XdlError
from xdl.io import atomic_write, read_json, write_json
from xdl.methods.paired import Interval, McNemar, mcnemar, mean_spearman, paired_bootstrap
from xdl.models.inference import eval_mode
from xdl.models.weights import WEIGHTS
from xdl.render.cards import human
from xdl.render.html import render_compare, render_compare_inline
from xdl.runs.provenance import describe, file_digest, splits_digest
from xdl.runs.run import Run

FIGURE_SAMPLES = 6  # samples per explanation figure: one row each, the runs in columns
# The compute card's entries the summary quotes, each measured once per run (no interval).
COMPUTE = (("parameters", "Parameters"), ("flops_forward_per_sample", "FLOPs per sample"),
           ("train_seconds", "Training time"))


# -----------------------------------------------------------------------------------------
# What a comparison holds
# -----------------------------------------------------------------------------------------


@dataclass
class Side:
    """One run as the comparison reads it: its audit's findings and results, its test outcomes."""

    run: Run
    name: str
    findings: list[Finding]
    results: dict[str, Result]  # "kind/method" → the audited result, arrays loaded
    right: np.ndarray  # per test sample, in split order: 1.0 right, 0.0 wrong
    audit_seconds: float = 0.0


@dataclass
class Difference:
    """One run against the first on one row: ``other − first``."""

    interval: Interval | None = None  # paired bootstrap over the same samples
    test: McNemar | None = None  # for right/wrong outcomes
    only_first: list[int] = field(default_factory=list)  # samples the first run gets right and the other wrong
    only_other: list[int] = field(default_factory=list)
    plain: float | None = None  # the shown numbers' difference, where no per-sample outcomes exist
    percent: bool = False  # the shown numbers are percentages: the difference is in points

    @property
    def better(self) -> int:
        """1: the other run is better, -1: the first is, 0: not shown (the interval holds 0, or there is none).

        For right/wrong outcomes McNemar's mid-p must also be below 0.05: on a handful of samples
        the percentile interval can exclude 0 where four discordant samples prove nothing."""
        if self.interval is None or not self.interval.excludes_zero:
            return 0
        if self.test is not None and self.test.p_mid >= 1 - self.interval.level:
            return 0
        return 1 if self.interval.low > 0 else -1

    @property
    def text(self) -> str:
        if self.interval is not None:
            i = self.interval
            return f"{100 * i.difference:+.1f} pp [{100 * i.low:+.1f}, {100 * i.high:+.1f}]"
        if self.plain is not None:
            return f"{self.plain:+.3g}{' pp' if self.percent else ''} (no interval)"
        return ""

    @property
    def p_text(self) -> str:
        if self.test is None:
            return ""
        t = self.test
        return f"McNemar p = {t.p_exact:.3g} (mid-p {t.p_mid:.3g}); right only in one: {t.only_a} vs {t.only_b}"


@dataclass
class Row:
    """One line of a table: a finding (or a class, a group) for every run, and the differences."""

    label: str
    source: str  # the section key it comes from; "" for the run's own numbers
    values: list[str]
    differences: list[Difference] = field(default_factory=list)  # one per run after the first
    why: str = ""  # why the runs' numbers are not put side by side ("" when they are)
    note: str = ""  # why there is no interval, when there is none
    help: str = ""

    @property
    def marks(self) -> list[bool]:
        """Which runs' values are marked better: only where the paired interval excludes 0."""
        if not self.differences:
            return [False for _ in self.values]
        return [all(d.better == -1 for d in self.differences)] + [d.better == 1 for d in self.differences]


@dataclass
class View:
    """One explanation method's maps of the same samples in every run, and how alike they rank."""

    source: str
    why: str = ""
    samples: int = 0
    spearman: list[float] = field(default_factory=list)  # mean per-sample rank correlation with the first run
    figure: bytes | None = None

    @property
    def anchor(self) -> str:
        return "explain-" + self.source.replace("/", "-")


@dataclass
class Comparison:
    sides: list[Side]
    out: Path
    rows: list[Row]
    classes: list[Row]
    explanations: list[View]
    created: str = ""
    seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sides]

    @property
    def html_path(self) -> Path:
        return self.out / "compare.html"

    @property
    def json_path(self) -> Path:
        return self.out / "compare.json"

    @property
    def attacks(self) -> list[Row]:
        """The attack rows whose right/wrong outcomes were paired: what each attack breaks in one run only."""
        return [r for r in self.rows if r.source.startswith("attack/") and r.differences and r.differences[0].test]

    def _repr_html_(self) -> str:
        """Jupyter shows the comparison's tables inline, as on the page."""
        return render_compare_inline(self)

    def to_json(self) -> dict[str, Any]:
        """The page's content; explanation figures are the PNG files beside compare.json."""
        return {
            "created": self.created,
            "seconds": round(self.seconds, 3),
            "runs": [{"name": s.name, "path": str(s.run.path.resolve()), "audit_seconds": round(s.audit_seconds, 3),
                      "test_samples": len(s.right)} for s in self.sides],
            "summary": [_row_json(r) for r in self.rows],
            "classes_and_groups": [_row_json(r) for r in self.classes],
            "explanations": [{"source": v.source, "why": v.why, "samples": v.samples, "spearman": v.spearman,
                              "figure": f"{v.anchor}.png" if v.figure else None} for v in self.explanations],
        }


def _row_json(row: Row) -> dict[str, Any]:
    entry = {k: v for k, v in dataclasses.asdict(row).items() if k != "differences"}
    entry["differences"] = [{**dataclasses.asdict(d), "better": d.better} for d in row.differences]
    return entry


# -----------------------------------------------------------------------------------------
# Running it
# -----------------------------------------------------------------------------------------


def compare(
    runs: list[Run | str | Path],
    out: str | Path,
    *,
    only: list[str] | None = None,
    skip: list[str] | None = None,
    samples: int | None = None,
    eps: float | None = None,
    audit_attack: str | None = None,
    budget: float | None = None,
    recompute: bool = False,
    device: str = "auto",
    progress: bool = True,
    trust_code: bool = False,
) -> Comparison:
    """Compare two or more runs on the same data; write OUT/compare.html and OUT/compare.json.

    A run without audit.json is audited first; with any of ``only``, ``skip``, ``samples``,
    ``eps``, ``audit_attack``, ``budget`` or ``recompute`` every run is audited with them
    (reusing saved results whose provenance matches, as ``xdl audit`` does). Every other run
    is compared with the first: differences are ``other − first``.
    """
    started = time.perf_counter()
    opened = _open(runs, trust_code)
    _check_same_data(opened)
    out = _out_dir(out)
    options = {k: v for k, v in {"only": only, "skip": skip, "samples": samples, "eps": eps,
                                 "audit_attack": audit_attack, "budget": budget}.items() if v is not None}
    if recompute:
        options["recompute"] = True
    names = _names(opened)
    sides = [_side(run, name, options, device, progress) for run, name in zip(opened, names)]
    result = Comparison(sides, out, rows=_summary_rows(sides), classes=_class_rows(sides),
                        explanations=_explanations(sides),
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    result.seconds = time.perf_counter() - started
    write(result)
    return result


def write(comparison: Comparison) -> None:
    """compare.json, the explanation figures beside it, and compare.html, each written atomically."""
    for view in comparison.explanations:
        if view.figure:
            atomic_write(comparison.out / f"{view.anchor}.png", view.figure)
    write_json(comparison.json_path, comparison.to_json())
    atomic_write(comparison.html_path, render_compare(comparison))


def _open(runs: Any, trust_code: bool) -> list[Run]:
    if isinstance(runs, (str, Path, Run)):
        runs = [runs]
    runs = list(runs)
    if len(runs) < 2:
        raise XdlError(f"compare needs two or more runs, got {len(runs)}")
    opened = [r if isinstance(r, Run) else Run(r, trust_code=trust_code) for r in runs]
    for run in opened:
        run.trust_code = run.trust_code or trust_code
    paths = [r.path.resolve() for r in opened]
    twice = next((p for i, p in enumerate(paths) if p in paths[:i]), None)
    if twice is not None:
        raise XdlError(f"{twice} is given twice: compare different runs (a copy of a run compares as itself)")
    return opened


def _check_same_data(runs: list[Run]) -> None:
    """Refuse runs whose data differ: run.json's digest of the splits (train, val, test) as training saw them."""
    digests = [run.info.get("data_sha256") or splits_digest(run.data) for run in runs]
    for run, digest in zip(runs[1:], digests[1:]):
        if digest != digests[0]:
            raise XdlError(
                f"runs on different data: {run.name}'s data digest (data_sha256) {digest[:12]}… differs from "
                f"{runs[0].name}'s {digests[0][:12]}…; compare runs trained on the same data and split"
            )


def _out_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise XdlError(f"--out {out} is a file; compare writes a folder (compare.html, compare.json)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise XdlError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    return out


def _names(runs: list[Run]) -> list[str]:
    """Each run's folder name, or its path where two runs share a name."""
    names = [r.name for r in runs]
    return [str(r.path) if names.count(r.name) > 1 else r.name for r in runs]


def _side(run: Run, name: str, options: dict[str, Any], device: str, progress: bool) -> Side:
    """The run's audit as compare.json's reader would see it, auditing first where needed."""
    if options or _stale(run):
        audit(run, device=device, progress=progress, **options)
    saved = read_json(run.path / "audit.json")
    known = {f.name for f in dataclasses.fields(Finding)}
    # The run's own numbers (no source) are measured here again, per sample, on the whole test split.
    found = [Finding(**{k: v for k, v in f.items() if k in known}) for f in saved.get("findings", []) if f.get("source")]
    results = {}
    for s in saved.get("sections", []):
        folder = run.path / str(s.get("path") or "")
        if s.get("path") and s.get("status") in ("computed", "reused") and (folder / "result.json").is_file():
            results[f"{s['kind']}/{s['method']}"] = Result.load(folder, arrays=True)
    return Side(run, name, found, results, _test_right(run, device), float(saved.get("seconds") or 0))


def _stale(run: Run) -> bool:
    """No audit yet, or one of another model's weights (retrained since): the audit must run."""
    path = run.path / "audit.json"
    if not path.is_file():
        return True
    weights = file_digest(run.path / WEIGHTS)
    sections = read_json(path).get("sections", [])
    return any((s.get("provenance") or {}).get("model_sha256") not in (None, weights) for s in sections)


def _test_right(run: Run, device: str) -> np.ndarray:
    """Right (1) or wrong (0) on every test sample: the pairs behind the test accuracy's interval."""
    data = run.data
    test = data.test
    model = run.model
    ctx = Context(model=model, x=test.x, y=test.y, kind=data.kind, class_names=data.class_names, data=data, run=run,
                  device=resolve_device(device))
    with eval_mode(model):
        model.to(ctx.device)
        try:
            probs = ctx.predict()
        finally:
            model.to("cpu")
    return (probs.argmax(1) == test.y.long()).numpy().astype(np.float64)


# -----------------------------------------------------------------------------------------
# The summary: the test accuracy, every finding, the compute card
# -----------------------------------------------------------------------------------------


def _summary_rows(sides: list[Side]) -> list[Row]:
    n = len(sides[0].right)
    rows = [_paired_row("Test accuracy", "", [s.right for s in sides], np.arange(n), help=(
        "Each run's accuracy on the whole test split, measured again here sample by sample so the runs can be "
        "paired; the interval is of the difference, resampling the same test samples."))]
    keys = dict.fromkeys((f.source, f.label) for s in sides for f in s.findings)
    rows += [_finding_row(sides, source, label) for source, label in keys]
    for key, label in COMPUTE:
        values = [(s.run.info.get("compute") or {}).get(key) for s in sides]
        if any(v is not None for v in values):
            rows.append(Row(label, "", [human(key, v) for v in values],
                            note="one measurement per run: no interval"))
    return rows


def _finding_row(sides: list[Side], source: str, label: str) -> Row:
    found = [next((f for f in s.findings if (f.source, f.label) == (source, label)), None) for s in sides]
    values = [f.value if f else "" for f in found]
    help = next((f.help for f in found if f and f.help), "")
    why = next((f"not in {s.name}'s audit" for s, f in zip(sides, found) if f is None), "") or _why_apart(sides, source)
    if why:
        return Row(label, source, ["" for _ in sides], why=why, help=help)
    results = [s.results[source] for s in sides]
    outcomes = [_outcomes(r).get(label) for r in results]
    if all(o is not None and len(o) == len(outcomes[0]) for o in outcomes):
        return _paired_row(label, source, [np.asarray(o, dtype=np.float64) for o in outcomes],
                           _indices(results[0], len(outcomes[0])), values, help)
    numbers = [_number(v) for v in values]
    plain = [Difference(plain=x - numbers[0], percent="%" in values[0]) for x in numbers[1:]] \
        if all(x is not None for x in numbers) else []
    return Row(label, source, values, plain, help=help,
               note=f"{source} saves no per-sample outcomes for it: no interval, neither is called better")


def _paired_row(label: str, source: str, outcomes: list[np.ndarray], index: np.ndarray, values: list[str] | None = None,
                help: str = "") -> Row:
    """A row whose runs are paired by sample: bootstrap intervals, and McNemar's test for right/wrong outcomes."""
    first = outcomes[0]
    differences = []
    for other in outcomes[1:]:
        d = Difference(interval=paired_bootstrap(first, other))
        if _binary(first) and _binary(other):
            d.test = mcnemar(first, other)
            d.only_first = index[(first == 1) & (other == 0)].tolist()
            d.only_other = index[(other == 1) & (first == 0)].tolist()
        differences.append(d)
    values = values or [f"{100 * o.mean():.1f}%" for o in outcomes]
    return Row(label, source, values, differences, help=help)


def _why_apart(sides: list[Side], source: str) -> str:
    """Why ``source``'s results cannot be put side by side ("" when they can)."""
    missing = next((s.name for s in sides if source not in s.results), None)
    if missing:
        return f"{missing}'s audit has no saved {source} result"
    first = sides[0].results[source].provenance
    for side in sides[1:]:
        why = differs(first, side.results[source].provenance)
        if why:
            return f"{sides[0].name} vs {side.name}: {why}"
    return ""


def differs(a: dict[str, Any], b: dict[str, Any]) -> str:
    """How two results' provenance differ in what they measured ("" when not): data, split,
    samples, parameters, seed, target. The model and the xdl version may differ: that is the comparison."""
    if not a or not b:
        return "a result saved without provenance"
    if a.get("data_sha256") != b.get("data_sha256"):
        return f"computed on different data (digest {str(a.get('data_sha256'))[:12]}… vs {str(b.get('data_sha256'))[:12]}…)"
    if a.get("split") != b.get("split"):
        return f"computed on different splits ({a.get('split')} vs {b.get('split')})"
    if a.get("indices_sha256") != b.get("indices_sha256"):
        if a.get("samples") != b.get("samples"):
            return f"computed on different samples ({describe(a)} vs {describe(b)})"
        return f"computed on different samples ({describe(a)} each, not the same ones)"
    pa, pb = a.get("params") or {}, b.get("params") or {}
    changed = [k for k in dict.fromkeys([*pa, *pb]) if pa.get(k) != pb.get(k)]
    if changed:
        return "computed with different parameters: " + ", ".join(f"{k} {pa.get(k)} vs {pb.get(k)}" for k in changed)
    for key in ("seed", "target", "other"):
        if a.get(key) != b.get(key):
            return f"computed with a different {key} ({a.get(key)} vs {b.get(key)})"
    return ""


def _outcomes(result: Result) -> dict[str, np.ndarray]:
    try:
        return load_analyzer(result.kind, result.method).outcomes(result)
    except Exception:  # a plugin missing now, or its bug: its rows are compared without intervals
        return {}


def _indices(result: Result, n: int) -> np.ndarray:
    """The analyzed samples' positions in their split; above provenance's list limit (a whole
    split, as the audit's attacks take it), their order 0..n-1."""
    listed = result.provenance.get("indices")
    return np.asarray(listed, dtype=np.int64) if isinstance(listed, list) and len(listed) == n else np.arange(n)


def _binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0.0, 1.0)).all())


def _number(text: str) -> float | None:
    """The number a finding's value leads with: "97.3%" → 97.3, "0.04" → 0.04; None for words."""
    match = re.match(r"\s*([-+−]?\d[\d,]*(?:\.\d+)?)", str(text))
    return float(match.group(1).replace(",", "").replace("−", "-")) if match else None


# -----------------------------------------------------------------------------------------
# Per class and group, and explanations side by side
# -----------------------------------------------------------------------------------------


def _class_rows(sides: list[Side]) -> list[Row]:
    """Accuracy per class and per group of the test split, paired per sample like the test accuracy."""
    data = sides[0].run.data
    y = data.test.y.numpy()
    parts = [(f"class {name}", y == c) for c, name in enumerate(data.class_names)]
    for column, labels in sorted(data.test.groups.items()):
        labels = np.asarray(labels).astype(str)
        parts += [(f"{column} = {value}", labels == value) for value in np.unique(labels)]
    return [_paired_row(label, "", [s.right[mask] for s in sides], np.flatnonzero(mask))
            for label, mask in parts if mask.any()]


def _explanations(sides: list[Side]) -> list[View]:
    """Each explanation method's maps of the same samples, runs in columns, and their rank agreement."""
    views = []
    for source in dict.fromkeys(k for s in sides for k in s.results if k.startswith("explain/")):
        why = _why_apart(sides, source)
        if why:
            views.append(View(source, why))
            continue
        results = [s.results[source] for s in sides]
        provenance = results[0].provenance
        index = _indices(results[0], int(provenance.get("samples") or 0))
        x = sides[0].run.data.split(provenance.get("split", "test")).x[torch.as_tensor(index)]
        maps = [_attributions(r, x) for r in results]
        if any(m is None for m in maps):
            views.append(View(source, f"{source} keeps no attribution maps shaped like its inputs", len(index)))
            continue
        views.append(View(source, "", len(index), [mean_spearman(maps[0], m) for m in maps[1:]],
                          _side_by_side(x.numpy(), maps, [s.name for s in sides])))
    return views


def _attributions(result: Result, x: torch.Tensor) -> np.ndarray | None:
    try:
        return load_analyzer(result.kind, result.method).attributions(result, x)
    except Exception:  # a plugin missing now, or its bug: the view says there are no maps
        return None


def _side_by_side(x: np.ndarray, maps: list[np.ndarray], names: list[str]) -> bytes:
    """PNG: a row per sample, the input then each run's map (signed maps around white = no effect)."""
    from matplotlib.figure import Figure

    n = min(FIGURE_SAMPLES, len(x))
    fig = Figure(figsize=(1.6 * (1 + len(maps)), 1.6 * n + 0.3))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / (1.6 * n + 0.3), wspace=0.05, hspace=0.1)
    axes = fig.subplots(n, 1 + len(maps), squeeze=False)
    for i in range(n):
        picture = _plane(x[i], mean=True)
        axes[i, 0].imshow(picture, cmap="gray", interpolation="nearest")
        for j, heat in enumerate(maps, 1):
            plane = _plane(heat[i])
            scale = float(np.abs(plane).max()) or 1.0
            axes[i, j].imshow(plane, cmap="bwr", vmin=-scale, vmax=scale, interpolation="nearest")
    for ax in axes.flat:
        ax.set_axis_off()
    for j, title in enumerate(["input", *names]):
        axes[0, j].set_title(title[:24], fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _plane(values: np.ndarray, mean: bool = False) -> np.ndarray:
    """One sample as a 2-D picture: channels summed (a map) or averaged (an input); a table row as 1×F."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 3:
        return values.mean(0) if mean else values.sum(0)
    return values.reshape(1, -1) if values.ndim == 1 else values
