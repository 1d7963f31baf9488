"""Mutation testing for aiocrypt: ``./dev mutate [module ...]``.

Each mutant is one small change to one module (a flipped comparison, ``and`` for
``or``, a negated condition, a constant off by one, a deleted statement, ``return
None`` for a value, ``-`` for ``+``). The module's own tests (``TESTS`` below) run
against it; a mutant no test fails on *survived*. A survivor either shows a line no
test pins or is *equivalent* (it cannot change behaviour): equivalents are listed
with the reason in ``tools/mutate_equivalent.toml`` and left out of the second score.

Mutants never touch the checkout: the tree is copied once per worker into a
temporary directory (other people run tests in the checkout meanwhile), the
mutated module is written into the copy, and the tests run there with the copy
first on ``PYTHONPATH``. Runs are bounded: each mutant gets three times the
baseline run of its tests (at least ``MIN_TIMEOUT`` seconds, counted as killed
when it runs out: a mutant that hangs is caught), and ``--max-minutes`` stops
starting new mutants.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import dataclasses
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "tools" / "mutate_equivalent.toml"
MIN_TIMEOUT = 10.0
#: Lines carrying this comment are not mutated (say why next to it).
NO_MUTATE = "pragma: no mutate"

#: Module -> the tests that exercise it (running the whole suite per mutant is too
#: slow). A module's mutants are judged by these tests only.
TESTS: dict[str, list[str]] = {
    "aiocrypt/_format.py": [
        "tests/core/test_mutants_format.py",
        "tests/core/test_coverage_format.py",
        "tests/test_vectors.py",
        "tests/test_decryption_errors.py",
        "tests/test_rejection.py",
        "tests/security/test_fuzz_tokens.py",
    ],
    "aiocrypt/_codec.py": [
        "tests/core/test_mutants_codec.py",
        "tests/core/test_coverage_codec.py",
        "tests/test_codec.py",
        "tests/test_vectors.py",
    ],
    "aiocrypt/_crypto.py": [
        "tests/core/test_mutants_crypto.py",
        "tests/core/test_coverage_crypto.py",
        "tests/test_vectors.py",
        "tests/test_decryption_errors.py",
        "tests/test_field_fastpath.py",
        "tests/security/test_purpose_binding.py",
        "tests/test_streams.py",
    ],
    "aiocrypt/_policy.py": [
        "tests/core/test_mutants_policy.py",
        "tests/core/test_coverage_policy.py",
        "tests/test_lifecycle.py",
    ],
    "aiocrypt/_keyring.py": [
        "tests/core/test_mutants_keyring.py",
        "tests/core/test_coverage_keyring.py",
        "tests/core/test_coverage_bulk.py",
        "tests/test_field_fastpath.py",
        "tests/test_service.py",
        "tests/test_lifecycle.py",
        "tests/test_decryption_errors.py",
        "tests/test_rejection.py",
    ],
    "aiocrypt/_bulk.py": [
        "tests/core/test_bulk_mutants.py",
        "tests/core/test_coverage_bulk.py",
        "tests/test_files.py",
        "tests/test_vectors.py",
    ],
    "aiocrypt/_streams.py": [
        "tests/core/test_streams_mutants.py",
        "tests/core/test_coverage_streams.py",
        "tests/test_stream_threads.py",
        "tests/test_streams.py",
        "tests/test_vectors.py",
    ],
    "aiocrypt/_keyset_seal.py": [
        "tests/core/test_mutants_keyset_seal.py",
        "tests/core/test_mutants_keyset_guard.py",
        "tests/security/test_storage_attacker.py",
    ],
    "aiocrypt/_keyset_guard.py": [
        "tests/core/test_mutants_keyset_guard.py",
        "tests/core/test_mutants_keyset_state.py",
        "tests/security/test_storage_attacker.py",
    ],
    "aiocrypt/_keyset_state.py": [
        "tests/core/test_mutants_keyset_state.py",
        "tests/core/test_mutants_keyset_guard.py",
        "tests/security/test_storage_attacker.py",
    ],
}
DEFAULT_MODULES = [
    "aiocrypt/_format.py",
    "aiocrypt/_codec.py",
    "aiocrypt/_crypto.py",
    "aiocrypt/_policy.py",
    "aiocrypt/_keyring.py",
    "aiocrypt/_bulk.py",
    "aiocrypt/_streams.py",
]

# -- generating mutants ---------------------------------------------------------

_COMPARE_SWAPS: dict[type[ast.cmpop], tuple[type[ast.cmpop], ...]] = {
    ast.Lt: (ast.LtE, ast.GtE),
    ast.LtE: (ast.Lt, ast.Gt),
    ast.Gt: (ast.GtE, ast.LtE),
    ast.GtE: (ast.Gt, ast.Lt),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
}
_OP_TEXT = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.Add: "+",
    ast.Sub: "-",
}
#: Statements whose deletion is not a useful mutant (or not a statement of logic).
_KEEP = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Import,
    ast.ImportFrom,
    ast.Global,
    ast.Nonlocal,
    ast.Pass,
    ast.Return,
)


@dataclasses.dataclass(frozen=True)
class Mutant:
    module: str
    lineno: int
    line: str  # the stripped source line where the change starts
    change: str  # what changed, e.g. "`<` -> `<=`"
    source: str  # the whole mutated module

    @property
    def key(self) -> tuple[str, str, str]:
        """Stable across unrelated edits: no line number in it."""
        return (self.module, self.line, self.change)


class _Collector:
    """Walks a module and yields (node, replacement text or None, change) edits."""

    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.edits: list[tuple[ast.AST, str, str]] = []

    def collect(self) -> list[tuple[ast.AST, str, str]]:
        self._visit(self.tree, in_function=False)
        return self.edits

    def _add(self, node: ast.AST, new: ast.AST | str, change: str) -> None:
        text = new if isinstance(new, str) else ast.unparse(new)
        if isinstance(node, ast.expr):
            text = f"({text})"  # the source span of an expression never includes its parens
        self.edits.append((node, text, change))

    def _visit(self, node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.JoinedStr):
            return  # positions inside f-strings are not reliable before Python 3.12
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            return
        if isinstance(node, ast.AnnAssign):
            if node.value is not None:
                self._visit(node.value, in_function)
            self._statement(node, in_function)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in node.body:
                self._visit(stmt, True)
            for default in node.args.defaults + [d for d in node.args.kw_defaults if d]:
                self._visit(default, in_function)
            for deco in node.decorator_list:
                self._visit(deco, in_function)
            return
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            return  # docstrings and bare constants
        self._expression(node)
        if isinstance(node, ast.stmt):
            self._statement(node, in_function)
        for child in ast.iter_child_nodes(node):
            self._visit(child, in_function)

    def _statement(self, node: ast.stmt, in_function: bool) -> None:
        if (
            isinstance(node, ast.Return)
            and node.value is not None
            and not (isinstance(node.value, ast.Constant) and node.value.value is None)
        ):
            self._add(node, "return None", "return None")
        if isinstance(node, ast.AugAssign) and type(node.op) in (ast.Add, ast.Sub):
            new = copy.copy(node)
            new.op = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
            self._add(node, new, f"`{_OP_TEXT[type(node.op)]}=` -> `{_OP_TEXT[type(new.op)]}=`")
        if isinstance(node, (ast.If, ast.While, ast.Assert)):
            self._negate(node.test)
        if in_function and not isinstance(node, _KEEP):
            self._add(node, "pass", "delete statement")

    def _negate(self, test: ast.expr) -> None:
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            return  # "remove `not`" covers it
        self._add(test, ast.UnaryOp(ast.Not(), test), "negate condition")

    def _expression(self, node: ast.AST) -> None:  # noqa: C901 - one branch per mutation operator
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                for swap in _COMPARE_SWAPS[type(op)]:
                    new = copy.copy(node)
                    new.ops = list(node.ops)
                    new.ops[i] = swap()
                    self._add(node, new, f"`{_OP_TEXT[type(op)]}` -> `{_OP_TEXT[swap]}`")
        elif isinstance(node, ast.BoolOp):
            boolop = copy.copy(node)
            boolop.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            names = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
            self._add(node, boolop, f"`{names[0]}` -> `{names[1]}`")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self._add(node, node.operand, "remove `not`")
        elif isinstance(node, ast.IfExp):
            self._negate(node.test)
        elif isinstance(node, ast.comprehension):
            for cond in node.ifs:
                self._negate(cond)
        elif isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub):
            binop = copy.copy(node)
            binop.op = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
            self._add(node, binop, f"`{_OP_TEXT[type(node.op)]}` -> `{_OP_TEXT[type(binop.op)]}`")
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            self._add(node, ast.Constant(not node.value), f"`{node.value}` -> `{not node.value}`")
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            for value in dict.fromkeys((node.value + 1, node.value - 1)):
                self._add(node, ast.Constant(value), f"`{node.value}` -> `{value}`")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _offsets(source: str) -> list[int]:
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line.encode("utf-8")))
    return starts


def mutants_of(module: str, source: str | None = None) -> list[Mutant]:
    """Every mutant of ``module`` (a path relative to the repository root)."""
    if source is None:
        source = (ROOT / module).read_text(encoding="utf-8")
    tree = ast.parse(source)
    raw = source.encode("utf-8")
    lines = source.splitlines()
    starts = _offsets(source)
    result: list[Mutant] = []
    seen: set[str] = set()
    occurrences: dict[tuple[str, str], int] = {}
    for node, text, change in _Collector(tree).collect():
        line = lines[node.lineno - 1]  # type: ignore[attr-defined]
        if NO_MUTATE in line:
            continue
        begin = starts[node.lineno - 1] + node.col_offset  # type: ignore[attr-defined]
        end = starts[node.end_lineno - 1] + node.end_col_offset  # type: ignore[attr-defined]
        mutated = (raw[:begin] + text.encode("utf-8") + raw[end:]).decode("utf-8")
        if mutated == source or mutated in seen:
            continue
        try:
            compile(mutated, module, "exec")
        except SyntaxError:
            continue
        seen.add(mutated)
        # the same change twice on the same text (two `+ 1` on a line): number the later ones
        nth = occurrences[line.strip(), change] = occurrences.get((line.strip(), change), 0) + 1
        if nth > 1:
            change = f"{change} #{nth}"
        result.append(Mutant(module, node.lineno, line.strip(), change, mutated))  # type: ignore[attr-defined]
    return result


# -- equivalents ----------------------------------------------------------------


@dataclasses.dataclass
class Equivalent:
    module: str
    line: str
    change: str
    why: str


def load_equivalents(path: Path = EQUIVALENT_FILE) -> dict[tuple[str, str, str], Equivalent]:
    if not path.exists():
        return {}
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    result = {}
    for entry in data.get("equivalent", []):
        eq = Equivalent(entry["module"], entry["line"].strip(), entry["change"], entry["why"])
        if not eq.why.strip():
            raise SystemExit(f"{path}: equivalent mutant without a reason: {entry}")
        result[(eq.module, eq.line, eq.change)] = eq
    return result


# -- running --------------------------------------------------------------------

_COPY_IGNORE = shutil.ignore_patterns(
    ".venv",
    ".git",
    "__pycache__",
    ".hypothesis",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "*.egg-info",
    "mutants",
    "node_modules",
)


def make_workspace(base: Path, index: int) -> Path:
    """A copy of the tree in which ``aiocrypt.integrations`` resolves inside the copy too."""
    target = base / f"w{index}"
    shutil.copytree(ROOT, target, ignore=_COPY_IGNORE, symlinks=True)
    link = target / "aiocrypt" / "integrations"
    if not link.exists():
        link.symlink_to(target / "integrations", target_is_directory=True)
    probe = "import aiocrypt, aiocrypt.integrations as i; print(aiocrypt.__file__, i.__file__)"
    found = subprocess.run(  # noqa: S603 - our own interpreter, a fixed probe
        [sys.executable, "-c", probe],
        cwd=target,
        env=_env(target),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not all(Path(f).resolve().is_relative_to(target.resolve()) for f in found):
        raise SystemExit(f"the copy in {target} imports aiocrypt from elsewhere: {found}")
    return target


def _env(workspace: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(workspace)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a stale .pyc of a same-size mutant must not load
    env["HYPOTHESIS_DATABASE"] = ""
    return env


def _plugins_off(tests: list[str]) -> list[str]:
    """Hypothesis's pytest plugin, off when no test file uses it: importing it is half
    of a pytest start here, and a module's mutants start pytest hundreds of times."""
    files = {ROOT / t.split("::")[0] for t in tests}
    if any("hypothesis" in path.read_text(encoding="utf-8") for path in files):
        return []
    return ["-p", "no:hypothesispytest"]


def run_tests(workspace: Path, tests: list[str], timeout: float | None) -> tuple[str, float]:
    """Run ``tests`` in ``workspace``: ("passed" | "failed" | "timeout", seconds)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "--no-header",
        "-p",
        "no:cacheprovider",
        *_plugins_off(tests),
        "-o",
        "addopts=--strict-markers",
        "--tb=no",
        *tests,
    ]
    start = time.monotonic()
    # our own interpreter and arguments, in our own copy of the tree
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        cmd,
        cwd=workspace,
        env=_env(workspace),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout", time.monotonic() - start
    return ("passed" if rc == 0 else "failed"), time.monotonic() - start


def _clear_pyc(workspace: Path, module: str) -> None:
    path = workspace / module
    for pyc in (path.parent / "__pycache__").glob(path.stem + ".*.pyc"):
        pyc.unlink()


@dataclasses.dataclass
class Outcome:
    mutant: Mutant
    status: str  # "killed" | "survived" | "timeout"


@dataclasses.dataclass
class ModuleResult:
    module: str
    total: int
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    error: str = ""


def run_module(
    module: str,
    tests: list[str],
    workspaces: queue.Queue[Path],
    deadline: float,
    lines: set[int] | None,
    progress: bool,
) -> ModuleResult:
    mutants = [m for m in mutants_of(module) if lines is None or m.lineno in lines]
    result = ModuleResult(module, len(mutants))
    tests = [t for t in tests if (ROOT / t.split("::")[0]).exists()]
    if not tests:
        result.error = "no tests mapped"
        return result
    ws = workspaces.get()
    try:
        status, baseline = run_tests(ws, tests, None)
    finally:
        workspaces.put(ws)
    if status != "passed":
        result.error = "tests fail without any mutant (fix them first)"
        return result
    timeout = max(3 * baseline, MIN_TIMEOUT)
    if progress:
        print(
            f"{module}: {len(mutants)} mutants, baseline {baseline:.1f}s, "
            f"timeout {timeout:.0f}s, tests: {' '.join(tests)}",
            file=sys.stderr,
            flush=True,
        )
    lock = threading.Lock()

    def one(mutant: Mutant) -> None:
        if time.monotonic() > deadline:
            return
        ws = workspaces.get()
        target = ws / module
        original = target.read_bytes()
        try:
            target.write_text(mutant.source, encoding="utf-8")
            _clear_pyc(ws, module)
            status, _ = run_tests(ws, tests, timeout)
        finally:
            target.write_bytes(original)
            workspaces.put(ws)
        outcome = Outcome(
            mutant,
            "killed" if status == "failed" else "timeout" if status == "timeout" else "survived",
        )
        with lock:
            result.outcomes.append(outcome)
            if progress:
                mark = {"killed": ".", "timeout": "T", "survived": "S"}[outcome.status]
                print(mark, end="", file=sys.stderr, flush=True)

    with concurrent.futures.ThreadPoolExecutor(workspaces.qsize()) as pool:
        list(pool.map(one, mutants))
    if progress:
        print(file=sys.stderr)
    result.outcomes.sort(key=lambda o: (o.mutant.lineno, o.mutant.change))
    return result


# -- reporting ------------------------------------------------------------------


def _pct(num: int, den: int) -> str:
    return f"{100 * num / den:.1f}%" if den else "n/a"


def report(
    results: list[ModuleResult], equivalents: dict[tuple[str, str, str], Equivalent]
) -> Iterator[str]:
    yield (
        "| module | mutants run | killed | survived | timeout | equivalent | score "
        "| score without equivalent mutants |"
    )
    yield "|---|---:|---:|---:|---:|---:|---:|---:|"
    for r in results:
        name = f"`{Path(r.module).name}`"
        if r.error:
            yield f"| {name} | {r.error} | | | | | | |"
            continue
        run = len(r.outcomes)
        killed = sum(o.status == "killed" for o in r.outcomes)
        timeout = sum(o.status == "timeout" for o in r.outcomes)
        survived = run - killed - timeout
        equiv = sum(o.status == "survived" and o.mutant.key in equivalents for o in r.outcomes)
        note = f" (of {r.total})" if run < r.total else ""
        yield (
            f"| {name} | {run}{note} | {killed} | {survived} | {timeout} | {equiv} "
            f"| {_pct(killed + timeout, run)} | {_pct(killed + timeout, run - equiv)} |"
        )
    survivors = [
        o
        for r in results
        for o in r.outcomes
        if o.status == "survived" and o.mutant.key not in equivalents
    ]
    yield ""
    yield f"Surviving mutants (not listed as equivalent): {len(survivors)}"
    for o in survivors:
        yield f"  {o.mutant.module}:{o.mutant.lineno}: {o.mutant.change}    {o.mutant.line}"
    stale = [
        eq
        for r in results
        if not r.error
        for eq in equivalents.values()
        if eq.module == r.module
        and (eq.module, eq.line, eq.change) not in {m.key for m in mutants_of(r.module)}
    ]
    if stale:
        yield ""
        yield "Listed as equivalent but no such mutant (the line changed?):"
        for eq in stale:
            yield f"  {eq.module}: {eq.change}    {eq.line}"
    wrongly = [
        o
        for r in results
        for o in r.outcomes
        if o.status != "survived" and o.mutant.key in equivalents
    ]
    if wrongly:
        yield ""
        yield "Listed as equivalent but killed (remove from tools/mutate_equivalent.toml):"
        for o in wrongly:
            yield f"  {o.mutant.module}:{o.mutant.lineno}: {o.mutant.change}    {o.mutant.line}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev mutate", description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="e.g. aiocrypt/_format.py (default: the core)")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="parallel mutants (default 2)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=30.0,
        help="start no new mutant after this many minutes (default 30)",
    )
    parser.add_argument("--lines", help="only mutants starting on these lines, e.g. 120-130,140")
    parser.add_argument("--tests", nargs="+", help="run these tests instead of the module's own")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    args = parser.parse_args(argv)

    modules = [_module_path(m) for m in args.modules] or DEFAULT_MODULES
    lines = _parse_lines(args.lines) if args.lines else None
    if args.list:
        for module in modules:
            for m in mutants_of(module):
                if lines is None or m.lineno in lines:
                    print(f"{m.module}:{m.lineno}: {m.change}    {m.line}")
        return 0
    equivalents = load_equivalents()
    deadline = time.monotonic() + 60 * args.max_minutes
    base = Path(tempfile.mkdtemp(prefix="mutate-"))
    signal.signal(signal.SIGTERM, _exit_on_signal)  # so the copies are removed
    try:
        workspaces: queue.Queue[Path] = queue.Queue()
        for i in range(max(1, args.jobs)):
            workspaces.put(make_workspace(base, i))
        results = []
        for module in modules:
            results.append(
                run_module(
                    module,
                    args.tests or TESTS.get(module, []),
                    workspaces,
                    deadline,
                    lines,
                    progress=True,
                )
            )
            if len(modules) > 1:  # each module's survivors as soon as it is done
                for text in report(results[-1:], equivalents):
                    print(text, file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"$ ./dev mutate {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    for text in report(results, equivalents):
        print(text)
    if time.monotonic() > deadline:
        print(f"\nStopped at --max-minutes {args.max_minutes:g}: some mutants were not run.")
    return 1 if any(r.error for r in results) else 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _module_path(name: str) -> str:
    name = name.removesuffix(".py").replace(".", "/")
    if not name.startswith("aiocrypt/"):
        name = "aiocrypt/" + name.lstrip("/")
    path = name + ".py"
    if not (ROOT / path).is_file():
        raise SystemExit(f"no module {path}")
    return path


def _parse_lines(spec: str) -> set[int]:
    result: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        result.update(range(int(low), int(high or low) + 1))
    return result


if __name__ == "__main__":
    sys.exit(main())
