"""Subject keys in PostgreSQL (``PostgresKeyStore.subject_store()``), beside the key records.

One table in the key store's schema, one row per subject key::

    subject_keys (id text PRIMARY KEY,   -- the subject key id ('T-<lookup>': a tombstone)
                  lookup text UNIQUE,    -- NULL once forgotten
                  wrapping_key_id text, live boolean, record text)

Every hot-path read is one indexed lookup (``lookup`` or ``id``); the rewrap
pages through a partial index on (``wrapping_key_id``, ``id``) of live rows; a
first key is inserted with ``ON CONFLICT DO NOTHING`` and read back, so two
processes creating the same subject's key at once end with one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from .._subjects import SubjectKeyRecord
from ._subjects_base import SubjectKeyStore

if TYPE_CHECKING:
    from .postgres import PostgresKeyStore

__all__ = ["PostgresSubjectKeyStore"]

_TOMBSTONE_ID: Final = "T-"


def _statements(schema: str) -> dict[str, str]:
    t = f'"{schema}".subject_keys'
    return {
        "migrate": f"""
            CREATE TABLE IF NOT EXISTS {t} (
                id text PRIMARY KEY,
                lookup text UNIQUE,
                wrapping_key_id text NOT NULL,
                live boolean NOT NULL,
                record text NOT NULL);
            CREATE INDEX IF NOT EXISTS subject_keys_wrapping
                ON {t} (wrapping_key_id, id) WHERE live;
        """,
        "find": f"SELECT record FROM {t} WHERE lookup = $1",  # noqa: S608
        "get": f"SELECT record FROM {t} WHERE id = $1",  # noqa: S608
        "insert": f"INSERT INTO {t} (id, lookup, wrapping_key_id, live, record) "  # noqa: S608
        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[], "
        "$5::text[]) ON CONFLICT DO NOTHING",
        "forget": f"INSERT INTO {t} (id, lookup, wrapping_key_id, live, record) "  # noqa: S608
        "VALUES ($1, NULL, $2, false, $3) ON CONFLICT (id) DO UPDATE "
        "SET lookup = NULL, live = false, record = EXCLUDED.record",
        "rewrap": f"UPDATE {t} AS s SET wrapping_key_id = u.w, record = u.r "  # noqa: S608
        "FROM unnest($1::text[], $2::text[], $3::text[]) AS u(i, w, r) "
        "WHERE s.id = u.i AND s.live AND s.wrapping_key_id = $4",
        "wrapped_by": f"SELECT record FROM {t} WHERE live AND wrapping_key_id = $1 "  # noqa: S608
        "AND id > $2 ORDER BY id LIMIT $3",
        "census": f"SELECT wrapping_key_id, count(*) AS n FROM {t} "  # noqa: S608
        "WHERE live AND wrapping_key_id = ANY($1::text[]) GROUP BY wrapping_key_id",
    }


class PostgresSubjectKeyStore(SubjectKeyStore):
    """Subject keys in ``<schema>.subject_keys``, over the key store's pool."""

    name = "postgres"

    def __init__(self, keystore: PostgresKeyStore) -> None:
        self._keystore = keystore
        self._sql = _statements(keystore.schema)
        self._where = f"PostgreSQL subject-key store (schema {keystore.schema!r})"
        self._migrated = False

    def __repr__(self) -> str:
        return f"<PostgresSubjectKeyStore schema={self._keystore.schema!r}>"

    async def _pool(self) -> Any:
        pool = await self._keystore._ready()
        if not self._migrated:
            from .postgres import _lock_id

            with self._keystore._translate("create the subject-key table"):
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock($1)",
                        _lock_id("migrate", self._keystore.schema),
                    )
                    await conn.execute(self._sql["migrate"])
            self._migrated = True
        return pool

    async def open(self) -> None:
        await self._pool()

    async def migrate(self) -> None:
        """Create the table (what ``open`` does on first use)."""
        self._migrated = False
        await self._pool()

    async def _fetchval(self, action: str, statement: str, *args: Any) -> Any:
        pool = await self._pool()
        with self._keystore._translate(action):
            return await pool.fetchval(self._sql[statement], *args)

    def _parse(self, raw: str | None) -> SubjectKeyRecord | None:
        return None if raw is None else SubjectKeyRecord.from_json(raw, self._where)

    async def find(self, lookup: str) -> SubjectKeyRecord | None:
        return self._parse(await self._fetchval("find a subject key", "find", lookup))

    async def get(self, key_id: str) -> SubjectKeyRecord | None:
        return self._parse(await self._fetchval("read a subject key", "get", key_id))

    async def insert(self, record: SubjectKeyRecord) -> SubjectKeyRecord:
        await self.insert_many([record])
        found = await self.find(record.lookup)
        return record if found is None else found

    async def insert_many(self, records: Sequence[SubjectKeyRecord]) -> int:
        pool = await self._pool()
        with self._keystore._translate("insert subject keys"):
            status = await pool.execute(
                self._sql["insert"],
                [r.key_id for r in records],
                [r.lookup for r in records],
                [r.wrapping_key_id for r in records],
                [True] * len(records),
                [r.to_json() for r in records],
            )
        return int(status.split()[-1])

    async def forget(
        self, lookup: str, record: SubjectKeyRecord | None, tombstone: SubjectKeyRecord | None
    ) -> None:
        pool = await self._pool()
        with self._keystore._translate("forget a subject key"):
            async with pool.acquire() as conn, conn.transaction():
                if record is not None:
                    marker = record.forgotten()
                    await conn.execute(
                        self._sql["forget"], record.key_id, record.wrapping_key_id, marker.to_json()
                    )
                if tombstone is not None:
                    await conn.execute(
                        self._sql["insert"],
                        [_TOMBSTONE_ID + lookup],
                        [lookup],
                        [""],
                        [False],
                        [tombstone.to_json()],
                    )

    async def rewrap(self, records: Sequence[SubjectKeyRecord], previous: str) -> int:
        if not records:
            return 0
        pool = await self._pool()
        with self._keystore._translate("rewrap subject keys"):
            status = await pool.execute(
                self._sql["rewrap"],
                [r.key_id for r in records],
                [r.wrapping_key_id for r in records],
                [r.to_json() for r in records],
                previous,
            )
        return int(status.split()[-1])

    async def wrapped_by(
        self, wrapping_key_id: str, *, after: str = "", limit: int = 1000
    ) -> list[SubjectKeyRecord]:
        pool = await self._pool()
        with self._keystore._translate("page through subject keys"):
            rows = await pool.fetch(self._sql["wrapped_by"], wrapping_key_id, after, limit)
        return [SubjectKeyRecord.from_json(row["record"], self._where) for row in rows]

    async def census(self, wrapping_key_ids: Iterable[str]) -> dict[str, int]:
        ids = list(wrapping_key_ids)
        counts = dict.fromkeys(ids, 0)
        pool = await self._pool()
        with self._keystore._translate("count subject keys"):
            rows = await pool.fetch(self._sql["census"], ids)
        counts.update({row["wrapping_key_id"]: int(row["n"]) for row in rows})
        return counts
