"""tools/mutate.py (``./dev mutate``): its operators, and the equivalent-mutant list.

The mutation run itself is too slow for ``./dev test``; these checks are not. The
list of equivalent mutants must name mutants that exist, each with a reason, so an
edit that changes a listed line shows up here rather than as a silently shorter list.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutate_tool", ROOT / "tools" / "mutate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mutate = _tool()

SOURCE = '''\
"""Docstring: never mutated."""
LIMIT = 64


def check(a, b, items):
    """Docstring."""
    if a < b and a is not None:
        a += 1
        return a + b
    while not items:
        items.append(0)
    return [x for x in items if x in (1, 2)] or True
'''


def test_each_operator_makes_its_mutant() -> None:
    changes = {(m.lineno, m.change) for m in mutate.mutants_of("x.py", SOURCE)}
    assert {
        (2, "`64` -> `65`"),
        (2, "`64` -> `63`"),
        (7, "`<` -> `<=`"),
        (7, "`<` -> `>=`"),
        (7, "`is not` -> `is`"),
        (7, "`and` -> `or`"),
        (7, "negate condition"),
        (7, "delete statement"),
        (8, "`+=` -> `-=`"),
        (8, "`1` -> `2`"),
        (8, "`1` -> `0`"),
        (8, "delete statement"),
        (9, "return None"),
        (9, "`+` -> `-`"),
        (10, "remove `not`"),
        (11, "`0` -> `1`"),
        (11, "`0` -> `-1`"),
        (12, "`in` -> `not in`"),
        (12, "negate condition"),
        (12, "`or` -> `and`"),
        (12, "`True` -> `False`"),
        (12, "return None"),
    } <= changes
    assert not [c for c in changes if c[0] in (1, 6)]  # docstrings


def test_every_mutant_compiles_and_changes_the_source() -> None:
    mutants = mutate.mutants_of("x.py", SOURCE)
    assert len({m.source for m in mutants}) == len(mutants)
    for m in mutants:
        assert m.source != SOURCE
        compile(m.source, "x.py", "exec")


def test_a_change_made_twice_on_one_line_is_numbered() -> None:
    source = "def f(a):\n    return (a + 1, a + 1)\n"
    changes = [m.change for m in mutate.mutants_of("x.py", source)]
    assert changes.count("`+` -> `-`") == 1 and changes.count("`+` -> `-` #2") == 1


def test_every_listed_equivalent_mutant_exists_and_says_why() -> None:
    equivalents = mutate.load_equivalents()
    assert equivalents
    by_module: dict[str, set[tuple[str, str, str]]] = {}
    for key, entry in equivalents.items():
        if entry.module not in by_module:
            by_module[entry.module] = {m.key for m in mutate.mutants_of(entry.module)}
        assert key in by_module[entry.module], f"no such mutant (any more?): {key}"
        assert len(entry.why.split()) >= 5, f"say why: {key}"
