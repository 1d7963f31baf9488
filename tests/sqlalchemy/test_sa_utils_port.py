"""sqlalchemy-utils' own tests of its encrypted types, ported to aiocrypt's types.

Source: sqlalchemy-utils 0.43.0, ``tests/types/test_encrypted.py`` from the PyPI sdist
``sqlalchemy_utils-0.43.0.tar.gz`` (BSD licence; ``pip download --no-deps --no-binary
:all: sqlalchemy-utils==0.43.*``). Each test keeps its name and what it checks, with
``StringEncryptedType(T, key, engine, padding)`` replaced by ``Encrypted(T, key_type)``,
and runs on four backends: SQLite (pysqlite) and Postgres (psycopg2) under sync
sessions, aiosqlite and asyncpg under async ones (the test body runs in
``AsyncSession.run_sync``, where the column types may await).

Where the original is parametrized over sqlalchemy-utils engines and paddings (AesEngine
with pkcs5 / oneandzeroes / zeroes / naive, FernetEngine, AesGcmEngine), aiocrypt has
one authenticated scheme: the engine classes collapse into one. Cases aiocrypt refuses on
purpose are kept as tests of the refusal; docs/sqlalchemy.md lists each with its reason.
"""

from __future__ import annotations

import base64
import random
import string
from collections.abc import AsyncIterator, Callable
from datetime import date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session, declarative_base
from sqlalchemy_utils import ColorType, PhoneNumberType
from sqlalchemy_utils.types import JSONType

from aiocrypt import DecryptionError, EncryptionService, KeyType
from aiocrypt.integrations.sqlalchemy import Encrypted, set_encryption_service
from aiocrypt.testing import make_service

KEY_TYPES = [KeyType.PII, KeyType.API_KEYS, KeyType.FINANCIAL_DATA]


class Backend:
    """One database behind a sync or an async engine; ``run(fn)`` calls ``fn(session)``."""

    def __init__(self, engine: Any, is_async: bool) -> None:
        self.engine = engine
        self.is_async = is_async

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.is_async:
            async with AsyncSession(self.engine) as session:
                return await session.run_sync(fn, *args)
        with Session(self.engine) as session:
            return fn(session, *args)

    async def ddl(self, fn: Callable[[Any], None]) -> None:
        if self.is_async:
            async with self.engine.begin() as conn:
                await conn.run_sync(fn)
        else:
            with self.engine.begin() as conn:
                fn(conn)


@pytest.fixture(params=["sqlite", "postgres+psycopg2", "aiosqlite", "asyncpg"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Any, bound_service: EncryptionService
) -> AsyncIterator[Backend]:
    await bound_service.key_manager.ensure_active(KEY_TYPES)  # sync engines cannot await
    name = request.param
    if name.startswith("postgres") or name == "asyncpg":
        dsn = request.getfixturevalue("postgres_dsn")
        url = dsn.replace(
            "postgresql://",
            "postgresql+psycopg2://" if name != "asyncpg" else "postgresql+asyncpg://",
            1,
        )
    else:
        url = f"sqlite{'+aiosqlite' if name == 'aiosqlite' else ''}:///{tmp_path}/port.db"
    is_async = name in ("aiosqlite", "asyncpg")
    engine = create_async_engine(url) if is_async else sa.create_engine(url)
    try:
        yield Backend(engine, is_async)
    finally:
        if is_async:
            await engine.dispose()  # type: ignore[misc]  # the engine is an AsyncEngine here
        else:
            engine.dispose()


@pytest.fixture
def Base() -> Any:
    return declarative_base()


@pytest.fixture
def deterministic() -> bool:
    return False


@pytest.fixture
def User(Base: Any, suffix: str, deterministic: bool) -> Any:
    class User(Base):  # type: ignore[misc]  # declarative_base() is Any
        __tablename__ = f"user_{suffix}"
        id = sa.Column(sa.Integer, primary_key=True)
        username = sa.Column(Encrypted(sa.Unicode, KeyType.PII, deterministic=deterministic))
        access_token = sa.Column(Encrypted(sa.String, KeyType.API_KEYS))
        is_active = sa.Column(Encrypted(sa.Boolean, KeyType.PII))
        accounts_num = sa.Column(Encrypted(sa.Integer, KeyType.FINANCIAL_DATA))
        phone = sa.Column(Encrypted(PhoneNumberType, KeyType.PII))
        color = sa.Column(Encrypted(ColorType, KeyType.PII))
        date = sa.Column(Encrypted(sa.Date, KeyType.PII))
        time = sa.Column(Encrypted(sa.Time, KeyType.PII))
        datetime = sa.Column(Encrypted(sa.DateTime, KeyType.PII))
        enum = sa.Column(Encrypted(sa.Enum("One", name="user_enum_t"), KeyType.PII))
        json = sa.Column(Encrypted(JSONType, KeyType.PII))

    return User


@pytest.fixture
def test_token() -> str:
    characters = string.ascii_letters + string.digits
    return "".join(random.choice(characters) for _ in range(60))


VALUES = {
    "username": "someone",
    "phone": "(555) 555-5555",
    "color": "#fff",
    "date": date(2010, 10, 2),
    "time": time(10, 12),
    "enum": "One",
    "json": {"key": "value"},
    "datetime": datetime(2010, 10, 2, 10, 12, 45, 2334),
    "is_active": True,
    "accounts_num": 2,
}


@pytest.fixture
async def user(backend: Backend, Base: Any, User: Any, test_token: str) -> AsyncIterator[Any]:
    await backend.ddl(Base.metadata.create_all)

    def create(session: Session) -> Any:
        user = User(access_token=test_token, **VALUES)
        session.add(user)
        session.commit()
        found = session.get(User, user.id)  # reloaded: expired on commit
        session.expunge(found)
        return found

    try:
        yield await backend.run(create)
    finally:
        await backend.ddl(Base.metadata.drop_all)


# -- EncryptedTypeTestCase -------------------------------------------------------


def test_unicode(user: Any) -> None:
    assert user.username == VALUES["username"]


def test_string(user: Any, test_token: str) -> None:
    assert user.access_token == test_token


def test_boolean(user: Any) -> None:
    assert user.is_active == VALUES["is_active"]


def test_integer(user: Any) -> None:
    assert user.accounts_num == VALUES["accounts_num"]


def test_phone_number(user: Any) -> None:
    assert str(user.phone) == VALUES["phone"]


def test_color(user: Any) -> None:
    assert user.color.hex == VALUES["color"]


def test_date(user: Any) -> None:
    assert user.date == VALUES["date"]


def test_datetime(user: Any) -> None:
    assert user.datetime == VALUES["datetime"]


def test_time(user: Any) -> None:
    assert user.time == VALUES["time"]


def test_enum(user: Any) -> None:
    assert user.enum == VALUES["enum"]


def test_json(user: Any) -> None:
    assert user.json == VALUES["json"]


def test_lookup_key_is_refused() -> None:
    """The original picks the key per row with a callable reading ``Team.key`` from the
    database. Refused: a key is named by its key type and comes from the keyring, never
    from a value an attacker can write (docs/sqlalchemy.md)."""
    team_key = "one"
    with pytest.raises(TypeError, match="key type"):
        Encrypted(sa.Unicode, lambda: team_key)


# -- AesEncryptedTypeTestCase (deterministic) -------------------------------------


@pytest.mark.parametrize("deterministic", [True])
async def test_lookup_by_encrypted_string(backend: Backend, user: Any, User: Any) -> None:
    def find(session: Session) -> Any:
        return session.query(User).filter(User.username == VALUES["username"]).first()

    test = await backend.run(find)
    assert test.username == user.username


# -- TestAesGcmEncryptedType (randomized) ------------------------------------------


async def test_lookup_by_encrypted_string_randomized_is_refused(
    backend: Backend, user: Any, User: Any
) -> None:
    """sqlalchemy-utils runs the query and finds nothing (a fresh IV per value);
    aiocrypt refuses to build a comparison that can never match."""

    def find(session: Session) -> Any:
        return session.query(User).filter(User.username == "someonex").first()

    with pytest.raises(TypeError, match="randomized"):
        await backend.run(find)


# -- TestAesEncryptedTypeTestcaseWithNaivePadding ----------------------------------


async def test_decrypt_raises_value_error_with_invalid_key(
    backend: Backend, Base: Any, suffix: str
) -> None:
    """Values read with other keys fail (aiocrypt: ``DecryptionError``, authenticated,
    where sqlalchemy-utils' naive padding may only fail to decode as UTF-8)."""

    class Team(Base):  # type: ignore[misc]  # declarative_base() is Any
        __tablename__ = f"team_{suffix}"
        id = sa.Column(sa.Integer, primary_key=True)
        key = sa.Column(sa.String(50))
        name = sa.Column(Encrypted(sa.Unicode, KeyType.PII))

    await backend.ddl(Base.metadata.create_all)
    other = make_service()
    await other.start()
    await other.key_manager.ensure_active(KEY_TYPES)
    try:

        def add(session: Session) -> int:
            team = Team(key="one", name="One")
            session.add(team)
            session.commit()
            return int(team.id)

        team_id = await backend.run(add)
        set_encryption_service(other)  # the keys change
        with pytest.raises(DecryptionError):
            await backend.run(lambda session: session.get(Team, team_id).name)
    finally:
        await other.close()
        await backend.ddl(Base.metadata.drop_all)


# -- TestDatetimeHandler -------------------------------------------------------------
# The original tests sqlalchemy-utils' string parser (dateutil). aiocrypt stores typed
# values, so the same values are round-tripped through the columns instead.


@pytest.mark.parametrize(
    ("column_type", "value"),
    [
        (
            sa.DateTime(timezone=True),  # pytz in the original; zoneinfo here
            datetime(2017, 8, 21, 4, 26, 36, 523010, tzinfo=ZoneInfo("Pacific/Tahiti")),
        ),
        (sa.DateTime(), datetime(2017, 8, 21, 10, 12, 45, 22)),
        (sa.DateTime(), datetime(2017, 8, 21, 10, 12, 45)),
        (sa.Time(), time(10, 12, 45, 22)),
        (sa.Time(), time(10, 12, 45)),
        (sa.Date(), date(2017, 8, 21)),
    ],
    ids=[
        "datetime_with_micro_and_timezone",
        "datetime_with_micro",
        "datetime_simple",
        "time_with_micro",
        "time_simple",
        "date_simple",
    ],
)
async def test_datetime_handler(
    backend: Backend, Base: Any, suffix: str, column_type: Any, value: Any
) -> None:
    class Event(Base):  # type: ignore[misc]  # declarative_base() is Any
        __tablename__ = f"event_{suffix}"
        id = sa.Column(sa.Integer, primary_key=True)
        at = sa.Column(Encrypted(column_type, KeyType.PII))

    await backend.ddl(Base.metadata.create_all)
    try:

        def roundtrip(session: Session) -> Any:
            session.add(Event(id=1, at=value))
            session.commit()
            return session.get(Event, 1).at  # type: ignore[union-attr]  # get() is Optional

        back = await backend.run(roundtrip)
        assert back == value and type(back) is type(value)
        if isinstance(value, datetime):
            assert back.utcoffset() == value.utcoffset()
    finally:
        await backend.ddl(Base.metadata.drop_all)


# -- TestAesGcmEngine ------------------------------------------------------------------
# The original edits characters 3, 19 and 43 of sqlalchemy-utils' base64 layout (IV,
# tag, ciphertext). An aiocrypt token is "ac2.<key id>." + base64url(algorithm, flags,
# nonce (12), ciphertext, tag (16)): the same edits are made in each of those parts.


@pytest.fixture
async def column(bound_service: EncryptionService) -> Encrypted:
    await bound_service.key_manager.ensure_active(KEY_TYPES)
    column = sa.Column("value", Encrypted(sa.Unicode, KeyType.PII))
    sa.Table("engine_tests", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True), column)
    return column.type


def _edit(token: str, part: str) -> str:
    prefix, body = token.rsplit(".", 1)
    raw = bytearray(base64.urlsafe_b64decode(body))
    index = {"iv": 2 + 3, "tag": len(raw) - 3, "ciphertext": 2 + 12 + 1}[part]
    raw[index] ^= 0x20
    return f"{prefix}.{base64.urlsafe_b64encode(bytes(raw)).decode()}"


async def test_roundtrip(column: Encrypted) -> None:
    for number in range(0, 36):
        plaintext = "0123456789abcdefghijklmnopqrstuvwxyz"[:number]
        encrypted = column.process_bind_param(plaintext, None)
        assert column.process_result_value(encrypted, None) == plaintext, number


@pytest.mark.parametrize("part", ["iv", "tag", "ciphertext"])
async def test_modified_token_fails_to_decrypt(column: Encrypted, part: str) -> None:
    encrypted = column.process_bind_param("abcdefgh", None)
    with pytest.raises(DecryptionError):
        column.process_result_value(_edit(encrypted, part), None)


async def test_too_short_ciphertext_fails_to_decrypt(column: Encrypted) -> None:
    encrypted = column.process_bind_param("abcdefgh", None)[:40]
    with pytest.raises(DecryptionError):
        column.process_result_value(encrypted, None)


async def test_different_ciphertexts_each_time(column: Encrypted) -> None:
    encrypted1 = column.process_bind_param("abcdefgh", None)
    encrypted2 = column.process_bind_param("abcdefgh", None)
    assert column.process_result_value(encrypted1, None) == column.process_result_value(
        encrypted2, None
    )
    assert encrypted1 != encrypted2
