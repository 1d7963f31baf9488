"""What may import what (docs/architecture.md), checked on the source.

* no import cycle among the core's modules (imports at module level: those that
  run when a module is imported; imports inside functions and under
  ``TYPE_CHECKING`` are deliberate deferrals and do not count);
* the core imports no integration at module level, and elsewhere only the few
  public integration modules listed below, lazily;
* nothing outside the core (integrations/, examples/, bench/) imports a private
  module of aiocrypt (``aiocrypt._x``): adapters use ``aiocrypt.adapters`` and the
  public API; the leftovers below may only shrink.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "aiocrypt"
INTEGRATIONS = ROOT / "integrations"

#: Private aiocrypt modules imported outside the core, by file (may only shrink): only
#: benchmarks that time internals on purpose; every integration imports public modules.
PRIVATE_IMPORTS = {
    "bench/_common.py": {"aiocrypt._service"},
    "bench/bench_bulk.py": {"aiocrypt._gil"},
    "bench/bench_reencrypt.py": {"aiocrypt._cli_reencrypt"},
    "bench/telemetry_overhead.py": {"aiocrypt._telemetry"},
}

#: The core's only imports of integrations: inside the function that needs them (the
#: core imports without the extras), of public modules, each for one command.
CORE_TO_INTEGRATIONS = {
    # `aiocrypt jobs` (a lazily loaded command group, named by a string) and
    # `aiocrypt keys compromise --reencrypt`, which enqueues the ARQ re-encryption
    "aiocrypt/cli.py": {"aiocrypt.integrations.arq.cli"},
    # `--models module:Base`: table specs and legacy readers from SQLAlchemy metadata
    "aiocrypt/_cli_ops.py": {"aiocrypt.integrations.sqlalchemy"},
    # the demo's SQLAlchemy models
    "aiocrypt/demo.py": {"aiocrypt.integrations.sqlalchemy"},
}
OUTSIDE = ("integrations", "examples", "bench")


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
                for block in (
                    node.body,
                    node.orelse,
                    node.finalbody,
                    *[h.body for h in node.handlers],
                ):
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
                cycle = [*stack[stack.index(target) :], target]
                if not all(
                    b.startswith(a + ".") or a.startswith(b + ".")
                    for a, b in itertools.pairwise(cycle)
                ):
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


def _is_integration(name: str) -> bool:
    return (
        name.split(".")[:2] == ["aiocrypt", "integrations"]
        or name == "integrations"
        or name.startswith("integrations.")
    )


def test_the_core_imports_no_integration_at_module_level() -> None:
    offenders = []
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _top_level_imports(tree):
            names = _resolve(_module_name(path), node, path.name == "__init__.py")
            if any(_is_integration(n) for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def _core_integration_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        name, is_package = _module_name(path), path.name == "__init__.py"
        for node in ast.walk(tree):  # lazy imports count here
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = {t for t in _resolve(name, node, is_package) if _is_integration(t)}
                # "from .integrations.arq.cli import x": the module, not module.x
                if isinstance(node, ast.ImportFrom) and targets:
                    targets = {
                        t
                        for t in targets
                        if not any(t == f"{u}.{a.name}" for u in targets for a in node.names)
                    }
                if targets:
                    found.setdefault(path.relative_to(ROOT).as_posix(), set()).update(targets)
    return found


def test_the_core_imports_integrations_only_where_listed() -> None:
    found = _core_integration_imports()
    unlisted = {
        path: sorted(mods - CORE_TO_INTEGRATIONS.get(path, set()))
        for path, mods in found.items()
        if mods - CORE_TO_INTEGRATIONS.get(path, set())
    }
    assert unlisted == {}, (
        "the core imports integrations it should not: register a "
        f"plugin instead, or list it here with the reason: {unlisted}"
    )
    assert found == CORE_TO_INTEGRATIONS  # a list that outlived its import shrinks
    for mods in found.values():
        assert not any(part.startswith("_") for m in mods for part in m.split("."))


def _private_imports(path: Path) -> set[str]:
    """Private aiocrypt modules ``path`` imports (anywhere in it, lazily too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # "from aiocrypt import _format" names a module too (from a public package)
            if not any(part.startswith("_") for part in node.module.split(".")):
                names |= {
                    f"{node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                }
    return {
        n
        for n in names
        if n.split(".")[0] == "aiocrypt" and any(part.startswith("_") for part in n.split(".")[1:])
    }


def test_nothing_outside_the_core_imports_a_private_module() -> None:
    found: dict[str, set[str]] = {}
    for folder in OUTSIDE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            private = _private_imports(path)
            if private:
                found[path.relative_to(ROOT).as_posix()] = private
    grown = {
        name: sorted(mods - PRIVATE_IMPORTS.get(name, set()))
        for name, mods in found.items()
        if mods - PRIVATE_IMPORTS.get(name, set())
    }
    assert grown == {}, (
        "modules outside aiocrypt/ import private aiocrypt modules; use "
        "aiocrypt.adapters or the public API, or make what they need "
        f"public (docs/architecture.md): {grown}"
    )


def test_the_private_import_check_sees_every_form(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import aiocrypt._gil\n"
        "from aiocrypt import _format, KeyType\n"
        "from aiocrypt.reencrypt._engine import x\n"
        "def f():\n    from aiocrypt._types import KeyTypeLike\n"
        "from aiocrypt.adapters import DataKey\n"
        "from ._extension import y\n",
        encoding="utf-8",
    )
    assert _private_imports(sample) == {
        "aiocrypt._gil",
        "aiocrypt._format",
        "aiocrypt.reencrypt._engine",
        "aiocrypt._types",
    }


def test_every_module_over_500_lines_says_why_at_its_top() -> None:
    """A module past about 500 lines is a choice, stated in its docstring ("... 500 lines
    ...: why"), or a module to split (issue 18)."""
    unexplained = []
    for path in sorted([*CORE.rglob("*.py"), *INTEGRATIONS.rglob("*.py")]):
        source = path.read_text(encoding="utf-8")
        if source.count("\n") <= 500:
            continue
        docstring = ast.get_docstring(ast.parse(source)) or ""
        if "500 lines" not in docstring:
            unexplained.append(str(path.relative_to(ROOT)))
    assert unexplained == [], f"over 500 lines with no reason at the top: {unexplained}"
