"""Encrypted columns keyed per data subject (issue 20): the ORM takes the subject from a
column of the row, forgetting the subject makes exactly their values unreadable, a
changed subject column moves the values to the new subject's key, Core writes must
say the subject, and re-encryption leaves subject-keyed columns where they are."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from aiocrypt import (
    ColumnSpec,
    ConfigurationError,
    DecryptionError,
    DecryptionFailure,
    EncryptionService,
    KeyType,
    ReencryptionEngine,
    TableSpec,
)
from aiocrypt.integrations.sqlalchemy import (
    EncryptedFloat,
    EncryptedJSON,
    EncryptedString,
    RowValue,
    reencryption_engine,
    set_encryption_service,
    table_specs,
)


@pytest.fixture(params=["sqlite", "postgres"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/orm.db"
    else:
        dsn: str = request.getfixturevalue("postgres_dsn")
        url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    eng = create_async_engine(url)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
def bound(service: EncryptionService) -> Any:
    set_encryption_service(service)
    yield service
    set_encryption_service(None)


def make_models(suffix: str) -> tuple[Any, Any, Any]:
    class Base(DeclarativeBase):
        pass

    class User(Base):  # the subject is the row's own (generated) primary key
        __tablename__ = f"subj_users_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII, subject_column="id"))
        income: Mapped[float | None] = mapped_column(
            EncryptedFloat(KeyType.FINANCIAL_DATA, subject_column="id", row_bound=True)
        )

    class Order(Base):  # the subject is a plain column of the row
        __tablename__ = f"subj_orders_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[int] = mapped_column()
        address: Mapped[str | None] = mapped_column(
            EncryptedString(KeyType.PII, subject_column="user_id", subject_prefix="user")
        )
        items: Mapped[Any] = mapped_column(
            EncryptedJSON(KeyType.PII, subject_column="user_id"), nullable=True
        )
        note: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))

    return Base, User, Order


@pytest.fixture
async def models(engine: AsyncEngine, bound: EncryptionService) -> AsyncIterator[Any]:
    models = make_models(uuid.uuid4().hex[:10])
    async with engine.begin() as conn:
        await conn.run_sync(models[0].metadata.create_all)
    try:
        yield models
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(models[0].metadata.drop_all)


def reason(exc: pytest.ExceptionInfo[DecryptionError]) -> Any:
    return exc.value.reason


async def test_forgetting_a_subject_makes_their_values_unreadable(
    engine: AsyncEngine, models: Any, bound: EncryptionService
) -> None:
    _, User, Order = models
    Session_ = async_sessionmaker(engine, expire_on_commit=False)
    async with Session_() as session:
        users = [User(email=f"u{i}@example.com", income=1000.0 * i) for i in range(1, 4)]
        session.add_all(users)
        await session.flush()  # ids from the database: the subject keys follow
        session.add_all(
            [
                Order(user_id=u.id, address=f"{u.id} Main St", items=[u.id, "x"], note="gift")
                for u in users
            ]
        )
        await session.commit()
    victim = users[1].id
    async with engine.connect() as conn:
        raw = (
            await conn.execute(
                sa.text(f"SELECT email FROM {User.__tablename__} WHERE id = :i"), {"i": victim}
            )
        ).scalar()
    assert isinstance(raw, str) and raw.startswith("ac2.S-")  # sealed under a subject key

    await bound.forget_subject(f"user:{victim}")

    async with Session_() as session:
        others = (
            (await session.execute(sa.select(User).where(User.id != victim).order_by(User.id)))
            .scalars()
            .all()
        )
        assert [(u.email, u.income) for u in others] == [
            ("u1@example.com", 1000.0),
            ("u3@example.com", 3000.0),
        ]
        orders = (
            (
                await session.execute(
                    sa.select(Order).where(Order.user_id != victim).order_by(Order.id)
                )
            )
            .scalars()
            .all()
        )
        assert [(o.address, list(o.items), o.note) for o in orders] == [
            ("1 Main St", [1, "x"], "gift"),
            ("3 Main St", [3, "x"], "gift"),
        ]
        with pytest.raises(DecryptionError) as caught:
            await session.get(User, victim)
        assert reason(caught) == DecryptionFailure.SUBJECT_FORGOTTEN
        assert caught.value.location is not None
        assert caught.value.location.primary_key == victim
        with pytest.raises(DecryptionError) as caught:
            await session.execute(sa.select(Order.address).where(Order.user_id == victim))
        assert reason(caught) == DecryptionFailure.SUBJECT_FORGOTTEN
        # a column keyed by no subject still reads
        note = await session.execute(sa.select(Order.note).where(Order.user_id == victim))
        assert note.scalar_one() == "gift"


async def test_a_changed_subject_column_moves_the_values_to_the_new_subject(
    engine: AsyncEngine, models: Any, bound: EncryptionService
) -> None:
    _, _, Order = models
    Session_ = async_sessionmaker(engine, expire_on_commit=False)
    async with Session_() as session:
        order = Order(user_id=7, address="7 Elm St", items={"n": 1})
        session.add(order)
        await session.commit()
        order.user_id = 8  # the address and items are sealed again under user:8
        await session.commit()
    await bound.forget_subject("user:7")
    async with Session_() as session:
        again = (await session.execute(sa.select(Order))).scalar_one()
        assert (again.address, dict(again.items)) == ("7 Elm St", {"n": 1})
        session.expire(again, ["address", "items"])  # not loaded when the subject changes:
        again.user_id = 9  # read in the flush, sealed for user:9
        await session.commit()
    await bound.forget_subject("user:8")
    async with Session_() as session:
        again = (await session.execute(sa.select(Order))).scalar_one()
        assert (again.address, dict(again.items)) == ("7 Elm St", {"n": 1})
    await bound.forget_subject("user:9")
    async with Session_() as session:
        with pytest.raises(DecryptionError):
            await session.execute(sa.select(Order))


async def test_core_writes_must_name_the_subject(
    engine: AsyncEngine, models: Any, bound: EncryptionService
) -> None:
    _, _, Order = models
    table = Order.__table__
    async with engine.begin() as conn:
        with pytest.raises(sa.exc.StatementError, match="subject") as info:
            await conn.execute(table.insert().values(id=1, user_id=5, address="bare"))
        assert isinstance(info.value.orig, ConfigurationError)
        assert "bare" not in str(info.value.orig)
    async with engine.begin() as conn:  # bulk: one executemany, the subject per row
        await conn.execute(
            table.insert(),
            [
                {"id": i, "user_id": i % 3, "address": RowValue(f"addr {i}", subject=i % 3)}
                for i in range(1, 31)
            ],
        )
    async with async_sessionmaker(engine)() as session:  # an ORM bulk insert: the same
        with pytest.raises(sa.exc.StatementError, match="subject"):
            await session.execute(sa.insert(Order), [{"id": 99, "user_id": 1, "address": "a"}])
        await session.rollback()
        await session.execute(
            sa.insert(Order),
            [
                {"id": i, "user_id": i % 3, "address": RowValue(f"addr {i}", subject=i % 3)}
                for i in range(31, 37)
            ],
        )
        await session.commit()
    await bound.forget_subject("user:0")
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(table.c.id, table.c.address)
                .where(table.c.user_id != 0)
                .order_by(table.c.id)
            )
        ).all()
        assert rows == [(i, f"addr {i}") for i in range(1, 37) if i % 3]
        # Core rows are processed when fetched: stream them so that happens where the
        # service can be awaited (it says the subject was forgotten)
        result = await conn.stream(sa.select(table.c.address).where(table.c.user_id == 0))
        with pytest.raises(DecryptionError) as caught:
            await result.all()
        assert reason(caught) == DecryptionFailure.SUBJECT_FORGOTTEN


async def test_reencryption_leaves_subject_columns_alone(
    engine: AsyncEngine, models: Any, bound: EncryptionService
) -> None:
    """A rotation needs no row rewrite: the engine neither moves subject tokens onto the
    version key (out of forget's reach) nor fails on them."""
    Base, _, Order = models
    Session_ = async_sessionmaker(engine, expire_on_commit=False)
    async with Session_() as session:
        session.add_all([Order(user_id=i, address=f"a{i}", note=f"n{i}") for i in range(5)])
        await session.commit()
    [spec] = [s for s in table_specs(Base.metadata) if s.name == Order.__tablename__]
    assert [c.name for c in spec.columns] == ["note"]
    table = Order.__table__

    async def raw() -> list[tuple[Any, ...]]:
        async with engine.connect() as conn:
            return [
                tuple(r)
                for r in (
                    await conn.execute(
                        sa.text(f"SELECT address, items, note FROM {table.name} ORDER BY id")
                    )
                ).all()
            ]

    before = await raw()
    await bound.key_manager.rotate_key(KeyType.PII, force=True)
    checkpoints = f"ckpt_{uuid.uuid4().hex[:8]}"
    job = reencryption_engine(bound, engine, Base.metadata, checkpoint_table=checkpoints)
    try:
        result = await job.reencrypt(spec.name)
        assert result.complete and result.run_rows_updated == 5
        # named by hand (a ColumnSpec of the subject column): what would the engine do?
        by_hand = TableSpec(
            spec.name, spec.primary_key, (*spec.columns, ColumnSpec("address", KeyType.PII))
        )
        hand_job = ReencryptionEngine(
            bound.key_manager, job.database, tables=[by_hand], on_error="skip"
        )
        outcome = await hand_job.reencrypt(spec.name)
        # nothing moved onto the version key: subject tokens are never pending (their
        # keys are rewrapped instead), so no row is even read, and none fails
        assert outcome.complete and outcome.run_rows_read == 0
        assert outcome.run_rows_updated == 0 and outcome.run_rows_failed == 0
    finally:
        await job.database.close()
        async with engine.begin() as conn:
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS {checkpoints}"))
    rewrap = await bound.key_manager.rewrap_subjects(KeyType.PII)  # the keys move instead
    assert rewrap.rewrapped == 5 and not any(rewrap.remaining.values())
    after = await raw()
    assert [r[:2] for r in after] == [r[:2] for r in before]  # subject tokens untouched
    assert all(a[2] != b[2] for a, b in zip(after, before, strict=True))  # notes moved
    await bound.forget_subject("user:3")
    async with Session_() as session:
        rows = (
            await session.execute(
                sa.select(Order.address, Order.note).where(Order.user_id != 3).order_by(Order.id)
            )
        ).all()
        assert [tuple(r) for r in rows] == [(f"a{i}", f"n{i}") for i in (0, 1, 2, 4)]


def test_options_that_cannot_hold_are_refused() -> None:
    with pytest.raises(ValueError, match="deterministic"):
        EncryptedString(KeyType.PII, subject_column="user_id", deterministic=True)
    with pytest.raises(ConfigurationError, match="allow_plaintext"):
        EncryptedString(KeyType.PII, subject_column="user_id", allow_plaintext=True)
    with pytest.raises(ConfigurationError, match="prefix"):
        EncryptedString(KeyType.PII, subject_column="user_id", subject_prefix="a:b")

    class Base(DeclarativeBase):
        pass

    class Bad(Base):
        __tablename__ = f"subj_bad_{uuid.uuid4().hex[:8]}"
        id: Mapped[int] = mapped_column(primary_key=True)
        secret: Mapped[str | None] = mapped_column(
            EncryptedString(KeyType.PII, subject_column="owner")
        )

    try:
        with pytest.raises(ConfigurationError, match="'owner' is not a column"):
            Base.registry.configure()
    finally:
        Base.registry.dispose()  # no failed mapper left for other tests to trip on


async def test_a_sync_engine_uses_cached_subject_keys_or_refuses_clearly(
    tmp_path: Path, bound: EncryptionService
) -> None:
    _, _, Order = make_models(uuid.uuid4().hex[:8])
    engine = sa.create_engine(f"sqlite:///{tmp_path}/sync.db")
    Order.metadata.create_all(engine)
    # user:1's key is cached in this process (used by async code a moment ago)
    await bound.encrypt_field("warm", KeyType.PII, context="warm", subject="user:1")
    try:
        with Session(engine) as session:
            session.add(Order(id=1, user_id=1, address="1 Sync St", items=[1]))
            session.commit()
        with Session(engine) as session:
            order = session.get(Order, 1)
            assert order is not None and (order.address, order.items) == ("1 Sync St", [1])
            session.add(Order(id=2, user_id=2, address="x"))  # user:2 has no cached key
            with pytest.raises(sa.exc.StatementError, match="use an async engine"):
                session.commit()
        await bound.forget_subject("user:1")
        with Session(engine) as session, pytest.raises(ConfigurationError):
            session.get(Order, 1)  # not cached any more, and a sync engine cannot load it
    finally:
        engine.dispose()
