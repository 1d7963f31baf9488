"""Column types added by issue 16: naive DateTime, Time, Interval, Enum, JSON scalars and
mutation tracking, the generic ``Encrypted`` wrapper (with deterministic lookups and blind
indexes), key types taken from column names, and the codec tags underneath."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from aiocrypt import ConfigurationError, EncryptionService, KeyType
from aiocrypt._codec import NaiveDateTime, decode_value, encode_value
from aiocrypt._errors import UnsupportedTypeError
from aiocrypt.integrations.sqlalchemy import (
    COLUMN_KEY_TYPES,
    BlindIndex,
    Encrypted,
    EncryptedDateTime,
    EncryptedEnum,
    EncryptedInterval,
    EncryptedJSON,
    EncryptedString,
    EncryptedTime,
    key_type_for_column,
)
from aiocrypt.reencrypt import parse_legacy


class Status(enum.Enum):
    ACTIVE = "a"
    BANNED = "b"


class Digits(TypeDecorator[str]):
    """A user type that binds digits only (like a phone-number type binds E.164 text)."""

    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else "".join(c for c in value if c.isdigit())

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else f"#{value}"


def make_models(suffix: str) -> tuple[Any, Any]:
    class Base(DeclarativeBase):
        pass

    class Person(Base):
        __tablename__ = f"types_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        seen_at: Mapped[dt.datetime | None] = mapped_column(
            EncryptedDateTime(KeyType.PII, timezone=False)
        )
        wakes: Mapped[dt.time | None] = mapped_column(EncryptedTime(KeyType.PII))
        shift: Mapped[dt.timedelta | None] = mapped_column(EncryptedInterval(KeyType.PII))
        status: Mapped[Status | None] = mapped_column(EncryptedEnum(Status, KeyType.PII))
        tier: Mapped[str | None] = mapped_column(EncryptedEnum(["gold", "silver"], KeyType.PII))
        prefs: Mapped[Any] = mapped_column(EncryptedJSON(KeyType.PII), nullable=True)
        frozen: Mapped[Any] = mapped_column(
            EncryptedJSON(KeyType.PII, mutable=False), nullable=True
        )
        phone: Mapped[str | None] = mapped_column(Encrypted(Digits(), KeyType.PII))
        phone_index: Mapped[str | None] = mapped_column(BlindIndex("phone"))
        state: Mapped[Status | None] = mapped_column(
            Encrypted(sa.Enum(Status), KeyType.PII, deterministic=True)
        )
        state_index: Mapped[str | None] = mapped_column(BlindIndex("status"))
        ssn_encrypted: Mapped[str | None] = mapped_column(EncryptedString())  # -> pii
        plain_at: Mapped[dt.datetime | None] = mapped_column(Encrypted(sa.DateTime(), KeyType.PII))

    return Base, Person


@pytest.fixture
async def model(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> AsyncIterator[Any]:
    base, person = make_models(suffix)
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.create_all)
    yield person
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.drop_all)


@pytest.fixture
def sessions(engine: AsyncEngine) -> Callable[[], Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


SEEN = dt.datetime(2024, 3, 1, 12, 30, 5, 12)


async def test_new_types_round_trip(model: Any, sessions: Any, engine: AsyncEngine) -> None:
    async with sessions() as session:
        session.add(
            model(
                id=1,
                seen_at=SEEN,
                wakes=dt.time(6, 45, 1, 5),
                shift=dt.timedelta(days=-1, seconds=5, microseconds=3),
                status=Status.BANNED,
                tier="gold",
                prefs="just a string",
                frozen=[1, "x"],
                phone="(555) 123-4567",
                state=Status.ACTIVE,
                ssn_encrypted="078-05-1120",
                plain_at=SEEN,
            )
        )
        session.add(model(id=2, prefs=7, status="ACTIVE"))
        session.add(model(id=3, prefs=False))
        await session.commit()
    async with sessions() as session:
        one = await session.get(model, 1)
        assert one.seen_at == SEEN and one.seen_at.tzinfo is None
        assert type(one.seen_at) is dt.datetime
        assert one.wakes == dt.time(6, 45, 1, 5)
        assert one.shift == dt.timedelta(days=-1, seconds=5, microseconds=3)
        assert (one.status, one.tier, one.prefs, one.frozen) == (
            Status.BANNED,
            "gold",
            "just a string",
            [1, "x"],
        )
        assert one.phone == "#5551234567"  # the underlying type's result processing
        assert one.state is Status.ACTIVE and one.plain_at == SEEN
        assert one.ssn_encrypted == "078-05-1120"
        two = await session.get(model, 2)
        assert (two.prefs, two.status) == (7, Status.ACTIVE)
        assert (await session.get(model, 3)).prefs is False
        # deterministic lookups and blind indexes on wrapping types
        assert (
            await session.execute(sa.select(model.id).where(model.state == Status.ACTIVE))
        ).scalar_one() == 1
        assert (
            await session.execute(
                sa.select(model.id).where(model.phone_index.matches("555 123 4567"))
            )
        ).scalar_one() == 1
        assert sorted(
            (
                await session.execute(
                    sa.select(model.id).where(model.state_index.matches(Status.ACTIVE))
                )
            ).scalars()
        ) == [2]
    async with engine.connect() as conn:
        raw = (
            await conn.execute(
                sa.text(
                    f"SELECT seen_at, status, phone, ssn_encrypted FROM {model.__tablename__} "
                    "WHERE id = 1"
                )
            )
        ).one()
    assert all(value.startswith("ac2.") for value in raw)
    assert model.__table__.c.ssn_encrypted.type.key_type == KeyType.PII


async def test_json_tracks_in_place_changes(model: Any, sessions: Any) -> None:
    async with sessions() as session:
        session.add(model(id=1, prefs={"lang": "en"}, frozen={"lang": "en"}))
        session.add(model(id=2, prefs=[1]))
        await session.commit()
    async with sessions() as session:
        one = await session.get(model, 1)
        one.prefs["lang"] = "fr"  # tracked
        one.frozen["lang"] = "fr"  # mutable=False: not tracked
        two = await session.get(model, 2)  # held: the session keeps clean objects weakly
        two.prefs.append(2)
        await session.commit()
    async with sessions() as session:
        one = await session.get(model, 1)
        assert one.prefs == {"lang": "fr"} and one.frozen == {"lang": "en"}
        assert (await session.get(model, 2)).prefs == [1, 2]
        one.prefs = {"new": True}  # a new dict is tracked too
        one.prefs["more"] = 1
        await session.commit()
    async with sessions() as session:
        assert (await session.get(model, 1)).prefs == {"new": True, "more": 1}


async def test_values_outside_the_type_are_refused(model: Any, sessions: Any) -> None:
    cases: list[dict[str, Any]] = [  # keyword arguments to the model
        {"status": "DELETED"},
        {"tier": "bronze"},
        {"status": Status},
        {"prefs": {1, 2}},
        {"seen_at": SEEN.replace(tzinfo=dt.UTC)},
        {"state": "nope"},
        {"wakes": SEEN},
    ]
    for i, values in enumerate(cases):
        async with sessions() as session:
            session.add(model(id=100 + i, **values))
            with pytest.raises(sa.exc.StatementError) as info:
                await session.commit()
            assert isinstance(info.value.orig, (TypeError, ValueError)), values
            assert "DELETED" not in str(info.value.orig)  # values never in the message


async def test_a_stored_name_the_enum_lost_is_refused_on_read(
    model: Any, sessions: Any, bound_service: EncryptionService
) -> None:
    token = await bound_service.encrypt_field(
        "RETIRED", "pii", context=f"{model.__tablename__}.status"
    )
    async with sessions() as session:
        session.add(model(id=1))
        await session.commit()
        await session.execute(
            sa.update(model.__table__).values(status=sa.type_coerce(token, sa.Text()))
        )
        await session.commit()
    async with sessions() as session:
        with pytest.raises(LookupError):
            await session.get(model, 1)


def test_aware_column_refuses_naive_values() -> None:
    column = sa.Column("at", EncryptedDateTime(KeyType.PII))
    sa.Table("aware_t", sa.MetaData(), column)
    with pytest.raises(TypeError, match="timezone=False"):
        column.type.coerce_value(SEEN)  # type: ignore[attr-defined]  # an EncryptedDateTime, Any to mypy


# -- key types from column names -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("monthly_income_encrypted", "financial_data"),
        ("ssn_encrypted", "pii"),
        ("savings", "financial_data"),
        ("email_address", "pii"),
        ("api_key", "api_keys"),
        ("access_token", "api_keys"),
        ("DOB", "pii"),
        ("client_secret", "api_keys"),
    ],
)
def test_key_type_from_the_column_name(name: str, expected: str) -> None:
    assert key_type_for_column(name) == KeyType(expected)
    table = sa.Table(f"kt_{name}", sa.MetaData(), sa.Column(name, EncryptedString()))
    assert table.c[name].type.key_type == KeyType(expected)  # type: ignore[attr-defined]  # an EncryptedString, Any to mypy


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("notes", "pass the key type"),
        ("tokenized", "pass the key type"),
        ("email_token", "several key types"),
    ],
)
def test_a_name_without_a_key_type_is_refused(name: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as info:
        sa.Table("kt_refused", sa.MetaData(), sa.Column(name, EncryptedString()))
    assert "KeyType." in str(info.value)
    with pytest.raises(ConfigurationError, match="give key_type"):
        EncryptedString(context="t.c")


def test_the_mapping_can_be_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(COLUMN_KEY_TYPES, "iban", KeyType.FINANCIAL_DATA)
    monkeypatch.delitem(COLUMN_KEY_TYPES, "token")
    assert key_type_for_column("iban") == KeyType.FINANCIAL_DATA
    with pytest.raises(ConfigurationError):
        key_type_for_column("access_token")
    assert key_type_for_column("x", mapping={"x": "pii"}) == KeyType.PII


# -- what the types store --------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        dt.time(0, 0),
        dt.time(23, 59, 59, 999999),
        dt.time(10, 12, tzinfo=dt.UTC),
        dt.timedelta(0),
        dt.timedelta.max,
        dt.timedelta.min,
        dt.timedelta(microseconds=-1),
        NaiveDateTime(1, 1, 1),
        NaiveDateTime(9999, 12, 31, 23, 59, 59, 999999),
    ],
)
def test_added_codec_tags_round_trip(value: Any) -> None:
    back = decode_value(encode_value(value))
    assert (
        back == value
        and type(back) is type(value).__mro__[1 if isinstance(value, NaiveDateTime) else 0]
    )


@pytest.mark.parametrize(
    "encoded",
    [
        b"\x0d10:99",
        b"\x0e" + bytes(11),
        b"\x0e\x00\x00\x00\x00\x00\x01\x51\x80" + bytes(4),
        b"\x0e\x00\x00\x00\x00" + bytes(4) + b"\x00\x0f\x42\x40",
        b"\x0e\x7f\xff\xff\xff" + bytes(8),
        b"\x0f2024-01-01T00:00:00+00:00",
        b"\x10",
    ],
)
def test_added_codec_tags_refuse_malformed_bodies(encoded: bytes) -> None:
    with pytest.raises(ValueError, match="malformed"):
        decode_value(encoded)


def test_plain_naive_datetimes_stay_refused() -> None:
    with pytest.raises(UnsupportedTypeError):
        encode_value(dt.datetime(2024, 1, 1))
    with pytest.raises(UnsupportedTypeError):
        encode_value(NaiveDateTime(2024, 1, 1, tzinfo=dt.UTC))


@pytest.mark.parametrize(
    ("kind", "raw", "expected"),
    [
        ("time", "10:12:45.000022", dt.time(10, 12, 45, 22)),
        ("timedelta", "1 day, 2:03:04.5", dt.timedelta(days=1, hours=2, minutes=3, seconds=4.5)),
        ("timedelta", "-1 days +23:00:00".replace(" +", " "), dt.timedelta(hours=-1)),
        ("timedelta", "-02:00:00", dt.timedelta(hours=-2)),
        ("timedelta", "90.5", dt.timedelta(seconds=90.5)),
        ("naive_datetime", "2024-03-01 12:30:05.000012", SEEN),
        ("naive_datetime", SEEN, SEEN),
    ],
)
def test_plaintext_of_the_new_types_parses(kind: str, raw: Any, expected: Any) -> None:
    assert parse_legacy(kind, raw) == expected
    if kind == "naive_datetime":
        assert isinstance(parse_legacy(kind, raw), NaiveDateTime)


def test_an_aware_timestamp_is_not_plaintext_of_a_naive_column() -> None:
    with pytest.raises(ValueError):
        parse_legacy("naive_datetime", "2024-03-01T12:30:05+02:00")


async def test_wrapper_names_what_it_binds(model: Any) -> None:
    columns = model.__table__.c
    assert [columns[c].type.python_type_name for c in ("phone", "state", "plain_at")] == [
        "str",
        "str",
        "naive_datetime",
    ]
    assert "Digits" in repr(columns.phone.type)
