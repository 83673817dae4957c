"""The package's shape: no import circle, a short root, subpackages that say what they hold, and
every third-party import declared in pyproject.toml."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "reals_cli"


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, names: set[str]) -> tuple[set[str], set[str]]:
    """(reals_cli modules, top-level third-party names) that `path` imports, anywhere in it."""
    module = _module(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` imports the module x when there is one
                ours.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]:
                (ours if name.split(".")[0] == "reals_cli" else theirs).add(name)
    return {n for n in ours if n in names and n != module}, {n.split(".")[0] for n in theirs}


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    names = {_module(p) for p in files}
    return {_module(p): _imports(p, names)[0] for p in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_no_module_imports_itself_round_a_circle():
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_root_is_short_and_every_subpackage_says_what_it_holds():
    assert len(list(PACKAGE.glob("*.py"))) <= 16
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "May import" in doc or init.parent.name == "commands", init


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_every_third_party_import_is_a_declared_dependency():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("_", "-")
              for d in declared["dependencies"] + declared["optional-dependencies"]["cuda"]}
    stdlib = set(sys.stdlib_module_names)
    distributions = packages_distributions()
    missing = {}
    names = {_module(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        for name in _imports(path, names)[1] - stdlib - {"reals_cli"}:
            dists = {d.lower().replace("_", "-") for d in distributions.get(name, [name])}
            if not dists & wanted:
                missing[name] = str(path.relative_to(REPO))
    assert not missing
