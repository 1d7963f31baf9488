"""PostgreSQL key store (``aiocrypt[postgres]``, asyncpg).

Its own schema (default ``aiocrypt``; configurable so applications and tests
can keep apart), created on first use or by :meth:`PostgresKeyStore.migrate`:

* ``revision``  one row, bumped by every write, with the keyset seal of that
  revision (``aiocrypt._keyset_seal``)
* ``keys``      key id -> JSON record (``EncryptionKey.to_dict``)
* ``usage``     key id -> shared encryption counter

A write is one transaction: ``UPDATE revision ... WHERE revision = <expected>``
(a concurrent writer blocks on the row and then finds the revision moved, so
exactly one of two racing writers wins), the upsert of the records, and a
``pg_notify`` that PostgreSQL delivers only when the transaction commits.
The rotation lock is ``pg_advisory_lock`` held on a connection of its own:
if the holder dies its connection dies and the server releases the lock.
``changes()`` LISTENs on a connection of its own and also checks the
revision every ``poll_interval``, so a notification lost during a
disconnection is not missed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, Final

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "aiocrypt.keystore.postgres needs asyncpg: pip install 'aiocrypt[postgres]'"
    ) from exc

import anyio

from .._config import EncryptionConfig
from .._errors import (
    ConcurrentModificationError,
    ConfigurationError,
    KeyStoreError,
    KeyStoreIntegrityError,
    LockTimeoutError,
)
from .._keys import EncryptionKey
from .._urls import redact_url, scrub
from ._base import KeySet, KeyStore, decode_records, encode_record
from ._subjects_postgres import PostgresSubjectKeyStore

__all__ = ["PostgresKeyStore", "from_config"]

logger = logging.getLogger("aiocrypt.keystore.postgres")

DEFAULT_SCHEMA: Final = "aiocrypt"
_SCHEMA_RE: Final = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
# InternalClientError: asyncpg's own state errors on a connection that a timeout or an
# outage left mid-operation ("cannot switch to state ...; another operation is in progress")
_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


def _lock_id(*parts: str) -> int:
    digest = hashlib.sha256("\x00".join(("aiocrypt", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _statements(schema: str) -> dict[str, str]:
    """Every statement, for one schema (validated by ``_SCHEMA_RE``, always quoted)."""
    s = f'"{schema}"'
    return {
        "migrate": f"""
            CREATE SCHEMA IF NOT EXISTS {s};
            CREATE TABLE IF NOT EXISTS {s}.revision (
                id smallint PRIMARY KEY CHECK (id = 1),
                revision bigint NOT NULL);
            ALTER TABLE {s}.revision ADD COLUMN IF NOT EXISTS seal text;
            INSERT INTO {s}.revision (id, revision) VALUES (1, 0) ON CONFLICT DO NOTHING;
            CREATE TABLE IF NOT EXISTS {s}.keys (
                key_id text PRIMARY KEY,
                record jsonb NOT NULL,
                revision bigint NOT NULL);
            CREATE TABLE IF NOT EXISTS {s}.usage (
                key_id text PRIMARY KEY,
                count bigint NOT NULL);
        """,  # noqa: S608
        "drop": f"DROP SCHEMA IF EXISTS {s} CASCADE",
        # one statement: one snapshot of the revision and the records
        "read": f"SELECT r.revision, r.seal, k.record FROM {s}.revision r "  # noqa: S608
        f"LEFT JOIN {s}.keys k ON true",
        "revision": f"SELECT revision FROM {s}.revision WHERE id = 1",  # noqa: S608
        "bump": f"UPDATE {s}.revision SET revision = revision + 1, seal = $2 "  # noqa: S608
        "WHERE id = 1 AND revision = $1 RETURNING revision",
        "upsert": f"INSERT INTO {s}.keys (key_id, record, revision) "  # noqa: S608
        "SELECT i, r::jsonb, $3 FROM unnest($1::text[], $2::text[]) AS t(i, r) "
        "ON CONFLICT (key_id) DO UPDATE "
        "SET record = EXCLUDED.record, revision = EXCLUDED.revision",
        "add_usage": f"INSERT INTO {s}.usage AS u (key_id, count) "  # noqa: S608
        "SELECT * FROM unnest($1::text[], $2::bigint[]) "
        "ON CONFLICT (key_id) DO UPDATE SET count = u.count + EXCLUDED.count "
        "RETURNING key_id, count",
        "usage": f"SELECT key_id, count FROM {s}.usage",  # noqa: S608
    }


class PostgresKeyStore(KeyStore):
    """Key records in PostgreSQL tables, shared by every process using the same schema."""

    name = "postgres"

    def __init__(
        self,
        pool_or_dsn: Any,
        *,
        schema: str = DEFAULT_SCHEMA,
        auto_migrate: bool = True,
        command_timeout: float = 10.0,
    ) -> None:
        """Give an ``asyncpg`` pool (the caller keeps owning it) or a ``postgresql://`` DSN.

        With ``auto_migrate`` the schema and tables are created on first use
        (needs CREATE on the database); otherwise run :meth:`migrate` once.
        """
        if not _SCHEMA_RE.match(schema):
            raise ValueError(f"invalid schema name {schema!r} (lower-case letters, digits, _)")
        self.schema = schema
        self.auto_migrate = auto_migrate
        self.command_timeout = command_timeout
        if isinstance(pool_or_dsn, str):
            self._dsn: str | None = pool_or_dsn
            self._where = redact_url(pool_or_dsn) if "://" in pool_or_dsn else "<dsn>"
            self._pool: Any = None
            self._owns_pool = True
        else:
            self._dsn = None
            self._where = "<asyncpg pool>"
            self._pool = pool_or_dsn
            self._owns_pool = False
        self.channel = f"aiocrypt_{schema}"
        self._sql = _statements(schema)
        self._open_lock = asyncio.Lock()
        self._migrated = False
        self._subjects: PostgresSubjectKeyStore | None = None

    def __repr__(self) -> str:
        return f"<PostgresKeyStore {self._where} schema={self.schema!r}>"

    @contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        try:
            yield
        except _ERRORS as exc:
            raise KeyStoreError(
                f"PostgreSQL key store {self._where} (schema {self.schema!r}): {action} failed "
                f"({type(exc).__name__}: {scrub(str(exc), self._dsn)}); check that PostgreSQL is "
                "running and reachable (ENCRYPTION_POSTGRES_DSN)"
            ) from exc

    # -- lifecycle ----------------------------------------------------------

    async def open(self) -> None:
        await self._ready()

    async def _ready(self) -> Any:
        if self._pool is not None and (self._migrated or not self.auto_migrate):
            return self._pool
        async with self._open_lock:
            await self._create_pool()
            if self.auto_migrate and not self._migrated:
                await self._migrate(self._pool)
        return self._pool

    async def _create_pool(self) -> None:
        if self._pool is None:
            with self._translate("connect"):
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=4,
                    command_timeout=self.command_timeout,
                    timeout=min(10.0, self.command_timeout),
                )

    async def migrate(self) -> None:
        """Create the schema and tables if they do not exist (idempotent, concurrency-safe)."""
        async with self._open_lock:
            await self._create_pool()
            await self._migrate(self._pool)

    async def _migrate(self, pool: Any) -> None:
        with self._translate("create schema"):
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1)", _lock_id("migrate", self.schema)
                )
                await conn.execute(self._sql["migrate"])
        self._migrated = True

    async def close(self) -> None:
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            self._migrated = False
            with anyio.CancelScope(shield=True):
                try:
                    with anyio.fail_after(5):
                        await pool.close()
                # pool.close() waits for every acquired connection: it fails only when one
                # is held for 5 s (or the server hangs), which no fast test can do
                except (TimeoutError, *_ERRORS):  # pragma: no cover - a connection held 5 s
                    pool.terminate()

    async def drop(self) -> None:
        """Drop the schema and everything in it (tests, decommissioning)."""
        pool = await self._ready()
        with self._translate("drop schema"):
            await pool.execute(self._sql["drop"])
        self._migrated = False
        self._subjects = None

    async def _connect(self) -> Any:
        """A connection of its own (for the lock and LISTEN): from the DSN, else the pool."""
        if self._dsn is not None:
            return await asyncpg.connect(
                self._dsn,
                timeout=min(10.0, self.command_timeout),
                command_timeout=self.command_timeout,
            )
        return await self._pool.acquire()

    async def _disconnect(self, conn: Any) -> None:
        with anyio.CancelScope(shield=True), suppress(*_ERRORS):
            with anyio.fail_after(5):
                if self._dsn is not None:
                    await conn.close()
                else:
                    await self._pool.release(conn)
            return
        # reached only when closing a live connection fails or hangs for 5 s: asyncpg
        # closes or releases a dead one quietly, so no fast test gets here
        conn.terminate()  # pragma: no cover - a close that fails or hangs for 5 s

    # -- records ------------------------------------------------------------

    async def read(self) -> KeySet:
        pool = await self._ready()
        with self._translate("read"):
            rows = await pool.fetch(self._sql["read"])
        if not rows:
            raise KeyStoreIntegrityError(
                f"PostgreSQL key store {self._where}: table {self.schema}.revision is empty "
                "(run migrate())"
            )
        keys = decode_records(
            (row["record"] for row in rows if row["record"] is not None),
            f"PostgreSQL key store {self._where} (schema {self.schema!r})",
        )
        return KeySet(int(rows[0]["revision"]), keys, rows[0]["seal"])

    def subject_store(self) -> PostgresSubjectKeyStore:
        """Subject keys in this schema's ``subject_keys`` table (docs/subjects.md)."""
        if self._subjects is None:
            self._subjects = PostgresSubjectKeyStore(self)
        return self._subjects

    async def revision(self) -> int:
        pool = await self._ready()
        with self._translate("read revision"):
            return int(await pool.fetchval(self._sql["revision"]) or 0)

    async def write(
        self, keys: Sequence[EncryptionKey], *, expected_revision: int, seal: str | None = None
    ) -> int:
        pool = await self._ready()
        ids = [k.key_id for k in keys]
        records = [encode_record(k) for k in keys]
        with self._translate("write"):
            async with pool.acquire() as conn, conn.transaction():
                new = await conn.fetchval(self._sql["bump"], expected_revision, seal)
                if new is None:
                    current = await conn.fetchval(self._sql["revision"])
                    raise ConcurrentModificationError(
                        f"PostgreSQL key store {self._where} is at revision {current}, "
                        f"not {expected_revision}"
                    )
                await conn.execute(self._sql["upsert"], ids, records, new)
                await conn.execute("SELECT pg_notify($1, $2)", self.channel, str(new))
        return int(new)

    # -- usage counters -----------------------------------------------------

    async def add_usage(self, increments: Mapping[str, int]) -> dict[str, int]:
        if not increments:
            return {}
        pool = await self._ready()
        with self._translate("count usage"):
            rows = await pool.fetch(
                self._sql["add_usage"], list(increments), [int(n) for n in increments.values()]
            )
        return {row["key_id"]: int(row["count"]) for row in rows}

    async def get_usage(self) -> dict[str, int]:
        pool = await self._ready()
        with self._translate("read usage"):
            rows = await pool.fetch(self._sql["usage"])
        return {row["key_id"]: int(row["count"]) for row in rows}

    # -- change notification ------------------------------------------------

    async def changes(self, poll_interval: float = 1.0) -> AsyncIterator[int]:
        last: int | None = None
        while True:
            queue: asyncio.Queue[str] = asyncio.Queue()

            def on_notify(
                _conn: Any,
                _pid: int,
                _channel: str,
                payload: str,
                queue: asyncio.Queue[str] = queue,
            ) -> None:
                queue.put_nowait(payload)

            conn = None
            try:
                await self._ready()
                with self._translate("listen"):
                    conn = await self._connect()
                    await conn.add_listener(self.channel, on_notify)
                current = await self.revision()
                if last is not None and current != last:
                    last = current
                    yield current
                last = current
                while not conn.is_closed():
                    payload: str | None = None
                    with anyio.move_on_after(poll_interval):
                        payload = await queue.get()
                    if payload is not None and payload.isdigit():
                        revision = int(payload)
                        if revision > last:
                            last = revision
                            yield revision
                    else:
                        current = await self.revision()
                        if current != last:
                            last = current
                            yield current
            except KeyStoreError as exc:
                logger.warning(
                    "PostgreSQL key store %s: change notifications interrupted (%s); reconnecting",
                    self._where,
                    type(exc.__cause__).__name__,
                )
            finally:
                if conn is not None:
                    with suppress(*_ERRORS):
                        if not conn.is_closed():
                            await conn.remove_listener(self.channel, on_notify)
                    await self._disconnect(conn)
            await anyio.sleep(poll_interval)

    # -- locking ------------------------------------------------------------

    @asynccontextmanager
    async def lock(self, name: str = "rotation", *, timeout: float = 30.0) -> AsyncIterator[None]:
        await self._ready()
        lock_id = _lock_id("lock", self.schema, name)
        with self._translate(f"connect for lock {name!r}"):
            conn = await self._connect()
        try:
            deadline = anyio.current_time() + timeout
            delay = 0.01
            while True:
                with self._translate(f"take lock {name!r}"):
                    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_id):
                        break
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    raise LockTimeoutError(
                        f"PostgreSQL key store {self._where}: lock {name!r} held elsewhere "
                        f"for over {timeout}s"
                    )
                await anyio.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.2)
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        with anyio.fail_after(5):
                            await conn.fetchval("SELECT pg_advisory_unlock($1)", lock_id)
                    except (TimeoutError, *_ERRORS) as exc:
                        # the connection is closed below; the server then drops the lock
                        logger.warning(
                            "PostgreSQL key store %s: could not unlock %r (%s)",
                            self._where,
                            name,
                            type(exc).__name__,
                        )
        finally:
            await self._disconnect(conn)


def from_config(config: EncryptionConfig) -> PostgresKeyStore:
    """Build from ``ENCRYPTION_POSTGRES_DSN``."""
    if not config.postgres_dsn:
        raise ConfigurationError("the postgres key store needs ENCRYPTION_POSTGRES_DSN")
    # ENCRYPTION_POSTGRES_SCHEMA (see docs/backends.md); empty means the default
    schema = config.postgres_schema or DEFAULT_SCHEMA
    try:
        return PostgresKeyStore(config.postgres_dsn, schema=schema)
    except ValueError as exc:
        raise ConfigurationError(f"postgres key store: {exc}") from None
