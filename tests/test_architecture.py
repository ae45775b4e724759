"""The layout stays one-way (docs/architecture.md): checked from the source, not by importing it.

The import graph counts every ``import`` in ``xdl/``, those inside functions included (an
import hidden in a function still ties two modules together); only ``if TYPE_CHECKING:``
blocks are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xdl"

# What a module may import: ground modules (imported by anything, importing only ground), then
# packages in the order data flows through them; a module imports its own rank or below.
GROUND = {"xdl", "xdl._lazy", "xdl.errors", "xdl.io", "xdl.device", "xdl.limits", "xdl.trust", "xdl.plotting"}
LAYERS = ["data", "models", "runs", "methods", "training", "render", "analysis", "auditing", "api", "cli", "testing",
          "__main__"]
# Modules that orchestrate rather than analyze: they should name no built-in analyzer.
ORCHESTRATION = ("__init__.py", "api.py", "analysis", "auditing", "render", "cli")
MAX_LINES = 80
MAX_LOOSE = 10
MAX_METHOD_LITERALS = 5


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The xdl modules ``name`` imports, resolved to the module (a package's ``__init__``) that runs."""

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(stem + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target == "xdl" or target.startswith("xdl."):
                resolved = resolve(target)
                if resolved and resolved != name:
                    found.add(resolved)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def rank(name: str) -> int:
    if name in GROUND:
        return 0
    return 1 + LAYERS.index(name.split(".")[1])


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_xdl_modules():
    assert cycles(graph()) == []


def test_imports_run_one_way():
    upward = [f"{name} imports {target}" for name, targets in graph().items() for target in sorted(targets)
              if rank(target) > rank(name)]
    assert upward == []


def test_every_package_says_what_it_holds_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "imports" in doc.lower(), f"{init.relative_to(ROOT)} does not say what it may import"


def test_few_loose_modules():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(loose) <= MAX_LOOSE, loose


def test_functions_fit_in_a_head():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def builtin_methods() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {name for group, entries in project["entry-points"].items() if group.startswith("xdl.") for name in entries}


def method_literals() -> list[str]:
    """String constants (docstrings left out) in the orchestration modules that name a built-in analyzer."""
    methods = builtin_methods()
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if not (str(rel) in ORCHESTRATION or rel.parts[0] in ORCHESTRATION):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in methods and id(node) not in docstrings:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    return found


def test_the_core_names_almost_no_plugin():
    assert "pgd" in builtin_methods() and "bias" in builtin_methods()
    found = method_literals()
    assert len(found) <= MAX_METHOD_LITERALS, found


def test_the_readme_is_a_front_door_to_every_docs_page():
    from xdl.cli.main import DOCS  # the epilog of xdl --help

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert len(readme.splitlines()) <= 250
    assert "architecture.md" in pages and len(pages) >= 10
    assert [p for p in pages if f"](docs/{p})" not in readme] == []
    assert [p for p in pages if p not in DOCS] == []
    assert [p for p in DOCS.split() if p.endswith(".md") and p not in pages] == []
