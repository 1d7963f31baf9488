"""Encrypted SQLAlchemy models, end to end.

    python examples/sqlalchemy_models.py                                  # SQLite (temp dir)
    python examples/sqlalchemy_models.py postgresql://postgres@127.0.0.1:5432/test

Declares a ``User`` model with encrypted, row-bound columns (key types taken
from the column names where none is given), stores a user, reads it back,
shows what the table really holds (tokens, via plain SQL), shows that a token
copied into another row with plain SQL does not decrypt there, finds the user
by a blind index before and after rotating the keys, then re-encrypts every
row onto the new keys with the re-encryption engine and prints the census of
rows per key. Keys live in a file key store under a temporary directory, wrapped by a
master key from ENCRYPTION_MASTER_KEY (or a random one for this run, never
printed). On Postgres the example's table is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aiocrypt import (
    DecryptionError,
    EncryptionConfig,
    EncryptionService,
    KeyType,
    build_key_manager,
)
from aiocrypt.integrations.sqlalchemy import (
    BLIND_INDEX_KEY_TYPE,
    BlindIndex,
    EncryptedDate,
    EncryptedFloat,
    EncryptedJSON,
    EncryptedString,
    normalize_digits,
    reencryption_engine,
    set_encryption_service,
)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "example_users"
    # Every encrypted column is sealed with the row's primary key as well: a token
    # copied into another row does not decrypt there (docs/sqlalchemy.md).
    __aiocrypt_row_bound__ = True

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(sa.String(50), unique=True)
    # no key type given: "income" -> financial_data, "ssn" -> pii (COLUMN_KEY_TYPES)
    monthly_income_encrypted: Mapped[float | None] = mapped_column(EncryptedFloat())
    ssn_encrypted: Mapped[str | None] = mapped_column(EncryptedString())
    ssn_index: Mapped[str | None] = mapped_column(
        BlindIndex("ssn_encrypted", normalizer=normalize_digits), index=True
    )
    # deterministic (for ==): equal values must give equal tokens in every row
    email: Mapped[str | None] = mapped_column(
        EncryptedString(KeyType.PII, deterministic=True, row_bound=False)
    )
    date_of_birth: Mapped[dt.date | None] = mapped_column(EncryptedDate(KeyType.PII))
    preferences: Mapped[dict[str, Any] | None] = mapped_column(EncryptedJSON(KeyType.PII))


def _say(title: str) -> None:
    print(f"\n== {title}")


def _async_url(dsn: str | None, workdir: Path) -> str:
    if dsn is None:
        return f"sqlite+aiosqlite:///{workdir / 'example.db'}"
    if dsn.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + dsn.split("://", 1)[1]
    return dsn


def _service(workdir: Path) -> EncryptionService:
    master_key = os.environ.get("ENCRYPTION_MASTER_KEY") or base64.b64encode(os.urandom(32)).decode(
        "ascii"
    )
    config = EncryptionConfig(master_key=master_key, storage_path=str(workdir / "keys.json"))
    return EncryptionService(build_key_manager(config))


async def run(engine: AsyncEngine, service: EncryptionService) -> None:
    set_encryption_service(service)  # the column types find the service here
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    _say("store a user")
    async with sessions() as session:
        user = User(username="alice")
        user.monthly_income_encrypted = 50000.0
        user.ssn_encrypted = "123-45-6789"
        user.email = "alice@example.org"
        user.date_of_birth = dt.date(1990, 4, 1)
        user.preferences = {"newsletter": True, "currency": "EUR"}
        session.add(user)
        session.add_all(
            [
                User(
                    username="bob",
                    monthly_income_encrypted=4200.0,
                    ssn_encrypted="987-65-4321",
                    email="bob@example.org",
                )
            ]
        )
        await session.commit()
        user_id = user.id

    _say("read it back (a fresh session)")
    async with sessions() as session:
        loaded = await session.get(User, user_id)
        assert loaded is not None
        print(
            f"income={loaded.monthly_income_encrypted!r} ssn={loaded.ssn_encrypted!r} "
            f"born={loaded.date_of_birth} prefs={loaded.preferences}"
        )

    _say("what the table holds (plain SQL, no aiocrypt)")
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    "SELECT monthly_income_encrypted, ssn_encrypted, ssn_index FROM example_users "
                    "WHERE id = :id"
                ),
                {"id": user_id},
            )
        ).one()
    for name, value in zip(
        ("monthly_income_encrypted", "ssn_encrypted", "ssn_index"), row, strict=True
    ):
        print(f"{name:26} {value[:60]}...")
    assert row[0].startswith("ac2.") and "50000" not in row[0]
    assert row[1].startswith("ac2.") and "6789" not in row[1]

    async def find(ssn: str) -> list[str]:
        async with sessions() as session:
            result = await session.execute(
                sa.select(User.username).where(User.ssn_index.matches(ssn))
            )
            return list(result.scalars())

    _say("copy bob's ssn token into alice's row (plain SQL, as an attacker could)")
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "UPDATE example_users SET ssn_encrypted = (SELECT ssn_encrypted FROM "
                "example_users WHERE username = 'bob') WHERE id = :id"
            ),
            {"id": user_id},
        )
    async with sessions() as session:
        try:
            await session.get(User, user_id)
        except DecryptionError as exc:
            print("reading alice:", exc)
    async with sessions() as session:  # put alice's own token back (it decrypts in her row)
        users = cast(sa.Table, User.__table__)  # declared as a FromClause
        await session.execute(
            sa.update(users)
            .where(User.id == user_id)
            .values(ssn_encrypted=sa.type_coerce(row[1], sa.Text()))
        )
        await session.commit()

    _say("search by blind index and by deterministic encryption")
    print("ssn 123 45 6789 ->", await find("123 45 6789"))
    async with sessions() as session:
        print(
            "email bob@example.org ->",
            list(
                (
                    await session.execute(
                        sa.select(User.username).where(User.email == "bob@example.org")
                    )
                ).scalars()
            ),
        )

    _say("rotate the field keys and the blind-index key")
    manager = service.key_manager
    for key_type in (KeyType.FINANCIAL_DATA, KeyType.PII, BLIND_INDEX_KEY_TYPE):
        key = await manager.rotate_key(key_type, force=True)
        print(f"{key_type.value:15} now {key.key_id}")
    print("ssn 123-45-6789 ->", await find("123-45-6789"), "(old index version still matches)")

    _say("re-encrypt every row onto the new keys")
    reencryption = reencryption_engine(
        service, engine, Base.metadata, checkpoint_table="example_reencrypt_checkpoints"
    )
    try:
        print("census before:", dict((await reencryption.census("example_users")).counts))
        result = await reencryption.reencrypt("example_users")
        print(f"{result.run_rows_updated} rows re-encrypted in {result.run_batches} batch(es)")
        print("census after: ", dict((await reencryption.census("example_users")).counts))
    finally:
        await reencryption.database.close()
    async with sessions() as session:
        loaded = await session.get(User, user_id)
        assert loaded is not None and loaded.ssn_encrypted == "123-45-6789"
        print("alice still reads back:", loaded.monthly_income_encrypted, loaded.ssn_encrypted)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", nargs="?", help="a Postgres DSN (default: SQLite in a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aiocrypt-sqlalchemy-") as tmp:
        workdir = Path(tmp)
        engine = create_async_engine(_async_url(args.dsn, workdir))
        service = _service(workdir)
        try:
            async with service:
                await run(engine, service)
        finally:
            if args.dsn is not None:
                async with engine.begin() as conn:
                    await conn.run_sync(Base.metadata.drop_all)
                    await conn.execute(
                        sa.text("DROP TABLE IF EXISTS example_reencrypt_checkpoints")
                    )
            set_encryption_service(None)
            await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
