"""Paths of the SQLAlchemy integration the wider suite leaves unrun: declaration
errors, sync binds without loaded keys, coercions, and the mapper checks."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from aiocrypt import (
    ColumnSpec,
    ConfigurationError,
    DecryptionError,
    DecryptionFailure,
    EncryptionService,
    KeyManager,
    KeyType,
    TableSpec,
    get_encryption_service,
    reset_defaults,
)
from aiocrypt.integrations.alembic import encrypt_column
from aiocrypt.integrations.sqlalchemy import (
    BLIND_INDEX_KEY_TYPE,
    BlindIndex,
    Encrypted,
    EncryptedBytes,
    EncryptedDecimal,
    EncryptedEnum,
    EncryptedJSON,
    EncryptedString,
    FernetReader,
    RowValue,
    SQLAlchemyDatabase,
    _typed_key,
    blind_index_usage,
    legacy_readers,
    rebuild_blind_indexes,
    set_encryption_service,
    table_specs,
)
from aiocrypt.testing import FakeKekProvider, MemoryKeyStore, make_service

_DIALECT = sqlite.dialect()


def _column(typ: Any, name: str = "ssn", table: str = "people") -> Any:
    """``typ`` attached to ``table.name`` (so it knows its context)."""
    tbl = sa.Table(table, sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    tbl.append_column(sa.Column(name, typ))
    return typ


class _BlankIsNone(TypeDecorator[str]):
    """A user type that binds the empty string as NULL."""

    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return value or None


class Color(enum.Enum):
    RED = 1


# -- sync binds: the keys a sync engine needs must be loaded ----------------------


async def test_sync_bind_before_the_service_started_says_to_start_it() -> None:
    typ = _column(EncryptedString(KeyType.PII, service=make_service()))
    with pytest.raises(ConfigurationError, match=r"no keys loaded: start it"):
        typ.process_bind_param("123-45-6789", _DIALECT)


async def test_sync_bind_of_a_key_type_not_preloaded_names_preload() -> None:
    async with make_service(preload=[KeyType.PII]) as svc:
        typ = _column(EncryptedString(KeyType.FINANCIAL_DATA, service=svc))
        with pytest.raises(ConfigurationError, match=r"preload=\['financial_data'\]"):
            typ.process_bind_param("123-45-6789", _DIALECT)
        pii = _column(EncryptedString(KeyType.PII, service=svc))
        token = pii.process_bind_param("123-45-6789", _DIALECT)
        assert token is not None
        assert "123-45-6789" not in token
        assert svc.key_manager.keyring.decrypt(token, KeyType.PII, "people.ssn") == "123-45-6789"


def test_bound_none_from_the_underlying_type_is_stored_as_null(
    service: EncryptionService,
) -> None:
    typ = _column(Encrypted(_BlankIsNone(), KeyType.PII, service=service))
    assert typ.process_bind_param("", _DIALECT) is None


# -- RowValue given where it does not belong --------------------------------------


def test_row_value_needs_a_primary_key_or_a_subject() -> None:
    with pytest.raises(ValueError, match="needs the row's primary key"):
        RowValue("x")


def test_row_value_on_a_column_that_is_not_row_bound_is_refused(
    service: EncryptionService,
) -> None:
    typ = _column(EncryptedString(KeyType.PII, service=service))
    with pytest.raises(TypeError, match=r"people\.ssn: RowValue given to a column that is not"):
        typ.process_bind_param(RowValue("x", 1), _DIALECT)


def test_row_value_subject_on_a_column_without_subject_column_is_refused(
    service: EncryptionService,
) -> None:
    typ = _column(EncryptedString(KeyType.PII, service=service))
    with pytest.raises(TypeError, match=r"RowValue\(subject=\.\.\.\) given to a column without"):
        typ.process_bind_param(RowValue("x", subject=7), _DIALECT)


# -- declarations ------------------------------------------------------------------


@pytest.mark.parametrize("subject_column", ["", 5])
def test_subject_column_must_be_a_column_name(subject_column: Any) -> None:
    with pytest.raises(ConfigurationError, match="subject_column must name a column"):
        EncryptedString(KeyType.PII, subject_column=subject_column)


@pytest.mark.parametrize("choices", [[], ["gold", 2]])
def test_encrypted_enum_refuses_what_is_not_an_enum_or_strings(choices: Any) -> None:
    with pytest.raises(TypeError, match=r"takes an enum\.Enum class or strings"):
        EncryptedEnum(choices, KeyType.PII)


def test_tokens_for_a_randomised_column_is_refused() -> None:
    typ = _column(EncryptedString(KeyType.PII))
    with pytest.raises(TypeError, match=r"people\.ssn: only deterministic columns"):
        typ.tokens_for("x")


def test_blind_index_repr_and_explicit_context() -> None:
    index = BlindIndex("email", key_type=KeyType.PII, context="users.email.v2")
    _column(index, name="email_index", table="users")
    assert repr(index) == "BlindIndex('email', key_type='pii')"
    assert index.context == "users.email.v2"
    assert index.table_name == "users"


# -- coercions ---------------------------------------------------------------------


def test_python_types_and_coercions() -> None:
    assert EncryptedBytes(KeyType.PII).python_type is bytes
    assert EncryptedDecimal(KeyType.PII).python_type is Decimal
    got = EncryptedBytes(KeyType.PII).coerce_value(bytearray(b"ab"))
    assert got == b"ab" and type(got) is bytes
    assert EncryptedBytes(KeyType.PII).coerce_value(memoryview(b"cd")) == b"cd"
    dec = EncryptedDecimal(KeyType.PII).coerce_value(7)
    assert dec == Decimal(7) and type(dec) is Decimal
    with pytest.raises(TypeError, match="expected decimal, got bool"):
        EncryptedDecimal(KeyType.PII, context="t.c").coerce_value(True)


def test_encrypted_over_an_enum_coerces_through_it() -> None:
    typ = Encrypted(sa.Enum(Color), KeyType.PII, context="t.c")
    assert typ.coerce_value(Color.RED) == "RED"
    assert typ.coerce_value("RED") == "RED"
    assert typ.coerce_value(None) is None
    with pytest.raises(ValueError, match=r"t\.c: not one of the column's values \(RED\)"):
        typ.coerce_value("BLUE")


# -- metadata walks ----------------------------------------------------------------


def test_table_specs_keeps_only_the_named_tables() -> None:
    md = sa.MetaData()
    for name in ("a", "b"):
        sa.Table(
            name,
            md,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("ssn", EncryptedString(KeyType.PII)),
        )
    assert [spec.name for spec in table_specs(md, ["b"])] == ["b"]
    assert [spec.name for spec in table_specs(md)] == ["a", "b"]


def test_table_specs_needs_a_single_column_primary_key() -> None:
    md = sa.MetaData()
    sa.Table(
        "pairs",
        md,
        sa.Column("a", sa.Integer, primary_key=True),
        sa.Column("b", sa.Integer, primary_key=True),
        sa.Column("ssn", EncryptedString(KeyType.PII)),
    )
    with pytest.raises(ConfigurationError, match="table pairs: re-encryption needs a single"):
        table_specs(md)


# -- mapper checks (a registry of its own, disposed after: a failed configure must
# not leave a broken mapper for the other tests' configure) ------------------------


@pytest.fixture
def base() -> Iterator[type[DeclarativeBase]]:
    class Base(DeclarativeBase):
        pass

    try:
        yield Base
    finally:
        Base.registry.dispose()


def test_blind_index_of_a_missing_column_is_refused(base: type[DeclarativeBase]) -> None:
    class User(base):  # type: ignore[valid-type,misc]
        __tablename__ = "bi_missing"
        id: Mapped[int] = mapped_column(primary_key=True)
        email_index: Mapped[str | None] = mapped_column(BlindIndex("email"))

    with pytest.raises(
        ConfigurationError, match=r"blind index bi_missing\.email_index: no column 'email'"
    ):
        base.registry.configure()


def test_subject_column_that_is_not_a_column_is_refused(base: type[DeclarativeBase]) -> None:
    class User(base):  # type: ignore[valid-type,misc]
        __tablename__ = "subj_missing"
        id: Mapped[int] = mapped_column(primary_key=True)
        ssn: Mapped[str | None] = mapped_column(
            EncryptedString(KeyType.PII, subject_column="owner")
        )

    with pytest.raises(ConfigurationError, match="subject_column 'owner' is not a column"):
        base.registry.configure()


def test_encrypted_subject_column_is_refused(base: type[DeclarativeBase]) -> None:
    class User(base):  # type: ignore[valid-type,misc]
        __tablename__ = "subj_encrypted"
        id: Mapped[int] = mapped_column(primary_key=True)
        owner: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))
        ssn: Mapped[str | None] = mapped_column(
            EncryptedString(KeyType.PII, subject_column="owner")
        )

    with pytest.raises(
        ConfigurationError, match="the subject column 'owner' must hold the subject in clear"
    ):
        base.registry.configure()


def test_row_bound_columns_need_a_single_column_primary_key(base: type[DeclarativeBase]) -> None:
    class Pair(base):  # type: ignore[valid-type,misc]
        __tablename__ = "rb_pairs"
        a: Mapped[int] = mapped_column(primary_key=True)
        b: Mapped[int] = mapped_column(primary_key=True)
        ssn: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII, row_bound=True))

    with pytest.raises(ConfigurationError, match="table rb_pairs: row-bound columns need a single"):
        base.registry.configure()


def test_model_row_bound_refuses_a_deterministic_column(base: type[DeclarativeBase]) -> None:
    with pytest.raises(
        ConfigurationError, match=r"rb_det\.email: deterministic, so it cannot be row-bound"
    ):

        class User(base):  # type: ignore[valid-type,misc]
            __tablename__ = "rb_det"
            __aiocrypt_row_bound__ = True
            id: Mapped[int] = mapped_column(primary_key=True)
            email: Mapped[str | None] = mapped_column(
                EncryptedString(KeyType.PII, deterministic=True)
            )


def test_columns_left_unmapped_are_skipped(base: type[DeclarativeBase]) -> None:
    table = sa.Table(
        "partly_mapped",
        base.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner", sa.Integer),
        sa.Column("email", sa.String),
        sa.Column("email_index", BlindIndex("email")),
        sa.Column("ssn", EncryptedString(KeyType.PII, row_bound=True)),
        sa.Column("note", EncryptedString(KeyType.PII, subject_column="owner")),
    )

    class Partial(base):  # type: ignore[valid-type,misc]
        __table__ = table
        __mapper_args__: ClassVar[dict[str, Any]] = {"include_properties": ["id", "owner", "email"]}

    base.registry.configure()  # no hook for columns the model does not map
    assert set(sa.inspect(Partial).column_attrs.keys()) == {"id", "owner", "email"}
    assert Partial(id=1, email="a@b.c").__dict__.get("email_index") is None


def test_encrypted_columns_need_a_model_mapped_to_a_table(base: type[DeclarativeBase]) -> None:
    left = sa.Table(
        "j_left",
        base.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ssn", EncryptedString(KeyType.PII, row_bound=True)),
    )
    right = sa.Table(
        "j_right",
        base.metadata,
        sa.Column("id", sa.Integer, sa.ForeignKey("j_left.id"), primary_key=True),
    )

    class Joined(base):  # type: ignore[valid-type,misc]
        __table__ = sa.join(left, right)
        id = sa.orm.column_property(left.c.id, right.c.id)

    with pytest.raises(
        ConfigurationError, match="Joined: encrypted columns need a model mapped to a table"
    ):
        base.registry.configure()


def test_legacy_readers_with_one_name_twice_are_refused() -> None:
    md = sa.MetaData()
    keys = [Fernet.generate_key()]
    sa.Table(
        "leg",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("a", EncryptedString(KeyType.PII, legacy=FernetReader(keys))),
        sa.Column("b", EncryptedString(KeyType.PII, legacy=FernetReader(keys))),
    )
    with pytest.raises(ConfigurationError, match="two legacy readers are named 'fernet'"):
        legacy_readers(md)
    shared = FernetReader(keys)
    md2 = sa.MetaData()
    sa.Table(
        "leg",
        md2,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("a", EncryptedString(KeyType.PII, legacy=shared)),
        sa.Column("b", EncryptedString(KeyType.PII, legacy=shared)),
    )
    assert legacy_readers(md2) == [shared]


# -- ORM flushes and reads (SQLite, a file per test) --------------------------------


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/paths.db")
    try:
        yield eng
    finally:
        await eng.dispose()


async def _create(engine: AsyncEngine, base: type[DeclarativeBase]) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.create_all)


async def test_subject_keyed_write_with_no_subject_says_to_set_it(
    base: type[DeclarativeBase], sqlite_engine: AsyncEngine, bound_service: EncryptionService
) -> None:
    class Order(base):  # type: ignore[valid-type,misc]
        __tablename__ = "orders"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[int | None]
        address: Mapped[str | None] = mapped_column(
            EncryptedString(KeyType.PII, subject_column="user_id")
        )

    await _create(sqlite_engine, base)
    async with async_sessionmaker(sqlite_engine)() as session:
        session.add(Order(id=1, user_id=None, address="1 Main St"))
        with pytest.raises(
            ConfigurationError,
            match=r"orders\.address: .*subject column 'user_id' is None; set it first",
        ):
            await session.flush()


async def test_primary_key_of_a_row_bound_row_cannot_change(
    base: type[DeclarativeBase], sqlite_engine: AsyncEngine, bound_service: EncryptionService
) -> None:
    class User(base):  # type: ignore[valid-type,misc]
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        ssn: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII, row_bound=True))

    await _create(sqlite_engine, base)
    async with async_sessionmaker(sqlite_engine, expire_on_commit=False)() as session:
        user = User(id=1, ssn="123-45-6789")
        session.add(user)
        await session.commit()
        user.id = 2
        with pytest.raises(
            ConfigurationError, match="users: the primary key of a row with row-bound"
        ):
            await session.flush()


async def test_changed_subject_reseals_an_expired_value_on_a_composite_key(
    base: type[DeclarativeBase], sqlite_engine: AsyncEngine, bound_service: EncryptionService
) -> None:
    class Doc(base):  # type: ignore[valid-type,misc]
        __tablename__ = "docs"
        a: Mapped[int] = mapped_column(primary_key=True)
        b: Mapped[int] = mapped_column(primary_key=True)
        owner: Mapped[int]
        note: Mapped[str | None] = mapped_column(
            EncryptedString(KeyType.PII, subject_column="owner")
        )
        memo: Mapped[str | None] = mapped_column(
            EncryptedString(KeyType.PII, subject_column="owner")
        )

    await _create(sqlite_engine, base)
    raw = sa.select(sa.type_coerce(Doc.__table__.c.note, sa.Text()))
    async with async_sessionmaker(sqlite_engine)() as session:
        session.add(Doc(a=1, b=1, owner=1, note="draft", memo=None))
        await session.commit()
        before = (await session.execute(raw)).scalar_one()
        doc = await session.get(Doc, (1, 1))
        assert doc is not None
        session.expire(doc, ["note"])  # not loaded when the flush reseals it
        doc.owner = 2
        await session.commit()
        after = (await session.execute(raw)).scalar_one()
    assert after != before
    await bound_service.forget_subject("user:1")  # the old subject: no longer needed
    async with async_sessionmaker(sqlite_engine)() as session:
        doc = await session.get(Doc, (1, 1))
        assert doc is not None
        assert (doc.note, doc.memo) == ("draft", None)


async def test_reassigning_the_same_json_keeps_it_tracked(
    base: type[DeclarativeBase], sqlite_engine: AsyncEngine, bound_service: EncryptionService
) -> None:
    class Prefs(base):  # type: ignore[valid-type,misc]
        __tablename__ = "prefs"
        id: Mapped[int] = mapped_column(primary_key=True)
        data: Mapped[Any] = mapped_column(EncryptedJSON(KeyType.PII), nullable=True)

    await _create(sqlite_engine, base)
    async with async_sessionmaker(sqlite_engine, expire_on_commit=False)() as session:
        row = Prefs(id=1, data={"lang": "en"})
        session.add(row)
        await session.commit()
        same = row.data
        row.data = same
        assert row.data is same
        assert not session.is_modified(row)
        same["lang"] = "fr"
        assert session.is_modified(row)
        await session.commit()
    async with async_sessionmaker(sqlite_engine)() as session:
        got = await session.get(Prefs, 1)
        assert got is not None and got.data == {"lang": "fr"}


async def test_a_key_rotated_by_another_process_is_loaded_on_read(
    base: type[DeclarativeBase], sqlite_engine: AsyncEngine
) -> None:
    store, kek = MemoryKeyStore(), FakeKekProvider()
    reader = EncryptionService(KeyManager(store, kek), preload=[KeyType.PII])
    writer = EncryptionService(KeyManager(store, kek))

    class User(base):  # type: ignore[valid-type,misc]
        __tablename__ = "rotated"
        id: Mapped[int] = mapped_column(primary_key=True)
        ssn: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))

    await _create(sqlite_engine, base)
    async with reader, writer:
        await writer.key_manager.rotate_key(KeyType.PII, force=True)  # v2, unknown to reader
        try:
            set_encryption_service(writer)
            async with async_sessionmaker(sqlite_engine)() as session:
                session.add(User(id=1, ssn="123-45-6789"))
                await session.commit()
            set_encryption_service(reader)  # its keyring is fresh: no refresh before the read
            assert not reader.key_manager.is_stale()
            async with async_sessionmaker(sqlite_engine)() as session:
                got = await session.get(User, 1)
        finally:
            set_encryption_service(None)
        assert got is not None and got.ssn == "123-45-6789"
        assert reader.counters["decrypt_failures"] == 0
        assert sorted(dk.key.version for dk in reader.key_manager.keyring) == [1, 2]


async def test_a_row_value_set_on_the_model_is_sealed_with_the_rows_own_key(
    base: type[DeclarativeBase], sqlite_engine: AsyncEngine, bound_service: EncryptionService
) -> None:
    class User(base):  # type: ignore[valid-type,misc]
        __tablename__ = "rv_users"
        id: Mapped[int] = mapped_column(primary_key=True)
        ssn: Mapped[Any] = mapped_column(EncryptedString(KeyType.PII, row_bound=True))

    await _create(sqlite_engine, base)
    async with async_sessionmaker(sqlite_engine, expire_on_commit=False)() as session:
        user = User(id=1, ssn="123-45-6789")
        session.add(user)
        await session.commit()
        user.ssn = RowValue("987-65-4321", 999)  # another row's key: the flush uses row 1's
        await session.commit()
        assert user.ssn == "987-65-4321"
    async with async_sessionmaker(sqlite_engine)() as session:
        got = await session.get(User, 1)
        assert got is not None and got.ssn == "987-65-4321"


# -- Core reads and the service lookup ----------------------------------------------


def test_a_row_bound_value_selected_without_its_table_has_no_primary_key(
    service: EncryptionService,
) -> None:
    typ = EncryptedString(KeyType.PII, row_bound=True, context="people.ssn", service=service)
    engine = sa.create_engine("sqlite://")
    try:
        with engine.connect() as conn:
            query = sa.select(sa.type_coerce(sa.literal_column("'ac1.x'"), typ))
            with pytest.raises(DecryptionError, match="read without its primary key") as info:
                conn.execute(query).scalar_one()
    finally:
        engine.dispose()
    assert info.value.reason is DecryptionFailure.MALFORMED


def test_a_row_key_without_its_table_stays_text() -> None:
    assert _typed_key(None, "42") == "42"
    table = sa.Table("t", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    assert _typed_key(table, "42") == 42


def test_an_unattached_column_without_context_is_refused(service: EncryptionService) -> None:
    typ = EncryptedString(KeyType.PII, service=service)
    with pytest.raises(
        ConfigurationError, match="EncryptedString is not attached to a table column yet"
    ):
        typ.process_bind_param("x", _DIALECT)


async def test_a_column_without_service_uses_the_process_wide_one(
    monkeypatch: pytest.MonkeyPatch, key_path: Path, master_key_b64: str, clean_env: None
) -> None:
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY", master_key_b64)
    monkeypatch.setenv("ENCRYPTION_KEY_STORAGE_PATH", str(key_path))
    await reset_defaults()
    try:
        typ = _column(EncryptedString(KeyType.PII))
        # the process-wide service is built on first use, not started: a sync bind says so
        with pytest.raises(ConfigurationError, match="no keys loaded: start it"):
            typ.process_bind_param("x", _DIALECT)
        await get_encryption_service().key_manager.ensure_active([KeyType.PII])
        token = typ.process_bind_param("x", _DIALECT)
        assert (
            await get_encryption_service().decrypt_field(token, KeyType.PII, context="people.ssn")
            == "x"
        )
    finally:
        await reset_defaults()


# -- blind indexes and the re-encryption database over SQLAlchemy -------------------


async def test_rebuild_blind_indexes_needs_a_single_column_primary_key(
    sqlite_engine: AsyncEngine,
) -> None:
    table = sa.Table(
        "bi_pairs",
        sa.MetaData(),
        sa.Column("a", sa.Integer, primary_key=True),
        sa.Column("b", sa.Integer, primary_key=True),
        sa.Column("email", sa.String),
        sa.Column("email_index", BlindIndex("email")),
    )
    with pytest.raises(
        ConfigurationError, match="table bi_pairs: needs a single-column primary key"
    ):
        await rebuild_blind_indexes(sqlite_engine, table)


async def test_blind_index_usage_ignores_values_of_unknown_versions(
    sqlite_engine: AsyncEngine, bound_service: EncryptionService
) -> None:
    md = sa.MetaData()
    table = sa.Table(
        "bi_usage",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String),
        sa.Column("email_index", BlindIndex("email")),
    )
    async with sqlite_engine.begin() as conn:
        await conn.run_sync(md.create_all)
        await conn.execute(table.insert(), [{"id": 1, "email": "a@b.c", "email_index": "a@b.c"}])
        raw = sa.type_coerce(table.c.email_index, sa.Text())
        await conn.execute(sa.insert(table).values(id=2, email="x"))
        await conn.execute(
            sa.update(table).where(table.c.id == 2).values({raw: "99:not-a-live-version"})
        )
    usage = await blind_index_usage(sqlite_engine, md)
    keys = await bound_service.key_manager.list_keys(KeyType(BLIND_INDEX_KEY_TYPE))
    assert usage == {keys[0].key_id: 1}


async def test_sqlalchemy_database_boundaries(sqlite_engine: AsyncEngine) -> None:
    md = sa.MetaData()
    table = sa.Table("shards", md, sa.Column("id", sa.Integer, primary_key=True))
    async with sqlite_engine.begin() as conn:
        await conn.run_sync(md.create_all)
        await conn.execute(table.insert(), [{"id": i} for i in (10, 20, 30, 40)])
    db = SQLAlchemyDatabase(sqlite_engine)
    assert repr(db) == "<SQLAlchemyDatabase sqlite>"
    spec = TableSpec("shards", "id", (ColumnSpec("ssn", KeyType.PII),))
    assert await db.boundaries(spec, 1) == []
    assert await db.boundaries(spec, 2) == [20]
    assert await db.boundaries(spec, 8) == [
        10,
        10,
        20,
        20,
        30,
        30,
    ]  # 4 rows over 8: offsets 0 skipped


# -- where an ORM read's undecryptable value cannot be given its row ----------------


async def test_undecryptable_value_of_a_table_without_primary_key_names_no_row(
    base: type[DeclarativeBase], sqlite_engine: AsyncEngine, bound_service: EncryptionService
) -> None:
    table = sa.Table(
        "no_pk",
        base.metadata,
        sa.Column("id", sa.Integer),
        sa.Column("ssn", EncryptedString(KeyType.PII)),
    )

    class Person(base):  # type: ignore[valid-type,misc]
        __table__ = table
        __mapper_args__: ClassVar[dict[str, Any]] = {
            "primary_key": [table.c.id]
        }  # the mapper's key, not the table's

    await _create(sqlite_engine, base)
    async with sqlite_engine.begin() as conn:
        await conn.execute(sa.insert(table).values(id=1, ssn=None))
        raw = sa.type_coerce(table.c.ssn, sa.Text())
        await conn.execute(sa.update(table).values({raw: "not a token"}))
    async with async_sessionmaker(sqlite_engine)() as session:
        with pytest.raises(DecryptionError, match="not a token") as info:
            await session.execute(sa.select(Person))
    assert info.value.reason is DecryptionFailure.MALFORMED
    assert info.value.location is not None
    assert (info.value.location.table, info.value.location.column) == ("no_pk", "ssn")
    assert info.value.location.primary_key is None


async def test_undecryptable_expression_outside_a_table_names_no_row(
    base: type[DeclarativeBase], sqlite_engine: AsyncEngine, bound_service: EncryptionService
) -> None:
    class User(base):  # type: ignore[valid-type,misc]
        __tablename__ = "expr_users"
        id: Mapped[int] = mapped_column(primary_key=True)
        ssn: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))

    await _create(sqlite_engine, base)
    async with async_sessionmaker(sqlite_engine)() as session:
        session.add(User(id=1, ssn="123-45-6789"))
        await session.commit()
        loose = EncryptedString(KeyType.PII, context="report.ssn")  # no table behind it
        query = sa.select(User.id, sa.type_coerce(sa.literal_column("'not a token'"), loose))
        with pytest.raises(DecryptionError) as info:
            await session.execute(query)
    assert info.value.location is not None
    assert (info.value.location.table, info.value.location.column) == ("?", "report.ssn")
    assert info.value.location.primary_key is None


def test_alembic_encrypt_column_checks_its_batch_size(service: EncryptionService) -> None:
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        encrypt_column(
            "users", "ssn", key_type=KeyType.PII, value_type="str", service=service, batch_size=0
        )
