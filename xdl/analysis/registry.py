"""Plugin discovery in three steps (find, load, classify), as flake8 does it.

Find reads entry-point metadata only, so listing analyzers imports none of them. Load
imports the one analyzer asked for and wraps its failure with the package's name, so a
broken plugin breaks only itself. There is no global registry state: each call looks again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata

from xdl.errors import XdlError

KINDS = ("explain", "attack", "report")
# The method each verb runs when none is named (xdl explain RUN, xdl.report(run)).
DEFAULT_METHOD = {"explain": "saliency", "attack": "fgsm", "report": "bias"}
BUILTIN_PACKAGE = "xdl"
DISABLE_AUTOLOAD = "XDL_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    kind: str
    value: str  # "module:Class"
    package: str
    version: str

    @property
    def builtin(self) -> bool:
        return self.package == BUILTIN_PACKAGE


def discover(kind: str | None = None) -> list[PluginInfo]:
    """Every registered analyzer (or those of one kind), sorted by kind and name.

    With XDL_DISABLE_PLUGIN_AUTOLOAD=1 only the built-ins are found. When two packages
    register the same name, the built-in wins, then the first package by name.
    """
    builtin_only = os.environ.get(DISABLE_AUTOLOAD, "") not in ("", "0")
    found: dict[tuple[str, str], PluginInfo] = {}
    for k in [kind] if kind else KINDS:
        for ep in metadata.entry_points(group=f"xdl.{k}"):
            dist = ep.dist
            package = dist.metadata["Name"] if dist is not None else "?"
            info = PluginInfo(ep.name, k, ep.value, package, dist.version if dist is not None else "?")
            if builtin_only and not info.builtin:
                continue
            previous = found.get((k, ep.name))
            if previous is None or (info.builtin, previous.package) > (previous.builtin, info.package):
                found[(k, ep.name)] = info
    return sorted(found.values(), key=lambda p: (KINDS.index(p.kind), p.name))


def names(kind: str) -> list[str]:
    return [p.name for p in discover(kind)]


def load_analyzer(kind: str, name: str):
    """Import and return the analyzer class registered as ``name`` under ``xdl.<kind>``."""
    from xdl.analysis.base import Analyzer  # torch: listing and --help read only the metadata above

    if kind not in KINDS:
        raise XdlError(f"unknown analyzer kind {kind!r}: choose one of {', '.join(KINDS)}")
    plugins = {p.name: p for p in discover(kind)}
    if name not in plugins:
        available = ", ".join(plugins) or "none installed"
        raise XdlError(f"unknown {kind} method {name!r}; available: {available}")
    info = plugins[name]
    module_name, _, attr = info.value.partition(":")
    try:
        module = __import__(module_name, fromlist=[attr or "_"])
        cls = getattr(module, attr) if attr else module
    except Exception as exc:  # a plugin's import error is its own, reported with its package
        raise XdlError(
            f"{kind} method {name!r} from package {info.package} {info.version} failed to load: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Analyzer)):
        raise XdlError(f"{kind} method {name!r} from package {info.package} is not an xdl Analyzer ({info.value})")
    if cls.kind != kind:
        raise XdlError(f"{info.value} declares kind {cls.kind!r} but is registered under xdl.{kind}")
    cls.name = name
    return cls
