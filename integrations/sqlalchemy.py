"""SQLAlchemy integration: encrypted columns, blind indexes and the re-encryption engine.

Declare columns with the encrypted types; values are encrypted when bound and
decrypted when loaded, bound to ``"<table>.<column>"`` so a token copied to
another column fails to decrypt (and, for ``row_bound=True`` columns, to
``"<table>.<column>#<primary key>"``, so one copied to another row fails too)::

    from aiocrypt.integrations.sqlalchemy import (
        BlindIndex, EncryptedFloat, EncryptedString, set_encryption_service)

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        monthly_income_encrypted: Mapped[float | None] = mapped_column(
            EncryptedFloat(KeyType.FINANCIAL_DATA))
        ssn_encrypted: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))
        ssn_index: Mapped[str | None] = mapped_column(
            BlindIndex("ssn_encrypted", normalizer=normalize_digits), index=True)

    set_encryption_service(service)          # or pass service= to each type
    session.add(User(monthly_income_encrypted=50000.0, ssn_encrypted="123-45-6789"))
    select(User).where(User.ssn_index.matches("123-45-6789"))

Keys. The type decorators run synchronously inside SQLAlchemy. Under an async
engine they run in SQLAlchemy's greenlet, where they refresh a stale keyring,
create a missing active key and load a key id they have not seen (rotated by
another process) through the service's async ``KeyManager``. Under a sync
engine nothing can be awaited: start the service (``preload=[...]`` the key
types you use) before the first query; keys rotated elsewhere are seen after
``await service.key_manager.refresh()``.

Over 500 lines on purpose: the column types, the flush hooks that give them their
row (primary key, data subject), the blind index and the SQLAlchemy adapter of the
re-encryption engine all depend on how SQLAlchemy hands values to a type; kept in
one module so one SQLAlchemy upgrade is checked in one place. ``aiocrypt.reencrypt``
holds everything that is not SQLAlchemy-specific.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import logging
import secrets
import unicodedata
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from enum import Enum as _Enum
from typing import Any, Final, cast
from uuid import UUID

try:
    import sqlalchemy as sa
    from sqlalchemy import event
    from sqlalchemy.engine import Dialect
    from sqlalchemy.engine.default import DefaultDialect
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.ext.mutable import Mutable, MutableDict, MutableList
    from sqlalchemy.orm import Mapper, ORMExecuteState, Session
    from sqlalchemy.orm.attributes import set_committed_value
    from sqlalchemy.orm.exc import UnmappedColumnError
    from sqlalchemy.sql import operators
    from sqlalchemy.types import TypeDecorator
    from sqlalchemy.util import concurrency as _concurrency
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "aiocrypt.integrations.sqlalchemy needs SQLAlchemy: pip install 'aiocrypt[sqlalchemy]'"
    ) from exc

from aiocrypt import (
    ConfigurationError,
    DecryptionError,
    DecryptionFailure,
    DecryptionLocation,
    EncryptionService,
    Keyring,
    KeyType,
    UnknownKeyError,
    get_encryption_service,
)
from aiocrypt.adapters import (
    TEXT_PREFIXES,
    DataKey,
    FernetReader,
    KeyTypeLike,
    LegacyReader,
    LegacyTokenError,
    NaiveDateTime,
    SqlalchemyUtilsReader,
    context_bytes,
    decryption_failed,
    encode_value,
    key_id_sql,
)
from aiocrypt.reencrypt import (
    CHECKPOINT_COLUMNS,
    DEFAULT_CHECKPOINT_TABLE,
    PYTHON_TYPES,
    AsyncpgDatabase,
    Checkpoint,
    ColumnSpec,
    ReencryptionDatabase,
    ReencryptionEngine,
    TableCensus,
    TableSpec,
    WriteBatch,
    census_from_rows,
    census_sql,
    checkpoint_ddl,
    checkpoint_from_row,
    checkpoint_upsert_sql,
    checkpoint_values,
    parse_legacy,
    pending_condition,
    quote_identifier,
    row_context,
)

from ._subject_ids import check_subject_prefix, subject_id

__all__ = [
    "BLIND_INDEX_KEY_TYPE",
    "COLUMN_KEY_TYPES",
    "BlindIndex",
    "Encrypted",
    "EncryptedBoolean",
    "EncryptedBytes",
    "EncryptedDate",
    "EncryptedDateTime",
    "EncryptedDecimal",
    "EncryptedEnum",
    "EncryptedFloat",
    "EncryptedInteger",
    "EncryptedInterval",
    "EncryptedJSON",
    "EncryptedNumeric",
    "EncryptedString",
    "EncryptedTime",
    "EncryptedType",
    "EncryptedUUID",
    "FernetReader",
    "IndexDigest",
    "LegacyReader",
    "SQLAlchemyDatabase",
    "SqlalchemyUtilsReader",
    "blind_index_matches",
    "blind_index_usage",
    "legacy_readers",
    "database_for",
    "key_type_for_column",
    "normalize_digits",
    "normalize_email",
    "normalize_text",
    "legacy_reads",
    "plaintext_reads",
    "RowValue",
    "rebuild_blind_indexes",
    "reencryption_engine",
    "set_encryption_service",
    "table_specs",
]

logger = logging.getLogger("aiocrypt.sqlalchemy")

BLIND_INDEX_KEY_TYPE: Final = KeyType("blind_index")
"""Default key type of blind indexes: never shared with field encryption."""

plaintext_reads: Counter[str] = Counter()
"""Plaintext (not yet encrypted) values read per ``table.column`` since start."""

legacy_reads: Counter[str] = Counter()
"""Values in a legacy reader's form (sqlalchemy-utils, Fernet) read per ``table.column``."""

_await: Callable[[Any], Any] = getattr(_concurrency, "await_", None) or _concurrency.await_only
_in_greenlet: Callable[[], bool] = _concurrency.in_greenlet

_default_service: EncryptionService | None = None


def set_encryption_service(service: EncryptionService | None) -> None:
    """The service used by column types declared without ``service=`` (None: the
    process-wide ``aiocrypt.get_encryption_service()``)."""
    global _default_service
    _default_service = service


def _service_for(explicit: EncryptionService | None) -> EncryptionService:
    if explicit is not None:
        return explicit
    if _default_service is not None:
        return _default_service
    return get_encryption_service()


def _current_keyring(service: EncryptionService, key_type: KeyType | None = None) -> Keyring:
    """The service's keyring, refreshed (and ``key_type`` made active) where we may await."""
    manager = service.key_manager
    keyring = manager.keyring
    if _in_greenlet():
        if len(keyring) == 0 or manager.is_stale():
            keyring = _await(manager.current_keyring())
        if key_type is not None:
            dk = keyring.get_active(key_type)
            if dk is None or dk.encryptions >= dk.refill_at:  # the usage limit: reserve here
                keyring = _await(manager.reserve_usage(key_type, ahead=dk is not None))
    elif len(keyring) == 0:
        raise ConfigurationError(
            "the encryption service has no keys loaded: start it (await service.start()) "
            "before building queries or using a sync engine"
        )
    elif key_type is not None and key_type not in keyring.active_keys:
        raise ConfigurationError(
            f"no active {key_type.value!r} key is loaded: with a sync engine, start the "
            f"service first (EncryptionService(..., preload=[{key_type.value!r}]))"
        )
    return keyring


def _decrypt(
    service: EncryptionService,
    token: str,
    key_type: KeyType,
    context: str,
    *,
    by_subject: bool = False,
) -> Any:
    keyring = _current_keyring(service)
    if by_subject:  # a subject key (``ac2.S-...``) this process has cached: no lookup miss
        ring = service.key_manager.subjects.ring_of(token)
        if ring is not None:
            keyring = ring
    try:
        return keyring.decrypt(token, key_type, context)
    except UnknownKeyError as exc:
        if by_subject:  # a subject key not cached: the service loads it
            if _in_greenlet():  # ... or says the subject was forgotten
                return _await(service.decrypt_field(token, key_type, context=context))
            raise ConfigurationError(
                f"{context}: the subject key of a value is not cached in this process, and "
                "it cannot be loaded outside SQLAlchemy's greenlet (a sync engine, or the "
                "rows of a Core result on an async connection, processed when fetched): "
                "read it through an ORM session or await conn.stream(...)"
            ) from None
        # A key rotated in another process: load it once (only possible in a greenlet).
        if _in_greenlet() and _await(service.key_manager.load_key(exc.key_id)) is not None:
            return service.key_manager.keyring.decrypt(token, key_type, context)
        service.counters["decrypt_failures"] += 1
        raise service._missing_key(exc.key_id) if _in_greenlet() else exc from None
    except DecryptionError:
        service.counters["decrypt_failures"] += 1
        raise


def _encrypt_for_subject(
    service: EncryptionService, value: Any, key_type: KeyType, context: str, subject: str
) -> str:
    """Seal ``value`` under ``subject``'s key: the cached key where there is one (as the
    service's own fast path does), else through the service, which creates it."""
    _current_keyring(service)  # refreshed where we may await: a forget elsewhere is seen
    subjects = service.key_manager.subjects
    dk = subjects.cached(key_type, subject)
    ring = None if dk is None else subjects.cached_ring(dk.key_id)
    if ring is not None:
        return ring.encrypt(
            value, key_type, context, compression_level=service.compression_level_for(key_type)
        )
    if _in_greenlet():
        return cast(
            str, _await(service.encrypt_field(value, key_type, context=context, subject=subject))
        )
    raise ConfigurationError(
        f"{context}: the subject's key is not cached in this process, and a sync engine "
        "cannot await creating or loading it: use an async engine for columns keyed "
        "per data subject"
    )


def _check_subject_options(
    subject_column: Any, subject_prefix: Any, *, deterministic: bool, migrating: bool
) -> None:
    if not isinstance(subject_column, str) or not subject_column:
        raise ConfigurationError("subject_column must name a column of the same table")
    check_subject_prefix(subject_prefix, f"subject_column={subject_column!r}")
    if deterministic:
        raise ValueError(
            "a column keyed per data subject cannot be deterministic: equal "
            "values of two subjects differ, so no lookup could match; use a "
            "BlindIndex"
        )
    if migrating:
        raise ConfigurationError(
            "a column keyed per data subject cannot take allow_plaintext or legacy: the "
            "re-encryption engine never rewrites it (its subject keys are rewrapped "
            "instead); migrate into a new subject-keyed column through the ORM"
        )


# -- naming the row of a value that does not decrypt --------------------------

#: Set while an undecryptable ORM read is read again to find its row: the column
#: types then return an ``_Undecryptable`` marker instead of raising. It is never
#: set outside :func:`_locate_undecryptable_row`, so no marker reaches a caller.
_locating: contextvars.ContextVar[bool] = contextvars.ContextVar("aiocrypt_locating", default=False)


class _Undecryptable:
    __slots__ = ("error", "table")

    def __init__(self, error: DecryptionError, table: sa.Table | None) -> None:
        self.error = error
        self.table = table


@event.listens_for(Session, "do_orm_execute")
def _locate_undecryptable_row(state: ORMExecuteState) -> Any:
    """Add the primary key to a ``DecryptionError`` raised by an ORM read.

    A type decorator sees a value, never its row. When a query run by an ORM
    session fails to decrypt, the same statement is run again on the session's
    connection as plain rows, with the column types returning a marker instead
    of raising; the row holding the marker gives the primary key. Only failures
    pay for the second read. For it, the rows of a query over a mapper with
    encrypted columns are processed inside ``execute`` (``prebuffer_rows``, which
    ``AsyncSession.execute`` always asks for); with ``yield_per`` or
    ``stream_results`` they are not, and the error names table and column only.
    """
    if not state.is_select or _locating.get():
        return None
    options = state.execution_options
    try:
        if (
            options.get("prebuffer_rows")
            or options.get("yield_per")
            or options.get("stream_results")
            or not any(_has_encrypted_columns(m) for m in state.all_mappers)
        ):
            return state.invoke_statement()
        return state.invoke_statement(execution_options={"prebuffer_rows": True})
    except DecryptionError as exc:
        location = exc.location
        if location is None or location.primary_key is not None:
            raise
        try:
            found = _reread(state, location)
        # The re-read runs the statement that just ran, on the same connection: it fails
        # only if that connection drops between the two reads.
        except Exception:  # pragma: no cover - a connection lost between the two reads
            # the diagnosis must never hide the failure it explains
            logger.debug("could not find the row of an undecryptable value", exc_info=True)
            found = None
        if found is None:
            raise
        raise found from None


_ENCRYPTED_MAPPERS: weakref.WeakKeyDictionary[Mapper[Any], bool] = weakref.WeakKeyDictionary()


def _has_encrypted_columns(mapper: Mapper[Any]) -> bool:
    found = _ENCRYPTED_MAPPERS.get(mapper)
    if found is None:
        found = any(isinstance(c.type, EncryptedType) for c in mapper.columns)
        _ENCRYPTED_MAPPERS[mapper] = found
    return found


def _reread(state: ORMExecuteState, location: DecryptionLocation) -> DecryptionError | None:
    connection = state.session.connection(bind_arguments=state.bind_arguments)
    reset = _locating.set(True)
    try:
        rows = connection.execute(state.statement, state.parameters or {}).all()
    finally:
        _locating.reset(reset)
    for row in rows:
        for value in row:
            if not isinstance(value, _Undecryptable) or value.table is None:
                continue
            error = value.error
            # The re-read sees the same rows in the same order, so its first undecryptable
            # value is the one that raised; another comes first only if a write landed
            # between the two reads.
            if error.location is None or (error.location.table, error.location.column) != (
                location.table,
                location.column,
            ):  # pragma: no cover - rows changed between the failed read and the re-read
                continue
            mapping = row._mapping
            try:
                keys = [mapping[c] for c in value.table.primary_key.columns]
            except KeyError:
                return None  # the query did not select the primary key
            if not keys:
                return None
            return error.located(
                DecryptionLocation(
                    location.table, location.column, keys[0] if len(keys) == 1 else tuple(keys)
                )
            )
    return None


def _live_keys(keyring: Keyring, key_type: KeyType) -> list[DataKey]:
    """Every loaded version of ``key_type`` (destroyed keys are never loaded), newest first."""
    keys = [dk for dk in keyring if dk.key.key_type == key_type]
    return sorted(keys, key=lambda dk: dk.key.version, reverse=True)


# -- encrypted columns ----------------------------------------------------------


class _TableBound(TypeDecorator[Any]):
    """Learns ``table.column`` when its column is attached to a table (context binding)."""

    impl: Any = sa.Text
    cache_ok = True

    context: str | None
    _explicit_context: bool

    def _set_parent(self, parent: Any, outer: bool = False, **kw: Any) -> None:
        super()._set_parent(parent, outer=outer, **kw)
        # SQLAlchemy 2 calls a type's _set_parent only with its Column (Column.__init__,
        # Column._merge)
        if isinstance(parent, sa.Column):  # pragma: no branch - always a Column in SQLAlchemy 2
            parent._on_table_attach(self._attached)

    def _attached(self, column: sa.Column[Any], table: sa.Table) -> None:
        if not self._explicit_context:
            self.context = f"{table.name}.{column.name}"
        self.table_name = table.name
        self.column_name = column.name
        self.table = table

    def _context(self) -> str:
        if self.context is None:
            raise ConfigurationError(
                f"{type(self).__name__} is not attached to a table column yet; "
                "give context= when using it outside a Table"
            )
        return self.context


class _EncryptedComparator(TypeDecorator.Comparator[Any]):
    """``==`` / ``!=`` / ``in_`` with Python values on a deterministic column match every
    live key version; on a randomized column they can never match, so they raise.

    A comparison with another SQL expression is left to SQLAlchemy: it compares
    columns with ``==`` itself (result-map keys of a cached statement), and a
    column-to-column comparison compares stored tokens, nothing else.
    """

    __slots__ = ()

    def operate(self, op: Any, *other: Any, **kwargs: Any) -> Any:
        typ = self.expr.type
        if (
            op in (operators.eq, operators.ne, operators.in_op, operators.not_in_op)
            and other
            and other[0] is not None
            and isinstance(typ, EncryptedType)
            and not isinstance(other[0], sa.sql.ClauseElement)
        ):
            if not typ.deterministic:
                raise TypeError(
                    f"{typ.context}: randomized encryption cannot be compared in SQL; "
                    "use deterministic=True or a BlindIndex column"
                )
            values = other[0] if op in (operators.in_op, operators.not_in_op) else [other[0]]
            clause = typ.match_clause(self.expr, values)
            return ~clause if op in (operators.ne, operators.not_in_op) else clause
        return super().operate(op, *other, **kwargs)


COLUMN_KEY_TYPES: dict[str, KeyTypeLike] = {
    "income": KeyType.FINANCIAL_DATA,
    "salary": KeyType.FINANCIAL_DATA,
    "savings": KeyType.FINANCIAL_DATA,
    "balance": KeyType.FINANCIAL_DATA,
    "ssn": KeyType.PII,
    "email": KeyType.PII,
    "phone": KeyType.PII,
    "address": KeyType.PII,
    "dob": KeyType.PII,
    "api_key": KeyType.API_KEYS,
    "token": KeyType.API_KEYS,
    "secret": KeyType.API_KEYS,
}
"""Words of a column name -> the key type of an encrypted column declared without one.

A word matches between underscores (``monthly_income_encrypted`` -> ``income``).
Change it before the models are declared (``COLUMN_KEY_TYPES["iban"] =
KeyType.FINANCIAL_DATA``, or ``del COLUMN_KEY_TYPES["token"]``)."""


def key_type_for_column(
    column: str, table: str | None = None, mapping: Mapping[str, KeyTypeLike] | None = None
) -> KeyType:
    """The key type :data:`COLUMN_KEY_TYPES` (or ``mapping``) gives ``column``'s name.

    A name matching no word, or words of two key types, is refused with
    ``ConfigurationError``: a column never gets a key type by default.
    """
    words = f"_{column.lower()}_"
    matched = {
        word: KeyType(kt)
        for word, kt in (mapping or COLUMN_KEY_TYPES).items()
        if f"_{word.lower()}_" in words
    }
    found = set(matched.values())
    where = f"{table}.{column}" if table else column
    if len(found) == 1:
        return found.pop()
    if found:
        named = ", ".join(f"{kt.value} ({w})" for w, kt in sorted(matched.items()))
        raise ConfigurationError(
            f"{where}: the column name matches several key types "
            f"({named}); pass the one it holds, e.g. "
            f"EncryptedString(KeyType.{sorted(found)[0].name})"
        )
    raise ConfigurationError(
        f"{where}: no key type given and the column name says none (words known: "
        f"{', '.join(sorted(mapping or COLUMN_KEY_TYPES))}); pass the key type of what it "
        "holds, e.g. EncryptedString(KeyType.PII) for personal data, "
        "KeyType.FINANCIAL_DATA for amounts, KeyType.API_KEYS for credentials"
    )


class EncryptedType(_TableBound):
    """Base of the encrypted column types: a text column holding an aiocrypt token.

    ``key_type``: the key purpose (``KeyType.PII``, ``"financial_data"``, ...); when
    omitted, taken from the column's name (:data:`COLUMN_KEY_TYPES`), or refused.
    ``context``: defaults to ``"<table>.<column>"``, set when the column joins its table.
    ``deterministic``: AES-SIV, equal values give equal tokens, so ``==`` works (and
    matches every live key version); leaks equality, use for exact-match columns only.
    ``allow_plaintext``: the column may still hold plaintext from before encryption
    (a migration in progress); such values are returned as they are, counted in
    :data:`plaintext_reads` and logged, until the migration encrypts them.
    ``row_bound``: bind the row's primary key into the context too
    (``"<table>.<column>#<pk>"``), so a token copied to another row of the same
    column fails to decrypt. ``None`` (the default) takes the model's
    ``__aiocrypt_row_bound__`` (False when absent). The ORM fills the key in on
    flush and load; see docs/sqlalchemy.md, "Row-bound columns".
    ``legacy``: a :class:`LegacyReader` (:class:`SqlalchemyUtilsReader`,
    :class:`FernetReader`): the column may still hold that tool's ciphertext, read
    like plaintext above (counted in :data:`legacy_reads`) until the re-encryption
    engine rewrites it; remove it when the migration is done (docs/sqlalchemy.md).
    ``subject_column``: the column of the same table whose value names the row's data
    subject (``"user_id"``); each value is sealed under that subject's key, subject id
    ``"<subject_prefix>:<value>"`` (``subject_prefix`` defaults to ``"user"``), so
    ``await service.forget_subject("user:42")`` makes every such value of user 42
    unreadable. The ORM fills the subject in on flush; Core writes bind
    ``RowValue(value, subject=<the subject column's value>)``. Needs an async
    engine (or subject keys loaded, see docs/sqlalchemy.md, "Columns keyed per
    data subject"); not combinable with ``deterministic``, ``allow_plaintext`` or
    ``legacy``.
    ``service``: defaults to :func:`set_encryption_service` / the process-wide service.
    """

    python_type_name: str = "str"
    comparator_factory = _EncryptedComparator

    def __init__(
        self,
        key_type: KeyTypeLike | None = None,
        *,
        context: str | None = None,
        deterministic: bool = False,
        allow_plaintext: bool = False,
        row_bound: bool | None = None,
        legacy: LegacyReader | None = None,
        subject_column: str | None = None,
        subject_prefix: str = "user",
        service: EncryptionService | None = None,
    ) -> None:
        super().__init__()
        if subject_column is not None:
            _check_subject_options(
                subject_column,
                subject_prefix,
                deterministic=deterministic,
                migrating=allow_plaintext or legacy is not None,
            )
        if deterministic and row_bound:
            raise ValueError(
                "a row-bound column cannot be deterministic: its tokens differ "
                "per row, so no equality lookup could match; use a BlindIndex"
            )
        if key_type is None and context is not None:
            raise ConfigurationError(
                f"{context}: give key_type (with an explicit context "
                "there is no column name to take it from)"
            )
        self.key_type: KeyType = (
            KeyType(key_type) if key_type is not None else cast(KeyType, None)
        )  # set from the column name when attached
        self.context = context
        self.deterministic = deterministic
        self.allow_plaintext = allow_plaintext
        self.row_bound = row_bound
        self.legacy = legacy
        self.subject_column = subject_column
        self.subject_prefix = subject_prefix
        self.service = service
        self._explicit_context = context is not None

    def __repr__(self) -> str:
        kt = "None" if self.key_type is None else repr(self.key_type.value)
        options = ", deterministic=True" if self.deterministic else ""
        if self.subject_column is not None:
            options += f", subject_column={self.subject_column!r}"
        return f"{type(self).__name__}({kt}{options})"

    def _attached(self, column: sa.Column[Any], table: sa.Table) -> None:
        super()._attached(column, table)
        if self.key_type is None:
            self.key_type = key_type_for_column(column.name, table.name)

    def bind_value(self, value: Any, dialect: Dialect | None = None) -> Any:
        """What is encrypted for ``value`` (checked and coerced to the column's type)."""
        return self.coerce_value(value)

    def result_value(self, value: Any, dialect: Dialect | None = None) -> Any:
        """The Python value for a decrypted one (the identity but for wrapping types)."""
        return value

    @property
    def python_type(self) -> type:
        return cast(type, PYTHON_TYPES[self.python_type_name])

    def coerce_value(self, value: Any) -> Any:
        """The value as this column's Python type (``int`` -> ``float`` for a float column)."""
        expected = PYTHON_TYPES[self.python_type_name]
        if isinstance(value, expected) and not (
            isinstance(value, bool) and self.python_type_name != "bool"
        ):
            return value
        raise TypeError(
            f"{self.context}: expected {self.python_type_name}, got {type(value).__name__}"
        )

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        primary_key = subject = None
        if isinstance(value, RowValue):
            value, primary_key, subject = value.value, value.primary_key, value.subject
        if value is None:
            return None
        context = self._bind_context(primary_key)
        subject_id = self._bind_subject(subject)
        value = self.bind_value(value, dialect)
        if value is None:
            return None
        service = _service_for(self.service)
        if subject_id is not None:
            return _encrypt_for_subject(service, value, self.key_type, context, subject_id)
        keyring = _current_keyring(service, self.key_type)
        if self.deterministic:
            return keyring.encrypt_deterministic(value, self.key_type, context)
        return keyring.encrypt(
            value,
            self.key_type,
            context,
            compression_level=service.compression_level_for(self.key_type),
        )

    def _bind_context(self, primary_key: Any) -> str:
        if not self.row_bound:
            if primary_key is not None:
                raise TypeError(f"{self.context}: RowValue given to a column that is not row-bound")
            return self._context()
        if primary_key is None:
            raise ConfigurationError(
                f"{self.context}: a row-bound column is sealed with its row's primary key, "
                "which this write does not give: write through the ORM (a unit of work "
                "fills it in) or bind RowValue(value, primary_key)"
            )
        return row_context(self._context(), primary_key)

    def _bind_subject(self, subject: Any) -> str | None:
        """The subject id a write seals under (None: the key type's own key)."""
        if self.subject_column is None:
            if subject is not None:
                raise TypeError(
                    f"{self.context}: RowValue(subject=...) given to a column "
                    "without subject_column"
                )
            return None
        where = f"{getattr(self, 'table_name', '?')}.{self.subject_column}"
        if subject is None:
            raise ConfigurationError(
                f"{self.context}: sealed under the key of the row's data subject "
                f"({where}), which this write does not give: write through the ORM (a unit "
                f"of work fills it in) or bind RowValue(value, subject=<{where}>)"
            )
        return subject_id(self.subject_prefix, subject, where)

    def column_expression(self, colexpr: Any) -> Any:
        """A row-bound column is selected as ``col || '#' || CAST(pk AS TEXT) || '#' ||
        <marker>``, so the value arrives with the primary key of the row it was read
        from (SQL says which row, not the stored text)."""
        if not self.row_bound:
            return colexpr
        key = self._row_key_column(colexpr)
        text = sa.Text()
        suffix = sa.cast(key, text) if key is not None else sa.literal("", text)
        return sa.type_coerce(
            sa.type_coerce(colexpr, text)
            + sa.literal("#", text)
            + suffix
            + sa.literal(_ROW_MARKER, text),
            self,
        )

    def _row_key_column(self, colexpr: Any) -> Any:
        table = getattr(self, "table", None)
        source = getattr(colexpr, "table", None)
        if table is None or source is None or len(table.primary_key.columns) != 1:
            return None
        return source.c.get(next(iter(table.primary_key.columns)).key)

    def _split_row(self, value: str) -> tuple[str, str]:
        """(stored value, primary key text) of a value selected by column_expression."""
        stored, marked, key = value.partition("#")
        if not marked or not key.endswith(_ROW_MARKER) or len(key) == len(_ROW_MARKER):
            # textual SQL (no column_expression) or a query that lost the primary key:
            # whatever follows a "#" here was stored, not selected, so it is not trusted
            raise decryption_failed(
                DecryptionFailure.MALFORMED,
                None,
                "a row-bound column was read without its primary key",
            )
        return stored, key[: -len(_ROW_MARKER)]

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        primary_key: Any = None
        try:
            context = self._context()
            if self.row_bound and isinstance(value, str):
                value, primary_key = self._split_row(value)
                context = row_context(context, primary_key)
                primary_key = _typed_key(getattr(self, "table", None), primary_key)
            if isinstance(value, str) and value.startswith(TEXT_PREFIXES):
                decrypted = _decrypt(
                    _service_for(self.service),
                    value,
                    self.key_type,
                    context,
                    by_subject=self.subject_column is not None,
                )
            elif self.legacy is not None:
                try:
                    text = self.legacy.open(value)
                except LegacyTokenError:
                    raise decryption_failed(
                        DecryptionFailure.AUTHENTICATION_FAILED,
                        None,
                        f"not a valid {self.legacy.name} token",
                    ) from None
                decrypted = self._legacy(text, legacy_reads, "legacy_reads")
            elif not self.allow_plaintext:
                raise decryption_failed(
                    DecryptionFailure.MALFORMED, None, "the stored value is not a token"
                )
            else:
                decrypted = self._legacy(value, plaintext_reads, "plaintext_reads")
        except DecryptionError as exc:
            # Name the column (never the value); a row-bound column knows its row,
            # otherwise the primary key is added by _locate_undecryptable_row when an
            # ORM session ran the query.
            located = exc.located(
                DecryptionLocation(
                    getattr(self, "table_name", "?"),
                    getattr(self, "column_name", self.context or "?"),
                    primary_key,
                )
            )
            if _locating.get():
                return _Undecryptable(located, getattr(self, "table", None))
            raise located from None
        return self.result_value(decrypted, dialect)

    def _legacy(self, value: Any, reads: Counter[str], counter: str) -> Any:
        """A value from before the migration (plaintext, or a legacy reader's text)."""
        context = self._context()
        try:
            parsed = parse_legacy(self.python_type_name, value)
        except ValueError:
            raise decryption_failed(
                DecryptionFailure.MALFORMED,
                None,
                "the stored value is neither a token nor valid plaintext",
            ) from None
        reads[context] += 1
        service = _service_for(self.service)
        service.counters[counter] += 1
        service.counters[f"{counter}:{context}"] += 1
        if reads[context] == 1 or reads[context] % 1000 == 0:
            logger.warning(
                "%s: read %d value(s) not in aiocrypt form yet (%s); run the "
                "migration (re-encryption engine) to encrypt them",
                context,
                reads[context],
                counter,
            )
        return parsed

    def tokens_for(self, value: Any, keyring: Keyring | None = None) -> list[str]:
        """Deterministic tokens of ``value`` under every live key version (newest first),
        in format version 2 and, while the keyring reads it, version 1 (rows not migrated)."""
        if not self.deterministic:
            raise TypeError(f"{self.context}: only deterministic columns have stable tokens")
        if keyring is None:
            keyring = _current_keyring(_service_for(self.service))
        plaintext = encode_value(self.bind_value(value))
        ctx = context_bytes(self._context())
        return [
            token
            for dk in _live_keys(keyring, self.key_type)
            for token in dk.deterministic_tokens(plaintext, ctx, v1=keyring.accept_format_v1)
        ]

    def match_clause(self, column: Any, values: Iterable[Any]) -> Any:
        tokens = [t for v in values for t in self.tokens_for(v)]
        return sa.type_coerce(column, sa.Text()).in_(tokens)


#: Ends the primary key a row-bound column is selected with. It is random per process
#: and travels as a bind parameter, so text an attacker stores after a "#" in the
#: column can never pass for the primary key SQL appended.
_ROW_MARKER: Final = "#" + secrets.token_hex(16)


class RowValue:
    """A value with what its row gives it, for writes the ORM's unit of work does not
    make (Core ``insert`` / ``update``, ORM bulk inserts): the row's primary key for a
    row-bound column, the value of its subject column for a column keyed per subject::

        conn.execute(users.insert().values(id=8, ssn=RowValue("123-45-6789", 8)))
        conn.execute(orders.insert().values(user_id=42, note=RowValue("...", subject=42)))
    """

    __slots__ = ("primary_key", "subject", "value")

    def __init__(self, value: Any, primary_key: Any = None, *, subject: Any = None) -> None:
        if primary_key is None and subject is None:
            raise ValueError("RowValue needs the row's primary key (or its subject)")
        self.value = value
        self.primary_key = primary_key
        self.subject = subject

    def __repr__(self) -> str:
        subject = "" if self.subject is None else ", subject=<subject>"
        return f"RowValue(<value>, {self.primary_key!r}{subject})"


def _typed_key(table: sa.Table | None, text: str) -> Any:
    """The primary key text of a row-bound read as the key's Python type (for errors)."""
    if table is None:
        return text
    try:
        python_type = next(iter(table.primary_key.columns)).type.python_type
        return python_type(text) if python_type in (int, UUID) else text
    except (NotImplementedError, StopIteration, ValueError):
        return text


class EncryptedString(EncryptedType):
    """``str`` values."""

    cache_ok = True
    python_type_name = "str"


class EncryptedBytes(EncryptedType):
    """``bytes`` values (stored as a text token like every other type)."""

    cache_ok = True
    python_type_name = "bytes"

    def coerce_value(self, value: Any) -> Any:
        if isinstance(value, (bytearray, memoryview)):
            return bytes(value)
        return super().coerce_value(value)


class EncryptedInteger(EncryptedType):
    """``int`` values of any size."""

    cache_ok = True
    python_type_name = "int"


class EncryptedFloat(EncryptedType):
    """``float`` values (ints are stored as floats)."""

    cache_ok = True
    python_type_name = "float"

    def coerce_value(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return super().coerce_value(value)


class EncryptedDecimal(EncryptedType):
    """``Decimal`` values, exactly (ints become Decimals; floats are refused: inexact)."""

    cache_ok = True
    python_type_name = "decimal"

    def coerce_value(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return Decimal(value)
        return super().coerce_value(value)


EncryptedNumeric = EncryptedDecimal


class EncryptedBoolean(EncryptedType):
    """``bool`` values."""

    cache_ok = True
    python_type_name = "bool"


class EncryptedDate(EncryptedType):
    """``date`` values (a datetime is refused: use EncryptedDateTime)."""

    cache_ok = True
    python_type_name = "date"

    def coerce_value(self, value: Any) -> Any:
        if isinstance(value, datetime):
            raise TypeError(f"{self.context}: expected date, got datetime")
        return super().coerce_value(value)


class EncryptedDateTime(EncryptedType):
    """``datetime`` values. ``timezone=True`` (the default): aware ones only, the
    offset kept. ``timezone=False``: naive ones only, stored and returned as they
    are: the application's own clock (naive UTC, say), which aiocrypt cannot check;
    an aware value is refused rather than have its zone dropped."""

    cache_ok = True
    python_type_name = "datetime"

    def __init__(
        self, key_type: KeyTypeLike | None = None, *, timezone: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(key_type, **kwargs)
        self.timezone = timezone
        if not timezone:
            self.python_type_name = "naive_datetime"

    def coerce_value(self, value: Any) -> Any:
        value = super().coerce_value(value)
        if self.timezone:
            if value.tzinfo is None or value.utcoffset() is None:
                raise TypeError(
                    f"{self.context}: a naive datetime in a timezone=True column; "
                    "attach a timezone, or declare EncryptedDateTime(timezone=False)"
                )
            return value
        if value.tzinfo is not None:
            raise TypeError(
                f"{self.context}: an aware datetime in a timezone=False column "
                "(its zone would be lost); convert it to the application's clock"
            )
        return NaiveDateTime.combine(value.date(), value.time())


class EncryptedTime(EncryptedType):
    """``time`` values (with or without an offset, kept as given)."""

    cache_ok = True
    python_type_name = "time"


class EncryptedInterval(EncryptedType):
    """``timedelta`` values, exactly (days, seconds, microseconds)."""

    cache_ok = True
    python_type_name = "timedelta"


_JSON_TYPES: Final = (dict, list, str, int, float, bool)


class EncryptedJSON(EncryptedType):
    """JSON-like values: a ``dict`` or ``list`` (items keep their types: Decimal, date,
    ...), or a top-level ``str`` / ``int`` / ``float`` / ``bool``. ``None`` is SQL NULL.

    ``mutable=True`` (the default): with the ORM, in-place changes to the top-level
    dict or list (``obj.prefs["lang"] = "fr"``, ``obj.tags.append(x)``) mark the
    attribute changed, as ``MutableDict`` / ``MutableList`` do; changes nested
    deeper need a reassignment or ``flag_modified``. ``mutable=False``: reassign.
    """

    cache_ok = True
    python_type_name = "json"

    def __init__(
        self, key_type: KeyTypeLike | None = None, *, mutable: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(key_type, **kwargs)
        self.mutable = mutable

    def coerce_value(self, value: Any) -> Any:
        if isinstance(value, _JSON_TYPES):
            return value
        raise TypeError(
            f"{self.context}: expected a dict, list, str, int, float or bool, "
            f"got {type(value).__name__}"
        )

    def result_value(self, value: Any, dialect: Dialect | None = None) -> Any:
        return _tracked_json(value) if self.mutable else value


def _tracked_json(value: Any) -> Any:
    if type(value) is dict:
        return MutableDict(value)
    if type(value) is list:
        return MutableList(value)
    return value


class EncryptedEnum(EncryptedType):
    """One of a Python ``enum.Enum``'s members (stored by name, as ``sa.Enum`` does) or
    of a sequence of strings; anything else is refused on write, and on read (a
    stored name the enum no longer has raises ``LookupError``)::

        status: Mapped[Status] = mapped_column(EncryptedEnum(Status, KeyType.PII))
        tier: Mapped[str] = mapped_column(EncryptedEnum(["gold", "silver"], KeyType.PII))
    """

    cache_ok = True
    python_type_name = "str"

    def __init__(
        self, enum: type[_Enum] | Sequence[str], key_type: KeyTypeLike | None = None, **kwargs: Any
    ) -> None:
        super().__init__(key_type, **kwargs)
        if isinstance(enum, type) and issubclass(enum, _Enum):
            self.enum: type[_Enum] | tuple[str, ...] = enum
            self.choices: tuple[str, ...] = tuple(enum.__members__)
        else:
            choices = tuple(enum)
            if not choices or not all(isinstance(c, str) for c in choices):
                raise TypeError("EncryptedEnum takes an enum.Enum class or strings")
            self.enum = self.choices = choices

    def coerce_value(self, value: Any) -> Any:
        if isinstance(self.enum, type) and isinstance(value, self.enum):
            return value.name
        if isinstance(value, str) and value in self.choices:
            return str(value)
        raise ValueError(
            f"{self.context}: not one of the column's values ({', '.join(self.choices)})"
        )

    def result_value(self, value: Any, dialect: Dialect | None = None) -> Any:
        if value not in self.choices:
            raise LookupError(
                f"{self.context}: a stored value is not one of the column's "
                f"values ({', '.join(self.choices)})"
            )
        return self.enum[value] if isinstance(self.enum, type) else value

    index_value = coerce_value


class EncryptedUUID(EncryptedType):
    """``uuid.UUID`` values."""

    cache_ok = True
    python_type_name = "uuid"


_NEUTRAL_DIALECT: Final = DefaultDialect()


class Encrypted(EncryptedType):
    """Encrypts whatever another column type binds: ``Encrypted(PhoneNumberType(),
    KeyType.PII)``, ``Encrypted(sa.Enum(Status))``, ``Encrypted(MyDecorator())``.

    On write the underlying type's ``process_bind_param`` (a ``TypeDecorator``) or
    its enum check (``sa.Enum``) runs first and the value it binds is encrypted
    (its Python type kept: a date stays a date); on read the decrypted value goes
    through the underlying ``process_result_value``. A naive datetime bound by the
    underlying type (``sa.DateTime()``) is stored as the application's clock.
    Deterministic mode and blind indexes hash the bound value, computed without a
    dialect: they need an underlying type whose binding does not depend on the
    database (most do; sqlalchemy-utils' ``JSONType`` does not).
    """

    cache_ok = True

    def __init__(self, underlying: Any, key_type: KeyTypeLike | None = None, **kwargs: Any) -> None:
        super().__init__(key_type, **kwargs)
        self.underlying = sa.types.to_instance(underlying)
        self.python_type_name = _bound_type_name(self.underlying)

    def __repr__(self) -> str:
        return f"Encrypted({self.underlying!r}, {super().__repr__()})"

    def coerce_value(self, value: Any) -> Any:
        return self.bind_value(value)

    def bind_value(self, value: Any, dialect: Dialect | None = None) -> Any:
        typ = self.underlying
        if isinstance(typ, TypeDecorator):
            value = typ.process_bind_param(value, dialect or _NEUTRAL_DIALECT)
        elif isinstance(typ, sa.Enum):
            value = _enum_bind(typ, value, self.context)
        if isinstance(value, datetime) and value.tzinfo is None:
            return NaiveDateTime.combine(value.date(), value.time())
        return value

    def result_value(self, value: Any, dialect: Dialect | None = None) -> Any:
        typ = self.underlying
        if isinstance(typ, TypeDecorator):
            return typ.process_result_value(value, dialect or _NEUTRAL_DIALECT)
        if isinstance(typ, sa.Enum) and typ.enum_class is not None and value is not None:
            return typ.enum_class[value]
        return value

    index_value = bind_value


def _enum_bind(typ: sa.Enum, value: Any, context: str | None) -> Any:
    if value is None:
        return None
    if typ.enum_class is not None and isinstance(value, typ.enum_class):
        return value.name
    if isinstance(value, str) and value in typ.enums:
        return value
    raise ValueError(f"{context}: not one of the column's values ({', '.join(typ.enums)})")


def _bound_type_name(typ: Any) -> str:
    """The value type name (LEGACY_TYPES) an underlying column type binds, for the
    plaintext and legacy readers; "str" where it cannot be told."""
    if isinstance(typ, TypeDecorator):
        return _bound_type_name(typ.impl_instance)
    if isinstance(typ, sa.DateTime):
        return "datetime" if typ.timezone else "naive_datetime"
    for sa_type, name in (
        (sa.Boolean, "bool"),
        (sa.Interval, "timedelta"),
        (sa.Date, "date"),
        (sa.Time, "time"),
        (sa.Integer, "int"),
        (sa.Float, "float"),
        (sa.Numeric, "decimal"),
        (sa.Uuid, "uuid"),
        (sa.JSON, "json"),
        (sa.LargeBinary, "bytes"),
    ):
        if isinstance(typ, sa_type):
            return name
    return "str"


# -- blind indexes --------------------------------------------------------------


def normalize_text(value: Any) -> str:
    """NFKC, trimmed, case-folded, whitespace collapsed: ``" Ann  SMITH "`` -> ``"ann smith"``."""
    return " ".join(unicodedata.normalize("NFKC", str(value)).casefold().split())


def normalize_digits(value: Any) -> str:
    """Digits only: ``"123-45-6789"`` == ``"123 45 6789"`` (SSNs, phone numbers)."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", str(value)) if ch.isdigit())


def normalize_email(value: Any) -> str:
    """Trimmed and case-folded e-mail address."""
    return unicodedata.normalize("NFKC", str(value)).strip().casefold()


class IndexDigest(str):
    """A stored blind-index value (``"<key version>:<base64url HMAC>"``) as loaded."""

    __slots__ = ()


class _BlindIndexComparator(TypeDecorator.Comparator[Any]):
    __slots__ = ()

    def matches(self, value: Any) -> Any:
        """Rows whose indexed value equals ``value`` under any live index key version."""
        return blind_index_matches(self.expr, value)

    def operate(self, op: Any, *other: Any, **kwargs: Any) -> Any:
        if (
            op in (operators.eq, operators.ne)
            and other
            and other[0] is not None
            and not isinstance(other[0], (IndexDigest, sa.sql.ClauseElement))
        ):
            clause = blind_index_matches(self.expr, other[0])
            return ~clause if op is operators.ne else clause
        return super().operate(op, *other, **kwargs)


class BlindIndex(_TableBound):
    """A searchable HMAC of another (encrypted) column of the same table.

    Stores ``"<index key version>:" + base64url(HMAC-SHA256(k, context || 0 ||
    normalizer(value))[:length])`` where ``k`` is derived with HKDF from the
    version of ``key_type`` (a key type of its own, ``"blind_index"`` by default)
    and ``context`` is ``"<table>.<source>"``. With the ORM, the value is kept in
    sync with ``source`` on insert and update; with Core, give the plaintext to
    both columns (the index column hashes what it is given).
    ``Model.index.matches(value)`` (or ``==``) matches every live key version, so
    lookups keep working across a rotation of the index key.

    ``length`` (bytes, 8..32) trades storage against collisions: with 16 bytes
    collisions are negligible; a short length deliberately makes lookups return
    a few extra rows (filter them after decrypting).
    """

    impl: Any = sa.String(64)
    cache_ok = True
    comparator_factory = _BlindIndexComparator

    def __init__(
        self,
        source: str,
        *,
        key_type: KeyTypeLike = BLIND_INDEX_KEY_TYPE,
        length: int = 16,
        normalizer: Callable[[Any], str | bytes] | None = None,
        context: str | None = None,
        service: EncryptionService | None = None,
    ) -> None:
        super().__init__()
        if not 8 <= length <= 32:
            raise ValueError("blind index length must be 8..32 bytes")
        self.source = source
        self.key_type = KeyType(key_type)
        self.length = length
        self.normalizer = normalizer
        self.context = context
        self.service = service
        self._explicit_context = context is not None

    def __repr__(self) -> str:
        return f"BlindIndex({self.source!r}, key_type={self.key_type.value!r})"

    def _attached(self, column: sa.Column[Any], table: sa.Table) -> None:
        super()._attached(column, table)
        if not self._explicit_context:
            self.context = f"{table.name}.{self.source}"

    def _message(self, value: Any) -> bytes:
        # a source that wraps another type (Encrypted, EncryptedEnum) is indexed by
        # the value it binds: an enum member by its name, a phone number by its text
        table = getattr(self, "table", None)
        source = table.columns.get(self.source) if table is not None else None
        index_value = getattr(getattr(source, "type", None), "index_value", None)
        if index_value is not None:
            value = index_value(value)
        normalized = self.normalizer(value) if self.normalizer is not None else value
        if isinstance(normalized, str):
            data = normalized.encode("utf-8")
        elif isinstance(normalized, bytes):
            data = normalized
        else:
            data = encode_value(normalized)
        return context_bytes(self._context()) + b"\x00" + data

    def digest(self, value: Any, data_key: DataKey) -> IndexDigest:
        """The index value of ``value`` under one index key version."""
        mac = hmac.new(
            data_key.derive(b"blind-index", 32), self._message(value), hashlib.sha256
        ).digest()[: self.length]
        encoded = base64.urlsafe_b64encode(mac).decode("ascii").rstrip("=")
        return IndexDigest(f"{data_key.key.version}:{encoded}")

    def candidates(self, value: Any, keyring: Keyring | None = None) -> list[str]:
        """The index value of ``value`` under every live version of the index key."""
        if keyring is None:
            keyring = _current_keyring(_service_for(self.service))
        return [self.digest(value, dk) for dk in _live_keys(keyring, self.key_type)]

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        if isinstance(value, IndexDigest):
            return str(value)  # loaded from the database, written back unchanged
        keyring = _current_keyring(_service_for(self.service), self.key_type)
        return str(self.digest(value, keyring.active(self.key_type)))

    def process_result_value(self, value: Any, dialect: Dialect) -> IndexDigest | None:
        return None if value is None else IndexDigest(value)


def blind_index_matches(column: Any, value: Any) -> Any:
    """``column IN (index of value under each live key version)`` for a BlindIndex column."""
    typ = column.type
    if not isinstance(typ, BlindIndex):
        raise TypeError("blind_index_matches() needs a BlindIndex column")
    candidates = typ.candidates(value)
    return sa.type_coerce(column, sa.String()).in_(candidates)


async def rebuild_blind_indexes(
    engine: AsyncEngine, table: sa.Table, *, batch_size: int = 1000
) -> int:
    """Recompute every blind index of ``table`` not yet under the active index key.

    Needed before an old index key version may be destroyed (lookups match every
    live version, so nothing is urgent before that). Walks the primary key in
    batches; each row's index is rewritten only while its source column still
    holds the token that was read (compare-and-swap), so a concurrent change of
    the source, which re-indexes itself, is never overwritten. Returns the number
    of index values rewritten.
    """
    pk_columns = list(table.primary_key.columns)
    if len(pk_columns) != 1:
        raise ConfigurationError(f"table {table.name}: needs a single-column primary key")
    pk = pk_columns[0]
    done = 0
    for index in [c for c in table.columns if isinstance(c.type, BlindIndex)]:
        index_type = cast(BlindIndex, index.type)
        source = table.columns[index_type.source]
        service = _service_for(index_type.service)
        keyring = await service.key_manager.ensure_active([index_type.key_type])
        active = keyring.active(index_type.key_type)
        tag = f"{active.key.version}:"
        raw_source = sa.type_coerce(source, sa.Text())
        raw_index = sa.type_coerce(index, sa.Text())
        update = (
            sa.update(table)
            .where(pk == sa.bindparam("b_pk"), raw_source == sa.bindparam("b_raw"))
            .values({index.name: sa.bindparam("b_new")})
        )
        last: Any = None
        while True:
            query = (
                sa.select(pk, raw_source, source)
                .where(
                    source.is_not(None),
                    sa.or_(index.is_(None), sa.func.substr(raw_index, 1, len(tag)) != tag),
                )
                .order_by(pk)
                .limit(batch_size)
            )
            if last is not None:
                query = query.where(pk > last)
            async with engine.begin() as conn:
                rows = (await conn.execute(query)).all()
                if not rows:
                    break
                await conn.execute(
                    update,
                    [
                        {"b_pk": key, "b_raw": raw, "b_new": index_type.digest(value, active)}
                        for key, raw, value in rows
                    ],
                )
            done += len(rows)
            last = rows[-1][0]
    return done


async def blind_index_usage(
    engine: AsyncEngine, metadata: sa.MetaData, service: EncryptionService | None = None
) -> dict[str, int]:
    """Rows per blind-index key id over every BlindIndex column of ``metadata``, in SQL.

    Merge it with ``ReencryptionEngine.key_usage()`` for ``KeyManager.census``: a
    blind-index key version still used by an index value must not be destroyed.
    """
    usage: dict[str, int] = {}
    for table in metadata.sorted_tables:
        for column in table.columns:
            if not isinstance(column.type, BlindIndex):
                continue
            manager = _service_for(service or column.type.service).key_manager
            versions = {k.version: k.key_id for k in await manager.list_keys(column.type.key_type)}
            raw = sa.type_coerce(column, sa.Text())
            if engine.dialect.name == "postgresql":
                version = sa.func.split_part(raw, ":", 1)
            else:
                version = sa.func.substr(raw, 1, sa.func.instr(raw, ":") - 1)
            query = sa.select(version, sa.func.count()).where(column.is_not(None)).group_by(version)
            async with engine.connect() as conn:
                for tag, rows in (await conn.execute(query)).all():
                    key_id = versions.get(int(tag)) if str(tag).isdigit() else None
                    if key_id is not None:
                        usage[key_id] = usage.get(key_id, 0) + int(rows)
    return usage


# Keep blind indexes in sync through the ORM: when the source attribute changes,
# copy its (plaintext) value into the index attribute; the type hashes it on flush.


def _index_pairs(mapper: Mapper[Any]) -> list[tuple[str, str]]:
    pairs = []
    for table in mapper.tables:
        for column in table.columns:
            if isinstance(column.type, BlindIndex):
                source = table.columns.get(column.type.source)
                if source is None:
                    raise ConfigurationError(
                        f"blind index {table.name}.{column.name}: no "
                        f"column {column.type.source!r} in the table"
                    )
                try:
                    pairs.append(
                        (
                            mapper.get_property_by_column(source).key,
                            mapper.get_property_by_column(column).key,
                        )
                    )
                except UnmappedColumnError:  # not mapped on this mapper (e.g. excluded)
                    pass
    return pairs


def _row_bound_columns(mapper: Mapper[Any]) -> list[tuple[str, sa.Column[Any]]]:
    found: list[tuple[str, sa.Column[Any]]] = []
    for column in _table(mapper).columns:
        if isinstance(column.type, EncryptedType) and column.type.row_bound:
            try:
                found.append((mapper.get_property_by_column(column).key, column))
            except UnmappedColumnError:
                pass
    return found


def _subject_columns(mapper: Mapper[Any]) -> list[tuple[str, sa.Column[Any], str]]:
    """(attribute, column, attribute of its subject column) of every subject-keyed column."""
    found: list[tuple[str, sa.Column[Any], str]] = []
    table = _table(mapper)
    for column in table.columns:
        typ = column.type
        if not isinstance(typ, EncryptedType) or typ.subject_column is None:
            continue
        subject = table.columns.get(typ.subject_column)
        if subject is None:
            raise ConfigurationError(
                f"{table.name}.{column.name}: subject_column "
                f"{typ.subject_column!r} is not a column of the table"
            )
        if isinstance(subject.type, EncryptedType):
            raise ConfigurationError(
                f"{table.name}.{column.name}: the subject column "
                f"{subject.name!r} must hold the subject in clear"
            )
        try:
            found.append(
                (
                    mapper.get_property_by_column(column).key,
                    column,
                    mapper.get_property_by_column(subject).key,
                )
            )
        except UnmappedColumnError:
            pass
    return found


def _table(mapper: Mapper[Any]) -> sa.Table:
    """The mapped table (row-bound columns and blind indexes live on a plain Table)."""
    table = mapper.local_table
    if not isinstance(table, sa.Table):
        raise ConfigurationError(
            f"{mapper.class_.__name__}: encrypted columns need a model "
            "mapped to a table (not a join or a select)"
        )
    return table


def _track_json_mutations(mapper: Mapper[Any]) -> None:
    """In-place changes of a mutable EncryptedJSON's top-level dict / list flag the
    attribute (``MutableDict`` / ``MutableList``); top-level scalars need no tracking."""
    for prop in mapper.column_attrs:
        typ = prop.columns[0].type
        if (
            not (isinstance(typ, EncryptedJSON) and typ.mutable)
            or prop.parent is not mapper
            or len(prop.columns) != 1
        ):
            continue
        key = prop.key

        def load(state: Any, *args: Any, key: str = key) -> None:
            value = state.dict.get(key)
            tracked = _tracked_json(value)
            # result_value already returns a mutable column's dict / list as MutableDict /
            # MutableList, so a loaded value arrives tracked
            if tracked is not value:  # pragma: no cover - loaded values arrive tracked
                state.dict[key] = tracked
            if isinstance(tracked, Mutable):
                tracked._parents[state] = key

        def refresh(state: Any, context: Any, attrs: Any, key: str = key) -> None:
            if not attrs or key in attrs:
                load(state)

        def set_(state: Any, value: Any, old: Any, initiator: Any, key: str = key) -> Any:
            if value is old:
                return value
            value = _tracked_json(value)
            if isinstance(value, Mutable):
                value._parents[state] = key
            if isinstance(old, Mutable):
                old._parents.pop(state, None)
            return value

        event.listen(mapper.class_, "load", load, raw=True, propagate=True)
        event.listen(mapper.class_, "refresh", refresh, raw=True, propagate=True)
        event.listen(mapper.class_, "refresh_flush", refresh, raw=True, propagate=True)
        event.listen(
            getattr(mapper.class_, key), "set", set_, raw=True, retval=True, propagate=True
        )


@event.listens_for(Mapper, "after_mapper_constructed")
def _model_row_binding(mapper: Mapper[Any], class_: type) -> None:
    """``__aiocrypt_row_bound__ = True`` on a model makes its encrypted columns declared
    without ``row_bound=`` row-bound (set when the class is mapped, before any query)."""
    default = getattr(class_, "__aiocrypt_row_bound__", None)
    if default is None:
        return
    for column in mapper.local_table.columns:
        typ = column.type
        if isinstance(typ, EncryptedType) and typ.row_bound is None:
            if default and typ.deterministic:
                raise ConfigurationError(
                    f"{typ.context}: deterministic, so it cannot be row-bound; declare it "
                    "with row_bound=False (or use a BlindIndex for lookups)"
                )
            typ.row_bound = bool(default)


@event.listens_for(Mapper, "mapper_configured")
def _register_flush_hooks(mapper: Mapper[Any], class_: type) -> None:  # noqa: C901 - SQLAlchemy session events as closures over the service: the count is the nested hooks'
    """Blind indexes follow their source; row-bound and subject-keyed values are sealed
    with what their row gives them.

    Such an attribute is handed to the type as ``RowValue(value, pk, subject=...)``
    for the flush and set back to the plain value after it. A row whose primary key
    the database generates has no key before its INSERT: a row-bound value (or one
    whose subject column is that key) is inserted as NULL and written by a second
    UPDATE in the same transaction, once the key is known. A row whose subject
    column changes has its subject-keyed values (read first if not loaded) sealed
    again under the new subject's key in the same UPDATE.
    """
    _track_json_mutations(mapper)
    pairs = _index_pairs(mapper)
    bound = _row_bound_columns(mapper)
    subjects = _subject_columns(mapper)
    if not pairs and not bound and not subjects:
        return
    table = _table(mapper)
    pk_columns = list(table.primary_key.columns)
    if bound and len(pk_columns) != 1:
        raise ConfigurationError(
            f"table {table.name}: row-bound columns need a single-column primary key"
        )
    pk_key = mapper.get_property_by_column(pk_columns[0]).key if len(pk_columns) == 1 else None
    columns = dict(bound) | {attr: column for attr, column, _ in subjects}
    bound_attrs = {attr for attr, _ in bound}
    subject_of = {attr: subject for attr, _, subject in subjects}

    def row_value(target: Any, attr: str, value: Any, key: Any) -> RowValue | None:
        """``value`` with its row's key and subject; None while the INSERT has to make them."""
        keyed = attr in bound_attrs
        subject_attr = subject_of.get(attr)
        subject = None if subject_attr is None else getattr(target, subject_attr)
        if (keyed and key is None) or (
            subject is None and subject_attr is not None and subject_attr == pk_key
        ):
            return None
        if subject_attr is not None and subject is None:
            raise ConfigurationError(
                f"{table.name}.{columns[attr].name}: sealed under the key of the row's data "
                f"subject, but its subject column {subject_attr!r} is None; set it first"
            )
        return RowValue(value, key if keyed else None, subject=subject)

    def before_insert(mapper: Mapper[Any], connection: Any, target: Any) -> None:
        for source, index in pairs:
            setattr(target, index, getattr(target, source))
        if not columns:
            return
        key = getattr(target, pk_key) if pk_key is not None else None
        pending = {}
        for attr in columns:
            value = getattr(target, attr)
            if value is None or isinstance(value, RowValue):
                continue
            wrapped = row_value(target, attr, value, key)
            if wrapped is None:
                pending[attr] = value
                setattr(target, attr, None)
            else:
                setattr(target, attr, wrapped)
        if pending:
            sa.inspect(target).info["aiocrypt_row_bound_pending"] = pending

    def before_update(mapper: Mapper[Any], connection: Any, target: Any) -> None:
        state = sa.inspect(target)
        for source, index in pairs:
            if state.attrs[source].history.has_changes():
                setattr(target, index, getattr(target, source))
        if not columns:
            return
        if bound and state.attrs[pk_key].history.has_changes():
            raise ConfigurationError(
                f"{table.name}: the primary key of a row with row-bound "
                "columns cannot change (its tokens are sealed with it); insert a new row"
            )
        key = None
        if pk_key is not None:
            key = state.identity[0] if state.identity else getattr(target, pk_key)
        for attr in columns:
            subject_attr = subject_of.get(attr)
            if not state.attrs[attr].history.has_changes():
                if subject_attr is None or not state.attrs[subject_attr].history.has_changes():
                    continue
            # not loaded (expired, deferred): read now, or its token would stay behind
            value = state.dict[attr] if attr in state.dict else getattr(target, attr)
            if isinstance(value, RowValue):
                value = value.value
            if value is not None:
                setattr(target, attr, row_value(target, attr, value, key))

    def after_write(mapper: Mapper[Any], connection: Any, target: Any) -> None:
        state = sa.inspect(target)
        for attr in columns:
            value = state.dict.get(attr)
            if isinstance(value, RowValue):
                set_committed_value(target, attr, value.value)
        pending = state.info.pop("aiocrypt_row_bound_pending", None)
        if pending:
            assert pk_key is not None  # pending only waits for a single-column key
            key = getattr(target, pk_key)
            connection.execute(
                table.update()
                .where(pk_columns[0] == key)
                .values(
                    {
                        columns[attr]: row_value(target, attr, value, key)
                        for attr, value in pending.items()
                    }
                )
            )
            for attr, value in pending.items():
                set_committed_value(target, attr, value)

    event.listen(mapper, "before_insert", before_insert)
    event.listen(mapper, "before_update", before_update)
    if columns:
        event.listen(mapper, "after_insert", after_write)
        event.listen(mapper, "after_update", after_write)


# -- the re-encryption engine over SQLAlchemy -----------------------------------


def table_specs(metadata: sa.MetaData, tables: Iterable[str] | None = None) -> list[TableSpec]:
    """A :class:`TableSpec` for every table with encrypted columns (blind indexes are
    derived values and are not re-encrypted). Tables need a one-column primary key.

    Columns keyed per data subject are left out: their values stay under their
    subject's key, which a rotation rewraps without touching the rows; moving them
    onto the key type's version key would take them out of ``forget_subject``'s reach.
    """
    wanted = None if tables is None else set(tables)
    specs = []
    for table in metadata.sorted_tables:
        if wanted is not None and table.name not in wanted:
            continue
        columns = [
            (c, c.type)
            for c in table.columns
            if isinstance(c.type, EncryptedType) and c.type.subject_column is None
        ]
        if not columns:
            continue
        pk = list(table.primary_key.columns)
        if len(pk) != 1:
            raise ConfigurationError(
                f"table {table.name}: re-encryption needs a single-column primary key"
            )
        name = table.name if table.schema is None else f"{table.schema}.{table.name}"
        specs.append(
            TableSpec(
                name,
                pk[0].name,
                tuple(
                    ColumnSpec(
                        c.name,
                        t.key_type,
                        context=t.context,
                        deterministic=t.deterministic,
                        row_bound=bool(t.row_bound),
                        legacy_type=t.python_type_name if t.allow_plaintext or t.legacy else None,
                        legacy_reader=t.legacy.name if t.legacy is not None else None,
                    )
                    for c, t in columns
                ),
            )
        )
    return specs


class SQLAlchemyDatabase:
    """The engine's database side over any SQLAlchemy ``AsyncEngine`` (SQLite, ...).

    One transaction per batch: a compare-and-swap ``UPDATE`` per row (executemany)
    and the checkpoint upsert. For Postgres on asyncpg, :func:`database_for`
    returns the faster :class:`~aiocrypt.reencrypt.AsyncpgDatabase` instead.
    """

    supports_pipelining = False

    def __init__(
        self, engine: AsyncEngine, *, checkpoint_table: str = DEFAULT_CHECKPOINT_TABLE
    ) -> None:
        quote_identifier(checkpoint_table)
        self.engine = engine
        self.checkpoint_table = checkpoint_table

    def __repr__(self) -> str:
        return f"<SQLAlchemyDatabase {self.engine.dialect.name}>"

    async def close(self) -> None:
        """Nothing to close: the caller owns the engine."""

    async def prepare(self, table: TableSpec) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(sa.text(checkpoint_ddl(self.checkpoint_table)))

    async def fetch_batch(
        self, table: TableSpec, prefixes: Sequence[str], after: Any, until: Any, limit: int
    ) -> Sequence[Sequence[Any]]:
        pk = quote_identifier(table.primary_key)
        cols = ", ".join(quote_identifier(c.name) for c in table.columns)
        params: dict[str, Any] = {f"p{i}": p for i, p in enumerate(prefixes)}
        where = [pending_condition(table, [f":p{i}" for i in range(len(prefixes))])]
        if after is not None:
            where.append(f"{pk} > :after")
            params["after"] = after
        if until is not None:
            where.append(f"{pk} <= :until")
            params["until"] = until
        params["limit"] = limit
        sql = (
            f"SELECT {pk}, {cols} FROM {quote_identifier(table.name)} "  # noqa: S608
            f"WHERE {' AND '.join(where)} ORDER BY {pk} LIMIT :limit"
        )
        async with self.engine.connect() as conn:
            result = await conn.execute(sa.text(sql), params)
            return [tuple(row) for row in result.all()]

    async def write_batch(self, table: TableSpec, batch: WriteBatch, checkpoint: Checkpoint) -> int:
        pk = quote_identifier(table.primary_key)
        sets, matches = [], []
        for i, column in enumerate(table.columns):
            col = quote_identifier(column.name)
            match = f"(CAST(:n{i} AS TEXT) IS NOT NULL AND {col} = :o{i})"
            matches.append(match)
            sets.append(f"{col} = CASE WHEN {match} THEN :n{i} ELSE {col} END")
        sql = (
            f"UPDATE {quote_identifier(table.name)} SET {', '.join(sets)} "  # noqa: S608
            f"WHERE {pk} = :pk AND ({' OR '.join(matches)})"
        )
        rows = []
        for r, key in enumerate(batch.pks):
            row: dict[str, Any] = {"pk": key}
            for i in range(len(table.columns)):
                row[f"o{i}"] = batch.old[i][r]
                row[f"n{i}"] = batch.new[i][r]
            rows.append(row)
        async with self.engine.begin() as conn:
            updated = 0
            statement = sa.text(sql)
            if rows and conn.dialect.supports_sane_multi_rowcount:
                updated = max((await conn.execute(statement, rows)).rowcount, 0)
            else:  # the driver cannot count an executemany: one statement per row
                for row in rows:
                    updated += max((await conn.execute(statement, row)).rowcount, 0)
            final = Checkpoint(
                checkpoint.job_id,
                checkpoint.table,
                checkpoint.pass_no,
                checkpoint.last_pk,
                checkpoint.batches,
                checkpoint.rows_read,
                checkpoint.rows_updated + updated,
                checkpoint.rows_conflicted + len(batch) - updated,
                checkpoint.rows_failed,
            )
            await self._upsert(conn, final)
        return updated

    async def _upsert(self, conn: Any, checkpoint: Checkpoint) -> None:
        await conn.execute(
            sa.text(
                checkpoint_upsert_sql(
                    self.checkpoint_table, lambda _, c: f":{c}", "CURRENT_TIMESTAMP"
                )
            ),
            dict(zip(CHECKPOINT_COLUMNS, checkpoint_values(checkpoint), strict=True)),
        )

    async def load_checkpoint(self, job_id: str) -> Checkpoint | None:
        async with self.engine.connect() as conn:
            result = await conn.execute(
                sa.text(
                    f"SELECT {', '.join(CHECKPOINT_COLUMNS)} FROM "  # noqa: S608
                    f"{quote_identifier(self.checkpoint_table)} WHERE job_id = :job_id"
                ),
                {"job_id": job_id},
            )
            row = result.first()
        return None if row is None else checkpoint_from_row(tuple(row))

    async def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        async with self.engine.begin() as conn:
            await self._upsert(conn, checkpoint)

    async def census(self, table: TableSpec) -> TableCensus:
        dialect = self.engine.dialect.name

        def key_id(column: str) -> str:
            return key_id_sql(column, dialect)

        async with self.engine.connect() as conn:
            result = await conn.execute(sa.text(census_sql(table, key_id)))
            return census_from_rows(table, result.all())

    async def boundaries(self, table: TableSpec, shards: int) -> list[Any]:
        if shards < 2:
            return []
        tbl, pk = quote_identifier(table.name), quote_identifier(table.primary_key)
        async with self.engine.connect() as conn:
            total = (await conn.execute(sa.text(f"SELECT count(*) FROM {tbl}"))).scalar_one()  # noqa: S608
            bounds = []
            for i in range(1, shards):
                offset = total * i // shards
                if offset == 0:
                    continue
                value = (
                    await conn.execute(
                        sa.text(f"SELECT {pk} FROM {tbl} ORDER BY {pk} LIMIT 1 OFFSET :o"),  # noqa: S608
                        {"o": offset - 1},
                    )
                ).scalar()
                # the offsets are below the count read just before on this connection:
                # None only if rows were deleted in between
                if value is not None:  # pragma: no branch - rows deleted since the count
                    bounds.append(value)
        return bounds


def database_for(
    engine: AsyncEngine, *, checkpoint_table: str = DEFAULT_CHECKPOINT_TABLE
) -> ReencryptionDatabase:
    """The fastest engine database for ``engine``: asyncpg directly on Postgres+asyncpg."""
    if engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg":
        url = engine.url.set(drivername="postgresql")
        return AsyncpgDatabase(
            url.render_as_string(hide_password=False), checkpoint_table=checkpoint_table
        )
    return SQLAlchemyDatabase(engine, checkpoint_table=checkpoint_table)


def legacy_readers(metadata: sa.MetaData) -> list[LegacyReader]:
    """The legacy readers of every encrypted column in ``metadata`` (one per name)."""
    readers: dict[str, LegacyReader] = {}
    for table in metadata.sorted_tables:
        for column in table.columns:
            reader = getattr(column.type, "legacy", None)
            if isinstance(column.type, EncryptedType) and reader is not None:
                if readers.setdefault(reader.name, reader) is not reader:
                    raise ConfigurationError(
                        f"two legacy readers are named {reader.name!r}: give each "
                        "configuration its own name="
                    )
    return list(readers.values())


def reencryption_engine(
    service: EncryptionService, engine: AsyncEngine, metadata: sa.MetaData, **kwargs: Any
) -> ReencryptionEngine:
    """A :class:`ReencryptionEngine` for every encrypted column found in ``metadata``.

    Keyword arguments go to ``ReencryptionEngine`` (``batch_size``, ``rate_limit``,
    ``progress``, ...). Close ``engine.database`` when done.
    """
    checkpoint_table = kwargs.pop("checkpoint_table", DEFAULT_CHECKPOINT_TABLE)
    kwargs.setdefault("legacy_readers", legacy_readers(metadata))
    return ReencryptionEngine(
        service.key_manager,
        database_for(engine, checkpoint_table=checkpoint_table),
        tables=table_specs(metadata),
        **kwargs,
    )
