"""The package layering of dd2dist, read from the source (ast, no imports executed).

Every ``import`` counts, at module level or inside a function (a lazy import is still a dependency). A failure
lists each offending ``file:line``. The rules:

(a) no module of dd2dist imports the entry points above it (``jobs``, ``data_pipelines``);
(b) the top-level packages and modules of dd2dist (``config``, ``data``, ``latent.py``, ...) import each other
    without a cycle; a failure prints the cycle with the imports that make it;
(c) ``dd2dist/engine`` runs models it is given: it imports neither ``dd2dist.teachers`` nor ``dd2dist.nets``;
(d) ``dd2dist/method`` is pure maths on the engine's callables: no ``ray`` or ``deepspeed``;
(e) ``dd2dist/conditions.py``, the types every layer shares, imports nothing from dd2dist.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dd2dist"
SHARED_TYPES = PACKAGE / "conditions.py"


@dataclass(frozen=True)
class Import:
    path: Path  # the importing file
    line: int
    target: str  # dotted module, e.g. "dd2dist.teachers.base"; for ``from m import a`` both m and m.a are listed
    statement: str  # the import as written

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO).as_posix()}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.statement}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def imports() -> tuple[Import, ...]:
    """Every import in every .py file under dd2dist/, relative imports resolved."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                out.extend(Import(path, node.lineno, a.name, ast.unparse(node)) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                text = ast.unparse(node)
                out.append(Import(path, node.lineno, source, text))
                out.extend(Import(path, node.lineno, f"{source}.{a.name}", text) for a in node.names if a.name != "*")
    return tuple(out)


def _root(target: str) -> str:
    return target.split(".")[0]


def _unit(path_or_target: Path | str) -> str | None:
    """The top-level package or module of dd2dist a file or dotted target belongs to (None: the root itself)."""
    if isinstance(path_or_target, Path):
        parts = path_or_target.relative_to(PACKAGE).with_suffix("").parts
        return None if parts == ("__init__",) else parts[0]
    parts = path_or_target.split(".")
    return parts[1] if parts[0] == "dd2dist" and len(parts) > 1 else None


def _units() -> set[str]:
    return {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}


def _fail_if(found: list[Import], title: str) -> None:
    if found:
        lines = sorted({str(i) for i in found})
        pytest.fail(f"{title} ({len(lines)}):\n  " + "\n  ".join(lines), pytrace=False)


def _under(directory: str) -> list[Import]:
    return [i for i in imports() if i.path.is_relative_to(PACKAGE / directory)]


def test_library_does_not_import_the_entry_points():
    found = [i for i in imports() if _root(i.target) in ("jobs", "data_pipelines")]
    _fail_if(found, "dd2dist imports jobs/ or data_pipelines/ (move the code it needs into dd2dist)")


def unit_graph() -> dict[tuple[str, str], list[Import]]:
    """(importing unit, imported unit) -> the imports behind that edge."""
    units = _units()
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for i in imports():
        src, dst = _unit(i.path), _unit(i.target)
        if src is not None and dst in units and dst != src:
            edges[(src, dst)].append(i)
    return edges


def find_cycle(nodes: set[str], edges: set[tuple[str, str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the directed graph, or None (depth-first search, deterministic order)."""
    succ: dict[str, list[str]] = defaultdict(list)
    for a, b in sorted(edges):
        succ[a].append(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in succ[n]:
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = 2
        path.pop()
        return None

    for n in sorted(nodes):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a", "b", "c"}, {("a", "b"), ("b", "c")}) is None
    assert find_cycle({"a", "b", "c"}, {("a", "b"), ("b", "c"), ("c", "b")}) == ["b", "c", "b"]


def test_no_import_cycle_between_top_level_packages():
    graph = unit_graph()
    cycle = find_cycle(_units(), set(graph))
    if cycle:
        legs = []
        for a, b in zip(cycle, cycle[1:]):
            legs.append(f"{a} -> {b}:")
            legs.extend(f"    {line}" for line in sorted({str(i) for i in graph[(a, b)]})[:6])
        pytest.fail("import cycle " + " -> ".join(cycle) + "\n  " + "\n  ".join(legs), pytrace=False)


def test_engine_does_not_import_teachers_or_nets():
    found = [i for i in _under("engine") if _unit(i.target) in ("teachers", "nets")]
    _fail_if(found, "dd2dist/engine builds models (the caller should pass them in)")


def test_method_does_not_import_ray_or_deepspeed():
    found = [i for i in _under("method") if _root(i.target) in ("ray", "deepspeed")]
    _fail_if(found, "dd2dist/method imports a distributed runtime")


def test_shared_types_import_nothing_from_dd2dist():
    found = [i for i in imports() if i.path == SHARED_TYPES and _root(i.target) == "dd2dist"]
    _fail_if(found, f"{SHARED_TYPES.name} must stay a leaf")
