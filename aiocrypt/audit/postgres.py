"""An append-only, hash-chained audit table in PostgreSQL (``aiocrypt[postgres]``).

Each row stores ``hash = H(prev_hash || canonical(seq, at, event, key_id, key_type,
details))`` with H = SHA-256, or HMAC-SHA256 under ``hmac_key`` when given. Rows
are numbered 1, 2, 3... without gaps under a transaction-scoped advisory lock,
and a one-row head table holds the last (seq, hash). ``verify()`` recomputes the
chain and reports an edited row (hash mismatch), a deleted or inserted row (gap
or broken link) and a removed tail (head mismatch).

Limits, stated plainly: with plain SHA-256 someone who can rewrite the whole
table and its head can forge a consistent chain; use ``hmac_key`` (kept out of
the database) or copy the head hash somewhere else (a log, a ticket) regularly.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the Postgres audit sink needs asyncpg: pip install 'aiocrypt[postgres]'") \
        from exc

from ._auditor import AuditEvent

__all__ = ["AuditVerification", "PostgresAuditSink"]

_GENESIS: Final = b"\x00" * 32
_NAME_RE: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _payload(seq: int, at: _dt.datetime, event: str, key_id: str | None, key_type: str | None,
             details: Any) -> bytes:
    return json.dumps(
        {"seq": seq, "at": at.astimezone(_dt.UTC).isoformat(), "event": event,
         "key_id": key_id, "key_type": key_type, "details": details},
        sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")


@dataclass
class AuditVerification:
    """What ``verify()`` found."""

    ok: bool
    rows: int
    problems: list[str] = field(default_factory=list)


class PostgresAuditSink:
    """Audit events as hash-chained rows; ``verify()`` detects edits and deletions."""

    def __init__(self, pool_or_dsn: asyncpg.Pool | str, *, table: str = "aiocrypt_audit",
                 hmac_key: bytes | None = None) -> None:
        if not _NAME_RE.fullmatch(table):
            raise ValueError("table must be a plain lower-case SQL identifier")
        self._dsn = pool_or_dsn if isinstance(pool_or_dsn, str) else None
        self._pool: asyncpg.Pool | None = None if isinstance(pool_or_dsn, str) else pool_or_dsn
        self._owns_pool = isinstance(pool_or_dsn, str)
        self.table = table
        self._hmac_key = hmac_key
        self._ready = False

    def __repr__(self) -> str:
        return f"<PostgresAuditSink table={self.table!r}>"

    def _digest(self, prev: bytes, payload: bytes) -> bytes:
        if self._hmac_key is not None:
            return hmac.new(self._hmac_key, prev + payload, hashlib.sha256).digest()
        return hashlib.sha256(prev + payload).digest()

    async def open(self) -> None:
        if self._ready:
            return
        if self._pool is None:
            assert self._dsn is not None
            self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4)
        t = self.table
        async with self._pool.acquire() as conn:
            await conn.execute(f"""
                CREATE TABLE IF NOT EXISTS {t} (
                    seq bigint PRIMARY KEY,
                    at timestamptz NOT NULL,
                    event text NOT NULL,
                    key_id text,
                    key_type text,
                    details jsonb NOT NULL,
                    prev_hash bytea NOT NULL,
                    hash bytea NOT NULL);
                CREATE TABLE IF NOT EXISTS {t}_head (
                    id int PRIMARY KEY CHECK (id = 1),
                    seq bigint NOT NULL,
                    hash bytea NOT NULL);
            """)
        self._ready = True

    async def close(self) -> None:
        if self._owns_pool and self._pool is not None:
            await self._pool.close()
            self._pool = None
        self._ready = False

    async def emit(self, event: AuditEvent) -> None:
        await self.open()
        assert self._pool is not None
        details = json.loads(json.dumps(dict(event.details), default=str))
        at = event.at.astimezone(_dt.UTC)
        t = self.table
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", t)
            head = await conn.fetchrow(f"SELECT seq, hash FROM {t}_head WHERE id = 1")
            seq = 1 if head is None else head["seq"] + 1
            prev = _GENESIS if head is None else bytes(head["hash"])
            digest = self._digest(prev, _payload(seq, at, event.event, event.key_id,
                                                 event.key_type, details))
            await conn.execute(
                f"INSERT INTO {t} (seq, at, event, key_id, key_type, details, prev_hash, hash)"
                " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)",
                seq, at, event.event, event.key_id, event.key_type,
                json.dumps(details), prev, digest)
            await conn.execute(
                f"INSERT INTO {t}_head (id, seq, hash) VALUES (1, $1, $2) "
                "ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash",
                seq, digest)

    async def verify(self) -> AuditVerification:
        """Recompute the whole chain; ``ok`` is False with a reason per problem found."""
        await self.open()
        assert self._pool is not None
        problems: list[str] = []
        expected_seq, prev, rows = 1, _GENESIS, 0
        t = self.table
        async with self._pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            head = await conn.fetchrow(f"SELECT seq, hash FROM {t}_head WHERE id = 1")
            async for row in conn.cursor(
                    f"SELECT seq, at, event, key_id, key_type, details::text AS details, "
                    f"prev_hash, hash FROM {t} ORDER BY seq"):
                rows += 1
                seq = row["seq"]
                if seq != expected_seq:
                    problems.append(f"row {expected_seq} is missing (next row is {seq})")
                if bytes(row["prev_hash"]) != prev:
                    problems.append(f"row {seq} does not link to the row before it")
                digest = self._digest(bytes(row["prev_hash"]), _payload(
                    seq, row["at"], row["event"], row["key_id"], row["key_type"],
                    json.loads(row["details"])))
                if digest != bytes(row["hash"]):
                    problems.append(f"row {seq} was modified (hash mismatch)")
                expected_seq, prev = seq + 1, bytes(row["hash"])
        if head is None:
            if rows:
                problems.append("the head record is missing")
        elif head["seq"] != expected_seq - 1 or bytes(head["hash"]) != prev:
            problems.append(f"the chain ends at row {expected_seq - 1} but the head says "
                            f"{head['seq']}: rows were removed from the end")
        return AuditVerification(not problems, rows, problems)
