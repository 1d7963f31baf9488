"""Re-encryption racing application writes: the engine's compare-and-swap must hold.

A table of 4000 rows on key v1 in the real PostgreSQL; the key is rotated to
v2 and the engine (AsyncpgDatabase, batches of 200) runs while four
application tasks keep updating random rows. Half of the application writes
come from a process that has not seen the rotation yet (its key manager is
stale, so it still writes under v1). On top of that, the test writes three
rows of every batch in the exact window between the engine's read and its
compare-and-swap write, so conflicts are certain.

What must hold: every row decrypts to the value the application wrote last
(none is overwritten by the engine with a stale re-encryption of an older
value); the engine counts the rows it did not write as conflicted; rows left
on v1 by the stale writer are picked up by a later pass or a second run, after
which every row is on v2 and decrypts.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Callable
from typing import Any

import pytest

from aiocrypt import (
    AsyncpgDatabase,
    ColumnSpec,
    EncryptionService,
    KeyManager,
    KeyType,
    ReencryptionEngine,
    TableSpec,
)
from aiocrypt.reencrypt import WriteBatch
from aiocrypt.testing import FakeKekProvider, MemoryKeyStore

asyncpg = pytest.importorskip("asyncpg")

ROWS = 4000
BATCH = 200
WRITERS = 4


class App:
    """The application: writes rows through a current and a stale service, remembers the last
    value it wrote to each row."""

    def __init__(
        self, dsn: str, table: str, fresh: EncryptionService, stale: EncryptionService
    ) -> None:
        self.dsn, self.table = dsn, table
        self.services = (fresh, stale)
        self.expected: dict[int, str] = {}
        self.writes = 0
        self.stale_writes = 0
        self._locks: dict[int, asyncio.Lock] = {}
        self.conn: Any = None

    async def write(self, conn: Any, row_id: int) -> None:
        lock = self._locks.setdefault(row_id, asyncio.Lock())
        async with lock:  # one writer per row at a time: "last written" is well defined
            self.writes += 1
            stale = self.writes % 2 == 0
            self.stale_writes += stale
            value = f"{row_id}-app-{self.writes}"
            token = await self.services[stale].encrypt_field(
                value, KeyType.PII, context=f"{self.table}.secret"
            )
            await conn.execute(
                f"UPDATE {self.table} SET secret = $2, plain = $3 WHERE id = $1",
                row_id,
                token,
                value,
            )
            self.expected[row_id] = value


class RacingDatabase(AsyncpgDatabase):
    """The real adapter; before each compare-and-swap write, the app rewrites 3 of its rows."""

    def __init__(self, dsn: str, app: App) -> None:
        super().__init__(dsn)
        self.app = app
        self.raced = 0
        self.racing = True

    async def write_batch(self, table: TableSpec, batch: WriteBatch, checkpoint: Any) -> int:
        if self.racing and len(batch.pks) >= 3:
            for row_id in random.sample(list(batch.pks), 3):
                await self.app.write(self.app.conn, row_id)
                self.raced += 1
        return await super().write_batch(table, batch, checkpoint)


async def test_reencryption_never_overwrites_application_writes(
    postgres_dsn: str, summary: Callable[..., None]
) -> None:
    """Concurrent and in-window application writes survive; all rows end on the new key."""
    table = f"rel_race_{secrets.token_hex(4)}"
    store, kek = MemoryKeyStore(), FakeKekProvider()
    fresh = EncryptionService(KeyManager(store, kek, watch=False))
    # a process that has not seen the rotation: it refreshes its keys only hourly
    stale = EncryptionService(KeyManager(store, kek, watch=False, refresh_interval=3600))
    conn = await asyncpg.connect(postgres_dsn)
    try:
        async with fresh, stale:
            originals = {i: f"{i}-original" for i in range(1, ROWS + 1)}
            tokens = await fresh.encrypt_many(
                list(originals.values()), KeyType.PII, context=f"{table}.secret"
            )
            await stale.key_manager.refresh(force=True)  # it knows v1, and only v1
            await conn.execute(
                f"CREATE TABLE {table} (id integer PRIMARY KEY, secret text, plain text)"
            )
            await conn.copy_records_to_table(
                table,
                records=[(i, t, originals[i]) for i, t in zip(originals, tokens, strict=True)],
                columns=["id", "secret", "plain"],
            )
            v2 = await fresh.key_manager.rotate_key(KeyType.PII, force=True)

            app = App(postgres_dsn, table, fresh, stale)
            app.conn = await asyncpg.connect(postgres_dsn)
            spec = TableSpec(table, "id", (ColumnSpec("secret", KeyType.PII),))
            database = RacingDatabase(postgres_dsn, app)
            engine = ReencryptionEngine(
                fresh.key_manager, database, tables=[spec], batch_size=BATCH
            )
            stop = asyncio.Event()

            async def writer(index: int) -> None:
                wconn = await asyncpg.connect(postgres_dsn)
                try:
                    while not stop.is_set():
                        await app.write(wconn, random.randrange(1, ROWS + 1))
                        await asyncio.sleep(0)
                finally:
                    await wconn.close()

            writers = [asyncio.create_task(writer(i)) for i in range(WRITERS)]
            try:
                first = await engine.reencrypt(table)
            finally:
                stop.set()
                await asyncio.gather(*writers)

            # nothing the application wrote was overwritten
            rows = await conn.fetch(f"SELECT id, secret, plain FROM {table} ORDER BY id")
            plain = await fresh.decrypt_many(
                [r["secret"] for r in rows], KeyType.PII, context=f"{table}.secret"
            )
            for row, value in zip(rows, plain, strict=True):
                assert value == row["plain"] == app.expected.get(row["id"], originals[row["id"]])
            left_on_v1 = sum(1 for r in rows if r["secret"].split(".")[1] != v2.key_id)
            assert first.run_rows_conflicted >= database.raced > 0

            database.racing = False  # the application has stopped writing
            second = await engine.reencrypt(table)  # the stale writer's rows get moved too
            assert second.complete
            rows = await conn.fetch(f"SELECT id, secret, plain FROM {table} ORDER BY id")
            assert all(r["secret"].split(".")[1] == v2.key_id for r in rows)
            plain = await fresh.decrypt_many(
                [r["secret"] for r in rows], KeyType.PII, context=f"{table}.secret"
            )
            assert plain == [r["plain"] for r in rows]
            census = await engine.census(table)
            assert census.rows_for(v2.key_id) == ROWS
            await app.conn.close()
            await database.close()
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()
    summary(
        rows=ROWS,
        app_writes=app.writes,
        stale_key_writes=app.stale_writes,
        in_window_writes=database.raced,
        engine_rows_updated=first.run_rows_updated,
        engine_rows_conflicted=first.run_rows_conflicted,
        passes_first_run=first.passes,
        left_on_old_key_after_first_run=left_on_v1,
        second_run_rows_updated=second.run_rows_updated,
        rows_checked=len(rows),
        overwritten=0,
    )
