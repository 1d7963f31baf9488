"""The Postgres adapter of the re-encryption engine (asyncpg, imported lazily).

One ``UPDATE ... FROM unnest(...)`` per batch, with the checkpoint upsert in
the same statement; reads and writes overlapped on two connections.
A failed call drops both connections (a server restart leaves them closed, a
cancelled or timed-out query leaves them mid-protocol), so the next call,
such as a rerun resuming from the checkpoint, starts on fresh ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .._errors import KeyNotFoundError
from .._format import key_id_sql
from ._database import (
    CHECKPOINT_COLUMNS,
    DEFAULT_CHECKPOINT_TABLE,
    census_from_rows,
    census_sql,
    checkpoint_ddl,
    checkpoint_from_row,
    checkpoint_upsert_sql,
    checkpoint_values,
    pending_condition,
    pending_counts_sql,
)
from ._specs import Checkpoint, TableCensus, TableSpec, WriteBatch, quote_identifier

__all__ = ["AsyncpgDatabase"]


class AsyncpgDatabase:
    """Postgres through asyncpg: one ``UPDATE ... FROM unnest(...)`` per batch.

    The compare-and-swap update and the checkpoint upsert are one statement (a
    data-modifying CTE), so they commit together. Reads and writes run on two
    connections so the next batch is fetched while this one is re-encrypted and
    the previous one written. Give it a DSN, or an ``asyncpg`` pool you own.
    ``command_timeout`` (seconds, DSN only) bounds each statement, so a server
    that stops answering fails the run instead of hanging it.
    """

    supports_pipelining = True

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: Any = None,
        checkpoint_table: str = DEFAULT_CHECKPOINT_TABLE,
        command_timeout: float | None = 300.0,
    ) -> None:
        if (dsn is None) == (pool is None):
            raise ValueError("give a DSN or an asyncpg pool")
        quote_identifier(checkpoint_table)
        self._dsn = dsn
        self._pool = pool
        self.checkpoint_table = checkpoint_table
        self.command_timeout = command_timeout
        self._reader: Any = None
        self._writer: Any = None
        self._pk_types: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<AsyncpgDatabase checkpoint_table={self.checkpoint_table}>"

    def _usable(self) -> bool:
        return (
            self._reader is not None
            and not self._reader.is_closed()
            and not self._writer.is_closed()
        )

    async def _connect(self) -> None:
        if self._usable():
            return
        async with self._lock:
            if self._usable():
                return
            await self.close()  # closed by the server, or dropped after a failure
            if self._pool is not None:
                reader = await self._pool.acquire()
                writer = await self._pool.acquire()
            else:
                try:
                    import asyncpg
                except ImportError as exc:  # pragma: no cover - depends on the environment
                    raise ImportError(
                        "AsyncpgDatabase needs asyncpg: pip install 'aiocrypt[postgres]'"
                    ) from exc
                timeout = min(60.0, self.command_timeout or 60.0)
                reader = await asyncpg.connect(
                    self._dsn, timeout=timeout, command_timeout=self.command_timeout
                )
                try:
                    writer = await asyncpg.connect(
                        self._dsn, timeout=timeout, command_timeout=self.command_timeout
                    )
                except BaseException:
                    await reader.close()
                    raise
            self._reader, self._writer = reader, writer

    async def close(self) -> None:
        reader, writer = self._reader, self._writer
        self._reader = self._writer = None
        for conn in (reader, writer):
            if conn is None:
                continue
            if self._pool is not None:
                await self._pool.release(conn)
            elif conn.is_closed():
                continue
            else:
                try:
                    await asyncio.wait_for(conn.close(), 5)
                # asyncpg's close() fails only when the server does not answer its
                # Terminate within 5 s (or the socket broke mid-message): not in a fast test
                except Exception:  # pragma: no cover - a server that stops answering
                    conn.terminate()

    @contextlib.asynccontextmanager
    async def _connected(self) -> AsyncIterator[None]:
        """Connect if needed; on any failure, drop both connections for the next call."""
        await self._connect()
        try:
            yield
        except BaseException:
            for conn in (self._reader, self._writer):
                if conn is not None and not conn.is_closed():
                    conn.terminate()  # the pool (if any) gets it back in close()
            raise

    async def __aenter__(self) -> AsyncpgDatabase:
        await self._connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def prepare(self, table: TableSpec) -> None:
        async with self._connected():
            try:
                await self._writer.execute(
                    checkpoint_ddl(self.checkpoint_table, timestamp_type="TIMESTAMPTZ")
                )
            except Exception as exc:
                # Two workers creating the table at once: the loser sees a duplicate.
                if type(exc).__name__ not in ("UniqueViolationError", "DuplicateTableError"):
                    raise
            pk_type = await self._reader.fetchval(
                "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "WHERE a.attrelid = $1::regclass AND a.attname = $2 AND NOT a.attisdropped",
                quote_identifier(table.name),
                table.primary_key,
            )
            if pk_type is None:
                raise KeyNotFoundError(f"table {table.name} has no column {table.primary_key!r}")
            self._pk_types[table.name] = pk_type

    def _fetch_sql(self, table: TableSpec, has_after: bool, has_until: bool) -> str:
        tbl, pk = quote_identifier(table.name), quote_identifier(table.primary_key)
        cols = ", ".join(quote_identifier(c.name) for c in table.columns)
        n = len(table.columns)
        where = [pending_condition(table, [f"${i + 1}" for i in range(n)])]
        args = n
        if has_after:
            args += 1
            where.append(f"{pk} > ${args}")
        if has_until:
            args += 1
            where.append(f"{pk} <= ${args}")
        return (
            f"SELECT {pk}, {cols} FROM {tbl} WHERE {' AND '.join(where)} "  # noqa: S608
            f"ORDER BY {pk} LIMIT ${args + 1}"
        )

    async def fetch_batch(
        self, table: TableSpec, prefixes: Sequence[str], after: Any, until: Any, limit: int
    ) -> Sequence[Sequence[Any]]:
        async with self._connected():
            args: list[Any] = list(prefixes)
            if after is not None:
                args.append(after)
            if until is not None:
                args.append(until)
            sql = self._fetch_sql(table, after is not None, until is not None)
            rows: Sequence[Sequence[Any]] = await self._reader.fetch(sql, *args, limit)
            return rows

    def _write_sql(self, table: TableSpec) -> str:
        tbl, pk = quote_identifier(table.name), quote_identifier(table.primary_key)
        pk_type = self._pk_types[table.name]
        n = len(table.columns)
        arrays = [f"$1::{pk_type}[]"]
        aliases = ["pk"]
        sets, matches = [], []
        for i, column in enumerate(table.columns):
            col = quote_identifier(column.name)
            arrays += [f"${2 + 2 * i}::text[]", f"${3 + 2 * i}::text[]"]
            aliases += [f"o{i}", f"n{i}"]
            match = f"(v.n{i} IS NOT NULL AND t.{col} = v.o{i})"
            matches.append(match)
            sets.append(f"{col} = CASE WHEN {match} THEN v.n{i} ELSE t.{col} END")
        base = 2 + 2 * n
        cp = [f"${base + k}" for k in range(len(CHECKPOINT_COLUMNS) - 1)]
        ckpt = quote_identifier(self.checkpoint_table)
        # cp params: job_id, table, pass_no, last_pk, batches, rows_read, rows_updated
        # (before this batch), rows_conflicted (before), rows_failed, rows sent.
        sent = f"${base + len(cp)}"
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in CHECKPOINT_COLUMNS[1:])
        return (
            f"WITH v AS (SELECT * FROM unnest({', '.join(arrays)}) "  # noqa: S608
            f"AS v({', '.join(aliases)})), "
            f"upd AS (UPDATE {tbl} AS t SET {', '.join(sets)} FROM v "
            f"WHERE t.{pk} = v.pk AND ({' OR '.join(matches)}) RETURNING 1), "
            "cnt AS (SELECT count(*) AS n FROM upd), "
            f"cp AS (INSERT INTO {ckpt} ({', '.join(CHECKPOINT_COLUMNS)}, updated_at) "
            f"SELECT {cp[0]}, {cp[1]}, {cp[2]}, {cp[3]}, {cp[4]}, {cp[5]}, "
            f"{cp[6]} + cnt.n, {cp[7]} + ({sent} - cnt.n), {cp[8]}, false, now() FROM cnt "
            f"ON CONFLICT (job_id) DO UPDATE SET {updates}, updated_at = EXCLUDED.updated_at "
            "RETURNING 1) "
            "SELECT n FROM cnt"
        )

    async def write_batch(self, table: TableSpec, batch: WriteBatch, checkpoint: Checkpoint) -> int:
        async with self._connected():
            args: list[Any] = [batch.pks]
            for old, new in zip(batch.old, batch.new, strict=True):
                args += [old, new]
            args += [
                checkpoint.job_id,
                checkpoint.table,
                checkpoint.pass_no,
                checkpoint.encoded_pk(),
                checkpoint.batches,
                checkpoint.rows_read,
                checkpoint.rows_updated,
                checkpoint.rows_conflicted,
                checkpoint.rows_failed,
                len(batch),
            ]
            updated: int = await self._writer.fetchval(self._write_sql(table), *args)
            return updated

    async def load_checkpoint(self, job_id: str) -> Checkpoint | None:
        async with self._connected():
            row = await self._reader.fetchrow(
                f"SELECT {', '.join(CHECKPOINT_COLUMNS)} FROM "  # noqa: S608
                f"{quote_identifier(self.checkpoint_table)} WHERE job_id = $1",
                job_id,
            )
            return None if row is None else checkpoint_from_row(row)

    async def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        async with self._connected():
            await self._writer.execute(
                checkpoint_upsert_sql(self.checkpoint_table, lambda i, _: f"${i}", "now()"),
                *checkpoint_values(checkpoint),
            )

    async def census(self, table: TableSpec) -> TableCensus:
        async with self._connected():
            rows = await self._reader.fetch(census_sql(table, key_id_sql))
            return census_from_rows(table, rows)

    async def count_rows(self, table: TableSpec, prefixes: Sequence[str] | None = None) -> int:
        """Rows of ``table``; with ``prefixes`` (each column's target token prefix), only
        the rows some column of which is not on its target key yet."""
        where = (
            ""
            if prefixes is None
            else " WHERE " + pending_condition(table, [f"${i + 1}" for i in range(len(prefixes))])
        )
        async with self._connected():
            count: int = await self._reader.fetchval(
                f"SELECT count(*) FROM {quote_identifier(table.name)}{where}",  # noqa: S608
                *(prefixes or ()),
            )
            return count

    async def count_pending(
        self, table: TableSpec, prefixes: Sequence[str], bounds: Sequence[Any]
    ) -> list[int]:
        async with self._connected():
            row = await self._reader.fetchrow(
                pending_counts_sql(table, len(bounds), lambda i: f"${i}"), *prefixes, *bounds
            )
            return [int(n) for n in row]

    async def boundaries(self, table: TableSpec, shards: int) -> list[Any]:
        async with self._connected():
            if shards < 2:
                return []
            pk = quote_identifier(table.primary_key)
            fractions = [i / shards for i in range(1, shards)]
            values = await self._reader.fetchval(
                f"SELECT percentile_disc($1::float8[]) WITHIN GROUP (ORDER BY {pk}) "  # noqa: S608
                f"FROM {quote_identifier(table.name)}",
                fractions,
            )
            return [] if values is None else [v for v in values if v is not None]
