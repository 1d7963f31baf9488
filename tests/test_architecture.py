"""What may import what (docs/architecture.md), checked on the source.

* no import cycle among the core's modules (imports at module level: those that
  run when a module is imported; imports inside functions and under
  ``TYPE_CHECKING`` are deliberate deferrals and do not count);
* the core imports no integration at module level;
* the integrations' imports of private core modules may only shrink: the list
  below is what they use today, until the public adapter surface exists.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "aiocrypt"
INTEGRATIONS = ROOT / "integrations"

#: Private core modules each integration imports today (may only shrink).
PRIVATE_IMPORTS = {
    "alembic.py": {"aiocrypt._format", "aiocrypt._legacy", "aiocrypt._types"},
    "arq/cli.py": {"aiocrypt._cli_base", "aiocrypt._urls"},
    "arq/failures.py": {"aiocrypt._types"},
    "arq/reencryption.py": {"aiocrypt._format", "aiocrypt._types"},
    "arq/rotation.py": {"aiocrypt._types"},
    "arq/state.py": {"aiocrypt._types"},
    "sqlalchemy.py": {"aiocrypt._codec", "aiocrypt._crypto", "aiocrypt._errors",
                      "aiocrypt._format", "aiocrypt._keyring", "aiocrypt._legacy",
                      "aiocrypt._types"},
}

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run at import time (not in functions, not TYPE_CHECKING)."""
    def walk(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    yield from walk(node.body)
                yield from walk(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody,
                              *[h.body for h in node.handlers]):
                    yield from walk(block)
    yield from walk(tree.body)


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    # "from . import x" may name a submodule: count both the package and base.x
    return {base} | {f"{base}.{alias.name}" for alias in node.names}


def _core_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in CORE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets: set[str] = set()
        for node in _top_level_imports(tree):
            targets |= _resolve(name, node, path.name == "__init__.py")
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles in ``graph``; a package importing its own submodules is not one."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if target.startswith(node + "."):
                continue  # a package's own submodule
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target):], target]
                if not all(b.startswith(a + ".") or a.startswith(b + ".")
                           for a, b in itertools.pairwise(cycle)):
                    cycles.append(cycle)
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycle_in_the_core() -> None:
    assert _cycles(_core_graph()) == []


def test_a_cycle_is_found() -> None:
    """The check itself: a cycle through two modules (or via the package) is reported."""
    assert _cycles({"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.a"}}) == [["p.a", "p.b", "p.a"]]
    assert _cycles({"p": {"p.a"}, "p.a": {"p"}}) == []  # from . import x in a submodule
    assert _cycles({"p": {"p.a", "p.b"}, "p.a": {"p.b"}, "p.b": {"p"}}) == []
    assert _cycles({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}) != []


def test_the_graph_is_read() -> None:
    """The walk above sees real edges (a broken resolver would find no cycle ever)."""
    graph = _core_graph()
    assert "aiocrypt._format" in graph["aiocrypt._crypto"]
    assert "aiocrypt._keyring" in graph["aiocrypt._manager"]
    assert "aiocrypt.keystore._base" in graph["aiocrypt.keystore.file"]


def test_the_core_imports_no_integration_at_module_level() -> None:
    offenders = []
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _top_level_imports(tree):
            names = _resolve(_module_name(path), node, path.name == "__init__.py")
            if any(n.startswith(("integrations", "aiocrypt.integrations")) for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_integrations_import_no_new_private_core_module() -> None:
    found: dict[str, set[str]] = {}
    for path in sorted(INTEGRATIONS.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        private = set()
        for node in ast.walk(tree):  # function-level imports count here too
            if isinstance(node, ast.ImportFrom) and node.module \
                    and node.module.startswith("aiocrypt."):
                if any(part.startswith("_") for part in node.module.split(".")[1:]):
                    private.add(node.module)
        if private:
            found[path.relative_to(INTEGRATIONS).as_posix()] = private
    grown = {name: sorted(mods - PRIVATE_IMPORTS.get(name, set()))
             for name, mods in found.items() if mods - PRIVATE_IMPORTS.get(name, set())}
    assert grown == {}, ("integrations import private core modules they did not before; "
                         f"make what they need public instead (docs/architecture.md): {grown}")
