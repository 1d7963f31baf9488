"""The database side of the engine: the ``ReencryptionDatabase`` protocol and the SQL
every adapter shares (checkpoint table, the pending-rows condition and counts, the
census),
written once here and used by the asyncpg adapter, the SQLAlchemy adapter and the
ARQ jobs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Protocol

from .._format import token_sql
from .._subjects import SUBJECT_TOKEN_PREFIX
from ._specs import (
    SUBJECT_KEYS,
    Checkpoint,
    TableCensus,
    TableSpec,
    WriteBatch,
    quote_identifier,
)

DEFAULT_CHECKPOINT_TABLE: Final = "aiocrypt_reencrypt_checkpoints"
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

    async def fetch_batch(
        self, table: TableSpec, prefixes: Sequence[str], after: Any, until: Any, limit: int
    ) -> Sequence[Sequence[Any]]: ...

    async def write_batch(
        self, table: TableSpec, batch: WriteBatch, checkpoint: Checkpoint
    ) -> int: ...

    async def load_checkpoint(self, job_id: str) -> Checkpoint | None: ...

    async def save_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    async def census(self, table: TableSpec) -> TableCensus: ...

    async def boundaries(self, table: TableSpec, shards: int) -> list[Any]: ...

    async def close(self) -> None: ...


class PendingRowsDatabase(ReencryptionDatabase, Protocol):
    """A database that also counts the rows still to move per primary-key range
    (:func:`pending_counts_sql`): what a planner of shards (the ARQ jobs) needs to
    size them. Implemented by :class:`AsyncpgDatabase`."""

    async def count_pending(
        self, table: TableSpec, prefixes: Sequence[str], bounds: Sequence[Any]
    ) -> list[int]: ...


def checkpoint_ddl(table: str, *, timestamp_type: str = "TIMESTAMP") -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(table)} ("
        "job_id VARCHAR(255) PRIMARY KEY, table_name VARCHAR(255) NOT NULL, "
        "pass_no INTEGER NOT NULL, last_pk TEXT, batches BIGINT NOT NULL, "
        "rows_read BIGINT NOT NULL, rows_updated BIGINT NOT NULL, "
        "rows_conflicted BIGINT NOT NULL, rows_failed BIGINT NOT NULL, "
        f"done BOOLEAN NOT NULL, updated_at {timestamp_type} DEFAULT CURRENT_TIMESTAMP)"
    )


CHECKPOINT_COLUMNS: Final = (
    "job_id",
    "table_name",
    "pass_no",
    "last_pk",
    "batches",
    "rows_read",
    "rows_updated",
    "rows_conflicted",
    "rows_failed",
    "done",
)


def checkpoint_from_row(row: Sequence[Any]) -> Checkpoint:
    return Checkpoint(
        job_id=row[0],
        table=row[1],
        pass_no=int(row[2]),
        last_pk=Checkpoint.decode_pk(row[3]),
        batches=int(row[4]),
        rows_read=int(row[5]),
        rows_updated=int(row[6]),
        rows_conflicted=int(row[7]),
        rows_failed=int(row[8]),
        done=bool(row[9]),
    )


def checkpoint_upsert_sql(table: str, placeholder: Callable[[int, str], str], now: str) -> str:
    """The checkpoint upsert every adapter runs: ``placeholder(i, column)`` writes the
    driver's parameter for a column (``$1`` or ``:job_id``), ``now`` the SQL clock."""
    params = ", ".join(placeholder(i + 1, c) for i, c in enumerate(CHECKPOINT_COLUMNS))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in CHECKPOINT_COLUMNS[1:])
    return (
        f"INSERT INTO {quote_identifier(table)} ({', '.join(CHECKPOINT_COLUMNS)}, "  # noqa: S608
        f"updated_at) VALUES ({params}, {now}) "
        f"ON CONFLICT (job_id) DO UPDATE SET {updates}, updated_at = {now}"
    )


def checkpoint_values(checkpoint: Checkpoint) -> tuple[Any, ...]:
    """The checkpoint's values in :data:`CHECKPOINT_COLUMNS` order."""
    return (
        checkpoint.job_id,
        checkpoint.table,
        checkpoint.pass_no,
        checkpoint.encoded_pk(),
        checkpoint.batches,
        checkpoint.rows_read,
        checkpoint.rows_updated,
        checkpoint.rows_conflicted,
        checkpoint.rows_failed,
        checkpoint.done,
    )


def pending_condition(table: TableSpec, prefix_params: Sequence[str]) -> str:
    """SQL true for a row with at least one column not yet on its target key.

    A data subject's token is never pending: its key is rewrapped under the new
    version key (``rewrap_subjects``), the data stays as it is (docs/subjects.md).
    """
    parts = []
    for column, param in zip(table.columns, prefix_params, strict=True):
        col = quote_identifier(column.name)
        parts.append(
            f"({col} IS NOT NULL AND substr({col}, 1, length({param})) <> {param} "
            f"AND {_not_subject(col)})"
        )
    return "(" + " OR ".join(parts) + ")"


def _subject_sql(col: str) -> str:
    return f"substr({col}, 1, {len(SUBJECT_TOKEN_PREFIX)}) = '{SUBJECT_TOKEN_PREFIX}'"


def _not_subject(col: str) -> str:
    return f"substr({col}, 1, {len(SUBJECT_TOKEN_PREFIX)}) <> '{SUBJECT_TOKEN_PREFIX}'"


def pending_counts_sql(table: TableSpec, bounds: int, placeholder: Callable[[int], str]) -> str:
    """One row of ``bounds + 1`` counts: the rows still to move in each primary-key range
    cut at ``bounds`` inner boundaries. Parameters: each column's target prefix
    (``placeholder(1)`` to ``placeholder(n)``), then the boundaries in order."""
    tbl, pk = quote_identifier(table.name), quote_identifier(table.primary_key)
    n = len(table.columns)
    counts = []
    for i in range(bounds + 1):
        parts = []
        if i > 0:
            parts.append(f"{pk} > {placeholder(n + i)}")
        if i < bounds:
            parts.append(f"{pk} <= {placeholder(n + i + 1)}")
        counts.append(f"count(CASE WHEN {' AND '.join(parts)} THEN 1 END)" if parts else "count(*)")
    condition = pending_condition(table, [placeholder(i + 1) for i in range(n)])
    return f"SELECT {', '.join(counts)} FROM {tbl} WHERE {condition}"  # noqa: S608


def census_sql(table: TableSpec, key_id_expr: Callable[[str], str]) -> str:
    """One query: (column index, key id or NULL for non-tokens, 1 for a format
    version 1 token else 0, rows) for every column; the tokens of every data
    subject's key count as one key id, :data:`SUBJECT_KEYS`."""
    tbl = quote_identifier(table.name)
    selects = []
    for i, column in enumerate(table.columns):
        col = quote_identifier(column.name)
        selects.append(
            f"SELECT {i} AS col, CASE WHEN {_subject_sql(col)} THEN '{SUBJECT_KEYS}' "  # noqa: S608
            f"WHEN {token_sql(col)} THEN {key_id_expr(col)} END AS kid, "
            f"CASE WHEN {token_sql(col, (1,))} THEN 1 ELSE 0 END AS v1, count(*) AS n "
            f"FROM {tbl} WHERE {col} IS NOT NULL GROUP BY 2, 3"
        )
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
