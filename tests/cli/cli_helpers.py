"""Helpers of the CLI tests (importable as ``cli_helpers`` from tests/cli)."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from click.testing import Result

from aiocrypt import EncryptionConfig, EncryptionService, KeyManager
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore

CliResult = subprocess.CompletedProcess[str]
Cli = Callable[..., CliResult]
COMMAND = [sys.executable, "-m", "aiocrypt.cli"]


def clean_environ() -> dict[str, str]:
    """The outer environment without any ENCRYPTION_* / AIOCRYPT_* setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENCRYPTION_", "AIOCRYPT_"))}
    env.pop("COLUMNS", None)
    return env


def run_cli(env: dict[str, str], cwd: Path, *args: str, timeout: float = 120) -> CliResult:
    return subprocess.run(
        [*COMMAND, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_error_line(result: CliResult) -> str:
    """The command's stderr, checked to be exactly one ``error: ...`` line (no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def service_for(env: dict[str, str]) -> EncryptionService:
    """A library service over the same file key store and master key the command uses."""
    kek = LocalKekProvider(base64.b64decode(env["ENCRYPTION_MASTER_KEY"]))
    store = FileKeyStore(env["ENCRYPTION_KEY_STORAGE_PATH"], kek)
    config = EncryptionConfig(
        master_key=env["ENCRYPTION_MASTER_KEY"], storage_path=env["ENCRYPTION_KEY_STORAGE_PATH"]
    )
    return EncryptionService(KeyManager(store, kek, config, watch=False))


def json_out(result: CliResult) -> Any:
    """The JSON a successful ``--json`` run printed (its stderr shown if it failed)."""
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


# -- the command in this process (click's CliRunner) -------------------------------------


def new_master_key() -> str:
    """A fresh master key as the settings take it (base64 of 32 random bytes)."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


class Run(Protocol):
    """The ``run`` fixture: ``aiocrypt ARGS...`` in this process."""

    def __call__(
        self, *args: str, env: Mapping[str, str | None] | None = None, input: str | None = None
    ) -> Result: ...


def json_of(result: Result) -> Any:
    """The JSON a command that succeeded printed."""
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def error_line(result: Result) -> str:
    """The ``error: ...`` line that ends a failed command's stderr (no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]
