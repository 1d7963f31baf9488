"""Every code sample in README.md and docs/**/*.md runs (issue 8).

The convention (announced to everyone who writes docs):

- every ```python, ```bash and ```console block is executed; ```text, ```toml,
  ```ini, ```json, ```sql, ```env ... are listings and are not;
- ```python blocks of one .md file run in order in ONE namespace and ONE event
  loop, top-level ``await`` allowed (compiled with ``ast.PyCF_ALLOW_TOP_LEVEL_AWAIT``);
- ```bash blocks run with ``bash -e``; in ```console blocks only the ``$ `` lines
  (and their ``\\`` continuations) are commands, the rest is expected output,
  which is not compared;
- all blocks of a file share a fresh temporary directory as cwd and an
  environment with a fresh local master key and a file key store in that
  directory (``ENCRYPTION_MASTER_KEY``, ``ENCRYPTION_KEY_STORAGE_BACKEND=file``,
  ``ENCRYPTION_KEY_STORAGE_PATH=<tmp>/keys.json``), no other ``ENCRYPTION_*``
  variable (a block that needs Redis or Postgres sets ``ENCRYPTION_REDIS_URL`` /
  ``ENCRYPTION_POSTGRES_DSN`` itself), and the venv's ``bin`` first on PATH;
- ``<!-- doc-test: skip: <reason> -->`` on the line just before a fence excludes
  that block (reported as skipped, with the reason); the README's opening
  ``./dev demo`` / ``./dev test`` commands are skipped by rule (they would set up
  the venv and run this very suite);
- each block has a timeout (``BLOCK_TIMEOUT`` seconds).

One pytest item per block, named ``<file>:<line>``. Python blocks run in a
worker process per .md file (this module run as a script), so a block that
hangs can be killed and no sample leaks state into the test process or into
another file's samples. Selecting a later block alone (``-k``) first runs the
blocks before it in its file.

A second group of tests keeps docs/configuration.md the true reference of the
environment: every ``ENCRYPTION_*`` name in a string literal of aiocrypt/ or
integrations/ is documented there, and every name documented there is in the code.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BLOCK_TIMEOUT = float(os.environ.get("AIOCRYPT_DOC_TEST_TIMEOUT", "60"))
RUN_LANGS = frozenset({"python", "bash", "console"})
# Languages that look runnable but would silently escape the runner.
AMBIGUOUS_LANGS = frozenset(
    {
        "sh",
        "shell",
        "zsh",
        "py",
        "python3",
        "pycon",
        "shell-session",
        "ipython",
        "bash-session",
        "pwsh",
    }
)
SKIP_RE = re.compile(r"^\s*<!--\s*doc-test:\s*skip:\s*(?P<reason>\S.*?)\s*-->\s*$")
MARKER_RE = re.compile(r"doc-test", re.IGNORECASE)
FENCE_RE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")
ENV_NAME_RE = re.compile(r"\bENCRYPTION_[A-Z0-9_]+\b")
ENV_REFERENCE = ROOT / "docs" / "configuration.md"
DEV_COMMAND_RE = re.compile(r"^\./dev(\s|$)")


# -- collecting ---------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    path: Path
    """Absolute path of the .md file."""
    line: int
    """1-based line of the opening fence."""
    lang: str
    code: str
    skip_reason: str | None

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    @property
    def id(self) -> str:
        return f"{self.rel}:{self.line}"

    @property
    def first_code_line(self) -> int:
        return self.line + 1

    def commands(self) -> str:
        """The shell script of a bash / console block."""
        if self.lang == "bash":
            return self.code
        commands: list[str] = []
        continuing = False
        for text in self.code.splitlines():
            if continuing:
                commands.append(text)
            elif text.startswith("$ "):
                commands.append(text[2:])
            else:
                continue
            continuing = text.rstrip().endswith("\\")
        return "\n".join(commands) + "\n"


def doc_files() -> list[Path]:
    files = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    files += sorted((ROOT / "docs").rglob("*.md"))
    return files


def parse_fences(path: Path) -> Iterator[tuple[int, str, str, str | None]]:
    """(fence line, language, code, skip reason) of every fenced block of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE_RE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        lang = (match["info"].split() or [""])[0].lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            text = lines[i]
            stripped = text.strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                break
            # content lines lose the fence's indentation (fences inside list items)
            body.append(text[indent:] if text[:indent].strip() == "" else text.lstrip())
            i += 1
        i += 1
        previous = lines[start - 1] if start > 0 else ""
        skip = SKIP_RE.match(previous)
        yield start + 1, lang, "\n".join(body) + "\n", skip["reason"] if skip else None


def _dev_rule(lang: str, code: str) -> str | None:
    """The README's ``./dev demo`` / ``./dev test`` would recurse into this suite."""
    if lang == "console":
        code = "\n".join(t[2:] for t in code.splitlines() if t.startswith("$ "))
    commands = [t.strip() for t in code.splitlines() if t.strip() and not t.strip().startswith("#")]
    if commands and all(DEV_COMMAND_RE.match(c) for c in commands):
        return "./dev sets up the venv and runs the whole suite (this test included): not run here"
    return None


def collect_blocks() -> list[Block]:
    blocks = []
    for path in doc_files():
        for line, lang, code, skip in parse_fences(path):
            if lang == "" and _dev_rule("bash", code):
                lang = "bash"  # the README's untagged opening: reported as skipped
            if lang not in RUN_LANGS:
                continue
            blocks.append(Block(path, line, lang, code, skip or _dev_rule(lang, code)))
    return blocks


BLOCKS = collect_blocks()


# -- running ------------------------------------------------------------------


def _base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCRYPTION_")}
    # COVERAGE_PROCESS_CONFIG: the samples' processes run unmeasured (about 25 s of the
    # suite); what they run is measured by in-process tests (docs/testing.md)
    for name in (
        "PYTHONSTARTUP",
        "PYTHONPATH",
        "PYTEST_CURRENT_TEST",
        "PYTEST_ADDOPTS",
        "COVERAGE_PROCESS_CONFIG",
    ):
        env.pop(name, None)
    env["ENCRYPTION_MASTER_KEY"] = base64.b64encode(os.urandom(32)).decode("ascii")
    env["ENCRYPTION_KEY_STORAGE_BACKEND"] = "file"
    env["ENCRYPTION_KEY_STORAGE_PATH"] = str(tmp / "keys.json")
    scripts = sysconfig.get_path("scripts")
    env["PATH"] = scripts + os.pathsep + env.get("PATH", os.defpath)
    env["VIRTUAL_ENV"] = sys.prefix
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass
class DocFile:
    """The shared state of one .md file's blocks: directory, environment, Python worker."""

    rel: str
    base: Path = field(init=False)
    """Private directory: ``tmp`` (the blocks' cwd) and the runner's logs and scripts."""
    tmp: Path = field(init=False)
    env: dict[str, str] = field(init=False)
    done: set[int] = field(default_factory=set)
    failed_at: str | None = None
    worker: subprocess.Popen[bytes] | None = None
    worker_in: IO[bytes] | None = None
    worker_out: IO[bytes] | None = None
    worker_log: Path | None = None
    groups: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="aiocrypt-doc-"))
        self.tmp = self.base / "work"
        self.tmp.mkdir()
        self.env = _base_env(self.tmp)

    def close(self) -> None:
        if self.worker is not None:
            assert self.worker_in is not None and self.worker_out is not None
            try:
                self.worker_in.close()
                self.worker.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                _kill_group(self.worker)
            self.worker_out.close()
            self.worker = None
        for pgid in self.groups:  # background processes a bash block left behind
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)

    # python ---------------------------------------------------------------

    def _start_worker(self) -> None:
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        self.worker_log = self.base / "python.log"
        with open(self.worker_log, "wb") as log:
            self.worker = subprocess.Popen(
                [sys.executable, __file__, "--worker", str(request_r), str(reply_w)],
                cwd=self.tmp,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(request_r, reply_w),
                start_new_session=True,
            )
        os.close(request_r)
        os.close(reply_w)
        self.worker_in = os.fdopen(request_w, "wb")
        self.worker_out = os.fdopen(reply_r, "rb")

    def run_python(self, block: Block) -> tuple[bool, str]:
        if self.worker is None:
            self._start_worker()
        assert self.worker is not None and self.worker_in is not None
        assert self.worker_out is not None and self.worker_log is not None
        offset = self.worker_log.stat().st_size
        request = {"path": str(block.path), "line": block.first_code_line, "code": block.code}
        try:
            self.worker_in.write(json.dumps(request).encode() + b"\n")
            self.worker_in.flush()
        except BrokenPipeError:
            return False, "the Python worker of this file is gone\n" + self._log_since(offset)
        ready, _, _ = select.select([self.worker_out], [], [], BLOCK_TIMEOUT)
        line = self.worker_out.readline() if ready else b""
        if not line:
            _kill_group(self.worker)
            self.worker = None
            why = (
                f"timed out after {BLOCK_TIMEOUT:.0f} s"
                if not ready
                else f"the Python worker died (exit code {self.worker_returncode()})"
            )
            return False, f"{why}\n--- output ---\n{self._log_since(offset)}"
        reply = json.loads(line)
        output = self._log_since(offset)
        if reply["ok"]:
            return True, output
        return False, f"--- output ---\n{output}\n--- error ---\n{reply['error']}"

    def worker_returncode(self) -> int | None:
        return None if self.worker is None else self.worker.poll()

    def _log_since(self, offset: int) -> str:
        assert self.worker_log is not None
        with open(self.worker_log, "rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")

    # shell ----------------------------------------------------------------

    def run_shell(self, block: Block) -> tuple[bool, str]:
        script = self.base / f"block-{block.line}.sh"
        script.write_text(block.commands(), encoding="utf-8")
        log_path = self.base / f"block-{block.line}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["bash", "-e", str(script)],
                cwd=self.tmp,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.groups.append(proc.pid)
            try:
                code = proc.wait(timeout=BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                code = None
        output = log_path.read_text(encoding="utf-8", errors="replace")
        script.unlink()
        log_path.unlink()
        if code == 0:
            return True, output
        why = f"timed out after {BLOCK_TIMEOUT:.0f} s" if code is None else f"exit code {code}"
        return False, f"{why}\n--- script ---\n{block.commands()}--- output ---\n{output}"

    def run(self, block: Block) -> tuple[bool, str]:
        return self.run_python(block) if block.lang == "python" else self.run_shell(block)


_FILES: dict[str, DocFile] = {}


def _worker_main(request_fd: int, reply_fd: int) -> None:
    """Run the python blocks of one .md file: one namespace, one event loop."""
    import asyncio
    import inspect
    import traceback

    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    requests = os.fdopen(request_fd, "rb")
    replies = os.fdopen(reply_fd, "w")
    with asyncio.Runner() as runner:
        for line in requests:
            request = json.loads(line)
            # Leading newlines make line numbers in tracebacks those of the .md file.
            source = "\n" * (request["line"] - 1) + request["code"]
            reply: dict[str, Any] = {"ok": True, "error": None}
            try:
                code = compile(
                    source,
                    request["path"],
                    "exec",
                    flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                    dont_inherit=True,
                )
                result = eval(code, namespace)  # running the docs is the point
                if inspect.iscoroutine(result):
                    runner.run(result)
            except BaseException as exc:  # reported to the test, which fails
                asyncio_dir = f"{os.sep}asyncio{os.sep}"
                frames = [
                    f
                    for f in traceback.extract_tb(exc.__traceback__)
                    if f.filename != __file__ and asyncio_dir not in f.filename
                ]
                reply = {
                    "ok": False,
                    "error": "Traceback (most recent call last):\n"
                    + "".join(traceback.format_list(frames))
                    + "".join(traceback.format_exception_only(exc)),
                }
            sys.stdout.flush()
            sys.stderr.flush()
            replies.write(json.dumps(reply) + "\n")
            replies.flush()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(int(sys.argv[2]), int(sys.argv[3]))
    sys.exit(0)


# -- tests --------------------------------------------------------------------

import pytest  # noqa: E402 - the worker above must not need pytest


@pytest.fixture(scope="module", autouse=True)
def _close_doc_files() -> Iterator[None]:
    yield
    while _FILES:
        _FILES.popitem()[1].close()


def _blocks_of(block: Block) -> list[Block]:
    return [b for b in BLOCKS if b.path == block.path]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_sample(block: Block) -> None:
    if block.skip_reason is not None:
        pytest.skip(f"{block.id}: {block.skip_reason}")
    state = _FILES.get(block.rel)
    if state is None:
        state = _FILES[block.rel] = DocFile(block.rel)
    # Blocks before this one in its file first (they set up what it uses). A failed
    # python block leaves its namespace incomplete, so later python blocks of the file
    # are skipped; a failed shell block does not stop the others (each reports itself).
    for earlier in _blocks_of(block):
        if earlier.line >= block.line:
            break
        if earlier.skip_reason is not None or earlier.line in state.done:
            continue
        state.done.add(earlier.line)
        if earlier.lang == "python" and state.failed_at is not None:
            continue
        ok, _ = state.run(earlier)
        if not ok and earlier.lang == "python":
            state.failed_at = earlier.id
    if block.lang == "python" and state.failed_at is not None:
        pytest.skip(f"{block.id} depends on {state.failed_at}, which failed")
    ok, output = state.run(block)
    state.done.add(block.line)
    if not ok:
        if block.lang == "python":
            state.failed_at = block.id
        pytest.fail(f"{block.id} ({block.lang}) failed\n{output}", pytrace=False)


def test_samples_were_found() -> None:
    """The collector sees the samples (a broken parser would pass every doc)."""
    assert any(b.rel == "README.md" and b.lang == "python" for b in BLOCKS)
    assert {b.lang for b in BLOCKS} >= {"python", "bash"}
    readme_dev = [b for b in BLOCKS if b.rel == "README.md" and "./dev test" in b.code]
    assert readme_dev and all(b.skip_reason is not None for b in readme_dev)


def test_readme_opens_with_the_two_commands() -> None:
    """The README's first lines stay exactly the two commands a newcomer types."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("```\n./dev demo\n./dev test\n```\n")


def test_no_sample_escapes_the_runner() -> None:
    """No fence in a language that looks runnable but is not run (```sh, ```py ...), and
    every doc-test marker is a well-formed skip right before a fence."""
    problems = []
    for path in doc_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        fences = {line: lang for line, lang, _, _ in parse_fences(path)}
        for line, lang in fences.items():
            if lang in AMBIGUOUS_LANGS:
                problems.append(
                    f"{path.relative_to(ROOT)}:{line}: ```{lang} is not run: use "
                    "```bash / ```console (run) or ```text (a listing)"
                )
        for number, text in enumerate(lines, start=1):
            if not MARKER_RE.search(text) or "`" in text:
                continue
            if not SKIP_RE.match(text):
                problems.append(
                    f"{path.relative_to(ROOT)}:{number}: malformed marker; "
                    "use <!-- doc-test: skip: <reason> -->"
                )
            elif number + 1 not in fences:
                problems.append(
                    f"{path.relative_to(ROOT)}:{number}: skip marker is not on "
                    "the line just before a fence"
                )
    assert not problems, "\n".join(problems)


def test_console_blocks_have_commands() -> None:
    empty = [b.id for b in BLOCKS if b.lang == "console" and not b.commands().strip()]
    assert not empty, f"console blocks without a '$ ' line: {empty}"


# -- the environment variable reference ------------------------------------------


def _names_in_code() -> dict[str, list[str]]:
    """ENCRYPTION_* names in string literals of aiocrypt/ and integrations/ -> files."""
    found: dict[str, list[str]] = {}
    for package in ("aiocrypt", "integrations"):
        for source in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    for name in ENV_NAME_RE.findall(node.value):
                        if not name.endswith("_"):  # a prefix such as ENCRYPTION_ARQ_
                            found.setdefault(name, []).append(source.relative_to(ROOT).as_posix())
    return found


def _names_in_reference() -> set[str]:
    text = ENV_REFERENCE.read_text(encoding="utf-8")
    return {n for n in ENV_NAME_RE.findall(text) if not n.endswith("_")}


def test_env_reference_lists_every_variable_the_code_reads() -> None:
    in_code = _names_in_code()
    assert "ENCRYPTION_MASTER_KEY" in in_code  # the scan works
    missing = sorted(set(in_code) - _names_in_reference())
    assert not missing, "undocumented in docs/configuration.md: " + ", ".join(
        f"{name} ({sorted(set(in_code[name]))[0]})" for name in missing
    )


def test_env_reference_documents_only_real_variables() -> None:
    documented = _names_in_reference()
    assert "ENCRYPTION_MASTER_KEY" in documented
    unknown = sorted(documented - set(_names_in_code()))
    assert not unknown, "docs/configuration.md documents names no code reads: " + ", ".join(unknown)
