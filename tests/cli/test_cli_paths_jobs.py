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
from aiocrypt._cli_reencrypt import ShardTask, _finished, _Ranges, _ranges_with_own_database
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
    return ShardTask(spec, dsn, f"{spec.name}_ckpt", 100, None, False, None)


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
        ranges = _Ranges(counter, len(SHARDS))
        readers = engine.legacy_readers.values()
        task = _task(missing_database)
        return await _ranges_with_own_database(engine.key_manager, task, SHARDS, ranges, readers)

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


def test_a_plan_that_fails_after_the_processes_started_stops_them(postgres_dsn: str) -> None:
    """--jobs 2 on a table that does not exist: the spawned process is started before the
    plan (so it imports meanwhile); the plan's error reaches the caller, and the process is
    gone afterwards (the pool shut down, nothing left running). One spawn: about a second."""
    spec = TableSpec("paths_jobs_no_such_table", "id", (ColumnSpec("ssn", KeyType("pii")),))

    async def run() -> None:
        manager = build_key_manager(load_config(), watch=False)
        async with manager:
            database = AsyncpgDatabase(postgres_dsn, checkpoint_table="paths_jobs_ckpt")
            async with database:
                engine = ReencryptionEngine(manager, database, tables=[spec])
                await _cli_reencrypt.reencrypt_sharded(
                    engine, _task(postgres_dsn, spec), 2, lambda done, rate: None
                )

    with pytest.raises(Exception, match="paths_jobs_no_such_table"):
        asyncio.run(run())
    assert multiprocessing.active_children() == []


def test_a_jobs_process_that_cannot_load_its_keys_stops_every_range(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spawned process's configuration fails to load (here: its master key is not in
    its environment): one error line for the process, as the command itself would say
    it, and no range starts after it (it used to escape as a CliError, after the
    command's own share had run every range)."""
    monkeypatch.delenv("ENCRYPTION_MASTER_KEY")
    monkeypatch.setattr(_cli_reencrypt, "_counter", None)
    counter = _counter()
    _cli_reencrypt._init_process(counter)
    outcome = _cli_reencrypt.run_ranges(_task(postgres_dsn), SHARDS)
    [(index, failure)] = outcome.items()
    assert index == -1 and failure["exit"] == 3, failure
    assert failure["error"].startswith("ENCRYPTION_MASTER_KEY is missing: set it to")
    assert counter.value == len(SHARDS)
