"""``xdl audit``: every analyzer that applies to a run, gathered into one HTML page.

The audit adds no analysis of its own. It runs each registered analyzer through
:func:`xdl.analysis.runner.analyze` — the same path ``xdl explain/attack/report`` take — with the
analyzer's defaults, except for two choices of its own: an FGSM eps sweep on images and
PGD at one eps. A result already saved in the run is reused only when its provenance —
split, sample indices, target, seed, parameters, xdl version, model and data digests —
equals what this audit asks for (:mod:`xdl.runs.provenance`). The Results go to :mod:`xdl.render`, which knows no analyzer by name, so a
third-party analyzer gets its section the same way a built-in does.

(This module is not ``xdl/audit.py`` on purpose: importing a submodule ``xdl.audit``
would bind the name on the package and hide the public function ``xdl.audit``.)
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from xdl.analysis.base import Analyzer, Context, Finding, Result, is_number, refusal
from xdl.analysis.registry import PluginInfo, discover, load_analyzer
from xdl.analysis.runner import analyze, expected_provenance
from xdl.auditing.pace import Pace
from xdl.device import resolve_device
from xdl.errors import XdlError
from xdl.io import atomic_write, write_json
from xdl.render import render_audit
from xdl.render.html import render_inline
from xdl.render.section import Section
from xdl.runs.provenance import same
from xdl.runs.run import Run

DEFAULT_EPS = 0.1  # the eps the summary's robust accuracy is quoted at (each attack's audit_params)
# Seconds of model passes an expensive per-sample method may take in the audit. On digits no
# method comes near it; on a ResNet at 224 px LIME's 1,000 perturbations or SHAP's draws cost
# 10–20 s per image, and --samples 32 of each would take the audit past half an hour.
BUDGET_SECONDS = 30.0


# -----------------------------------------------------------------------------------------
# What an audit holds
# -----------------------------------------------------------------------------------------




@dataclass
class Audit:
    run: Run
    sections: list[Section]
    findings: list[Finding]
    not_applicable: dict[str, str] = field(default_factory=dict)  # "kind/name": why it cannot apply
    settings: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    seconds: float = 0.0

    @property
    def html_path(self) -> Path:
        return self.run.path / "audit.html"

    @property
    def json_path(self) -> Path:
        return self.run.path / "audit.json"

    @property
    def failed(self) -> list[Section]:
        return [s for s in self.sections if s.status == "failed"]

    def header(self) -> dict[str, Any]:
        """Model, data, training configuration, metrics and versions, from run.json."""
        info = self.run.info
        return {
            "name": self.run.name,
            "path": str(self.run.path.resolve()),
            "model": info.get("model", {}),
            "data": info.get("data", {}),
            "dataset": info.get("dataset", {}),
            "train": info.get("train", {}),
            "metrics": info.get("metrics", {}),
            "compute": info.get("compute") or {},
            "versions": info.get("versions", {}),
            "imported": info.get("imported"),
        }

    def _repr_html_(self) -> str:
        """Jupyter shows the audit inline: its findings and sections, as on the page."""
        return render_inline(self)

    def to_json(self) -> dict[str, Any]:
        """The page's content without images: figures are paths relative to the run."""
        sections = []
        for s in self.sections:
            entry: dict[str, Any] = {"kind": s.kind, "method": s.method, "package": s.package, "status": s.status,
                                     "seconds": round(s.seconds, 3), "cpu_seconds": round(s.cpu_seconds, 3),
                                     "samples": s.samples}
            if s.error:
                entry["error"] = s.error
            if s.traceback:
                entry["traceback"] = s.traceback
            if s.result is not None:
                r = s.result
                folder = r.path.resolve().relative_to(self.run.path.resolve()) if r.path else None
                entry.update(
                    path=str(folder) if folder else None, summary=r.summary, metrics=r.metrics, params=r.params,
                    computed_on=s.computed_on, provenance=r.provenance, warnings=r.warnings, tables=r.tables,
                    figures=[str(folder / f"{name}.png") if folder else f"{name}.png" for name in r.figures],
                )
            sections.append(entry)
        return {
            "created": self.created,
            "seconds": round(self.seconds, 3),
            "run": self.header(),
            "settings": self.settings,
            "findings": [dataclasses.asdict(f) for f in self.findings],
            "not_applicable": self.not_applicable,
            "sections": sections,
        }


# -----------------------------------------------------------------------------------------
# Running it
# -----------------------------------------------------------------------------------------


def audit(
    run: Run | str | Path,
    *,
    only: list[str] | None = None,
    skip: list[str] | None = None,
    samples: int | None = None,
    recompute: bool = False,
    eps: float = DEFAULT_EPS,
    device: str = "auto",
    progress: bool = True,
    trust_code: bool = False,
    audit_attack: str | None = None,
    reencode: bool = False,
    budget: float = BUDGET_SECONDS,
) -> Audit:
    """Run every applicable analyzer on ``run`` and write RUN/audit.html and RUN/audit.json.

    ``only``/``skip`` take method names (``ig``) or kind/method (``explain/ig``);
    ``samples`` caps how many samples any analyzer gets; ``recompute`` ignores saved
    results; ``reencode`` audits a run whose data file changed since training, encoded with the
    saved encoding, instead of refusing it. An analyzer that fails becomes a failed section, not a failed audit.
    ``trust_code=True`` lets a run whose model is a ``package.module:factory`` import it.
    ``audit_attack`` is the headline attack (an attack whose class declares ``headline``; default:
    the strongest), ``budget`` (seconds; 0: none) caps a method whose cost per sample is known
    (:meth:`Analyzer.passes`) to the samples its model passes fit in, timed on this model;
    its section says so.
    """
    started = time.perf_counter()
    run = run if isinstance(run, Run) else Run(run, trust_code=trust_code, reencode=reencode)
    run.trust_code = run.trust_code or trust_code
    run.check_writable()  # audit.html goes into the run: a read-only one fails now, not at the end
    _check_options(samples, eps, budget, device)
    plugins, audit_attack = _attack_choice(select(discover(), only, skip), audit_attack, only)
    probe = _probe(run)
    if probe.input_range is not None and eps > probe.input_range[1] - probe.input_range[0]:
        lo, hi = probe.input_range
        raise XdlError(f"--eps {eps:g} is larger than the whole input range [{lo:g}, {hi:g}] of {probe.kind} data")
    planned, not_applicable = _plan(plugins, probe)
    sections = []
    pace = Pace(probe, budget)
    for info, cls, (error, trace) in _progress(planned, progress):
        if cls is None:
            sections.append(Section(info.kind, info.name, "failed", error=error, traceback=trace, package=info.package))
            continue
        cpu = time.process_time()
        section = _run_one(run, info, cls, samples=samples, recompute=recompute, eps=eps, device=device, pace=pace)
        section.guide = cls.guide or cls.description
        section.cpu_seconds = time.process_time() - cpu
        sections.append(section)
        if progress:
            _say(section)
    chosen = {f"{info.kind}/{info.name}": cls.audit_params(run.data.kind, eps) for info, cls, _ in planned if cls is not None}
    result = Audit(
        run=run, sections=sections, findings=findings(run, sections), not_applicable=not_applicable,
        settings={"only": only, "skip": skip, "samples": samples, "recompute": recompute, "eps": eps, "budget": budget,
                  "params": {key: values for key, values in chosen.items() if values}, "device": device,
                  "audit_attack": audit_attack},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    result.seconds = time.perf_counter() - started
    write(result)
    return result


def _check_options(samples: int | None, eps: float, budget: float, device: str) -> None:
    if samples is not None and samples <= 0:
        raise XdlError(f"--samples must be > 0, got {samples}")
    if not eps > 0:
        raise XdlError(f"--eps must be > 0, got {eps}")
    if not 0 <= budget < float("inf"):
        raise XdlError(f"--budget must be a finite number of seconds ≥ 0, got {budget}")
    resolve_device(device)  # a missing GPU is the user's error, before any analyzer fails on it


def _plan(plugins: list[PluginInfo], probe: Context) -> tuple[list[tuple[PluginInfo, type[Analyzer] | None, tuple[str, str]]], dict[str, str]]:
    """Each analyzer's class (or why it would not load), and those that do not apply to this
    run, with the reason each gives (:func:`xdl.analysis.base.refusal`)."""
    planned: list[tuple[PluginInfo, type[Analyzer] | None, tuple[str, str]]] = []
    not_applicable = {}
    for info in plugins:
        try:
            cls = load_analyzer(info.kind, info.name)
            why = refusal(cls, probe)
        except Exception as exc:  # a broken plugin is a failed section; the others still run
            planned.append((info, None, _failure(exc)))
            continue
        if why:
            not_applicable[f"{info.kind}/{info.name}"] = why
        else:
            planned.append((info, cls, ("", "")))
    return planned, not_applicable


def write(audit: Audit) -> None:
    """Write audit.json and audit.html, each atomically (a reader never sees half a page)."""
    write_json(audit.json_path, audit.to_json())
    atomic_write(audit.html_path, render_audit(audit))


def select(plugins: list[PluginInfo], only: list[str] | None, skip: list[str] | None) -> list[PluginInfo]:
    """The analyzers --only/--skip leave; a name that matches no analyzer is the user's error."""

    def matches(info: PluginInfo, name: str) -> bool:
        return name in (info.name, f"{info.kind}/{info.name}", info.kind)

    for name in [*(only or []), *(skip or [])]:
        if not any(matches(p, name) for p in plugins):
            known = ", ".join(p.name for p in plugins) or "none installed"
            raise XdlError(f"no analyzer called {name!r}; registered: {known}")
    chosen = [p for p in plugins if not only or any(matches(p, n) for n in only)]
    return [p for p in chosen if not any(matches(p, n) for n in skip or [])]


def headline_attacks() -> dict[str, type[Analyzer]]:
    """The attacks that can be the audit's headline (``Analyzer.headline``), strongest first."""
    found = {}
    for info in discover("attack"):
        try:
            cls = load_analyzer("attack", info.name)
        except Exception:  # a broken plugin cannot be the headline; its own section says why
            continue
        if cls.headline:
            found[info.name] = cls
    return dict(sorted(found.items(), key=lambda item: -item[1].headline))


def _attack_choice(plugins: list[PluginInfo], audit_attack: str | None, only: list[str] | None) -> tuple[list[PluginInfo], str | None]:
    """The analyzers left once the headline attack is chosen, and its name.

    Headline attacks stronger than the chosen one are left out (``--audit-attack pgd``: no
    AutoAttack), and so is every method a headline attack runs itself (its ``includes``),
    unless --only names it.
    """
    headlines = headline_attacks()
    if audit_attack is not None and audit_attack not in headlines:
        raise XdlError(f"unknown --audit-attack {audit_attack!r}: choose {' or '.join(headlines)}")
    chosen = audit_attack or next(iter(headlines), None)
    stronger = {name for name, cls in headlines.items() if chosen and cls.headline > headlines[chosen].headline}
    left_out = stronger | {part for cls in headlines.values() for part in cls.includes}
    named = set(only or [])
    kept = [p for p in plugins
            if not (p.kind == "attack" and p.name in left_out and not named & {p.name, f"attack/{p.name}"})]
    return kept, chosen


def _probe(run: Run) -> Context:
    """A Context over the whole test split, for ``Analyzer.why_not`` (which may inspect model or data)."""
    data = run.data
    test = data.test
    return Context(
        model=run.model, x=test.x, y=test.y, kind=data.kind, class_names=data.class_names,
        feature_names=data.feature_names, encoding=data.encoding, groups=test.groups, data=data, run=run,
    )


def _run_one(run: Run, info: PluginInfo, cls: type[Analyzer], *, samples: int | None, recompute: bool, eps: float,
             device: str, pace: Pace) -> Section:
    started = time.perf_counter()
    overrides = cls.audit_params(run.data.kind, eps)
    count = cls.samples if samples is None else min(samples, cls.samples or samples)
    try:
        count, cut = pace.samples(cls, overrides, count)
        if count == 0:
            skipped = Result(info.name, info.kind, summary=cut)
            return Section(info.kind, info.name, "skipped", skipped, seconds=time.perf_counter() - started,
                           package=info.package)
        wanted = expected_provenance(run, info.kind, info.name, samples=count, params=overrides)
        saved = _saved(run, info.kind, info.name, wanted)
        if saved is not None and not recompute:
            result = Result.load(saved)
            return Section(info.kind, info.name, "reused", result, seconds=time.perf_counter() - started,
                           package=info.package)
        out = saved or run.result_dir(info.kind, info.name)
        result = analyze(info.kind, run, info.name, samples=count, params=overrides, device=device, out=out)
        if cut:
            result.warnings.append(cut)
    except Exception as exc:  # recorded in the page and audit.json; one analyzer's failure ends only its section
        error, trace = _failure(exc)
        return Section(info.kind, info.name, "failed", error=error, traceback=trace,
                       seconds=time.perf_counter() - started, package=info.package)
    return Section(info.kind, info.name, "computed", result, seconds=time.perf_counter() - started,
                   samples=count, package=info.package)


def _failure(exc: Exception) -> tuple[str, str]:
    """The message and, for a bug rather than bad input, the traceback of a failed analyzer."""
    if isinstance(exc, XdlError):
        return str(exc), ""
    return f"{type(exc).__name__}: {exc}", traceback.format_exc()


def _saved(run: Run, kind: str, method: str, wanted: dict[str, Any]) -> Path | None:
    """The newest saved result of ``method`` (METHOD/, METHOD-2/, …) whose provenance is ``wanted``.

    A result computed on other samples, another split, target or seed, other weights or
    data, or by another xdl version does not stand for the one asked for, whatever its
    parameters; one saved without provenance is never reused.
    """
    pattern = re.compile(rf"{re.escape(method)}(?:-(\d+))?")
    found = []
    for key, folder in run.results(kind).items():
        match = pattern.fullmatch(key.partition("/")[2])
        if match:
            found.append((int(match.group(1) or 1), folder))
    for _, folder in sorted(found, reverse=True):
        try:
            saved = json.loads((folder / "result.json").read_text(encoding="utf-8")).get("provenance")
        except (ValueError, AttributeError):  # a damaged result.json is recomputed, not reused
            continue
        if same(saved, wanted):
            return folder
    return None


def _progress(items: list, enabled: bool):
    bar = tqdm(items, disable=not enabled, unit="analyzer", file=sys.stderr, dynamic_ncols=True, leave=False)
    for item in bar:
        bar.set_description(f"audit {item[0].kind}/{item[0].name}")
        yield item


def _say(section: Section) -> None:
    what = {"computed": f"{section.seconds:.1f}s ({section.cpu_seconds:.1f}s CPU)", "reused": "reused",
            "skipped": "skipped (over the time budget)"}.get(section.status, f"failed: {section.error}")
    tqdm.write(f"  {section.key:<22} {what}", file=sys.stderr)


# -----------------------------------------------------------------------------------------
# The summary of findings: the run's own test accuracy, then each analyzer's own findings
# -----------------------------------------------------------------------------------------


def findings(run: Run, sections: list[Section]) -> list[Finding]:
    """Headline numbers: the run's test accuracy, then what each section's analyzer reads from its Result.

    The audit knows no analyzer's metric keys: each analyzer class turns its own Result into
    findings (``Analyzer.findings``). One that fails costs its findings, not the audit.
    """
    found = []
    accuracy = run.metrics.get("test_accuracy")
    if is_number(accuracy):
        found.append(Finding(
            "Test accuracy", f"{100 * accuracy:.1f}%", f"{run.info['dataset']['sizes']['test']} test samples",
            help="The trained model's accuracy on the held-out test split, in eval mode; every other number "
                 "on this page is best read against it.",
        ))
    for s in sections:
        if s.result is None or s.status == "skipped":
            continue
        try:
            found += load_analyzer(s.kind, s.method).findings(s.result)
        except Exception as exc:  # a plugin's bug: shown where its findings would be
            found.append(Finding(f"{s.key}: no findings", "error", _failure(exc)[0], s.key, "warn"))
    return found
