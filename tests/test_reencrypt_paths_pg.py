"""Paths of the re-encryption engine and its asyncpg database the wider suite leaves
unrun, on the real Postgres: values that cannot move (plaintext, unparsable legacy
values, unknown keys), a key rotated by another process, the checkpoint DDL's
failures, and a second connection refused."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from aiocrypt import EncryptionService, KeyManager, KeyNotFoundError, KeyType
from aiocrypt.reencrypt import AsyncpgDatabase, ColumnSpec, ReencryptionEngine, TableSpec
from aiocrypt.testing import FakeKekProvider, MemoryKeyStore, make_service

pytestmark = pytest.mark.services
KT = KeyType.PII


class Table:
    def __init__(self, conn: asyncpg.Connection, name: str) -> None:
        self.conn, self.name, self.checkpoints = conn, name, f"{name}_ckpt"

    async def insert(self, *rows: tuple[Any, ...]) -> None:
        await self.conn.executemany(f"INSERT INTO {self.name} VALUES ($1, $2, $3)", rows)


@pytest.fixture
async def table(postgres_dsn: str) -> AsyncIterator[Table]:
    conn = await asyncpg.connect(postgres_dsn)
    tbl = Table(conn, f"rp_{secrets.token_hex(4)}")
    await conn.execute(f"CREATE TABLE {tbl.name} (id int PRIMARY KEY, ssn text, born text)")
    try:
        yield tbl
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {tbl.name}, {tbl.checkpoints}")
        await conn.close()


def _spec(tbl: Table, born_legacy: str | None = "date") -> TableSpec:
    return TableSpec(
        tbl.name,
        "id",
        (
            ColumnSpec("ssn", KT, context="users.ssn"),
            ColumnSpec("born", KT, context="users.born", legacy_type=born_legacy),
        ),
    )


async def test_values_that_cannot_move_are_reported_once_per_row(
    service: EncryptionService, postgres_dsn: str, table: Table
) -> None:
    other = make_service()  # another deployment: its key is not in this store
    async with other:
        foreign = await other.encrypt_field("123-45-6789", KT, context="users.ssn")
    token = await service.encrypt_field("987-65-4321", KT, context="users.ssn")
    born = await service.encrypt_field("1990-01-31", KT, context="users.born")
    await table.insert(
        (1, token, "1990-01-31"),  # a legacy date: moves
        (2, "plain ssn", born),  # not a token, no legacy_type: stays, reason unknown
        (3, foreign, "not a date"),  # unknown key and an unparsable legacy value
        (4, None, None),
    )
    await service.key_manager.rotate_key(KT, force=True)
    async with AsyncpgDatabase(postgres_dsn, checkpoint_table=table.checkpoints) as db:
        engine = ReencryptionEngine(
            service.key_manager, db, tables=[_spec(table)], on_error="skip", rate_limit=1e9
        )
        result = await engine.reencrypt(table.name)
        census = await engine.census(table.name)
        usage = await engine.key_usage()
    assert result.run_rows_failed == 2
    assert result.failed_primary_keys == (2, 3)
    by_cell = {(f.primary_key, f.column): f for f in result.failures}
    assert set(by_cell) == {(2, "ssn"), (3, "ssn"), (3, "born")}
    assert by_cell[2, "ssn"].reason is None
    assert by_cell[3, "ssn"].key_id == foreign.split(".")[1]  # a token: its key id is named
    assert by_cell[3, "born"].reason is None
    assert "987-65-4321" not in str(by_cell[2, "ssn"]) and "plain ssn" not in str(by_cell[2, "ssn"])
    active = service.key_manager.keyring.active(KT).key_id
    assert census.counts["ssn"][None] == 1  # the plaintext counts as no key
    assert usage[active] == 3  # ssn of row 1, born of rows 1 and 2; None not a key id
    assert None not in usage


async def test_a_key_rotated_by_another_process_is_loaded_mid_run(
    postgres_dsn: str, table: Table
) -> None:
    store, kek = MemoryKeyStore(), FakeKekProvider()
    writer = EncryptionService(KeyManager(store, kek), preload=[KT])
    runner = KeyManager(store, kek, watch=False)
    async with writer, runner:
        await runner.ensure_active([KT])
        v1 = await writer.encrypt_field("111-11-1111", KT, context="users.ssn")
        await writer.key_manager.rotate_key(KT, force=True)  # runner has not seen v2
        v2 = await writer.encrypt_field("222-22-2222", KT, context="users.ssn")
        await writer.key_manager.rotate_key(KT, force=True)
        await table.insert((1, v1, None), (2, v2, None))
        async with AsyncpgDatabase(postgres_dsn, checkpoint_table=table.checkpoints) as db:
            engine = ReencryptionEngine(runner, db, tables=[_spec(table)])
            result = await engine.reencrypt(table.name)
        assert result.complete and result.run_rows_failed == 0
        assert runner.keyring.get(v2.split(".")[1]) is not None  # loaded when its token was met
        rows = await table.conn.fetch(f"SELECT id, ssn FROM {table.name} ORDER BY id")
        values = [await writer.decrypt_field(r["ssn"], KT, context="users.ssn") for r in rows]
        assert values == ["111-11-1111", "222-22-2222"]


async def test_plan_shards_drops_repeated_boundaries(
    service: EncryptionService, postgres_dsn: str, table: Table
) -> None:
    await table.insert((10, None, None), (20, None, None))
    async with AsyncpgDatabase(postgres_dsn, checkpoint_table=table.checkpoints) as db:
        engine = ReencryptionEngine(service.key_manager, db, tables=[_spec(table)])
        shards = await engine.plan_shards(table.name, 6)  # 6 shards of 2 rows: bounds repeat
    edges = [(s.after, s.until) for s in shards]
    assert edges == [(None, 10), (10, 20), (20, None)]


# -- the asyncpg database --------------------------------------------------------------


async def test_prepare_needs_the_primary_key_column(postgres_dsn: str, table: Table) -> None:
    spec = TableSpec(table.name, "uid", (ColumnSpec("ssn", KT),))
    async with AsyncpgDatabase(postgres_dsn, checkpoint_table=table.checkpoints) as db:
        with pytest.raises(KeyNotFoundError, match=f"table {table.name} has no column 'uid'"):
            await db.prepare(spec)


async def test_prepare_raises_a_checkpoint_table_it_cannot_create(
    postgres_dsn: str, table: Table
) -> None:
    db = AsyncpgDatabase(postgres_dsn, checkpoint_table=f"no_schema_{table.name}.ckpt")
    try:
        with pytest.raises(asyncpg.InvalidSchemaNameError):
            await db.prepare(_spec(table))
    finally:
        await db.close()


async def test_prepare_racing_another_worker_creating_the_checkpoint_table(
    postgres_dsn: str, table: Table
) -> None:
    other = await asyncpg.connect(postgres_dsn)
    db = AsyncpgDatabase(postgres_dsn, checkpoint_table=table.checkpoints)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute(f"CREATE TABLE {table.checkpoints} (job_id VARCHAR(255) PRIMARY KEY)")
        prepare = asyncio.create_task(db.prepare(_spec(table)))
        for _ in range(100):  # until the prepare waits on the other worker's table
            waiting = await table.conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE $1",
                f'%CREATE TABLE IF NOT EXISTS "{table.checkpoints}"%',
            )
            if waiting:
                break
            await asyncio.sleep(0.005)
        assert waiting
        await tx.commit()
        await prepare  # the duplicate the loser sees is not an error
        assert await table.conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table.checkpoints)
    finally:
        await db.close()
        await other.close()


async def test_a_refused_second_connection_closes_the_first(
    postgres_dsn: str, table: Table
) -> None:
    role = f"rp_one_{secrets.token_hex(4)}"
    await table.conn.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
    try:
        dsn = postgres_dsn.replace("postgres@", f"{role}@", 1)
        db = AsyncpgDatabase(dsn, checkpoint_table=table.checkpoints)
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await db.prepare(_spec(table))
        for _ in range(100):  # the reader's backend goes away once it is closed
            left = await table.conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role
            )
            if not left:
                break
            await asyncio.sleep(0.005)
        assert left == 0
        await db.close()
    finally:
        await table.conn.execute(f"DROP ROLE IF EXISTS {role}")
