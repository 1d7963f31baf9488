"""``aiocrypt reencrypt --jobs``: a process that cannot open its database ends the run
with one error and lets no range start after it (run in this process: no spawn)."""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from aiocrypt import _cli_reencrypt
from aiocrypt._cli_base import load_config
from aiocrypt._cli_reencrypt import ShardTask, _finished, _ranges_of_parent
from aiocrypt._errors import AiocryptError
from aiocrypt._factory import build_key_manager
from aiocrypt._types import KeyType
from aiocrypt.reencrypt import (
    AsyncpgDatabase,
    ColumnSpec,
    KeyRange,
    ReencryptionEngine,
    TableSpec,
)

SPEC = TableSpec("paths_jobs", "id", (ColumnSpec("ssn", KeyType("pii")),))
SHARDS = [KeyRange(None, 10), KeyRange(10, 20), KeyRange(20, None)]


@pytest.fixture(autouse=True)
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh master key and file key store, in this process's environment."""
    for name in list(os.environ):
        if name.startswith(("ENCRYPTION_", "AIOCRYPT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    monkeypatch.setenv("ENCRYPTION_KEY_STORAGE_PATH", str(tmp_path / "keys.json"))


@pytest.fixture
def missing_database(postgres_dsn: str) -> str:
    return postgres_dsn.rsplit("/", 1)[0] + "/no_such_database_for_aiocrypt"


def _task(dsn: str, spec: TableSpec = SPEC) -> ShardTask:
    return ShardTask(spec, KeyRange(), dsn, f"{spec.name}_ckpt", 100, None, False, None)


def _counter() -> Any:
    return multiprocessing.get_context("spawn").Value("i", 0)


def test_a_jobs_process_that_cannot_open_the_database_stops_every_range(
    missing_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cli_reencrypt, "_counter", None)
    counter = _counter()
    _cli_reencrypt._init_process(counter)  # as the pool starts a process
    outcome = _cli_reencrypt.run_ranges(_task(missing_database), SHARDS)
    [(index, failure)] = outcome.items()
    assert index == -1 and failure["exit"] == 3
    assert "refused the connection" in failure["error"]
    assert counter.value == len(SHARDS)  # no range starts after it


def test_the_commands_own_share_that_cannot_open_the_database_stops_every_range(
    missing_database: str,
) -> None:
    counter = _counter()

    async def run() -> dict[int, dict[str, Any]]:
        manager = build_key_manager(load_config(), watch=False)
        engine = ReencryptionEngine(manager, AsyncpgDatabase(missing_database), tables=[SPEC])
        return await _ranges_of_parent(engine, _task(missing_database), SHARDS, counter)

    outcome = asyncio.run(run())
    assert list(outcome) == [-1] and outcome[-1]["exit"] == 3
    assert counter.value == len(SHARDS)


def test_a_process_that_stopped_fails_the_table_naming_its_error() -> None:
    stopped = {-1: {"error": "cannot reach the PostgreSQL database", "exit": 4}}
    with pytest.raises(AiocryptError) as caught:
        _finished(SPEC, {"ssn": "pii-v1"}, SHARDS, stopped, 0.1)
    assert str(caught.value) == (
        "paths_jobs: a --jobs process stopped: cannot reach the PostgreSQL database"
    )
