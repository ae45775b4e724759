"""Analyzers: the contract every explain/attack/report method fills, and their registry."""

from xdl.analyzers.base import (
    Analyzer,
    Context,
    NoParams,
    Result,
    analyze,
    eval_mode,
    hook_count,
    parse_params,
)
from xdl.analyzers.registry import KINDS, PluginInfo, discover, load_analyzer

__all__ = [
    "Analyzer",
    "Context",
    "KINDS",
    "NoParams",
    "PluginInfo",
    "Result",
    "analyze",
    "discover",
    "eval_mode",
    "hook_count",
    "load_analyzer",
    "parse_params",
]
