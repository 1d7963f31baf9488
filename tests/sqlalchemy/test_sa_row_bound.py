"""Row-bound columns (issue 16): a token copied to another row of the same column does
not decrypt, through the ORM (sync and async) and Core; the re-encryption engine moves
row-bound columns; a blind index still finds the row; server-generated keys get a
second write."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

from aiocrypt import ConfigurationError, DecryptionError, EncryptionService, KeyType
from aiocrypt.integrations.sqlalchemy import (
    BlindIndex,
    EncryptedFloat,
    EncryptedString,
    RowValue,
    normalize_digits,
    reencryption_engine,
    table_specs,
)


def make_models(suffix: str, *, model_level: bool = False) -> tuple[Any, Any]:
    class Base(DeclarativeBase):
        pass

    if model_level:

        class User(Base):
            __tablename__ = f"rb_users_{suffix}"
            __aiocrypt_row_bound__ = True
            id: Mapped[int] = mapped_column(primary_key=True)
            ssn: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))
            ssn_index: Mapped[str | None] = mapped_column(
                BlindIndex("ssn", normalizer=normalize_digits)
            )
            balance: Mapped[float | None] = mapped_column(EncryptedFloat(KeyType.FINANCIAL_DATA))
            note: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII, row_bound=False))

        return Base, User

    class Account(Base):
        __tablename__ = f"rb_accounts_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)  # autoincrement: server key
        ssn: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII, row_bound=True))
        ssn_index: Mapped[str | None] = mapped_column(
            BlindIndex("ssn", normalizer=normalize_digits)
        )
        balance: Mapped[float | None] = mapped_column(
            EncryptedFloat(KeyType.FINANCIAL_DATA, row_bound=True)
        )
        note: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))

    return Base, Account


@pytest.fixture
async def created(engine: AsyncEngine) -> AsyncIterator[Callable[[Any], Awaitable[None]]]:
    """``await created(Base)`` creates the models' tables; they are dropped afterwards."""
    made: list[Any] = []

    async def create(base: Any) -> None:
        async with engine.begin() as conn:
            await conn.run_sync(base.metadata.create_all)
        made.append(base)

    yield create
    async with engine.begin() as conn:
        for base in made:
            await conn.run_sync(base.metadata.drop_all)


async def _swap(engine: AsyncEngine, table: str, column: str, source: int, target: int) -> None:
    """The attacker's edit: copy row ``source``'s token into row ``target`` with raw SQL."""
    async with engine.begin() as conn:
        token = (
            await conn.execute(
                sa.text(f"SELECT {column} FROM {table} WHERE id = :i"), {"i": source}
            )
        ).scalar_one()
        await conn.execute(
            sa.text(f"UPDATE {table} SET {column} = :t WHERE id = :i"), {"t": token, "i": target}
        )


@pytest.mark.parametrize("model_level", [False, True])
async def test_row_swap_fails_through_the_async_orm(
    engine: AsyncEngine,
    created: Any,
    bound_service: EncryptionService,
    suffix: str,
    model_level: bool,
) -> None:
    base, model = make_models(suffix, model_level=model_level)
    table = model.__tablename__
    await created(base)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as session:
        session.add_all(
            [
                model(id=i, ssn=f"{i:03d}-00-0000", balance=float(i), note=f"n{i}")
                for i in range(1, 11)
            ]
        )
        await session.commit()
    async with sessions() as session:
        row = await session.get(model, 9)
        assert (row.ssn, row.balance, row.note) == ("009-00-0000", 9.0, "n9")  # type: ignore[union-attr]  # get() is Optional
    await _swap(engine, table, "ssn", 9, 8)
    await _swap(engine, table, "note", 9, 7)  # not row-bound: the swap "works"
    async with sessions() as session:
        with pytest.raises(DecryptionError) as info:
            await session.get(model, 8)
        assert info.value.location is not None
        assert (info.value.location.column, info.value.location.primary_key) == ("ssn", 8)
        assert "009-00-0000" not in str(info.value)
    async with sessions() as session:
        assert (await session.get(model, 7)).note == "n9"  # type: ignore[union-attr]  # get() is Optional
        # a Core select and an aliased entity are bound to their row too
        with pytest.raises(DecryptionError):
            (await session.execute(sa.select(model.ssn).where(model.id == 8))).all()
        # streamed ORM rows still name the row (no second read is possible there)
        streamed = await session.stream(
            sa.select(model).order_by(model.id).execution_options(yield_per=3)
        )
        try:
            with pytest.raises(DecryptionError) as info:
                async for _ in streamed:
                    pass
        finally:
            await streamed.close()
        assert info.value.location.primary_key == 8  # type: ignore[union-attr]  # location is Optional
        alias = aliased(model)
        assert (
            await session.execute(sa.select(alias.ssn).where(alias.id == 9))
        ).scalar_one() == "009-00-0000"
        # the blind index still finds the (intact) row
        found = (
            (await session.execute(sa.select(model.id).where(model.ssn_index.matches("009000000"))))
            .scalars()
            .all()
        )
        assert found == [9]


async def test_row_swap_fails_through_the_sync_orm(
    bound_service: EncryptionService, suffix: str, tmp_path: Any, postgres_dsn: str
) -> None:
    await bound_service.key_manager.ensure_active(["pii", "financial_data", "blind_index"])
    for url in (
        f"sqlite:///{tmp_path}/sync.db",
        postgres_dsn.replace("postgresql://", "postgresql+psycopg2://", 1),
    ):
        base, model = make_models(suffix)
        table = model.__tablename__
        sync_engine = sa.create_engine(url)
        base.metadata.create_all(sync_engine)
        try:
            with Session(sync_engine) as session:
                session.add_all(
                    [model(ssn=f"{i:03d}-00-0000", balance=float(i)) for i in range(1, 11)]
                )  # keys from the database
                session.commit()
                assert session.get(model, 9).ssn == "009-00-0000"  # type: ignore[union-attr]  # get() is Optional
            with sync_engine.begin() as conn:
                token = conn.execute(
                    sa.text(f"SELECT balance FROM {table} WHERE id = 9")
                ).scalar_one()
                conn.execute(sa.text(f"UPDATE {table} SET balance = :t WHERE id = 8"), {"t": token})
            with Session(sync_engine) as session:
                with pytest.raises(DecryptionError) as info:
                    session.get(model, 8)
                assert info.value.location.primary_key == 8  # type: ignore[union-attr]  # location is Optional
                assert session.get(model, 9).balance == 9.0  # type: ignore[union-attr]  # get() is Optional
                # an update re-seals under the same key
                session.get(model, 9).balance = 90.0  # type: ignore[union-attr]  # get() is Optional
                session.commit()
            with Session(sync_engine) as session:
                assert session.get(model, 9).balance == 90.0  # type: ignore[union-attr]  # get() is Optional
                # text SQL does not append the primary key: refused, never guessed
                typed = sa.text(f"SELECT ssn FROM {table} WHERE id = 9").columns(
                    ssn=model.__table__.c.ssn.type
                )
                with pytest.raises(DecryptionError):
                    session.execute(typed).all()
        finally:
            base.metadata.drop_all(sync_engine)
            sync_engine.dispose()


async def test_stored_suffix_cannot_pass_for_the_selected_key(
    engine: AsyncEngine, created: Any, bound_service: EncryptionService, suffix: str
) -> None:
    base, model = make_models(suffix)
    table = model.__tablename__
    await created(base)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with sessions() as session:
        session.add_all([model(id=i, ssn=f"{i:03d}") for i in (8, 9)])
        await session.commit()
    async with engine.begin() as conn:  # row 9's token plus "#9" stored in row 8
        token = (await conn.execute(sa.text(f"SELECT ssn FROM {table} WHERE id = 9"))).scalar_one()
        await conn.execute(
            sa.text(f"UPDATE {table} SET ssn = :t WHERE id = 8"), {"t": token + "#9"}
        )
    async with sessions() as session:
        with pytest.raises(DecryptionError):
            await session.get(model, 8)


async def test_core_writes_need_the_primary_key(
    engine: AsyncEngine, created: Any, bound_service: EncryptionService, suffix: str
) -> None:
    base, model = make_models(suffix)
    table = model.__table__
    await created(base)
    async with engine.begin() as conn:
        with pytest.raises(sa.exc.StatementError, match="RowValue") as info:
            await conn.execute(table.insert().values(id=1, ssn="111"))
        assert isinstance(info.value.orig, ConfigurationError)
    async with engine.begin() as conn:
        await conn.execute(table.insert().values(id=1, ssn=RowValue("111", 1)))
        assert (await conn.execute(sa.select(table.c.ssn))).scalar_one() == "111"


async def test_engine_moves_row_bound_columns(
    engine: AsyncEngine, created: Any, bound_service: EncryptionService, suffix: str
) -> None:
    base, model = make_models(suffix)
    await created(base)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    spec = table_specs(base.metadata)[0]
    assert {c.name: c.row_bound for c in spec.columns} == {
        "ssn": True,
        "balance": True,
        "note": False,
    }
    reenc = reencryption_engine(
        bound_service, engine, base.metadata, batch_size=7, checkpoint_table=f"ckpt_{suffix}"
    )
    try:
        async with sessions() as session:
            session.add_all([model(id=i, ssn=f"{i:03d}", balance=float(i)) for i in range(1, 31)])
            await session.commit()
        old = (await reenc.census(spec.name)).counts["ssn"]
        await bound_service.key_manager.rotate_key("pii", force=True)
        result = await reenc.reencrypt(spec.name)
        assert result.complete and result.run_rows_updated == 30
        census = await reenc.census(spec.name)
        assert set(census.counts["ssn"]).isdisjoint(old)
        async with sessions() as session:
            rows = (await session.execute(sa.select(model).order_by(model.id))).scalars().all()
            assert [(r.ssn, r.balance) for r in rows] == [
                (f"{i:03d}", float(i)) for i in range(1, 31)
            ]
            assert (
                await session.execute(sa.select(model.id).where(model.ssn_index.matches("017")))
            ).scalar_one() == 17
        await _swap(engine, spec.name, "ssn", 3, 4)  # still bound after the move
        async with sessions() as session:
            with pytest.raises(DecryptionError):
                await session.get(model, 4)
    finally:
        await reenc.database.close()
        async with engine.begin() as conn:
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS ckpt_{suffix}"))


def test_deterministic_columns_cannot_be_row_bound() -> None:
    with pytest.raises(ValueError, match="BlindIndex"):
        EncryptedString(KeyType.PII, deterministic=True, row_bound=True)


async def test_uuid_keys_on_postgres(
    pg_async_url: str, bound_service: EncryptionService, suffix: str
) -> None:
    class Base(DeclarativeBase):
        pass

    class Doc(Base):
        __tablename__ = f"rb_docs_{suffix}"
        __aiocrypt_row_bound__ = True
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        body: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))

    engine = create_async_engine(pg_async_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    reenc = reencryption_engine(
        bound_service, engine, Base.metadata, checkpoint_table=f"ckpt_{suffix}"
    )
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with sessions() as session:
            docs = [Doc(body=f"d{i}") for i in range(3)]  # keys from a Python default
            session.add_all(docs)
            await session.commit()
        await bound_service.key_manager.rotate_key("pii", force=True)
        assert (await reenc.reencrypt(Doc.__tablename__)).run_rows_updated == 3
        async with sessions() as session:
            assert [(await session.get(Doc, d.id)).body for d in docs] == ["d0", "d1", "d2"]  # type: ignore[union-attr]  # get() is Optional
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    f"UPDATE {Doc.__tablename__} SET body = (SELECT body "
                    f"FROM {Doc.__tablename__} WHERE id = :a) WHERE id = :b"
                ),
                {"a": docs[0].id, "b": docs[1].id},
            )
        async with sessions() as session:
            with pytest.raises(DecryptionError) as info:
                await session.get(Doc, docs[1].id)
            assert info.value.location.primary_key == docs[1].id  # type: ignore[union-attr]  # location is Optional
    finally:
        await reenc.database.close()
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS ckpt_{suffix}"))
        await engine.dispose()
