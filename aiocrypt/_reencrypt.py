"""The re-encryption engine (DESIGN.md section 5): move stored tokens onto the active keys.

A run walks one table in primary-key order (keyset pagination, never OFFSET)
and only ever reads rows that still need work: the format version and key id
sit at a fixed place in every text token, so ``substr(col, 1, n) <> 'ac2.<target
key id>.'`` selects them in SQL without decrypting anything: rows on an old key,
and rows on the target key still in format version 1 (``ac1.``), which a run
moves to version 2. Each batch is re-encrypted in
memory and written back with one statement that changes a column only while
it still holds the token that was read (compare-and-swap): a value an
application wrote in the meantime is never overwritten. The batch's
checkpoint (last primary key, counters) is written in the same transaction,
so a run killed at any point resumes exactly after the last committed batch.

A pass ends at the end of the table (or shard); the run then starts a new pass
from the beginning, which finds nothing unless a concurrent writer left a row
on an old key. Several workers share a table by primary-key range
(:class:`KeyRange`, :meth:`ReencryptionEngine.plan_shards`), each with its own
checkpoint.

Everything a job needs to name is an identifier (table, column, key type,
range), so a queued job (ARQ) carries no plaintext and no key material::

    engine = ReencryptionEngine(key_manager, AsyncpgDatabase(dsn), tables=specs)
    result = await engine.reencrypt("users", key_type="pii", shard=(0, 500_000))

The database sits behind :class:`ReencryptionDatabase`; :class:`AsyncpgDatabase`
is the fast Postgres implementation (``UPDATE ... FROM unnest(...)``, reads and
writes overlapped on two connections). ``aiocrypt.integrations.sqlalchemy``
adds one for any SQLAlchemy async engine and finds the specs in model metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import hashlib
import inspect
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, Literal, Protocol

from . import _compression
from ._codec import NaiveDateTime, encode_value
from ._crypto import NONCE_BYTES, DataKey
from ._errors import DecryptionError, DecryptionFailure, ReencryptionError
from ._format import FLAG_ZSTD, TEXT_PREFIXES, context_bytes, text_prefix, token_sql
from ._keyring import Keyring, UnknownKeyError
from ._legacy import LegacyReader
from ._manager import KeyManager
from ._types import KeyType, KeyTypeLike

__all__ = [
    "CHECKPOINT_COLUMNS",
    "DEFAULT_CHECKPOINT_TABLE",
    "LEGACY_TYPES",
    "TableCensus",
    "Checkpoint",
    "ColumnSpec",
    "KeyRange",
    "ReencryptionDatabase",
    "ReencryptionEngine",
    "ReencryptionError",
    "ReencryptionProgress",
    "ReencryptionResult",
    "TableSpec",
    "WriteBatch",
    "census_from_rows",
    "census_sql",
    "checkpoint_ddl",
    "checkpoint_from_row",
    "parse_legacy",
    "pending_condition",
    "quote_identifier",
    "row_context",
]

logger = logging.getLogger("aiocrypt.reencrypt")

DEFAULT_CHECKPOINT_TABLE: Final = "aiocrypt_reencrypt_checkpoints"
_IDENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")


def quote_identifier(name: str) -> str:
    """``"schema"."table"`` for a plain (optionally schema-qualified) SQL name; refuses others."""
    parts = name.split(".")
    if not 1 <= len(parts) <= 2 or not all(_IDENT_RE.fullmatch(p) for p in parts):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return ".".join(f'"{p}"' for p in parts)


# SQL in this module is built with f-strings from names that passed quote_identifier()
# (plain identifiers only) and integers; every value travels as a bind parameter.

# -- values stored before encryption was turned on ------------------------------


def _parse_bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "t", "true", "y", "yes", "on"):
        return True
    if low in ("0", "f", "false", "n", "no", "off"):
        return False
    raise ValueError("not a boolean")


def _parse_bytes(raw: str) -> bytes:
    # Postgres renders bytea as text in hex form ("\x4869"); anything else is UTF-8.
    if raw.startswith("\\x"):
        return bytes.fromhex(raw[2:])
    return raw.encode("utf-8")


def _parse_datetime(raw: str) -> _dt.datetime:
    value = _dt.datetime.fromisoformat(raw.strip())
    # Legacy naive timestamps are taken as UTC: the codec only stores aware ones.
    return value if value.tzinfo is not None else value.replace(tzinfo=_dt.UTC)


def _parse_date(raw: str) -> _dt.date:
    return _dt.date.fromisoformat(raw.strip()[:10])


def _parse_naive_datetime(raw: str) -> _dt.datetime:
    # a naive column keeps the application's clock: an offset would be dropped, so no
    value = _dt.datetime.fromisoformat(raw.strip())
    if value.tzinfo is not None:
        raise ValueError("an aware timestamp in a naive column")
    return NaiveDateTime.combine(value.date(), value.time())


_INTERVAL_RE: Final = re.compile(
    r"(?:(?P<days>-?\d+) days?,? ?)?(?P<sign>-)?(?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d(?:\.\d{1,6})?)")


def _parse_timedelta(raw: str) -> _dt.timedelta:
    # str(timedelta) ("1 day, 2:03:04.5"), Postgres interval text ("1 day 02:03:04"),
    # or a number of seconds
    text = raw.strip()
    match = _INTERVAL_RE.fullmatch(text)
    if match is None:
        return _dt.timedelta(seconds=float(text))
    clock = _dt.timedelta(hours=int(match["h"]), minutes=int(match["m"]),
                          seconds=float(match["s"]))
    return _dt.timedelta(days=int(match["days"] or 0)) + (-clock if match["sign"] else clock)


_LEGACY_PARSERS: Final[Mapping[str, Callable[[str], Any]]] = {
    "str": str,
    "bytes": _parse_bytes,
    "int": lambda raw: int(raw.strip()),
    "float": lambda raw: float(raw.strip()),
    "decimal": lambda raw: Decimal(raw.strip()),
    "bool": _parse_bool,
    "date": _parse_date,
    "datetime": _parse_datetime,
    "json": json.loads,
    "uuid": lambda raw: uuid.UUID(raw.strip()),
    "time": lambda raw: _dt.time.fromisoformat(raw.strip()),
    "timedelta": _parse_timedelta,
    "naive_datetime": _parse_naive_datetime,
}
_LEGACY_PYTHON_TYPES: Final[Mapping[str, type | tuple[type, ...]]] = {
    "str": str, "bytes": bytes, "int": int, "float": float, "decimal": Decimal,
    "bool": bool, "date": _dt.date, "datetime": _dt.datetime, "json": (dict, list),
    "uuid": uuid.UUID, "time": _dt.time, "timedelta": _dt.timedelta,
    "naive_datetime": _dt.datetime,
}
LEGACY_TYPES: Final = frozenset(_LEGACY_PARSERS)
"""Value types a column may hold as plaintext from before encryption (``legacy_type``)."""


def parse_legacy(value_type: str, raw: Any) -> Any:
    """A plaintext value stored before encryption, as the Python type the column holds.

    ``raw`` is what the driver returned (usually text: ``"50000.0"``, ``"t"``,
    ``"2024-01-31"``, JSON). Raises ``ValueError`` when it does not parse.
    """
    parser = _LEGACY_PARSERS.get(value_type)
    if parser is None:
        raise ValueError(f"unknown legacy value type {value_type!r}; use one of "
                         f"{sorted(LEGACY_TYPES)}")
    expected = _LEGACY_PYTHON_TYPES[value_type]
    if isinstance(raw, expected) and not (value_type == "int" and isinstance(raw, bool)):
        if value_type == "naive_datetime" and isinstance(raw, _dt.datetime):
            return _parse_naive_datetime(raw.isoformat())
        if isinstance(raw, _dt.datetime) and raw.tzinfo is None:
            return raw.replace(tzinfo=_dt.UTC)
        return raw
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw).decode("utf-8")
    if value_type == "float" and isinstance(raw, (int, Decimal)):
        return float(raw)
    if value_type == "decimal" and isinstance(raw, (int, float)):
        return Decimal(str(raw))
    if value_type == "bool" and isinstance(raw, int):
        return bool(raw)
    if value_type == "date" and isinstance(raw, _dt.datetime):
        return raw.date()
    try:
        return parser(raw if isinstance(raw, str) else str(raw))
    except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:  # deep JSON
        raise ValueError(f"stored plaintext is not a valid {value_type}") from exc


# -- what to re-encrypt ---------------------------------------------------------


def row_context(context: str, primary_key: Any) -> str:
    """The context a row-bound value is sealed under: ``"<context>#<primary key>"``.

    The primary key is rendered with ``str()`` (``8`` -> ``"8"``, a UUID in its
    dashed form), as ``CAST(pk AS TEXT)`` renders integer, text and (Postgres)
    uuid keys: the column types read it that way and the engine writes it so.
    """
    return f"{context}#{primary_key}"


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """One encrypted text column: its key type and the context its tokens are bound to.

    ``context`` defaults to ``"<table>.<column>"`` (what the SQLAlchemy column
    types use). ``row_bound`` appends ``"#<primary key>"`` to it. ``legacy_type``
    (one of :data:`LEGACY_TYPES`) lets the column still hold plaintext from
    before encryption, which a run encrypts (the online migration).
    ``legacy_reader`` names a :class:`~aiocrypt._legacy.LegacyReader` given to the
    engine (``legacy_readers=``): the column then holds another tool's ciphertext
    (sqlalchemy-utils, Fernet) instead of plaintext, opened by that reader and
    parsed as ``legacy_type``. A job carries the name only, never the reader's key.
    """

    name: str
    key_type: KeyType
    context: str | None = None
    deterministic: bool = False
    row_bound: bool = False
    legacy_type: str | None = None
    legacy_reader: str | None = None

    def __post_init__(self) -> None:
        quote_identifier(self.name)
        object.__setattr__(self, "key_type", KeyType(self.key_type))
        if self.legacy_type is not None and self.legacy_type not in LEGACY_TYPES:
            raise ValueError(f"unknown legacy_type {self.legacy_type!r}; use one of "
                             f"{sorted(LEGACY_TYPES)}")
        if self.legacy_reader is not None and self.legacy_type is None:
            raise ValueError(f"column {self.name}: legacy_reader needs the legacy_type its "
                             "plaintext parses as")

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "key_type": self.key_type.value, "context": self.context,
                "deterministic": self.deterministic, "row_bound": self.row_bound,
                "legacy_type": self.legacy_type}
        if self.legacy_reader is not None:  # absent otherwise: job ids stay as they were
            data["legacy_reader"] = self.legacy_reader
        return data


@dataclass(frozen=True, slots=True)
class TableSpec:
    """A table with a single-column primary key (int, text or uuid) and its encrypted columns."""

    name: str
    primary_key: str
    columns: tuple[ColumnSpec, ...]

    def __post_init__(self) -> None:
        quote_identifier(self.name)
        quote_identifier(self.primary_key)
        object.__setattr__(self, "columns", tuple(self.columns))
        if not self.columns:
            raise ValueError(f"table {self.name}: no encrypted columns")
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names) or self.primary_key in names:
            raise ValueError(f"table {self.name}: duplicate column names")

    def context_for(self, column: ColumnSpec) -> str:
        return column.context if column.context is not None else f"{self.name}.{column.name}"

    def select(self, columns: Iterable[str] | None = None,
               key_type: KeyTypeLike | None = None) -> TableSpec:
        """The same table limited to ``columns`` and / or to columns of ``key_type``."""
        chosen = list(self.columns)
        if columns is not None:
            wanted = list(columns)
            known = {c.name: c for c in chosen}
            missing = [n for n in wanted if n not in known]
            if missing:
                raise KeyError(f"table {self.name} has no encrypted column {missing[0]!r}")
            chosen = [known[n] for n in wanted]
        if key_type is not None:
            kt = KeyType(key_type)
            chosen = [c for c in chosen if c.key_type == kt]
        if not chosen:
            raise ValueError(f"table {self.name}: no encrypted column matches the selection")
        return TableSpec(self.name, self.primary_key, tuple(chosen))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (identifiers only: safe as a job argument)."""
        return {"name": self.name, "primary_key": self.primary_key,
                "columns": [c.to_dict() for c in self.columns]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableSpec:
        return cls(data["name"], data["primary_key"],
                   tuple(ColumnSpec(**c) for c in data["columns"]))


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Primary keys ``after < pk <= until`` (either side open when None): one shard."""

    after: Any = None
    until: Any = None

    @classmethod
    def of(cls, value: KeyRange | tuple[Any, Any] | Sequence[Any] | None) -> KeyRange:
        if value is None:
            return cls()
        if isinstance(value, KeyRange):
            return value
        after, until = value
        return cls(after, until)


@dataclass(slots=True)
class Checkpoint:
    """Progress of one job as stored in the checkpoint table (one row per job id)."""

    job_id: str
    table: str
    pass_no: int = 1
    last_pk: Any = None
    batches: int = 0
    rows_read: int = 0
    rows_updated: int = 0
    rows_conflicted: int = 0
    rows_failed: int = 0
    done: bool = False

    def encoded_pk(self) -> str | None:
        return None if self.last_pk is None else json.dumps(self.last_pk, default=str)

    @staticmethod
    def decode_pk(text: str | None) -> Any:
        return None if text is None else json.loads(text)


@dataclass(slots=True)
class WriteBatch:
    """Column-major arrays for one compare-and-swap write.

    For row ``r`` and column ``i``: when ``new[i][r]`` is not None, set the column
    to it if it still holds ``old[i][r]``; otherwise leave the column alone.
    """

    pks: list[Any]
    old: list[list[Any]]
    new: list[list[str | None]]

    def __len__(self) -> int:
        return len(self.pks)


@dataclass(frozen=True, slots=True)
class TableCensus:
    """Rows per key id per column; the key ``None`` counts values that are not tokens.

    Tokens of both format versions count for their key id; ``v1_counts`` says how
    many of a column's tokens are still format version 1 (0 everywhere: readers
    may set ``accept_format_v1=False``). NULLs are not counted. A key with
    ``rows_for(key_id) == 0`` in every table that used it holds no data any more
    and may be destroyed.
    """

    table: str
    counts: Mapping[str, Mapping[str | None, int]]
    v1_counts: Mapping[str, int] = field(default_factory=dict)

    def v1_rows(self) -> int:
        """Values (over all columns) still in format version 1."""
        return sum(self.v1_counts.values())

    def rows_for(self, key_id: str | None) -> int:
        return sum(by_key.get(key_id, 0) for by_key in self.counts.values())

    def key_ids(self) -> set[str]:
        return {k for by_key in self.counts.values() for k in by_key if k is not None}

    def off_target(self, targets: Mapping[str, str]) -> int:
        """Rows (per column) not on ``targets[column]`` (key id)."""
        return sum(n for col, by_key in self.counts.items()
                   for kid, n in by_key.items() if kid != targets.get(col))


@dataclass(frozen=True, slots=True)
class ReencryptionProgress:
    """Reported after every committed batch. Counters are cumulative for the job."""

    job_id: str
    table: str
    pass_no: int
    batches: int
    rows_read: int
    rows_updated: int
    rows_conflicted: int
    rows_failed: int
    last_pk: Any
    run_batches: int
    run_rows_updated: int
    elapsed: float

    @property
    def rows_per_second(self) -> float:
        return self.run_rows_updated / self.elapsed if self.elapsed > 0 else 0.0


@dataclass(frozen=True, slots=True)
class ReencryptionResult:
    """What one run did (``run_*``) and the job's cumulative checkpoint."""

    job_id: str
    table: str
    targets: Mapping[str, str]
    run_batches: int
    run_rows_read: int
    run_rows_updated: int
    run_rows_conflicted: int
    run_rows_failed: int
    passes: int
    resumed_from: Any
    checkpoint: Checkpoint
    elapsed: float
    complete: bool
    target_changed: bool = False
    #: Each row that did not decrypt, once (the first 100), and why, per column.
    failed_primary_keys: tuple[Any, ...] = field(default=())
    failures: tuple[ReencryptionError, ...] = field(default=())

    @property
    def rows_per_second(self) -> float:
        return self.run_rows_updated / self.elapsed if self.elapsed > 0 else 0.0


ProgressCallback = Callable[[ReencryptionProgress], Awaitable[None] | None]


# -- the database side ----------------------------------------------------------


class ReencryptionDatabase(Protocol):
    """What the engine needs from a database. Implementations: :class:`AsyncpgDatabase`,
    ``aiocrypt.integrations.sqlalchemy.SQLAlchemyDatabase``.

    ``fetch_batch`` returns rows ``(pk, col_0, ..., col_n)`` in primary-key order
    with ``after < pk <= until`` where at least one column is non-NULL and does not
    start with its prefix. ``write_batch`` applies a :class:`WriteBatch` with
    compare-and-swap and upserts ``checkpoint`` in the same transaction, adding
    the rows it updated to ``rows_updated`` and the rows it did not to
    ``rows_conflicted``; it returns the number of rows updated.
    """

    supports_pipelining: bool

    async def prepare(self, table: TableSpec) -> None: ...

    async def fetch_batch(self, table: TableSpec, prefixes: Sequence[str], after: Any,
                          until: Any, limit: int) -> Sequence[Sequence[Any]]: ...

    async def write_batch(self, table: TableSpec, batch: WriteBatch,
                          checkpoint: Checkpoint) -> int: ...

    async def load_checkpoint(self, job_id: str) -> Checkpoint | None: ...

    async def save_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    async def census(self, table: TableSpec) -> TableCensus: ...

    async def boundaries(self, table: TableSpec, shards: int) -> list[Any]: ...

    async def close(self) -> None: ...


def checkpoint_ddl(table: str, *, timestamp_type: str = "TIMESTAMP") -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(table)} ("
        "job_id VARCHAR(255) PRIMARY KEY, table_name VARCHAR(255) NOT NULL, "
        "pass_no INTEGER NOT NULL, last_pk TEXT, batches BIGINT NOT NULL, "
        "rows_read BIGINT NOT NULL, rows_updated BIGINT NOT NULL, "
        "rows_conflicted BIGINT NOT NULL, rows_failed BIGINT NOT NULL, "
        f"done BOOLEAN NOT NULL, updated_at {timestamp_type} DEFAULT CURRENT_TIMESTAMP)"
    )


CHECKPOINT_COLUMNS: Final = ("job_id", "table_name", "pass_no", "last_pk", "batches",
                             "rows_read", "rows_updated", "rows_conflicted", "rows_failed",
                             "done")


def checkpoint_from_row(row: Sequence[Any]) -> Checkpoint:
    return Checkpoint(job_id=row[0], table=row[1], pass_no=int(row[2]),
                      last_pk=Checkpoint.decode_pk(row[3]), batches=int(row[4]),
                      rows_read=int(row[5]), rows_updated=int(row[6]),
                      rows_conflicted=int(row[7]), rows_failed=int(row[8]), done=bool(row[9]))


def pending_condition(table: TableSpec, prefix_params: Sequence[str]) -> str:
    """SQL true for a row with at least one column not yet on its target key."""
    parts = []
    for column, param in zip(table.columns, prefix_params, strict=True):
        col = quote_identifier(column.name)
        parts.append(f"({col} IS NOT NULL AND substr({col}, 1, length({param})) <> {param})")
    return "(" + " OR ".join(parts) + ")"


def census_sql(table: TableSpec, key_id_expr: Callable[[str], str]) -> str:
    """One query: (column index, key id or NULL for non-tokens, 1 for a format
    version 1 token else 0, rows) for every column."""
    tbl = quote_identifier(table.name)
    selects = []
    for i, column in enumerate(table.columns):
        col = quote_identifier(column.name)
        selects.append(
            f"SELECT {i} AS col, CASE WHEN {token_sql(col)} "  # noqa: S608
            f"THEN {key_id_expr(col)} END AS kid, "
            f"CASE WHEN {token_sql(col, (1,))} THEN 1 ELSE 0 END AS v1, count(*) AS n "
            f"FROM {tbl} WHERE {col} IS NOT NULL GROUP BY 2, 3")
    return " UNION ALL ".join(selects)


def census_from_rows(table: TableSpec, rows: Iterable[Sequence[Any]]) -> TableCensus:
    counts: dict[str, dict[str | None, int]] = {c.name: {} for c in table.columns}
    v1_counts: dict[str, int] = {c.name: 0 for c in table.columns}
    for col, kid, v1, n in rows:
        name = table.columns[int(col)].name
        counts[name][kid] = counts[name].get(kid, 0) + int(n)
        if int(v1):
            v1_counts[name] += int(n)
    return TableCensus(table.name, counts, v1_counts)


# -- the engine -----------------------------------------------------------------


@dataclass(slots=True)
class _Column:
    spec: ColumnSpec
    context: str
    prefix: str
    target: DataKey
    compression_level: int | None
    reader: LegacyReader | None = None


@dataclass(slots=True)
class _RunStats:
    batches: int = 0
    rows_read: int = 0
    rows_updated: int = 0
    rows_conflicted: int = 0
    rows_failed: int = 0
    failed_pks: list[Any] = field(default_factory=list)
    failures: list[ReencryptionError] = field(default_factory=list)
    #: (primary key, column) of every value that failed in this run: a row whose
    #: only pending values failed before is neither counted nor reported again.
    failed_seen: set[tuple[str, str]] = field(default_factory=set)


class ReencryptionEngine:
    """Re-encrypts stored tokens onto the active key of each column's key type.

    ``tables`` registers :class:`TableSpec` by name so a job can name a table
    only (``aiocrypt.integrations.sqlalchemy.table_specs(Base.metadata)`` finds
    them in model metadata). ``rate_limit`` caps rows per second;
    ``progress`` (sync or async) is called after each committed batch, and an
    exception it raises stops the run after that batch (resume later).
    ``on_error="skip"`` leaves a value that does not decrypt in place (counted,
    its primary key reported) instead of stopping the run. Values are
    zstd-compressed as the key manager's config says for each column's key type
    (``compression_enabled`` / ``compressed_key_types``), as the service does;
    ``compression_level`` compresses every column at that level instead.
    ``legacy_readers`` open the other tools' ciphertext of columns whose spec
    names one (``ColumnSpec.legacy_reader``), the migration off sqlalchemy-utils
    or Fernet; a spec naming a reader the engine was not given is refused.
    """

    def __init__(self, key_manager: KeyManager, database: ReencryptionDatabase, *,
                 tables: Iterable[TableSpec] = (), batch_size: int = 2000,
                 rate_limit: float | None = None, progress: ProgressCallback | None = None,
                 max_passes: int = 3, on_error: Literal["raise", "skip"] = "raise",
                 compression_level: int | None = None,
                 legacy_readers: Iterable[LegacyReader] = ()) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be a positive number of rows per second")
        if max_passes < 1:
            raise ValueError("max_passes must be at least 1")
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        self.key_manager = key_manager
        self.database = database
        self.tables: dict[str, TableSpec] = {t.name: t for t in tables}
        self.batch_size = batch_size
        self.rate_limit = rate_limit
        self.progress = progress
        self.max_passes = max_passes
        self.on_error = on_error
        self.compression_level = compression_level
        self.legacy_readers: dict[str, LegacyReader] = {r.name: r for r in legacy_readers}
        self._prepared: set[str] = set()

    def __repr__(self) -> str:
        return f"<ReencryptionEngine tables={sorted(self.tables)} batch_size={self.batch_size}>"

    def table(self, table: str | TableSpec) -> TableSpec:
        if isinstance(table, TableSpec):
            return table
        try:
            return self.tables[table]
        except KeyError:
            raise KeyError(f"no table spec registered for {table!r}") from None

    async def _prepare(self, spec: TableSpec) -> None:
        if spec.name not in self._prepared:
            await self.database.prepare(spec)
            self._prepared.add(spec.name)

    # -- reporting ----------------------------------------------------------

    async def census(self, table: str | TableSpec) -> TableCensus:
        """Rows per key id per column, counted in SQL (nothing is decrypted)."""
        spec = self.table(table)
        await self._prepare(spec)
        return await self.database.census(spec)

    async def key_usage(self, tables: Iterable[str | TableSpec] | None = None) -> dict[str, int]:
        """Rows per key id over every column of ``tables`` (default: all registered).

        The shape ``KeyManager.census`` takes (``key_manager.census =
        engine.key_usage``), so cleanup destroys only keys no row uses any more.
        Every key of a key type these tables use is listed, with 0 when no row
        uses it: an explicit 0 is what lets cleanup destroy a key, while a key
        of a type the census does not cover (sessions, caches, blind indexes,
        tables elsewhere) is absent and therefore kept. Blind-index key versions
        are counted by ``aiocrypt.integrations.sqlalchemy.blind_index_usage``.
        """
        specs = [self.table(t) if isinstance(t, str) else t
                 for t in (self.tables.values() if tables is None else tables)]
        covered = {c.key_type for spec in specs for c in spec.columns}
        usage: dict[str, int] = {k.key_id: 0 for k in await self.key_manager.list_keys()
                                 if k.key_type in covered}
        for spec in specs:
            census = await self.census(spec)
            for by_key in census.counts.values():
                for key_id, rows in by_key.items():
                    if key_id is not None:
                        usage[key_id] = usage.get(key_id, 0) + rows
        return usage

    async def plan_shards(self, table: str | TableSpec, count: int) -> list[KeyRange]:
        """``count`` primary-key ranges of about equal size, for as many workers."""
        spec = self.table(table)
        await self._prepare(spec)
        bounds: list[Any] = []
        for value in await self.database.boundaries(spec, count):
            if not bounds or value != bounds[-1]:
                bounds.append(value)
        edges = [None, *bounds, None]
        return [KeyRange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]

    async def targets(self, table: str | TableSpec) -> dict[str, str]:
        """Column -> the key id a run would move it to (the active key of its key type)."""
        spec = self.table(table)
        keyring = await self.key_manager.ensure_active({c.key_type for c in spec.columns})
        return {c.name: keyring.active(c.key_type).key_id for c in spec.columns}

    # -- running ------------------------------------------------------------

    @staticmethod
    def job_id_for(spec: TableSpec, targets: Mapping[str, str], shard: KeyRange) -> str:
        """Stable id of (table, columns, target keys, shard): a rerun resumes its checkpoint."""
        material = json.dumps([spec.to_dict(), sorted(targets.items()), shard.after,
                               shard.until], default=str, sort_keys=True)
        digest = hashlib.sha256(material.encode("utf-8")).hexdigest()[:24]
        return f"{spec.name}:{digest}"

    async def reencrypt(self, table: str | TableSpec, *, columns: Iterable[str] | None = None,
                        key_type: KeyTypeLike | None = None,
                        shard: KeyRange | tuple[Any, Any] | None = None,
                        job_id: str | None = None) -> ReencryptionResult:
        """Move every value of the table (or shard) onto the active keys; resumable.

        All arguments are identifiers, so a job queue can carry them. Rerunning
        with the same arguments resumes from the checkpoint; once a job is
        complete, a rerun is a cheap verification pass.
        """
        spec = self.table(table)
        if columns is not None or key_type is not None:
            spec = spec.select(columns, key_type)
        key_range = KeyRange.of(shard)
        await self._prepare(spec)
        keyring = await self.key_manager.ensure_active({c.key_type for c in spec.columns})
        cols = []
        for c in spec.columns:
            target = keyring.require_encryptable(c.key_type)
            context = spec.context_for(c)
            context_bytes(context)  # validates it once: the hot loop only encodes it
            level = self.compression_level if self.compression_level is not None \
                else self.key_manager.config.compression_level_for(c.key_type)
            reader = None
            if c.legacy_reader is not None:
                reader = self.legacy_readers.get(c.legacy_reader)
                if reader is None:
                    raise ValueError(f"{spec.name}.{c.name}: no legacy reader named "
                                     f"{c.legacy_reader!r} was given (legacy_readers=)")
            # the target's version 2 prefix: its version 1 tokens are re-encrypted too
            cols.append(_Column(c, context, text_prefix(target.key_id), target, level,
                                reader))
        targets = {c.spec.name: c.target.key_id for c in cols}
        job = job_id or self.job_id_for(spec, targets, key_range)

        checkpoint = await self.database.load_checkpoint(job)
        resumed_from = None
        if checkpoint is None:
            checkpoint = Checkpoint(job, spec.name)
        elif checkpoint.done:
            checkpoint.pass_no += 1
            checkpoint.last_pk = None
            checkpoint.done = False
        else:
            resumed_from = checkpoint.last_pk
            logger.info("re-encryption %s resumes after batch %d", job, checkpoint.batches)

        stats = _RunStats()
        started = time.monotonic()
        passes = 0
        target_changed = False
        while True:
            passes += 1
            # A pass resumed mid-table proves nothing about the rows before its start
            # (a concurrent writer may have left some on an old key): only a sweep from
            # the start that finds nothing completes the job, and it is always run.
            full_sweep = checkpoint.last_pk is None
            read, target_changed = await self._pass(spec, cols, key_range, checkpoint, stats,
                                                    started)
            if target_changed or (full_sweep and (read == 0 or passes >= self.max_passes)):
                break
            checkpoint.pass_no += 1
            checkpoint.last_pk = None
            await self.database.save_checkpoint(checkpoint)
        complete = not target_changed and read == 0 and full_sweep and not stats.rows_failed
        if complete:
            checkpoint.done = True
            await self.database.save_checkpoint(checkpoint)
        elapsed = time.monotonic() - started
        logger.info("re-encryption %s: %d rows updated in %d batches, %.1f s%s", job,
                    stats.rows_updated, stats.batches, elapsed,
                    "" if complete else " (incomplete)")
        return ReencryptionResult(
            job_id=job, table=spec.name, targets=targets, run_batches=stats.batches,
            run_rows_read=stats.rows_read, run_rows_updated=stats.rows_updated,
            run_rows_conflicted=stats.rows_conflicted, run_rows_failed=stats.rows_failed,
            passes=passes, resumed_from=resumed_from, checkpoint=checkpoint, elapsed=elapsed,
            complete=complete, target_changed=target_changed,
            failed_primary_keys=tuple(stats.failed_pks), failures=tuple(stats.failures))

    async def _pass(self, spec: TableSpec, cols: list[_Column], key_range: KeyRange,
                    checkpoint: Checkpoint, stats: _RunStats,
                    started: float) -> tuple[int, bool]:
        """One sweep from the checkpoint to the end of the range: (rows read, target changed)."""
        db = self.database
        prefixes = [c.prefix for c in cols]
        limit = self.batch_size
        pipelined = db.supports_pipelining

        def fetch(after: Any) -> asyncio.Task[Sequence[Sequence[Any]]]:
            return asyncio.ensure_future(
                db.fetch_batch(spec, prefixes, after, key_range.until, limit))

        read = 0
        target_changed = False
        next_fetch: asyncio.Task[Sequence[Sequence[Any]]] | None = fetch(
            checkpoint.last_pk if checkpoint.last_pk is not None else key_range.after)
        writing: asyncio.Task[None] | None = None
        try:
            while next_fetch is not None:
                rows = await next_fetch
                next_fetch = None
                if not rows:
                    break
                last_pk = rows[-1][0]
                if len(rows) == limit and pipelined:
                    next_fetch = fetch(last_pk)
                keyring = await self.key_manager.current_keyring()
                if any(_active_id(keyring, c.spec.key_type) != c.target.key_id for c in cols):
                    logger.warning("re-encryption %s: a target key rotated during the run; "
                                   "stopping (run again for the new key)", checkpoint.job_id)
                    target_changed = True
                    break
                batch, failures = await self._transform(spec, cols, rows)
                failed, stale = _first_failures(failures, stats)
                read += len(rows) - stale
                if writing is not None:
                    await writing
                    writing = None
                    await self._after_commit(checkpoint, stats, started)
                stats.failed_pks.extend(failed[:max(0, 100 - len(stats.failed_pks))])
                stats.failures.extend(
                    [f for f in failures if f.primary_key in failed][:max(
                        0, 100 - len(stats.failures))])
                writing = asyncio.ensure_future(
                    self._commit(spec, batch, checkpoint, stats, last_pk, len(rows),
                                 len(failed)))
                if not pipelined:
                    await writing
                    writing = None
                    await self._after_commit(checkpoint, stats, started)
                if len(rows) == limit and not pipelined:
                    next_fetch = fetch(last_pk)
            if writing is not None:
                await writing
                writing = None
                await self._after_commit(checkpoint, stats, started)
        finally:
            for task in (next_fetch, writing):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
        return read, target_changed

    async def _commit(self, spec: TableSpec, batch: WriteBatch, checkpoint: Checkpoint,
                      stats: _RunStats, last_pk: Any, rows_read: int, failed: int) -> None:
        pending = Checkpoint(
            checkpoint.job_id, checkpoint.table, checkpoint.pass_no, last_pk,
            checkpoint.batches + 1, checkpoint.rows_read + rows_read, checkpoint.rows_updated,
            checkpoint.rows_conflicted, checkpoint.rows_failed + failed)
        updated = await self.database.write_batch(spec, batch, pending)
        conflicted = len(batch) - updated
        pending.rows_updated += updated
        pending.rows_conflicted += conflicted
        (checkpoint.last_pk, checkpoint.batches, checkpoint.rows_read, checkpoint.rows_updated,
         checkpoint.rows_conflicted, checkpoint.rows_failed) = (
            pending.last_pk, pending.batches, pending.rows_read, pending.rows_updated,
            pending.rows_conflicted, pending.rows_failed)
        stats.batches += 1
        stats.rows_read += rows_read
        stats.rows_updated += updated
        stats.rows_conflicted += conflicted
        stats.rows_failed += failed

    async def _after_commit(self, checkpoint: Checkpoint, stats: _RunStats,
                            started: float) -> None:
        elapsed = time.monotonic() - started
        if self.progress is not None:
            outcome = self.progress(ReencryptionProgress(
                checkpoint.job_id, checkpoint.table, checkpoint.pass_no, checkpoint.batches,
                checkpoint.rows_read, checkpoint.rows_updated, checkpoint.rows_conflicted,
                checkpoint.rows_failed, checkpoint.last_pk, stats.batches, stats.rows_updated,
                elapsed))
            if inspect.isawaitable(outcome):
                await outcome
        if self.rate_limit is not None:
            delay = stats.rows_read / self.rate_limit - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)

    async def _transform(self, spec: TableSpec, cols: list[_Column], rows: Sequence[Sequence[Any]]
                         ) -> tuple[WriteBatch, list[ReencryptionError]]:
        keyring = self.key_manager.keyring
        try:
            return self._transform_sync(spec, cols, rows, keyring)
        except UnknownKeyError as exc:
            # A token from a key this process has not loaded yet (rotated elsewhere).
            if await self.key_manager.load_key(exc.key_id) is None:
                return self._transform_sync(spec, cols, rows, self.key_manager.keyring,
                                            unknown_fails=True)
            return await self._transform(spec, cols, rows)

    def _transform_sync(self, spec: TableSpec, cols: list[_Column],
                        rows: Sequence[Sequence[Any]], keyring: Keyring, *,
                        unknown_fails: bool = False
                        ) -> tuple[WriteBatch, list[ReencryptionError]]:
        n = len(cols)
        pks: list[Any] = []
        old: list[list[Any]] = [[] for _ in range(n)]
        new: list[list[str | None]] = [[] for _ in range(n)]
        failed: list[ReencryptionError] = []
        # One getrandom call per batch instead of one per token (the hot loop's
        # largest fixed cost); each nonce is still 96 fresh random bits.
        randomness = os.urandom(NONCE_BYTES * n * len(rows))
        offset = 0
        for row in rows:
            pk = row[0]
            out: list[str | None] = [None] * n
            row_failed = False
            for i, col in enumerate(cols):
                value = row[i + 1]
                if value is None or (type(value) is str and value.startswith(col.prefix)):
                    continue
                context = col.context if not col.spec.row_bound else row_context(col.context, pk)
                try:
                    plaintext = self._plaintext(spec, col, keyring, value, context, pk,
                                                unknown_fails)
                except ReencryptionError as exc:
                    if self.on_error == "raise":
                        raise
                    # this value stays; the row's other columns still move
                    failed.append(exc)
                    row_failed = True
                    continue
                level = col.compression_level
                flags = 0
                if level is not None:
                    plaintext = _compression.compress(plaintext, level)
                    flags = FLAG_ZSTD
                ctx = context.encode("utf-8")
                if col.spec.deterministic:
                    out[i] = col.target.seal_deterministic(plaintext, ctx, flags)
                else:
                    out[i] = col.target.seal_text(plaintext, ctx, flags,
                                                  randomness[offset:offset + NONCE_BYTES])
                    offset += NONCE_BYTES
            if row_failed and all(o is None for o in out):
                continue  # nothing of it to write
            pks.append(pk)
            for i in range(n):
                old[i].append(row[i + 1])
                new[i].append(out[i])
        return WriteBatch(pks, old, new), failed

    @staticmethod
    def _plaintext(spec: TableSpec, col: _Column, keyring: Keyring, value: Any, context: str,
                   pk: Any, unknown_fails: bool) -> bytes:
        reason: DecryptionFailure | None = None
        key_id: str | None = None
        if type(value) is str and value.startswith(TEXT_PREFIXES):
            try:
                return keyring.decrypt_bytes(value, col.spec.key_type, context,
                                             for_reencryption=True)
            except UnknownKeyError as exc:
                if not unknown_fails:
                    raise
                reason, key_id = exc.reason, exc.key_id
            except DecryptionError as exc:
                reason, key_id = exc.reason, exc.key_id
        elif col.spec.legacy_type is not None:
            try:
                raw = value if col.reader is None else col.reader.open(value)
                return encode_value(parse_legacy(col.spec.legacy_type, raw))
            except ValueError:  # LegacyTokenError too: it does not say why
                reason = DecryptionFailure.AUTHENTICATION_FAILED \
                    if col.reader is not None else None
        raise ReencryptionError(spec.name, col.spec.name, pk, reason=reason, key_id=key_id)


def _first_failures(failures: Sequence[ReencryptionError],
                    stats: _RunStats) -> tuple[list[Any], int]:
    """(primary keys failing for the first time in this run, rows of known failures only).

    A value that does not decrypt stays where it is, so every later pass reads
    its row again: it is reported (and logged) once, and a pass that reads only
    such rows does not call for another pass.
    """
    new: list[Any] = []
    rows: dict[str, bool] = {}  # row -> whether any of its failures is new
    for exc in failures:
        row = json.dumps(exc.primary_key, default=str)
        seen = (row, exc.column) in stats.failed_seen
        if not seen:
            stats.failed_seen.add((row, exc.column))
            logger.warning("re-encryption left a value that does not decrypt: %s (primary key "
                           "%r)", exc, exc.primary_key)
            if row not in rows or not rows[row]:
                if exc.primary_key not in new:
                    new.append(exc.primary_key)
        rows[row] = rows.get(row, False) or not seen
    return new, sum(1 for fresh in rows.values() if not fresh)


def _active_id(keyring: Keyring, key_type: KeyType) -> str | None:
    dk = keyring.active_keys.get(key_type)
    return None if dk is None else dk.key_id


def __getattr__(name: str) -> Any:
    # The asyncpg adapter lives in its own module; kept importable from here.
    if name == "AsyncpgDatabase":
        from ._reencrypt_asyncpg import AsyncpgDatabase

        return AsyncpgDatabase
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
