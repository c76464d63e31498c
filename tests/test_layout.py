"""The package layout stays what docs/architecture.md says: no import cycles, small modules, one namespace.

Imports are read with `ast` from the source tree (function-local imports included: a cycle broken only by
importing inside a function is still a cycle between two modules that need each other).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"rewriter": "hfrewrite", "kernels": "hfrewrite.kernels", "rules": "hfrewrite.rules"}
MAX_LINES = 420


def module_files() -> dict[str, Path]:
    """hfrewrite module name -> source file, for every non-test module of the package."""
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name.startswith("test_"):
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The hfrewrite modules `name` imports (absolute or relative, anywhere in the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:` (annotations only, never imported at run time)."""
    nodes: list[ast.AST] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return nodes


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    known = set(modules)
    graph = {name: imported_modules(name, path, known) for name, path in sorted(modules.items())}
    for name in graph:  # importing a package's submodule runs the package's __init__, which is not a cycle edge
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(module_files()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_sees_a_cycle_through_local_imports(tmp_path: Path) -> None:
    """The check can fail: two modules that import each other, one of them inside a function."""
    (tmp_path / "a.py").write_text("from hfrewrite import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from hfrewrite.a import x\n")
    modules = {"hfrewrite.a": tmp_path / "a.py", "hfrewrite.b": tmp_path / "b.py"}
    assert find_cycle(import_graph(modules)) == ["hfrewrite.a", "hfrewrite.b", "hfrewrite.a"]


@pytest.mark.parametrize("name", sorted(module_files()))
def test_module_is_small(name: str) -> None:
    lines = len(module_files()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by job (limit {MAX_LINES})"


def test_no_top_level_rules_or_kernels_import() -> None:
    """`kernels` is Hugging Face's own package name; everything imports through `hfrewrite.`."""
    offenders = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        if ".git" in path.parts or "build" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("rules", "kernels")]
    assert not offenders, offenders
