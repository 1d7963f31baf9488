"""Re-encryption: move stored tokens onto the active keys, online, resumable.

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

from .._errors import ReencryptionError
from ._asyncpg import AsyncpgDatabase
from ._database import (
    CHECKPOINT_COLUMNS,
    DEFAULT_CHECKPOINT_TABLE,
    PendingRowsDatabase,
    ReencryptionDatabase,
    census_from_rows,
    census_sql,
    checkpoint_ddl,
    checkpoint_from_row,
    checkpoint_upsert_sql,
    checkpoint_values,
    pending_condition,
    pending_counts_sql,
)
from ._engine import ReencryptionEngine
from ._specs import (
    SUBJECT_KEYS,
    Checkpoint,
    ColumnSpec,
    KeyRange,
    ReencryptionProgress,
    ReencryptionResult,
    TableCensus,
    TableSpec,
    WriteBatch,
    quote_identifier,
    row_context,
)
from ._values import LEGACY_TYPES, PYTHON_TYPES, parse_legacy

__all__ = [
    "CHECKPOINT_COLUMNS",
    "DEFAULT_CHECKPOINT_TABLE",
    "LEGACY_TYPES",
    "PYTHON_TYPES",
    "SUBJECT_KEYS",
    "AsyncpgDatabase",
    "Checkpoint",
    "ColumnSpec",
    "KeyRange",
    "PendingRowsDatabase",
    "ReencryptionDatabase",
    "ReencryptionEngine",
    "ReencryptionError",
    "ReencryptionProgress",
    "ReencryptionResult",
    "TableCensus",
    "TableSpec",
    "WriteBatch",
    "census_from_rows",
    "census_sql",
    "checkpoint_ddl",
    "checkpoint_from_row",
    "checkpoint_upsert_sql",
    "checkpoint_values",
    "parse_legacy",
    "pending_condition",
    "pending_counts_sql",
    "quote_identifier",
    "row_context",
]
