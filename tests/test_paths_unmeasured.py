"""Lines only the unmeasured subprocesses ran (the CLI, the doc samples, the demo),
run here in this process.

The CLI, doc-sample and demo processes are no longer measured by coverage (suite
time): each test below takes one of their scenarios (named in its docstring) and
checks what the line does: the warning logged, the count returned, the problem
reported, the text printed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import runpy
import secrets
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from aiocrypt import EncryptionConfig, EncryptionService, KeyManager, KeyStatus, KeyType
from aiocrypt.audit import AuditEvent
from aiocrypt.audit.postgres import PostgresAuditSink
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore


def _file_manager(
    key_path: Path, master_key: bytes, *, watch: bool = False, refresh_interval: float = 5.0
) -> KeyManager:
    kek = LocalKekProvider(master_key)
    config = EncryptionConfig(storage_path=str(key_path))
    return KeyManager(
        FileKeyStore(key_path, kek), kek, config, watch=watch, refresh_interval=refresh_interval
    )


# -- the key manager ------------------------------------------------------------------


async def test_list_keys_opens_a_manager_nobody_opened(key_path: Path, master_key: bytes) -> None:
    """``aiocrypt keys list`` asks an unopened manager: it opens itself, then lists."""
    async with _file_manager(key_path, master_key) as writer:
        made = await writer.generate_key(KeyType.PII)
    reader = _file_manager(key_path, master_key)
    try:
        listed = await reader.list_keys(KeyType.PII, KeyStatus.ACTIVE)
        assert [k.key_id for k in listed] == [made.key_id]
    finally:
        await reader.close()


async def test_the_watch_task_logs_a_store_outage_and_keeps_retrying(
    key_path: Path, master_key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's directory disappears under a watching manager (a volume unmounted):
    a warning naming the error class (not its message, which could carry a URL), a
    pause of 0.5 s, and the watch tries again: it does not die with the first error."""
    caplog.set_level(logging.WARNING, logger="aiocrypt")
    async with _file_manager(key_path, master_key) as writer:
        made = await writer.generate_key(KeyType.PII)
    away = key_path.parent.with_name("keys-away")
    async with _file_manager(key_path, master_key, watch=True, refresh_interval=0.2) as watcher:
        key_path.parent.rename(away)  # before the watch task's first poll
        try:
            for _ in range(250):  # two warnings take about 0.7 s; up to 5 s on a busy machine
                await asyncio.sleep(0.02)
                if caplog.text.count("notifications interrupted") >= 2:
                    break
            assert watcher._watch_task is not None and not watcher._watch_task.done()
        finally:
            away.rename(key_path.parent)
        interrupted = [r.getMessage() for r in caplog.records if "interrupted" in r.message]
        assert interrupted[:2] == 2 * [
            "key store change notifications interrupted (KeyStoreError); retrying"
        ]
        # the keys verified before the outage are still served
        assert (await watcher.get_active_key(KeyType.PII)).key_id == made.key_id


async def test_rewrap_keys_on_an_open_manager_rewraps_every_dek_in_place(
    key_path: Path, master_key: bytes
) -> None:
    """``aiocrypt keys rewrap`` on a manager the caller already opened: every DEK wrapped
    afresh (new wrapped bytes, same data readable); ``only_foreign`` then finds none."""
    async with _file_manager(key_path, master_key) as manager:
        service = EncryptionService(manager)
        token = await service.encrypt_field("123-45-6789", KeyType.PII)
        await manager.generate_key(KeyType.FINANCIAL_DATA)
        before = {k.key_id: k.wrapped_key for k in await manager.list_keys()}
        assert await manager.rewrap_keys() == 2
        after = {k.key_id: k.wrapped_key for k in await manager.list_keys()}
        assert after.keys() == before.keys()
        assert all(after[i] != before[i] for i in before)
        assert await manager.rewrap_keys(only_foreign=True) == 0
    async with _file_manager(key_path, master_key) as reopened:
        assert await EncryptionService(reopened).decrypt_field(token, KeyType.PII) == "123-45-6789"


# -- the file key store ---------------------------------------------------------------


async def test_a_group_readable_key_store_is_warned_about_once(
    key_path: Path, master_key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A key store file copied with a umask of 022 (mode 0644): a warning with its path
    and mode on the first read, not on every refresh after it."""
    async with _file_manager(key_path, master_key) as manager:
        await manager.generate_key(KeyType.PII)
    key_path.chmod(0o644)
    caplog.set_level(logging.WARNING, logger="aiocrypt")
    store = FileKeyStore(key_path, LocalKekProvider(master_key))
    first = await store.read()
    again = await store.read()
    assert first.revision == again.revision >= 1
    warnings = [r.getMessage() for r in caplog.records if "accessible by group" in r.message]
    assert warnings == [
        f"key store {key_path} is accessible by group/others (mode 644); it should be 0600"
    ]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o644  # reported, not changed


# -- the Postgres audit sink ----------------------------------------------------------


@pytest.fixture
async def audit_table(postgres_dsn: str) -> AsyncIterator[str]:
    table = f"audit_{secrets.token_hex(4)}"
    yield table
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}, {table}_head")
    finally:
        await conn.close()


async def test_verify_with_the_recorded_head_as_anchor_passes(
    postgres_dsn: str, audit_table: str
) -> None:
    """docs/audit.md: record ``verify().head`` elsewhere, pass it back as the anchor;
    while the chain still holds that row with that hash, verification passes."""
    sink = PostgresAuditSink(postgres_dsn, table=audit_table, hmac_key=os.urandom(32))
    try:
        await sink.open()
        for _ in range(3):
            await sink.emit(AuditEvent("policy_run"))
        recorded = await sink.verify()
        assert recorded.ok and recorded.rows == 3 and recorded.mode == "hmac"
        assert recorded.head is not None and recorded.head.seq == 3
        await sink.emit(AuditEvent("policy_run"))  # the chain goes on past the anchor
        later = await sink.verify(anchor=recorded.head)
        assert later.ok and later.rows == 4 and later.problems == [], later
    finally:
        await sink.close()


async def test_verify_of_a_missing_table_says_it_does_not_exist(
    postgres_dsn: str, audit_table: str
) -> None:
    """``aiocrypt audit verify --table <a name never created>``: not ok, one problem
    naming both tables, and verifying creates neither (it is read-only)."""
    sink = PostgresAuditSink(postgres_dsn, table=audit_table)
    try:
        result = await sink.verify()
    finally:
        await sink.close()
    assert not result.ok and result.rows == 0
    assert result.problems == [
        f"the audit table {audit_table} (or {audit_table}_head) does not exist"
    ]
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass($1)", audit_table) is None
    finally:
        await conn.close()


async def test_closing_a_sink_on_the_callers_pool_leaves_the_pool_open(
    postgres_dsn: str, audit_table: str
) -> None:
    """A sink given the application's pool does not close it: the pool still answers
    after ``close()``, and a sink never connected closes without error."""
    PostgresAuditSink(postgres_dsn, table=audit_table)  # never opened
    await PostgresAuditSink(postgres_dsn, table=audit_table).close()
    pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=2)
    try:
        sink = PostgresAuditSink(pool, table=audit_table)
        await sink.open()
        await sink.emit(AuditEvent("policy_run"))
        await sink.close()
        assert await pool.fetchval(f"SELECT count(*) FROM {audit_table}") == 1
    finally:
        await pool.close()


# -- the demo -------------------------------------------------------------------------


def test_the_demo_as_a_module_with_dir_and_no_master_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    clean_env: None,
) -> None:
    """``python -m aiocrypt.demo --dir DIR`` with no ENCRYPTION_MASTER_KEY (as
    tests/test_examples.py runs it): a fresh master key it says it made but does not
    show, the state kept in DIR (created 0700), the ciphertext only in the database."""
    state = tmp_path / "state"
    monkeypatch.setattr(sys, "argv", ["aiocrypt.demo", "--dir", str(state)])
    # run as __main__ anew (as ``-m`` does), not the copy imported by other tests
    monkeypatch.delitem(sys.modules, "aiocrypt.demo", raising=False)
    runpy.run_module("aiocrypt.demo", run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith(
        "ENCRYPTION_MASTER_KEY not set: generated a fresh one for this run (not shown)\n"
    )
    assert "alice's data reads as ever: income 75000.0, ssn '123-45-6789'" in out
    assert out.rstrip().endswith("demo finished")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    raw = (state / "demo.sqlite3").read_bytes()
    assert b"123-45-6789" not in raw and b"75000" not in raw
