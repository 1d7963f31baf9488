"""Fixtures of the CLI tests: the real ``aiocrypt`` command, run in a subprocess.

Each test gets a fresh working directory, a fresh master key and a file key
store in that directory, handed to the command through the ``ENCRYPTION_*``
environment (nothing from the outer environment leaks in).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path

import pytest
from cli_helpers import Cli, CliResult, Run, clean_environ, new_master_key, run_cli
from click.testing import CliRunner, Result

from aiocrypt.cli import main


@pytest.fixture(autouse=True)
def _command_runs_unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's processes run without coverage: ``COVERAGE_PROCESS_CONFIG`` (which
    makes a Python subprocess measure itself) is taken out of the environment they get.
    Measuring each one cost the suite about 50 s; the command's lines are measured
    in-process by the CliRunner tests (test_cli_paths*.py; docs/testing.md)."""
    monkeypatch.delenv("COVERAGE_PROCESS_CONFIG", raising=False)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """A fresh master key and a file key store under ``tmp_path``."""
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    env = clean_environ()
    env.update(
        ENCRYPTION_MASTER_KEY=base64.b64encode(os.urandom(32)).decode("ascii"),
        ENCRYPTION_KEY_STORAGE_PATH=str(store / "keys.json"),
    )
    return env


@pytest.fixture
def cli(cli_env: dict[str, str], tmp_path: Path) -> Cli:
    """Run ``aiocrypt ARGS...`` in ``tmp_path`` with ``cli_env`` (plus ``env=`` overrides)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
        return run_cli({**cli_env, **(env or {})}, tmp_path, *args, timeout=timeout)

    return run


@pytest.fixture
def cli_vars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """For ``run``: a fresh master key and key store; every outer ENCRYPTION_* /
    AIOCRYPT_* unset; the working directory ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    env: dict[str, str | None] = {
        name: None for name in os.environ if name.startswith(("ENCRYPTION_", "AIOCRYPT_"))
    }
    env.update(
        ENCRYPTION_MASTER_KEY=new_master_key(),
        ENCRYPTION_KEY_STORAGE_PATH=str(store / "keys.json"),
        XDG_CONFIG_HOME=str(tmp_path / "xdg"),
        COLUMNS="200",
    )
    return env


@pytest.fixture
def run(cli_vars: dict[str, str | None]) -> Run:
    """``aiocrypt ARGS...`` in this process, measured by coverage (``env=`` adds to or
    unsets ``cli_vars``)."""

    def invoke(
        *args: str, env: Mapping[str, str | None] | None = None, input: str | None = None
    ) -> Result:
        return CliRunner().invoke(
            main, list(args), env={**cli_vars, **(env or {})}, input=input, prog_name="aiocrypt"
        )

    return invoke
