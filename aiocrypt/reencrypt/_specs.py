"""What to re-encrypt and what a run reports: column and table specs, primary-key
ranges, checkpoints, write batches, censuses, progress and results. Identifiers
only: a queued job carries these, never plaintext or key material."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .._errors import ReencryptionError
from .._types import KeyType, KeyTypeLike
from ._values import LEGACY_TYPES

_IDENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")


def quote_identifier(name: str) -> str:
    """``"schema"."table"`` for a plain (optionally schema-qualified) SQL name; refuses others."""
    parts = name.split(".")
    if not 1 <= len(parts) <= 2 or not all(_IDENT_RE.fullmatch(p) for p in parts):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return ".".join(f'"{p}"' for p in parts)


# SQL in this module is built with f-strings from names that passed quote_identifier()
# (plain identifiers only) and integers; every value travels as a bind parameter.


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
            raise ValueError(
                f"unknown legacy_type {self.legacy_type!r}; use one of {sorted(LEGACY_TYPES)}"
            )
        if self.legacy_reader is not None and self.legacy_type is None:
            raise ValueError(
                f"column {self.name}: legacy_reader needs the legacy_type its plaintext parses as"
            )

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "key_type": self.key_type.value,
            "context": self.context,
            "deterministic": self.deterministic,
            "row_bound": self.row_bound,
            "legacy_type": self.legacy_type,
        }
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

    def select(
        self, columns: Iterable[str] | None = None, key_type: KeyTypeLike | None = None
    ) -> TableSpec:
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
        return {
            "name": self.name,
            "primary_key": self.primary_key,
            "columns": [c.to_dict() for c in self.columns],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableSpec:
        return cls(
            data["name"], data["primary_key"], tuple(ColumnSpec(**c) for c in data["columns"])
        )


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


#: The census's one key id for the tokens of every data subject's key (``ac2.S-...``):
#: not a key id any key can have. They are neither pending nor off target: a rotation
#: rewraps the subjects' keys, it does not touch their data.
SUBJECT_KEYS: Final = "S-*"


@dataclass(frozen=True, slots=True)
class TableCensus:
    """Rows per key id per column; the key ``None`` counts values that are not tokens,
    :data:`SUBJECT_KEYS` the tokens of data subjects' keys.

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
        """The version keys' ids the table's tokens name."""
        return {
            k
            for by_key in self.counts.values()
            for k in by_key
            if k is not None and k != SUBJECT_KEYS
        }

    def subject_rows(self) -> int:
        """Values (over all columns) under data subjects' keys."""
        return self.rows_for(SUBJECT_KEYS)

    def off_target(self, targets: Mapping[str, str]) -> int:
        """Rows (per column) not on ``targets[column]`` (key id) nor a subject's key."""
        return sum(
            n
            for col, by_key in self.counts.items()
            for kid, n in by_key.items()
            if kid not in (targets.get(col), SUBJECT_KEYS)
        )


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
    #: The run stopped after ``max_batches`` batches (run again to resume).
    stopped: bool = False

    @property
    def rows_per_second(self) -> float:
        return self.run_rows_updated / self.elapsed if self.elapsed > 0 else 0.0


ProgressCallback = Callable[[ReencryptionProgress], Awaitable[None] | None]
