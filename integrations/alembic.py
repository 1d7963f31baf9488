"""Alembic helpers: turn a plaintext (or legacy-encrypted) column into an encrypted one, online.

Two routes, both safe to run while the application serves traffic:

* **Beside** (any column type): add a text column for the tokens, let the
  application write both columns (or read ``COALESCE``), encrypt the existing
  rows in batches, then drop the plaintext column in a later revision::

      def upgrade() -> None:
          add_encrypted_column("users", "ssn_encrypted")
          with op.get_context().autocommit_block():      # one commit per batch
              encrypt_column("users", "ssn", "ssn_encrypted", key_type="pii",
                             value_type="str", keyring=service.keyring)

* **In place** (text columns): declare the model column with
  ``allow_plaintext=True`` (reads return old plaintext with a counted
  warning), make the column text with :func:`alter_to_text`, then
  ``encrypt_column("users", "ssn", key_type="pii", value_type="str", ...)`` or,
  for big tables, the checkpointed re-encryption engine (which encrypts such
  values too: ``table_specs()`` marks ``allow_plaintext`` columns).

Every batch update is a compare-and-swap (a row changed by the application
since it was read is left alone), so a rerun finishes whatever is left.
The keyring must hold an active key of ``key_type``: start the service first.
"""

from __future__ import annotations

from typing import Any

try:
    import sqlalchemy as sa
    from alembic import op as _alembic_op
    from alembic.operations import Operations
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "aiocrypt.integrations.alembic needs Alembic and SQLAlchemy: "
        "pip install 'aiocrypt[sqlalchemy]'"
    ) from exc

from aiocrypt import EncryptionService, Keyring, KeyType
from aiocrypt.adapters import KeyTypeLike, LegacyReader, token_sql
from aiocrypt.reencrypt import LEGACY_TYPES, parse_legacy, quote_identifier, row_context

__all__ = ["add_encrypted_column", "alter_to_text", "encrypt_column"]


def _ops(op: Operations | None) -> Any:
    return op if op is not None else _alembic_op


def add_encrypted_column(
    table_name: str, column_name: str, *, schema: str | None = None, op: Operations | None = None
) -> None:
    """Add a nullable text column that will hold the tokens (any encrypted type)."""
    _ops(op).add_column(table_name, sa.Column(column_name, sa.Text(), nullable=True), schema=schema)


def alter_to_text(
    table_name: str,
    column_name: str,
    *,
    existing_type: Any = None,
    schema: str | None = None,
    op: Operations | None = None,
) -> None:
    """Change a column to text keeping its values as text (for in-place encryption).

    A no-op on SQLite, whose columns hold text whatever type they declare.
    """
    quoted = quote_identifier(column_name)
    operations = _ops(op)
    if operations.get_bind().dialect.name == "sqlite":
        return
    operations.alter_column(
        table_name,
        column_name,
        type_=sa.Text(),
        existing_type=existing_type,
        schema=schema,
        postgresql_using=f"{quoted}::text",
    )


def encrypt_column(
    table_name: str,
    source_column: str,
    target_column: str | None = None,
    *,
    key_type: KeyTypeLike,
    value_type: str,
    keyring: Keyring | None = None,
    service: EncryptionService | None = None,
    primary_key: str = "id",
    context: str | None = None,
    deterministic: bool = False,
    batch_size: int = 1000,
    schema: str | None = None,
    op: Operations | None = None,
    connection: sa.Connection | None = None,
    legacy: LegacyReader | None = None,
    row_bound: bool = False,
) -> int:
    """Encrypt existing plaintext in batches; returns the number of values encrypted.

    ``target_column=None`` encrypts ``source_column`` in place (rows whose value is
    not a token yet); otherwise fills ``target_column`` where it is NULL from
    ``source_column``. ``value_type`` (``"str"``, ``"float"``, ``"decimal"``,
    ``"date"``, ``"json"``, ...) is the Python type the encrypted column type reads
    back, so it must match the model's column type. ``context`` defaults to
    ``"<table>.<encrypted column>"``, as the column types use. ``legacy``: the
    source holds another tool's ciphertext (``SqlalchemyUtilsReader``,
    ``FernetReader``) rather than plaintext; a value it cannot open stops the run
    with ``LegacyTokenError`` (a ``ValueError`` that never says why).
    ``row_bound``: seal each value with its row's primary key, for a column
    declared ``row_bound=True`` (not with ``deterministic``).
    """
    if row_bound and deterministic:
        raise ValueError("a row-bound column cannot be deterministic")
    if value_type not in LEGACY_TYPES:
        raise ValueError(f"value_type must be one of {sorted(LEGACY_TYPES)}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if keyring is None:
        if service is None:
            raise ValueError("give keyring= or service= (a started EncryptionService)")
        keyring = service.keyring
    kt = KeyType(key_type)
    keyring.require_encryptable(kt)
    conn = connection if connection is not None else _ops(op).get_bind()
    table = table_name if schema is None else f"{schema}.{table_name}"
    tbl, pk = quote_identifier(table), quote_identifier(primary_key)
    src = quote_identifier(source_column)
    dst = quote_identifier(target_column) if target_column is not None else src
    ctx = (
        context
        if context is not None
        else f"{table_name}.{target_column if target_column is not None else source_column}"
    )
    if target_column is None:
        pending = f"{src} IS NOT NULL AND NOT {token_sql(src)}"
        update = (
            f"UPDATE {tbl} SET {src} = :new "  # noqa: S608
            f"WHERE {pk} = :pk AND {src} = :old"
        )
    else:
        pending = f"{src} IS NOT NULL AND {dst} IS NULL"
        update = f"UPDATE {tbl} SET {dst} = :new WHERE {pk} = :pk AND {dst} IS NULL"  # noqa: S608
    done = 0
    after: Any = None
    while True:
        where = pending + (f" AND {pk} > :after" if after is not None else "")
        rows = conn.execute(
            sa.text(
                f"SELECT {pk}, {src} FROM {tbl} WHERE {where} "  # noqa: S608
                f"ORDER BY {pk} LIMIT :limit"
            ),
            {"after": after, "limit": batch_size},
        ).all()
        if not rows:
            return done
        params = []
        for key, raw in rows:
            value = parse_legacy(value_type, raw if legacy is None else legacy.open(raw))
            context = row_context(ctx, key) if row_bound else ctx
            token = (
                keyring.encrypt_deterministic(value, kt, context)
                if deterministic
                else keyring.encrypt(value, kt, context)
            )
            params.append({"pk": key, "new": token, "old": raw})
        statement = sa.text(update)
        if conn.dialect.supports_sane_multi_rowcount:
            done += max(conn.execute(statement, params).rowcount, 0)
        else:  # the driver cannot count an executemany: one statement per row
            done += sum(max(conn.execute(statement, p).rowcount, 0) for p in params)
        after = rows[-1][0]
