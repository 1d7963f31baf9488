"""Encrypted column types against real SQLite and Postgres: round trips, ciphertext at rest,
context binding, rotation, sync engines."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.ext.mutable import MutableDict, MutableList
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from aiocrypt import DecryptionError, EncryptionService, KeyManager, KeyType
from aiocrypt.integrations.sqlalchemy import (
    EncryptedBoolean,
    EncryptedBytes,
    EncryptedDate,
    EncryptedDateTime,
    EncryptedDecimal,
    EncryptedFloat,
    EncryptedInteger,
    EncryptedJSON,
    EncryptedString,
    EncryptedUUID,
)
from aiocrypt.testing import make_key_manager, make_service


def make_models(suffix: str, service: EncryptionService | None = None) -> tuple[Any, Any]:
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = f"users_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(50), default="")
        monthly_income_encrypted: Mapped[float | None] = mapped_column(
            EncryptedFloat(KeyType.FINANCIAL_DATA, service=service)
        )
        ssn_encrypted: Mapped[str | None] = mapped_column(
            EncryptedString(KeyType.PII, service=service)
        )
        photo: Mapped[bytes | None] = mapped_column(EncryptedBytes(KeyType.PII, service=service))
        visits: Mapped[int | None] = mapped_column(EncryptedInteger(KeyType.PII, service=service))
        balance: Mapped[Decimal | None] = mapped_column(EncryptedDecimal(service=service))
        verified: Mapped[bool | None] = mapped_column(
            EncryptedBoolean(KeyType.PII, service=service)
        )
        born: Mapped[dt.date | None] = mapped_column(EncryptedDate(KeyType.PII, service=service))
        last_login: Mapped[dt.datetime | None] = mapped_column(
            EncryptedDateTime(KeyType.PII, service=service)
        )
        profile: Mapped[dict[str, Any] | None] = mapped_column(
            EncryptedJSON(KeyType.PII, service=service)
        )
        tags: Mapped[list[Any] | None] = mapped_column(EncryptedJSON(KeyType.PII, service=service))
        external_id: Mapped[uuid.UUID | None] = mapped_column(
            EncryptedUUID(KeyType.PII, service=service)
        )
        email: Mapped[str | None] = mapped_column(
            EncryptedString(KeyType.PII, deterministic=True, service=service)
        )

    return Base, User


VALUES: dict[str, Any] = {
    "monthly_income_encrypted": 50000.0,
    "ssn_encrypted": "123-45-6789",
    "photo": b"\x00\xffjpeg",
    "visits": 2**70,
    "balance": Decimal("12345.6700"),
    "verified": False,
    "born": dt.date(1990, 2, 28),
    "last_login": dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    "profile": {"city": "Lyon", "score": 9.5, "nested": [1, None, "x"]},
    "tags": ["a", 2, True],
    "external_id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "email": "ann@example.org",
}


async def _create(engine: AsyncEngine, base: Any) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.create_all)


async def _drop(engine: AsyncEngine, base: Any) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.drop_all)


async def test_every_type_round_trips_and_is_ciphertext_at_rest(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    base, user_cls = make_models(suffix)
    await _create(engine, base)
    try:
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        async with sessions() as session:
            session.add(user_cls(id=1, name="ann", **VALUES))
            session.add(user_cls(id=2, name="bob"))
            await session.commit()
        async with sessions() as session:
            ann = await session.get(user_cls, 1)
            bob = await session.get(user_cls, 2)
            for column, value in VALUES.items():
                loaded = getattr(ann, column)
                # a JSON dict / list comes back as its mutation-tracking subclass
                expected = {dict: MutableDict, list: MutableList}.get(type(value), type(value))  # type: ignore[call-overload]  # a class-keyed map
                assert loaded == value and type(loaded) is expected, column
                assert getattr(bob, column) is None
        table = user_cls.__table__
        async with engine.connect() as conn:
            raw = (
                await conn.execute(
                    sa.select(table)
                    .where(table.c.id == 1)
                    .with_only_columns(*[sa.type_coerce(table.c[c], sa.Text()) for c in VALUES])
                )
            ).one()
        for column, stored in zip(VALUES, raw, strict=True):
            assert isinstance(stored, str) and stored.startswith("ac2."), column
            assert str(VALUES[column]) not in stored
        assert raw[0].startswith(f"ac2.{bound_service.keyring.active('financial_data').key_id}.")
    finally:
        await _drop(engine, base)


async def test_seed_style_model(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    base, user_cls = make_models(suffix)
    await _create(engine, base)
    try:
        sessions = async_sessionmaker(engine)
        async with sessions() as session:
            user = user_cls(id=7, name="carol")
            user.monthly_income_encrypted = 50000.0
            user.ssn_encrypted = "123-45-6789"
            session.add(user)
            await session.commit()
        async with sessions() as session:
            user = await session.get(user_cls, 7)
            assert user.monthly_income_encrypted == 50000.0  # type: ignore[union-attr]  # get() is Optional
            assert user.ssn_encrypted == "123-45-6789"  # type: ignore[union-attr]  # get() is Optional
            user.monthly_income_encrypted = 61000  # type: ignore[union-attr]  # get() is Optional; an int is stored as the column's float
            await session.commit()
        async with sessions() as session:
            user = await session.get(user_cls, 7)
            assert user.monthly_income_encrypted == 61000.0  # type: ignore[union-attr]  # get() is Optional
            assert isinstance(user.monthly_income_encrypted, float)  # type: ignore[union-attr]  # get() is Optional
        async with engine.connect() as conn:
            income, ssn = (
                await conn.execute(
                    sa.text(f"SELECT monthly_income_encrypted, ssn_encrypted FROM users_{suffix}")
                )
            ).one()
        assert income.startswith("ac2.financial_data-") and "61000" not in income
        assert ssn.startswith("ac2.pii-") and "123-45" not in ssn
    finally:
        await _drop(engine, base)


async def test_token_moved_to_another_column_or_table_fails(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    base, user_cls = make_models(suffix)
    base2, user2_cls = make_models(suffix + "b")
    await _create(engine, base)
    await _create(engine, base2)
    try:
        sessions = async_sessionmaker(engine)
        async with sessions() as session:
            session.add(user_cls(id=1, ssn_encrypted="123-45-6789", email="a@b.c"))
            await session.commit()
        async with engine.begin() as conn:
            # Same key type, other column: the context (table.column) no longer matches.
            await conn.execute(sa.text(f"UPDATE users_{suffix} SET email = ssn_encrypted"))
            await conn.execute(
                sa.text(
                    f"INSERT INTO users_{suffix}b (id, name, ssn_encrypted) "
                    f"SELECT id, name, ssn_encrypted FROM users_{suffix}"
                )
            )
        async with sessions() as session:
            with pytest.raises(DecryptionError):
                await session.get(user_cls, 1)
        async with sessions() as session:
            with pytest.raises(DecryptionError):
                await session.get(user2_cls, 1)
    finally:
        await _drop(engine, base)
        await _drop(engine, base2)


async def test_randomized_columns_refuse_sql_comparison(suffix: str) -> None:
    _, user_cls = make_models(suffix)
    with pytest.raises(TypeError, match="BlindIndex"):
        sa.select(user_cls).where(user_cls.ssn_encrypted == "123-45-6789")
    # IS NULL stays available.
    assert "IS NULL" in str(sa.select(user_cls).where(user_cls.ssn_encrypted.is_(None)))


async def test_core_select_of_encrypted_columns_runs_again_from_the_statement_cache(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    """SQLAlchemy compares result columns with ``==`` when it reuses a cached Core
    statement; the randomized column's refusal of SQL comparison must not catch that."""
    base, user_cls = make_models(suffix)
    await _create(engine, base)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(user_cls).values(
                    id=1, ssn_encrypted="123-45-6789", email="ann@example.org"
                )
            )
        async with engine.connect() as conn:
            for _ in range(3):
                rows = (await conn.execute(sa.select(user_cls.ssn_encrypted, user_cls.email))).all()
                assert rows == [("123-45-6789", "ann@example.org")]
        # comparing with Python values is still refused / still matches
        with pytest.raises(TypeError, match="BlindIndex"):
            sa.select(user_cls).where(user_cls.ssn_encrypted == "123-45-6789")
        async with engine.connect() as conn:
            found = (
                (
                    await conn.execute(
                        sa.select(user_cls.id).where(user_cls.email == "ann@example.org")
                    )
                )
                .scalars()
                .all()
            )
            assert found == [1]
    finally:
        await _drop(engine, base)


async def test_deterministic_column_matches_across_rotation(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    base, user_cls = make_models(suffix)
    await _create(engine, base)
    try:
        sessions = async_sessionmaker(engine)
        async with sessions() as session:
            session.add_all(
                [user_cls(id=1, email="ann@example.org"), user_cls(id=2, email="bob@example.org")]
            )
            await session.commit()
        await bound_service.key_manager.rotate_key(KeyType.PII, force=True)
        async with sessions() as session:
            session.add(user_cls(id=3, email="ann@example.org"))
            await session.commit()

        async def ids(clause: Any) -> list[int]:
            async with sessions() as session:
                return sorted(
                    (await session.execute(sa.select(user_cls.id).where(clause))).scalars()
                )

        assert await ids(user_cls.email == "ann@example.org") == [1, 3]
        assert await ids(user_cls.email.in_(["bob@example.org", "nobody@x"])) == [2]
        assert await ids(user_cls.email != "ann@example.org") == [2]
        async with engine.connect() as conn:
            stored = (
                (await conn.execute(sa.text(f"SELECT email FROM users_{suffix} ORDER BY id")))
                .scalars()
                .all()
            )
        assert stored[0] != stored[2]  # same value, two key versions
        assert stored[0].split(".")[1] != stored[2].split(".")[1]
    finally:
        await _drop(engine, base)


async def test_key_rotated_in_another_process_is_loaded(engine: AsyncEngine, suffix: str) -> None:
    """Two services over one key store: B rotates and writes, A (stale) reads it."""
    service_a = make_service()
    await service_a.start()
    manager_b = KeyManager(service_a.key_manager.store, service_a.key_manager.kek)
    service_b = EncryptionService(manager_b)
    await service_b.start()
    base_a, user_a = make_models(suffix, service_a)
    _, user_b = make_models(suffix, service_b)
    await _create(engine, base_a)
    try:
        async with async_sessionmaker(engine)() as session:
            session.add(user_a(id=1, ssn_encrypted="old"))
            await session.commit()
        await manager_b.rotate_key(KeyType.PII, force=True)
        async with async_sessionmaker(engine)() as session:
            session.add(user_b(id=2, ssn_encrypted="new"))
            await session.commit()
        new_key = manager_b.keyring.active(KeyType.PII).key_id
        assert new_key not in service_a.keyring
        async with async_sessionmaker(engine)() as session:
            rows = (await session.execute(sa.select(user_a).order_by(user_a.id))).scalars()
            assert [u.ssn_encrypted for u in rows] == ["old", "new"]
        assert new_key in service_a.keyring
    finally:
        await _drop(engine, base_a)
        await service_b.close()
        await service_a.close()


async def test_sync_engine(tmp_path: Any, suffix: str) -> None:
    service = EncryptionService(make_key_manager(), preload=[KeyType.PII, KeyType.FINANCIAL_DATA])
    await service.start()
    try:
        base, user_cls = make_models(suffix, service)
        engine = sa.create_engine(f"sqlite:///{tmp_path}/sync.db")
        base.metadata.create_all(engine)
        with Session(engine) as session:
            session.add(user_cls(id=1, **VALUES))
            session.commit()
        with Session(engine) as session:
            user = session.get(user_cls, 1)
            assert {c: getattr(user, c) for c in VALUES} == VALUES
            assert session.scalars(
                sa.select(user_cls.id).where(user_cls.email == "ann@example.org")
            ).all() == [1]
        with engine.connect() as conn:
            assert (
                conn.execute(sa.text(f"SELECT ssn_encrypted FROM users_{suffix}"))
                .scalar_one()
                .startswith("ac2.pii-")
            )
        engine.dispose()
    finally:
        await service.close()


def test_wrong_value_type_is_refused(suffix: str) -> None:
    _, user_cls = make_models(suffix, make_service())
    column_type = user_cls.__table__.c.born.type
    with pytest.raises(TypeError, match="expected date"):
        column_type.process_bind_param(dt.datetime(2020, 1, 1, tzinfo=dt.UTC), None)
    with pytest.raises(TypeError, match="expected str"):
        user_cls.__table__.c.ssn_encrypted.type.process_bind_param(123, None)
    assert repr(column_type) == "EncryptedDate('pii')"


def same_datetime(back: dt.datetime, value: dt.datetime) -> bool:
    """What the codec promises for an aware datetime: the same wall time, UTC offset and
    instant (the zone itself is not kept; the value comes back with a fixed offset).

    Plain ``==`` cannot be the property: by PEP 495 a zoned value whose offset depends on
    ``fold`` (a local time in a daylight-saving gap or overlap) never equals a value of
    another zone, even at the same instant and offset.
    """
    return (
        back.replace(tzinfo=None) == value.replace(tzinfo=None)
        and back.utcoffset() == value.utcoffset()
        and back.timestamp() == value.timestamp()
    )


def test_datetime_in_a_daylight_saving_gap_keeps_wall_time_offset_and_instant() -> None:
    """The CI failure: 2016-03-13 02:00 America/Dawson does not exist (clocks jumped to 03:00);
    Python still gives it an offset (fold=0: the one before the jump). The codec keeps
    exactly that wall time, offset and instant, as for any other value."""
    from zoneinfo import ZoneInfo

    from aiocrypt._codec import decode_value, encode_value

    for fold in (0, 1):
        gap = dt.datetime(2016, 3, 13, 2, 0, fold=fold, tzinfo=ZoneInfo("America/Dawson"))
        back = decode_value(encode_value(gap))
        assert same_datetime(back, gap)
        assert back.astimezone(dt.UTC) == gap.astimezone(dt.UTC)
        assert back != gap  # PEP 495: why the round-trip property cannot use ==
    overlap = dt.datetime(2016, 11, 6, 1, 30, fold=1, tzinfo=ZoneInfo("America/Dawson"))
    back = decode_value(encode_value(overlap))
    assert same_datetime(back, overlap) and back.utcoffset() == dt.timedelta(hours=-8)


def test_types_round_trip_any_value() -> None:
    """Hypothesis: bind then result processing gives back an equal value of the same type."""
    import asyncio

    from hypothesis import given, settings
    from hypothesis import strategies as st

    service = EncryptionService(make_key_manager(), preload=[KeyType.PII, KeyType.FINANCIAL_DATA])
    asyncio.run(service.start())
    try:
        _, user_cls = make_models("hypothesis", service)
        columns = user_cls.__table__.c
        cases = [
            (columns.ssn_encrypted.type, st.text()),
            (columns.photo.type, st.binary()),
            (columns.visits.type, st.integers()),
            (columns.monthly_income_encrypted.type, st.floats(allow_nan=False)),
            (columns.balance.type, st.decimals(allow_nan=False)),
            (columns.verified.type, st.booleans()),
            (columns.born.type, st.dates()),
            (columns.last_login.type, st.datetimes(timezones=st.timezones())),
            (columns.profile.type, st.dictionaries(st.text(), st.integers() | st.text())),
            (columns.email.type, st.text()),
        ]

        @settings(max_examples=40, deadline=None)
        @given(st.data())
        def check(data: st.DataObject) -> None:
            for column_type, strategy in cases:
                value = data.draw(strategy)
                token = column_type.process_bind_param(value, None)
                assert token.startswith("ac2.")
                back = column_type.process_result_value(token, None)
                assert type(back) is {dict: MutableDict}.get(type(value), type(value))  # type: ignore[arg-type]  # a class-keyed map
                if isinstance(value, dt.datetime):
                    assert same_datetime(back, value)  # type: ignore[arg-type]  # a datetime here
                else:
                    assert back == value

        check()
    finally:
        asyncio.run(service.close())


def test_repr_names_key_type_and_the_options_that_change_the_tokens() -> None:
    """What a column's repr shows (Alembic autogenerate and error messages print it)."""
    assert repr(EncryptedString(KeyType.PII)) == "EncryptedString('pii')"
    assert (
        repr(EncryptedString(KeyType.PII, deterministic=True))
        == "EncryptedString('pii', deterministic=True)"
    )
    assert (
        repr(EncryptedString(KeyType.PII, subject_column="owner"))
        == "EncryptedString('pii', subject_column='owner')"
    )
    assert repr(EncryptedString()) == "EncryptedString(None)"
