"""An append-only, hash-chained audit table in PostgreSQL (``aiocrypt[postgres]``).

Each row stores ``hash = H(prev_hash || canonical(seq, at, event, key_id, key_type,
details))`` with H = HMAC-SHA256 under ``hmac_key`` ("hmac" mode) or plain SHA-256
("sha256" mode). Rows are numbered 1, 2, 3... without gaps under a
transaction-scoped advisory lock. A one-row head table holds the last (seq, hash)
and the chain's mode; in hmac mode the head also carries a MAC over (mode, seq,
hash) under a key derived from ``hmac_key``, rewritten in the same transaction as
each row. ``verify()`` recomputes the chain and reports an edited row, a deleted
or inserted row (gap or broken link), a removed tail (the chain ends before the
authenticated head), a head that fails its MAC, and a mode that does not match
the key it was given.

What holds against someone who can write the database but does not hold
``hmac_key``: they cannot edit, insert or reorder rows, cut rows off the end
(the head's MAC covers the row count and the last hash, and they cannot mint a
new one), relabel the table "sha256" or strip its mode record (a verifier with
the key insists on an authenticated hmac head). They can still put back a
complete older state of the table (an old head with its rows, copied earlier) or
drop both tables. Against that, a running sink remembers the highest row it wrote
or verified, and ``verify(anchor=...)`` checks a head recorded elsewhere
(``AuditVerification.head``). Without ``hmac_key`` the chain only detects edits
by someone who does not recompute it: whoever can write the table can rewrite its
tail and the head.

Tables written before heads were authenticated (no ``mode`` column) keep working:
a sink appends to them as before, with a warning, until ``upgrade()`` (``aiocrypt
audit upgrade``), the one-time explicit step, verifies the chain and MACs its
head. It is not done on open, because a sink that authenticated whatever head it
found would authenticate a head an attacker had cut back and stripped of its mode.

Just over 500 lines: the chain's writer, its verifier and the one-time
upgrade must agree byte for byte on what is hashed and MAC'd, so they stay
together.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Postgres audit sink needs asyncpg: pip install 'aiocrypt[postgres]'"
    ) from exc

from .._errors import AiocryptError
from ._auditor import AuditEvent

__all__ = ["AuditAnchor", "AuditChainError", "AuditVerification", "ChainMode", "PostgresAuditSink"]

ChainMode = Literal["hmac", "sha256"]

_log = logging.getLogger("aiocrypt")

_GENESIS: Final = b"\x00" * 32
_NAME_RE: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_HEAD_KEY_LABEL: Final = b"aiocrypt/audit/head-key/v1"
_HEAD_MAC_LABEL: Final = b"aiocrypt/audit/head/v1\x00"
#: Per-row "modified" lines kept in a report before the rest is only counted.
_MAX_ROW_PROBLEMS: Final = 20
_ROWS_SQL: Final = (
    "SELECT seq, at, event, key_id, key_type, details::text AS details, "
    "prev_hash, hash FROM {table}"
)


class AuditChainError(AiocryptError):
    """The audit table cannot be extended safely: its head failed authentication,
    went backwards, or its mode does not match the sink's key. Run ``aiocrypt audit
    verify`` and look at the table before appending to it again."""


def _payload(
    seq: int, at: _dt.datetime, event: str, key_id: str | None, key_type: str | None, details: Any
) -> bytes:
    return json.dumps(
        {
            "seq": seq,
            "at": at.astimezone(_dt.UTC).isoformat(),
            "event": event,
            "key_id": key_id,
            "key_type": key_type,
            "details": details,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    ).encode("utf-8")


@dataclass(frozen=True, slots=True)
class AuditAnchor:
    """A row number and its hash: the end of the chain at some moment.

    Copy ``AuditVerification.head`` somewhere the database's writers cannot reach
    (a log, a ticket); ``verify(anchor=...)`` then shows the table was not rolled
    back past it. Written as ``SEQ:HEX``.
    """

    seq: int
    digest: bytes

    def __str__(self) -> str:
        return f"{self.seq}:{self.digest.hex()}"

    @classmethod
    def parse(cls, text: str) -> AuditAnchor:
        seq, sep, digest = text.strip().partition(":")
        try:
            anchor = cls(int(seq), bytes.fromhex(digest))
        except ValueError:
            anchor = cls(-1, b"")
        if not sep or anchor.seq < 0 or len(anchor.digest) != 32:
            raise ValueError("an audit anchor is SEQ:HEX (a row number and its 64-digit hash)")
        return anchor


@dataclass
class AuditVerification:
    """What ``verify()`` found.

    ``mode`` is the mode the chain was checked in; ``head`` the end of the chain
    (record it elsewhere to detect a later rollback); ``warnings`` are limits of
    this check that are not evidence of tampering.
    """

    ok: bool
    rows: int
    problems: list[str] = field(default_factory=list)
    mode: ChainMode | None = None
    head: AuditAnchor | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Head:
    seq: int
    digest: bytes
    mode: str | None  # None: a table of the old layout (or one whose mode was stripped)
    mac: bytes | None


class PostgresAuditSink:
    """Audit events as hash-chained rows; ``verify()`` detects edits, deletions and truncation."""

    def __init__(
        self,
        pool_or_dsn: asyncpg.Pool | str,
        *,
        table: str = "aiocrypt_audit",
        hmac_key: bytes | None = None,
    ) -> None:
        if not _NAME_RE.fullmatch(table):
            raise ValueError("table must be a plain lower-case SQL identifier")
        if hmac_key is not None and len(hmac_key) < 16:
            raise ValueError("hmac_key must be at least 16 bytes")
        self._dsn = pool_or_dsn if isinstance(pool_or_dsn, str) else None
        self._pool: asyncpg.Pool | None = None if isinstance(pool_or_dsn, str) else pool_or_dsn
        self._owns_pool = isinstance(pool_or_dsn, str)
        self.table = table
        self._hmac_key = hmac_key
        self._head_key = (
            None
            if hmac_key is None
            else hmac.new(hmac_key, _HEAD_KEY_LABEL, hashlib.sha256).digest()
        )
        self.mode: ChainMode = "sha256" if hmac_key is None else "hmac"
        #: The highest row this sink wrote or saw verified: a head below it is a rollback.
        self._high_water = 0
        #: Appending to a table of the old layout (unauthenticated head) until upgrade().
        self._legacy = False
        self._ready = False

    def __repr__(self) -> str:
        return f"<PostgresAuditSink table={self.table!r} mode={self.mode}>"

    # -- the row hash and the head MAC ----------------------------------------------

    def _digest(self, prev: bytes, payload: bytes) -> bytes:
        if self._hmac_key is not None:
            return hmac.new(self._hmac_key, prev + payload, hashlib.sha256).digest()
        return hashlib.sha256(prev + payload).digest()

    def _row_digest(self, row: asyncpg.Record) -> bytes:
        return self._digest(
            bytes(row["prev_hash"]),
            _payload(
                row["seq"],
                row["at"],
                row["event"],
                row["key_id"],
                row["key_type"],
                json.loads(row["details"]),
            ),
        )

    def _head_mac(self, seq: int, digest: bytes) -> bytes | None:
        if self._head_key is None:
            return None
        body = json.dumps(
            {"mode": self.mode, "seq": seq, "hash": digest.hex()},
            sort_keys=True,
            separators=(",", ":"),
        ).encode("ascii")
        return hmac.new(self._head_key, _HEAD_MAC_LABEL + body, hashlib.sha256).digest()

    def _head_problem(self, head: _Head) -> str | None:
        """Why ``head`` (which records a mode) cannot be trusted by this sink, or None."""
        if head.mode != self.mode:
            if self.mode == "hmac":
                return (
                    f"the table is marked {head.mode!r} but an HMAC key was given: the "
                    "wrong table, or its mode record was changed (a downgrade)"
                )
            return (
                "the table is an HMAC chain: verify it with its key "
                "(aiocrypt audit verify --hmac-key-env NAME)"
            )
        if self.mode == "hmac":
            expected = self._head_mac(head.seq, head.digest)
            assert expected is not None
            if head.mac is None or not hmac.compare_digest(expected, head.mac):
                return (
                    "the head record is not authentic (its MAC does not verify under "
                    "this key): it was edited, or the key is wrong"
                )
        return None

    # -- connection and tables ------------------------------------------------------

    async def _connect(self) -> asyncpg.Pool:
        if self._pool is None:
            assert self._dsn is not None
            self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4)
        return self._pool

    async def open(self) -> None:
        """Create the tables, or check the head of existing ones (see the module doc)."""
        if self._ready:
            return
        pool = await self._connect()
        t = self.table
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", t)
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
                ALTER TABLE {t}_head ADD COLUMN IF NOT EXISTS mode text,
                                     ADD COLUMN IF NOT EXISTS mac bytea;
            """)
            head = await self._read_head(conn, lock=True)
            if head is None:
                if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {t})"):
                    raise AuditChainError(
                        f"audit table {t} has rows but no head record: it was tampered "
                        "with; run 'aiocrypt audit verify' before appending to it"
                    )
                await self._write_head(conn, 0, _GENESIS)
            else:
                self._accept(head, opening=True)
        self._ready = True

    def _accept(self, head: _Head, *, opening: bool = False) -> None:
        """Check ``head`` before appending after it; raise ``AuditChainError`` if it fails."""
        if head.mode is None:
            if not (opening or self._legacy):
                raise AuditChainError(
                    f"audit table {self.table}: the mode record of its head "
                    "was removed while this sink was writing to it"
                )
            if not self._legacy:
                _log.warning(
                    "audit table %s has an unauthenticated head (the old layout, or "
                    "its mode record was removed): check it with 'aiocrypt audit "
                    "verify', then run 'aiocrypt audit upgrade' once",
                    self.table,
                )
            self._legacy = True
        else:
            problem = self._head_problem(head)
            if problem is not None:
                raise AuditChainError(f"audit table {self.table}: {problem}")
            self._legacy = False
        if head.seq < self._high_water:
            raise AuditChainError(
                f"audit table {self.table}: its head went back from row {self._high_water} "
                f"to row {head.seq}: rows were removed and an older head restored"
            )
        self._high_water = head.seq

    async def _read_head(self, conn: asyncpg.Connection, *, lock: bool = False) -> _Head | None:
        # to_jsonb: a head table of the old layout has no mode / mac columns
        text = await conn.fetchval(
            f"SELECT to_jsonb(h)::text FROM {self.table}_head h "
            f"WHERE id = 1{' FOR UPDATE' if lock else ''}"
        )
        if text is None:
            return None
        data = json.loads(text)

        def raw(value: str | None) -> bytes | None:
            return None if value is None else bytes.fromhex(value.removeprefix("\\x"))

        return _Head(
            int(data["seq"]), raw(data["hash"]) or b"", data.get("mode"), raw(data.get("mac"))
        )

    async def _write_head(self, conn: asyncpg.Connection, seq: int, digest: bytes) -> None:
        await conn.execute(
            f"INSERT INTO {self.table}_head (id, seq, hash, mode, mac) VALUES (1, $1, $2, $3, $4)"
            " ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash,"
            " mode = EXCLUDED.mode, mac = EXCLUDED.mac",
            seq,
            digest,
            None if self._legacy else self.mode,
            None if self._legacy else self._head_mac(seq, digest),
        )
        self._high_water = max(self._high_water, seq)

    async def close(self) -> None:
        if self._owns_pool and self._pool is not None:
            await self._pool.close()
            self._pool = None
        self._ready = False

    # -- writing --------------------------------------------------------------------

    async def emit(self, event: AuditEvent) -> None:
        await self.open()
        assert self._pool is not None
        details = json.loads(json.dumps(dict(event.details), default=str))
        at = event.at.astimezone(_dt.UTC)
        t = self.table
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", t)
            head = await self._read_head(conn, lock=True)
            if head is None:
                raise AuditChainError(
                    f"audit table {t}: the head record is missing; run "
                    "'aiocrypt audit verify' before appending to it"
                )
            self._accept(head)
            seq = head.seq + 1
            digest = self._digest(
                head.digest, _payload(seq, at, event.event, event.key_id, event.key_type, details)
            )
            await conn.execute(
                f"INSERT INTO {t} (seq, at, event, key_id, key_type, details, prev_hash, hash)"
                " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)",
                seq,
                at,
                event.event,
                event.key_id,
                event.key_type,
                json.dumps(details),
                head.digest,
                digest,
            )
            await self._write_head(conn, seq, digest)

    async def upgrade(self) -> AuditVerification:
        """Authenticate the head of a table of the old layout: a one-time, explicit step.

        The whole chain is verified first, in this sink's mode, and nothing is
        written if it fails. What this trusts: the rows and the unkeyed head as they
        are now (a tail cut before the upgrade, with the old head fixed to match,
        goes unseen). The upgrade is recorded in the chain as an
        ``audit_chain_upgraded`` event. A table whose head is already authenticated
        is only verified.
        """
        await self.open()
        assert self._pool is not None
        t = self.table
        adopted: int | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", t)
            head = await self._read_head(conn, lock=True)
            # False for a table whose head is authenticated already
            # (test_upgrade_of_an_authenticated_table_only_verifies); CPython 3.11 reports
            # that jump as one to the block's last line, so coverage cannot record it
            if head is not None and head.mode is None:  # pragma: no branch - CPython 3.11 jump
                check = AuditVerification(True, 0, mode=self.mode)
                last, _ = await self._check_rows(conn, check, None)
                self._compare_head(check, head, last)
                if check.problems:
                    raise AuditChainError(
                        f"audit table {t}: not upgrading a chain that does "
                        f"not verify: {'; '.join(check.problems)}"
                    )
                self._legacy = False
                await self._write_head(conn, head.seq, head.digest)
                adopted = head.seq
        if adopted is not None:
            await self.emit(
                AuditEvent(
                    "audit_chain_upgraded", details={"mode": self.mode, "rows_adopted": adopted}
                )
            )
        return await self.verify()

    # -- checking -------------------------------------------------------------------

    async def verify(self, *, anchor: AuditAnchor | None = None) -> AuditVerification:
        """Recompute the whole chain; ``ok`` is False with a reason per problem found.

        Read-only (a table of the old layout is checked, not upgraded). ``anchor``,
        a head recorded earlier, must still be in the chain.
        """
        pool = await self._connect()
        t = self.table
        result = AuditVerification(True, 0, mode=self.mode)
        async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            if not await conn.fetchval(
                "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL", t, f"{t}_head"
            ):
                result.problems.append(f"the audit table {t} (or {t}_head) does not exist")
                result.ok = False
                return result
            head = await self._read_head(conn)
            if head is not None and head.mode is not None:
                problem = self._head_problem(head)
                if problem is not None and head.mode != self.mode:
                    # every row checked in the wrong mode would only bury this line
                    result.problems.append(problem)
                    result.ok = False
                    return result
                if problem is not None:
                    result.problems.append(problem)
            elif head is not None and self.mode == "hmac":
                result.problems.append(
                    "the head is not authenticated: a table of the old layout (run 'aiocrypt "
                    "audit upgrade' once) or its mode record was removed"
                )
            elif head is not None:
                result.warnings.append(
                    "the head is not authenticated (a table of the old "
                    "layout; run 'aiocrypt audit upgrade' once)"
                )
            last, anchored = await self._check_rows(conn, result, anchor)
        self._compare_head(result, head, last)
        if anchor is not None and not anchored:
            result.problems.append(
                f"the anchored row {anchor.seq} is not in the chain as "
                "recorded: the table was rolled back or rewritten"
            )
        end = last.seq if head is None else head.seq
        if end < self._high_water:
            result.problems.append(
                f"the table ends at row {end} but this sink has seen "
                f"row {self._high_water}: it was rolled back"
            )
        if self.mode == "sha256":
            result.warnings.append(
                "a SHA-256 chain is not keyed: whoever can write the table "
                "can rewrite its tail and head consistently"
            )
        result.head = last
        result.ok = not result.problems
        if result.ok:
            self._high_water = max(self._high_water, last.seq)
        return result

    async def _check_rows(
        self, conn: asyncpg.Connection, result: AuditVerification, anchor: AuditAnchor | None
    ) -> tuple[AuditAnchor, bool]:
        """Walk the rows into ``result``; the last (seq, hash) and whether ``anchor`` matched."""
        expected_seq, prev, modified = 1, _GENESIS, []
        anchored = anchor is not None and anchor.seq == 0 and anchor.digest == _GENESIS
        async for row in conn.cursor(_ROWS_SQL.format(table=self.table) + " ORDER BY seq"):
            result.rows += 1
            seq, digest = row["seq"], bytes(row["hash"])
            if seq != expected_seq:
                result.problems.append(f"row {expected_seq} is missing (next row is {seq})")
            if bytes(row["prev_hash"]) != prev:
                result.problems.append(f"row {seq} does not link to the row before it")
            if self._row_digest(row) != digest:
                modified.append(seq)
            if anchor is not None and seq == anchor.seq:
                anchored = hmac.compare_digest(digest, anchor.digest)
            expected_seq, prev = seq + 1, digest
        if len(modified) > 1 and len(modified) == result.rows:
            result.problems.append(
                f"no row verifies in {self.mode} mode: the wrong HMAC key (or none given for "
                "an HMAC chain), or every row was rewritten"
            )
        else:
            result.problems += [
                f"row {s} was modified (hash mismatch)" for s in modified[:_MAX_ROW_PROBLEMS]
            ]
            if len(modified) > _MAX_ROW_PROBLEMS:
                result.problems.append(
                    f"... and {len(modified) - _MAX_ROW_PROBLEMS} more modified rows"
                )
        return AuditAnchor(expected_seq - 1, prev), anchored

    @staticmethod
    def _compare_head(result: AuditVerification, head: _Head | None, last: AuditAnchor) -> None:
        if head is None:  # open() writes it with the tables: only removing it leaves none
            result.problems.append("the head record is missing")
        elif head.seq > last.seq:
            result.problems.append(
                f"the chain ends at row {last.seq} but the head says "
                f"{head.seq}: rows were removed from the end"
            )
        elif head.seq < last.seq:
            result.problems.append(
                f"the chain goes on to row {last.seq} past the head at "
                f"row {head.seq}: rows were appended outside the sink"
            )
        elif head.digest != last.digest:
            result.problems.append(f"the last row {last.seq} is not the row the head records")
