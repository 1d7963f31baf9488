"""Turning encryption on for existing data: mixed plaintext/ciphertext reads, the Alembic
helpers (beside and in place), and the engine finishing an in-place migration online."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aiocrypt import DecryptionError, EncryptionService, KeyType
from aiocrypt.integrations.alembic import add_encrypted_column, alter_to_text, encrypt_column
from aiocrypt.integrations.sqlalchemy import (
    EncryptedDate,
    EncryptedDecimal,
    EncryptedFloat,
    EncryptedJSON,
    EncryptedString,
    plaintext_reads,
    reencryption_engine,
)


def legacy_models(suffix: str, allow_plaintext: bool) -> tuple[Any, Any]:
    class Base(DeclarativeBase):
        pass

    class Person(Base):
        __tablename__ = f"people_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str | None] = mapped_column(
            EncryptedString(KeyType.PII, allow_plaintext=allow_plaintext)
        )
        income: Mapped[float | None] = mapped_column(
            EncryptedFloat(allow_plaintext=allow_plaintext)
        )
        balance: Mapped[Decimal | None] = mapped_column(
            EncryptedDecimal(allow_plaintext=allow_plaintext)
        )
        born: Mapped[dt.date | None] = mapped_column(
            EncryptedDate(KeyType.PII, allow_plaintext=allow_plaintext)
        )
        prefs: Mapped[dict[str, Any] | None] = mapped_column(
            EncryptedJSON(KeyType.PII, allow_plaintext=allow_plaintext)
        )

    return Base, Person


LEGACY_ROWS = [
    {
        "id": 1,
        "name": "Ann",
        "income": "50000.5",
        "balance": "10.25",
        "born": "1990-01-31",
        "prefs": '{"lang": "fr"}',
    },
    {"id": 2, "name": "Bob", "income": "42", "balance": "0", "born": None, "prefs": None},
]


async def test_mixed_plaintext_reads_then_online_migration(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    base, person = legacy_models(suffix, allow_plaintext=True)
    _, strict_person = legacy_models(suffix, allow_plaintext=False)
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.create_all)
        await conn.execute(
            sa.text(
                f"INSERT INTO people_{suffix} (id, name, income, balance, born, prefs) "
                "VALUES (:id, :name, :income, :balance, :born, :prefs)"
            ),
            LEGACY_ROWS,
        )
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    eng = None
    try:
        before = plaintext_reads[f"people_{suffix}.income"]
        async with sessions() as session:
            session.add(
                person(
                    id=3,
                    name="Cy",
                    income=1.0,
                    balance=Decimal("1"),
                    born=dt.date(2000, 1, 1),
                    prefs={"lang": "en"},
                )
            )
            await session.commit()
            ann, bob, cy = (
                (await session.execute(sa.select(person).order_by(person.id))).scalars().all()
            )
        assert (ann.name, ann.income, ann.balance, ann.born, ann.prefs) == (
            "Ann",
            50000.5,
            Decimal("10.25"),
            dt.date(1990, 1, 31),
            {"lang": "fr"},
        )
        assert (bob.income, bob.born, bob.prefs) == (42.0, None, None)
        assert isinstance(bob.income, float)
        assert cy.prefs == {"lang": "en"}
        assert plaintext_reads[f"people_{suffix}.income"] == before + 2
        assert bound_service.counters[f"plaintext_reads:people_{suffix}.income"] == 2

        # Without allow_plaintext a plaintext value is refused, never silently returned.
        async with async_sessionmaker(engine)() as session:
            with pytest.raises(DecryptionError):
                await session.get(strict_person, 1)

        eng = reencryption_engine(
            bound_service, engine, base.metadata, batch_size=1, checkpoint_table=f"ckpt_{suffix}"
        )
        census = await eng.census(f"people_{suffix}")
        assert census.counts["income"][None] == 2
        result = await eng.reencrypt(f"people_{suffix}")
        assert result.complete and result.run_rows_updated == 2
        census = await eng.census(f"people_{suffix}")
        assert census.rows_for(None) == 0

        async with async_sessionmaker(engine)() as session:
            rows = (
                (await session.execute(sa.select(strict_person).order_by(strict_person.id)))
                .scalars()
                .all()
            )
        assert [(p.name, p.income, p.balance, p.born, p.prefs) for p in rows] == [
            ("Ann", 50000.5, Decimal("10.25"), dt.date(1990, 1, 31), {"lang": "fr"}),
            ("Bob", 42.0, Decimal("0"), None, None),
            ("Cy", 1.0, Decimal("1"), dt.date(2000, 1, 1), {"lang": "en"}),
        ]
    finally:
        if eng is not None:
            await eng.database.close()
        async with engine.begin() as conn:
            await conn.run_sync(base.metadata.drop_all)
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS ckpt_{suffix}"))


async def test_alembic_helpers_beside_and_in_place(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    table = f"legacy_{suffix}"
    await bound_service.key_manager.ensure_active([KeyType.PII, KeyType.FINANCIAL_DATA])
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, income FLOAT, ssn VARCHAR(20))")
        )
        await conn.execute(
            sa.text(f"INSERT INTO {table} VALUES (:id, :income, :ssn)"),
            [
                {"id": i, "income": i * 1000.5 if i % 5 else None, "ssn": f"{i:03d}-00-0000"}
                for i in range(1, 26)
            ],
        )

    def migrate(conn: sa.Connection) -> tuple[int, int]:
        op = Operations(MigrationContext.configure(conn))
        add_encrypted_column(table, "income_encrypted", op=op)
        beside = encrypt_column(
            table,
            "income",
            "income_encrypted",
            key_type="financial_data",
            value_type="float",
            service=bound_service,
            batch_size=7,
            op=op,
        )
        alter_to_text(table, "ssn", existing_type=sa.String(20), op=op)
        in_place = encrypt_column(
            table,
            "ssn",
            key_type=KeyType.PII,
            value_type="str",
            keyring=bound_service.keyring,
            batch_size=4,
            op=op,
        )
        return beside, in_place

    try:
        async with engine.begin() as conn:
            beside, in_place = await conn.run_sync(migrate)
        assert (beside, in_place) == (20, 25)

        def migrate_again(conn: sa.Connection) -> tuple[int, int]:
            return (
                encrypt_column(
                    table,
                    "income",
                    "income_encrypted",
                    key_type="financial_data",
                    value_type="float",
                    service=bound_service,
                    connection=conn,
                ),
                encrypt_column(
                    table,
                    "ssn",
                    key_type="pii",
                    value_type="str",
                    service=bound_service,
                    connection=conn,
                ),
            )

        async with engine.begin() as conn:  # a rerun finds nothing left to do
            assert await conn.run_sync(migrate_again) == (0, 0)

        class Base(DeclarativeBase):
            pass

        class Legacy(Base):
            __tablename__ = table
            id: Mapped[int] = mapped_column(primary_key=True)
            income_encrypted: Mapped[float | None] = mapped_column(EncryptedFloat())
            ssn: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))

        async with async_sessionmaker(engine)() as session:
            rows = (await session.execute(sa.select(Legacy).order_by(Legacy.id))).scalars()
            assert [(r.income_encrypted, r.ssn) for r in rows] == [
                (i * 1000.5 if i % 5 else None, f"{i:03d}-00-0000") for i in range(1, 26)
            ]
        async with engine.connect() as conn:
            raw = (await conn.execute(sa.text(f"SELECT ssn FROM {table}"))).scalars().all()
        assert all(v.startswith("ac2.pii-") for v in raw)
    finally:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f"DROP TABLE {table}"))


def test_encrypt_column_arguments() -> None:
    with pytest.raises(ValueError, match="value_type"):
        encrypt_column("t", "c", key_type="pii", value_type="complex")
    with pytest.raises(ValueError, match="keyring= or service="):
        encrypt_column("t", "c", key_type="pii", value_type="str")
