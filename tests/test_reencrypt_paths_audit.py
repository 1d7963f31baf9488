"""Paths of the audit package the wider suite leaves unrun: the failure window's
summary, anchor parsing, the sink's argument checks, and tampered heads on real
Postgres."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from aiocrypt.audit import AuditEvent, Auditor, MemoryAuditSink
from aiocrypt.audit.postgres import AuditAnchor, AuditChainError, PostgresAuditSink


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_failures_of_a_window_are_summarised_when_the_next_begins() -> None:
    sink, clock = MemoryAuditSink(), Clock()
    auditor = Auditor([sink], failure_window=60.0, clock=clock)
    clock.now += 120.0  # a first window without failures ends: nothing to summarise
    await auditor.record_failures("pii", 1, successes_total=100)
    await auditor.record_failures("financial_data", 2, successes_total=100)
    assert sink.names() == []
    clock.now += 60.0
    await auditor.record_failures("pii", 1, successes_total=150)
    assert sink.names() == ["decrypt_failures"]
    summary = sink.events[0]
    assert summary.details == {
        "window_seconds": 60.0,
        "by_key_type": {"pii": 1, "financial_data": 2},
    }
    clock.now += 60.0  # the new window held one failure: summarised in turn
    await auditor.record_failures("pii", 1, successes_total=150)
    assert sink.names() == ["decrypt_failures", "decrypt_failures"]
    assert sink.events[1].details["by_key_type"] == {"pii": 1}


@pytest.mark.parametrize("text", ["12", "x:" + "00" * 32, "3:zz", "-1:" + "00" * 32, "3:abcd"])
def test_a_malformed_anchor_says_its_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"an audit anchor is SEQ:HEX"):
        AuditAnchor.parse(text)


def test_an_anchor_round_trips() -> None:
    anchor = AuditAnchor(7, bytes(range(32)))
    assert AuditAnchor.parse(f" {anchor} ") == anchor


def test_sink_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="plain lower-case SQL identifier"):
        PostgresAuditSink("postgresql://x/y", table="Audit; DROP")
    with pytest.raises(ValueError, match="hmac_key must be at least 16 bytes"):
        PostgresAuditSink("postgresql://x/y", hmac_key=b"short")


# -- tampered tables, on the real Postgres -------------------------------------------


@pytest.fixture
async def sink(postgres_dsn: str) -> AsyncIterator[PostgresAuditSink]:
    table = f"audit_{secrets.token_hex(4)}"
    sink = PostgresAuditSink(postgres_dsn, table=table)
    await sink.open()
    try:
        yield sink
    finally:
        await sink.close()
        await _sql(postgres_dsn, f"DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_head")


async def _sql(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _events(sink: PostgresAuditSink, count: int) -> None:
    for n in range(count):
        await sink.emit(AuditEvent("policy_run", details={"n": n}))


@pytest.mark.services
async def test_a_removed_head_is_reported_and_refuses_appends(
    sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    await _events(sink, 2)
    await _sql(postgres_dsn, f"DELETE FROM {sink.table}_head")
    result = await sink.verify()
    assert not result.ok
    assert result.problems == ["the head record is missing"]
    with pytest.raises(AuditChainError, match="the head record is missing; run 'aiocrypt audit"):
        await sink.emit(AuditEvent("policy_run"))
    other = PostgresAuditSink(postgres_dsn, table=sink.table)
    try:
        with pytest.raises(AuditChainError, match="has rows but no head record"):
            await other.open()
    finally:
        await other.close()


@pytest.mark.services
async def test_rows_appended_outside_the_sink_are_reported(
    sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    await _events(sink, 2)
    await _sql(
        postgres_dsn,
        f"INSERT INTO {sink.table} SELECT seq + 1, at, event, key_id, key_type, details, "
        f"hash, hash FROM {sink.table} WHERE seq = 2",
    )
    problems = (await sink.verify()).problems
    assert (
        "the chain goes on to row 3 past the head at row 2: rows were appended outside the sink"
        in problems
    )


@pytest.mark.services
async def test_a_head_naming_another_last_row_is_reported(
    sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    await _events(sink, 2)
    await _sql(postgres_dsn, f"UPDATE {sink.table}_head SET hash = '\\x{'11' * 32}'::bytea")
    result = await sink.verify()
    assert result.problems == ["the last row 2 is not the row the head records"]


@pytest.mark.services
async def test_many_modified_rows_are_listed_up_to_twenty(
    sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    await _events(sink, 23)
    await _sql(
        postgres_dsn,
        f"UPDATE {sink.table} SET details = '{{\"n\": -1}}'::jsonb WHERE seq BETWEEN 2 AND 23",
    )
    problems = (await sink.verify()).problems
    assert problems[:2] == [
        "row 2 was modified (hash mismatch)",
        "row 3 was modified (hash mismatch)",
    ]
    assert problems[20:] == ["... and 2 more modified rows"]
    assert len(problems) == 21


@pytest.mark.services
async def test_upgrade_of_an_authenticated_table_only_verifies(
    sink: PostgresAuditSink, postgres_dsn: str
) -> None:
    await _events(sink, 2)
    result = await sink.upgrade()
    assert result.ok and result.rows == 2, result.problems
    conn = await asyncpg.connect(postgres_dsn)
    try:
        events = await conn.fetch(f"SELECT event FROM {sink.table} ORDER BY seq")
    finally:
        await conn.close()
    assert [r["event"] for r in events] == ["policy_run", "policy_run"]  # nothing adopted
