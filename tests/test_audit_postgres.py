"""The hash-chained Postgres audit table detects edited, deleted and cut-off rows.

The attacks are made directly in Postgres, as someone with write access to the
database but without the HMAC key would make them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from aiocrypt import KeyManager, KeyType
from aiocrypt.audit import AuditEvent, Auditor, LoggingAuditSink
from aiocrypt.audit.postgres import AuditAnchor, AuditChainError, PostgresAuditSink
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
    manager = KeyManager(
        MemoryKeyStore(),
        FakeKekProvider(),
        watch=False,
        auditor=Auditor([LoggingAuditSink(), sink]),
    )
    async with manager:
        key = await manager.get_active_key(KeyType.PII)
        await manager.rotate_key(KeyType.PII, force=True)
        await manager.revoke_key(key.key_id, "test")
        await manager.rotate_keys_due()


async def test_chain_verifies_then_detects_an_edit(
    audit_sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    await lifecycle(audit_sink)
    result = await audit_sink.verify()
    assert result.ok and result.rows >= 5, result.problems
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(
            f"UPDATE {audit_sink.table} SET details = "
            "jsonb_set(details, '{reason}', '\"nothing to see\"') WHERE seq = 3"
        )
    finally:
        await conn.close()
    result = await audit_sink.verify()
    assert not result.ok
    assert result.problems == ["row 3 was modified (hash mismatch)"]


@pytest.mark.parametrize("which", ["middle", "last"])
async def test_chain_detects_a_deleted_row(
    audit_sink: PostgresAuditSink, postgres_dsn: str, which: str
) -> None:
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
        rows = await conn.fetch(
            f"SELECT event, key_id, details::text AS d FROM {audit_sink.table} ORDER BY seq"
        )
    finally:
        await conn.close()
    events = [r["event"] for r in rows]
    assert {"key_generated", "key_rotated", "key_revoked", "policy_run"} <= set(events)
    for row in rows:
        assert "wrapped" not in row["d"] and "material" not in row["d"]


# -- HMAC chains: the head covers the row count; the mode is recorded ---------------------

HMAC_KEY = b"k" * 32


@pytest.fixture
async def hmac_sink(postgres_dsn: str) -> AsyncIterator[PostgresAuditSink]:
    table = f"audit_{secrets.token_hex(4)}"
    sink = PostgresAuditSink(postgres_dsn, table=table, hmac_key=HMAC_KEY)
    await sink.open()
    try:
        yield sink
    finally:
        await drop(postgres_dsn, table)
        await sink.close()


async def drop(dsn: str, table: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_head")
    finally:
        await conn.close()


async def sql(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def events(sink: PostgresAuditSink, count: int) -> None:
    for n in range(count):
        await sink.emit(AuditEvent("policy_run", details={"n": n}))


def row_hash(
    key: bytes | None, prev: bytes, seq: int, at: dt.datetime, event: str, details: Any
) -> bytes:
    """A row's hash as the sink computes it (the frozen row format, written out)."""
    payload = json.dumps(
        {
            "seq": seq,
            "at": at.astimezone(dt.UTC).isoformat(),
            "event": event,
            "key_id": None,
            "key_type": None,
            "details": details,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    if key is None:
        return hashlib.sha256(prev + payload).digest()
    return hmac.new(key, prev + payload, hashlib.sha256).digest()


async def test_hmac_chain_reports_a_cut_tail_with_the_head_fixed(
    hmac_sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    await events(hmac_sink, 6)
    assert (await hmac_sink.verify()).ok
    # the attacker deletes rows 5 and 6 and points the head at row 4, as the old
    # unkeyed head allowed: the head's MAC no longer matches
    t = hmac_sink.table
    await sql(
        postgres_dsn,
        f"DELETE FROM {t} WHERE seq > 4",
        f"UPDATE {t}_head SET seq = 4, hash = (SELECT hash FROM {t} WHERE seq = 4)",
    )
    fresh = PostgresAuditSink(postgres_dsn, table=t, hmac_key=HMAC_KEY)
    try:
        result = await fresh.verify()
        assert not result.ok
        assert any("head record is not authentic" in p for p in result.problems), result.problems
        with pytest.raises(AuditChainError, match="not authentic"):
            await fresh.emit(AuditEvent("policy_run"))
    finally:
        await fresh.close()


async def test_hmac_chain_reports_a_cut_tail_with_the_head_left(
    hmac_sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    await events(hmac_sink, 5)
    await sql(postgres_dsn, f"DELETE FROM {hmac_sink.table} WHERE seq > 3")
    result = await hmac_sink.verify()
    assert result.problems == [
        "the chain ends at row 3 but the head says 5: rows were removed from the end"
    ]


async def test_hmac_chain_reports_an_edited_row(
    hmac_sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    await events(hmac_sink, 4)
    await sql(postgres_dsn, f"UPDATE {hmac_sink.table} SET details = '{{\"n\": 99}}' WHERE seq = 2")
    result = await hmac_sink.verify()
    assert result.problems == ["row 2 was modified (hash mismatch)"]


async def test_a_rollback_to_an_older_authentic_head_is_caught_by_the_anchor_and_the_sink(
    hmac_sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    t = hmac_sink.table
    await events(hmac_sink, 3)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        old_head = await conn.fetchrow(f"SELECT seq, hash, mode, mac FROM {t}_head")
        await events(hmac_sink, 3)
        anchor = (await hmac_sink.verify()).head
        assert anchor is not None and anchor.seq == 6
        # the attacker put back the head they copied at row 3 and deleted rows 4-6
        await conn.execute(f"DELETE FROM {t} WHERE seq > 3")
        await conn.execute(
            f"UPDATE {t}_head SET seq = $1, hash = $2, mode = $3, mac = $4", *old_head
        )
    finally:
        await conn.close()
    assert any("this sink has seen row 6" in p for p in (await hmac_sink.verify()).problems)
    with pytest.raises(AuditChainError, match="went back from row 6 to row 3"):
        await hmac_sink.emit(AuditEvent("policy_run"))
    fresh = PostgresAuditSink(postgres_dsn, table=t, hmac_key=HMAC_KEY)
    try:
        assert (await fresh.verify()).ok  # the limit the module states
        result = await fresh.verify(anchor=AuditAnchor.parse(str(anchor)))
        assert result.problems == [
            "the anchored row 6 is not in the chain as recorded: "
            "the table was rolled back or rewritten"
        ]
    finally:
        await fresh.close()


async def rewrite_as_sha256(dsn: str, table: str, *, through: int | None = None) -> None:
    """What an attacker without the key can do: recompute the chain with plain SHA-256."""
    conn = await asyncpg.connect(dsn)
    try:
        if through is not None:
            await conn.execute(f"DELETE FROM {table} WHERE seq > $1", through)
        prev = b"\x00" * 32
        rows = await conn.fetch(
            f"SELECT seq, at, event, details::text AS d FROM {table} ORDER BY seq"
        )
        for row in rows:
            digest = row_hash(None, prev, row["seq"], row["at"], row["event"], json.loads(row["d"]))
            await conn.execute(
                f"UPDATE {table} SET prev_hash = $1, hash = $2 WHERE seq = $3",
                prev,
                digest,
                row["seq"],
            )
            prev = digest
        await conn.execute(
            f"UPDATE {table}_head SET seq = $1, hash = $2, mode = 'sha256', mac = NULL",
            len(rows),
            prev,
        )
    finally:
        await conn.close()


async def test_a_downgrade_to_sha256_is_reported_and_refused(
    hmac_sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    await events(hmac_sink, 5)
    await rewrite_as_sha256(postgres_dsn, hmac_sink.table, through=3)
    result = await hmac_sink.verify()
    assert not result.ok
    assert result.problems == [
        "the table is marked 'sha256' but an HMAC key was given: the "
        "wrong table, or its mode record was changed (a downgrade)"
    ]
    with pytest.raises(AuditChainError, match="downgrade"):
        await hmac_sink.emit(AuditEvent("policy_run"))


async def test_a_stripped_mode_record_is_reported(
    hmac_sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    t = hmac_sink.table
    await events(hmac_sink, 5)
    await sql(
        postgres_dsn,
        f"DELETE FROM {t} WHERE seq > 3",
        f"UPDATE {t}_head SET seq = 3, hash = (SELECT hash FROM {t} WHERE seq = 3), "
        "mode = NULL, mac = NULL",
    )
    fresh = PostgresAuditSink(postgres_dsn, table=t, hmac_key=HMAC_KEY)
    try:
        result = await fresh.verify()
        assert any("head is not authenticated" in p for p in result.problems), result.problems
        with pytest.raises(AuditChainError, match="mode record"):
            await hmac_sink.emit(AuditEvent("policy_run"))
    finally:
        await fresh.close()


async def test_wrong_mode_or_no_key_says_so(
    hmac_sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    await events(hmac_sink, 3)
    plain = PostgresAuditSink(postgres_dsn, table=hmac_sink.table)
    try:
        result = await plain.verify()
        assert result.problems == [
            "the table is an HMAC chain: verify it with its key "
            "(aiocrypt audit verify --hmac-key-env NAME)"
        ]
        with pytest.raises(AuditChainError, match="HMAC chain"):
            await plain.emit(AuditEvent("policy_run"))
    finally:
        await plain.close()


# -- a table written by the code before heads were authenticated ----------------------


async def old_layout(dsn: str, table: str, key: bytes | None, count: int) -> None:
    """The tables and rows exactly as the sink of before wrote them (no mode, no MAC)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"""
            CREATE TABLE {table} (seq bigint PRIMARY KEY, at timestamptz NOT NULL,
                event text NOT NULL, key_id text, key_type text, details jsonb NOT NULL,
                prev_hash bytea NOT NULL, hash bytea NOT NULL);
            CREATE TABLE {table}_head (id int PRIMARY KEY CHECK (id = 1),
                seq bigint NOT NULL, hash bytea NOT NULL);""")
        prev = b"\x00" * 32
        for seq in range(1, count + 1):
            at = dt.datetime.now(dt.UTC)
            digest = row_hash(key, prev, seq, at, "policy_run", {"n": seq})
            await conn.execute(
                f"INSERT INTO {table} (seq, at, event, key_id, key_type, details, prev_hash, "
                "hash) VALUES ($1, $2, 'policy_run', NULL, NULL, $3::jsonb, $4, $5)",
                seq,
                at,
                json.dumps({"n": seq}),
                prev,
                digest,
            )
            await conn.execute(
                f"INSERT INTO {table}_head (id, seq, hash) VALUES (1, $1, $2) "
                "ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash",
                seq,
                digest,
            )
            prev = digest
    finally:
        await conn.close()


async def test_an_old_hmac_table_keeps_working_and_upgrades(postgres_dsn: str) -> None:
    table = f"audit_{secrets.token_hex(4)}"
    await old_layout(postgres_dsn, table, HMAC_KEY, 4)
    sink = PostgresAuditSink(postgres_dsn, table=table, hmac_key=HMAC_KEY)
    try:
        await sink.emit(AuditEvent("policy_run"))  # appends as before
        result = await sink.verify()
        assert result.rows == 5
        assert result.problems == [
            "the head is not authenticated: a table of the old layout "
            "(run 'aiocrypt audit upgrade' once) or its mode record "
            "was removed"
        ]
        wrong_key = PostgresAuditSink(postgres_dsn, table=table, hmac_key=b"x" * 32)
        try:
            with pytest.raises(AuditChainError, match="does not verify"):
                await wrong_key.upgrade()
        finally:
            await wrong_key.close()
        result = await sink.upgrade()
        assert result.ok and result.rows == 6 and result.mode == "hmac", result.problems
        conn = await asyncpg.connect(postgres_dsn)
        try:
            assert (
                await conn.fetchval(f"SELECT event FROM {table} WHERE seq = 6")
                == "audit_chain_upgraded"
            )
        finally:
            await conn.close()
        await sql(
            postgres_dsn,
            f"DELETE FROM {table} WHERE seq > 4",
            f"UPDATE {table}_head SET seq = 4, hash = (SELECT hash FROM {table} WHERE seq = 4)",
        )
        fresh = PostgresAuditSink(postgres_dsn, table=table, hmac_key=HMAC_KEY)
        try:
            assert not (await fresh.verify()).ok
        finally:
            await fresh.close()
    finally:
        await drop(postgres_dsn, table)
        await sink.close()


async def test_an_old_sha256_table_verifies_without_a_key(postgres_dsn: str) -> None:
    table = f"audit_{secrets.token_hex(4)}"
    await old_layout(postgres_dsn, table, None, 3)
    sink = PostgresAuditSink(postgres_dsn, table=table)
    try:
        result = await sink.verify()
        assert result.ok and result.rows == 3 and result.mode == "sha256"
        assert any("not authenticated" in w for w in result.warnings)
        keyed = PostgresAuditSink(postgres_dsn, table=table, hmac_key=HMAC_KEY)
        try:
            problems = (await keyed.verify()).problems
        finally:
            await keyed.close()
        assert (
            "no row verifies in hmac mode: the wrong HMAC key (or none given for an HMAC "
            "chain), or every row was rewritten" in problems
        )
    finally:
        await drop(postgres_dsn, table)
        await sink.close()


async def test_an_auditor_logs_why_a_tampered_table_refused_an_event(
    hmac_sink: PostgresAuditSink, postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    await events(hmac_sink, 2)
    await sql(postgres_dsn, f"UPDATE {hmac_sink.table}_head SET mode = 'sha256', mac = NULL")
    with caplog.at_level("ERROR", logger="aiocrypt"):
        await Auditor([hmac_sink]).emit("policy_run")  # never raises into the application
    assert any(
        "audit sink PostgresAuditSink failed" in r.getMessage() and "downgrade" in r.getMessage()
        for r in caplog.records
    ), caplog.text


async def test_a_new_empty_table_verifies_and_a_removed_head_never_does(
    audit_sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    """A new table has its head (written with the tables), so it verifies with no rows.
    A missing head is always reported: with rows, or with every row removed too (a
    wiped table must not verify as a new one)."""
    empty = await audit_sink.verify()
    assert empty.ok and empty.rows == 0 and empty.problems == [], empty
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"DELETE FROM {audit_sink.table}_head")
        wiped = await audit_sink.verify()
        assert not wiped.ok and wiped.rows == 0, wiped
        assert wiped.problems == ["the head record is missing"]
        writer = PostgresAuditSink(postgres_dsn, table=audit_sink.table)
        try:
            await writer.open()  # no rows and no head: a new chain
            await lifecycle(writer)
        finally:
            await writer.close()
        await conn.execute(f"DELETE FROM {audit_sink.table}_head")
    finally:
        await conn.close()
    headless = await audit_sink.verify()
    assert not headless.ok and headless.rows > 0
    assert "the head record is missing" in headless.problems
