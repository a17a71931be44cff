"""The shape the code promises (docs/architecture.md): one short loop that never branches on a
method, and modules that import in one direction."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "opd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every opd module ``path`` imports, at module level or inside functions, except imports
    under ``if TYPE_CHECKING:`` (never executed)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in modules}


def test_no_import_cycles():
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {name: _imports(path, set(files)) - {name} for name, path in files.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_the_loop_is_short_and_never_asks_which_method_it_runs():
    text = (SRC / "trainer.py").read_text()
    assert not re.findall(r"teacher\.kind|loss\.objective|isinstance\(teacher|objective ==|objective in \(", text)
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(ast.parse(text))
               if isinstance(node, ast.FunctionDef)}
    assert lengths["_train_steps"] <= 150, lengths["_train_steps"]
    assert max(lengths.values()) <= 150, lengths


def test_only_the_builder_reads_kinds_and_objective_names():
    def reads(path: Path) -> list[str]:
        found = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("kind", "objective"):
                code = ast.unparse(node)
                if code.endswith(("teacher.kind", "loss.objective")) or code in ("cfg.kind", "routed.kind"):
                    found.append(f"{path.name}:{node.lineno} {code}")
        return found

    # config.py refuses impossible combinations when a config loads; build.py assembles the run.
    readers = [hit for p in sorted(SRC.rglob("*.py")) if p.name not in ("config.py", "build.py") for hit in reads(p)]
    assert readers == [], readers
