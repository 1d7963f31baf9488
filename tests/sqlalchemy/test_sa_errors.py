"""On real Postgres: an ORM read of a tampered row names table, column and primary key,
and re-encryption with skipped errors reports a bad row once and still moves the row's
intact columns (issue 17)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import sqlalchemy as sa
from security._helpers import exception_texts
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aiocrypt import DecryptionError, DecryptionFailure, EncryptionService, KeyType
from aiocrypt.integrations.sqlalchemy import EncryptedFloat, EncryptedString, reencryption_engine

pytestmark = pytest.mark.services


def make_model(suffix: str) -> tuple[Any, Any]:
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = f"users_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]
        income: Mapped[float | None] = mapped_column(EncryptedFloat(KeyType.FINANCIAL_DATA))
        ssn_encrypted: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))

    return Base, User


def tampered(token: str) -> str:
    prefix, body = token.rsplit(".", 1)
    raw = bytearray(base64.urlsafe_b64decode(body))
    raw[20] ^= 1
    return prefix + "." + base64.urlsafe_b64encode(bytes(raw)).decode()


@pytest.fixture
async def pg_engine(pg_async_url: str) -> Any:
    engine = create_async_engine(pg_async_url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _setup(engine: AsyncEngine, suffix: str, rows: int) -> tuple[Any, Any, str]:
    base, user = make_model(suffix)
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.create_all)
    async with async_sessionmaker(engine)() as session:
        session.add_all(
            [
                user(id=i, name=f"u{i}", income=float(i), ssn_encrypted=f"{i:09d}")
                for i in range(1, rows + 1)
            ]
        )
        await session.commit()
    table = f"users_{suffix}"
    async with engine.begin() as conn:  # the attacker's edit: one bit of row 8's ssn
        token = (
            await conn.execute(sa.text(f"SELECT ssn_encrypted FROM {table} WHERE id = 8"))
        ).scalar_one()
        await conn.execute(
            sa.text(f"UPDATE {table} SET ssn_encrypted = :t WHERE id = 8"), {"t": tampered(token)}
        )
    return base, user, token


async def _teardown(engine: AsyncEngine, base: Any, suffix: str) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.drop_all)
        await conn.execute(sa.text(f"DROP TABLE IF EXISTS ckpt_{suffix}"))


async def test_orm_read_of_a_tampered_row_names_table_column_and_pk(
    pg_engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    base, user, token = await _setup(pg_engine, suffix, 12)
    table = f"users_{suffix}"
    try:
        async with async_sessionmaker(pg_engine)() as session:
            # intact rows read as usual
            assert (await session.get(user, 7)).ssn_encrypted == "000000007"  # type: ignore[union-attr]  # get() is Optional
            for query in (
                sa.select(user).order_by(user.id),  # the whole table
                sa.select(user).where(user.name == "u8"),
            ):  # the row alone
                with pytest.raises(DecryptionError) as info:
                    (await session.execute(query)).scalars().all()
                error = info.value
                assert error.reason is DecryptionFailure.AUTHENTICATION_FAILED
                assert error.location is not None
                assert (
                    error.location.table,
                    error.location.column,
                    error.location.primary_key,
                ) == (table, "ssn_encrypted", 8)
                assert str(error) == (
                    "decryption failed: token did not authenticate (tampered, truncated, or "
                    f"another context or row) (key {error.key_id}) ({table}.ssn_encrypted, "
                    "primary key 8)"
                )
                for text in exception_texts(error):
                    assert token[-20:] not in text and "000000008" not in text
            # the session is still usable, and holds no half-read object
            assert (await session.get(user, 9)).ssn_encrypted == "000000009"  # type: ignore[union-attr]  # get() is Optional
            with pytest.raises(DecryptionError) as info:
                await session.get(user, 8)
            assert info.value.location is not None and info.value.location.primary_key == 8
    finally:
        await _teardown(pg_engine, base, suffix)


async def test_a_column_selected_without_its_primary_key_names_table_and_column(
    pg_engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    base, user, _ = await _setup(pg_engine, suffix, 10)
    try:
        async with async_sessionmaker(pg_engine)() as session:
            with pytest.raises(DecryptionError) as info:
                (await session.execute(sa.select(user.ssn_encrypted))).scalars().all()
            location = info.value.location
            assert location is not None and location.column == "ssn_encrypted"
            assert location.primary_key is None
    finally:
        await _teardown(pg_engine, base, suffix)


async def test_skip_errors_reports_a_row_once_and_moves_its_other_columns(
    pg_engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    rows = 30
    base, _, _ = await _setup(pg_engine, suffix, rows)
    table = f"users_{suffix}"
    manager = bound_service.key_manager
    try:
        await manager.rotate_key(KeyType.PII, force=True)
        await manager.rotate_key(KeyType.FINANCIAL_DATA, force=True)
        eng = reencryption_engine(
            bound_service,
            pg_engine,
            base.metadata,
            batch_size=7,
            on_error="skip",
            checkpoint_table=f"ckpt_{suffix}",
        )
        try:
            result = await eng.reencrypt(table)
            census = await eng.census(table)
        finally:
            await eng.database.close()
        assert result.run_rows_failed == 1  # not once per pass
        assert result.failed_primary_keys == (8,)
        assert [(f.column, f.primary_key, f.reason) for f in result.failures] == [
            ("ssn_encrypted", 8, DecryptionFailure.AUTHENTICATION_FAILED)
        ]
        assert not result.complete
        new_income = bound_service.keyring.active(KeyType.FINANCIAL_DATA).key_id
        async with pg_engine.connect() as conn:
            income = (
                await conn.execute(sa.text(f"SELECT income FROM {table} WHERE id = 8"))
            ).scalar_one()
        assert income.startswith(f"ac2.{new_income}.")  # the intact column moved
        assert census.counts["income"] == {new_income: rows}
        new_pii = bound_service.keyring.active(KeyType.PII).key_id
        assert census.counts["ssn_encrypted"][new_pii] == rows - 1
    finally:
        await _teardown(pg_engine, base, suffix)
