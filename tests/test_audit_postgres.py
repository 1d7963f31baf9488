"""The hash-chained Postgres audit table detects edited and deleted rows."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from aiocrypt import KeyManager, KeyType
from aiocrypt.audit import Auditor, LoggingAuditSink
from aiocrypt.audit.postgres import PostgresAuditSink
from aiocrypt.testing import FakeKekProvider, MemoryKeyStore


@pytest.fixture
async def audit_sink(postgres_dsn: str) -> AsyncIterator[PostgresAuditSink]:
    table = f"audit_{secrets.token_hex(4)}"
    sink = PostgresAuditSink(postgres_dsn, table=table)
    await sink.open()
    try:
        yield sink
    finally:
        conn = await asyncpg.connect(postgres_dsn)
        await conn.execute(f"DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_head")
        await conn.close()
        await sink.close()


async def lifecycle(sink: PostgresAuditSink) -> None:
    manager = KeyManager(MemoryKeyStore(), FakeKekProvider(), watch=False,
                         auditor=Auditor([LoggingAuditSink(), sink]))
    async with manager:
        key = await manager.get_active_key(KeyType.PII)
        await manager.rotate_key(KeyType.PII, force=True)
        await manager.revoke_key(key.key_id, "test")
        await manager.rotate_keys_due()


async def test_chain_verifies_then_detects_an_edit(audit_sink: PostgresAuditSink,
                                                   postgres_dsn: str) -> None:
    await lifecycle(audit_sink)
    result = await audit_sink.verify()
    assert result.ok and result.rows >= 5, result.problems
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"UPDATE {audit_sink.table} SET details = "
                           "jsonb_set(details, '{reason}', '\"nothing to see\"') WHERE seq = 3")
    finally:
        await conn.close()
    result = await audit_sink.verify()
    assert not result.ok
    assert result.problems == ["row 3 was modified (hash mismatch)"]


@pytest.mark.parametrize("which", ["middle", "last"])
async def test_chain_detects_a_deleted_row(audit_sink: PostgresAuditSink, postgres_dsn: str,
                                           which: str) -> None:
    await lifecycle(audit_sink)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        last = await conn.fetchval(f"SELECT max(seq) FROM {audit_sink.table}")
        seq = 2 if which == "middle" else last
        await conn.execute(f"DELETE FROM {audit_sink.table} WHERE seq = $1", seq)
    finally:
        await conn.close()
    result = await audit_sink.verify()
    assert not result.ok
    if which == "middle":
        assert "row 2 is missing (next row is 3)" in result.problems
    else:
        assert any("rows were removed from the end" in p for p in result.problems)


async def test_events_carry_no_secrets(audit_sink: PostgresAuditSink, postgres_dsn: str) -> None:
    await lifecycle(audit_sink)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        rows = await conn.fetch(f"SELECT event, key_id, details::text AS d FROM "
                                f"{audit_sink.table} ORDER BY seq")
    finally:
        await conn.close()
    events = [r["event"] for r in rows]
    assert {"key_generated", "key_rotated", "key_revoked", "policy_run"} <= set(events)
    for row in rows:
        assert "wrapped" not in row["d"] and "material" not in row["d"]
