"""Moving off sqlalchemy-utils and Fernet (issue 16): tables written by
sqlalchemy-utils' ``StringEncryptedType`` (AesGcmEngine) and by plain Fernet are read
through aiocrypt columns during the migration window and rewritten online by the
re-encryption engine while a writer keeps updating rows. The 100,000-row run is
``bench/bench_legacy_migration.py`` (docs/performance-reencrypt.md)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy_utils import StringEncryptedType
from sqlalchemy_utils.types.encrypted.encrypted_type import AesEngine, AesGcmEngine

from aiocrypt import DecryptionError, EncryptionService, KeyType
from aiocrypt._legacy import LegacyTokenError
from aiocrypt.integrations.alembic import encrypt_column
from aiocrypt.integrations.sqlalchemy import (
    EncryptedInteger,
    EncryptedString,
    FernetReader,
    LegacyReader,
    SqlalchemyUtilsReader,
    legacy_reads,
    reencryption_engine,
)

ROWS = 5000
SU_KEY = "the sqlalchemy-utils key of the old app"


def sync_url(async_url: str) -> str:
    return async_url.replace("+aiosqlite", "").replace("+asyncpg", "+psycopg2")


def aiocrypt_models(
    suffix: str, su: LegacyReader | None, fernet: LegacyReader | None
) -> tuple[Any, Any, Any]:
    class Base(DeclarativeBase):
        pass

    class Customer(Base):  # written by sqlalchemy-utils
        __tablename__ = f"su_customers_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        ssn: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII, legacy=su))
        balance: Mapped[int | None] = mapped_column(
            EncryptedInteger(KeyType.FINANCIAL_DATA, legacy=su)
        )

    class Note(Base):  # written with Fernet by hand
        __tablename__ = f"fernet_notes_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII, legacy=fernet))

    return Base, Customer, Note


def write_legacy_tables(url: str, suffix: str, fernet_key: bytes) -> None:
    """The old application's data: sqlalchemy-utils columns and Fernet tokens."""
    metadata = sa.MetaData()
    customers = sa.Table(
        f"su_customers_{suffix}",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ssn", StringEncryptedType(sa.Unicode, SU_KEY, AesGcmEngine)),
        sa.Column("balance", StringEncryptedType(sa.Integer, SU_KEY, AesGcmEngine)),
    )
    notes = sa.Table(
        f"fernet_notes_{suffix}",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.Text),
    )
    fernet = Fernet(fernet_key)
    engine = sa.create_engine(url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                customers.insert(),
                [{"id": i, "ssn": f"{i:09d}", "balance": i * 10} for i in range(1, ROWS + 1)],
            )
            conn.execute(
                notes.insert(),
                [
                    {"id": i, "body": fernet.encrypt(f"note {i}".encode()).decode()}
                    for i in range(1, ROWS + 1)
                ],
            )
    finally:
        engine.dispose()


async def _writer(
    sessions: Any, customer: Any, note: Any, latest: dict[tuple[str, int], Any], stop: asyncio.Event
) -> int:
    """Keeps updating random rows through the aiocrypt columns until told to stop."""
    rng = random.Random(7)
    writes = 0
    while not stop.is_set() or writes < 20:
        model, attr = (customer, "balance") if writes % 2 else (note, "body")
        key = rng.randint(1, ROWS)
        async with sessions() as session:  # read (legacy or not), then write a new value
            row = await session.get(model, key)
            setattr(row, attr, row.balance + 1 if attr == "balance" else f"edited {writes}")
            await session.commit()
        latest[(attr, key)] = getattr(row, attr)
        writes += 1
        await asyncio.sleep(0)
    return writes


async def test_sqlalchemy_utils_and_fernet_tables_migrate_online(
    engine: AsyncEngine, db_url: str, bound_service: EncryptionService, suffix: str
) -> None:
    fernet_key = Fernet.generate_key()
    await asyncio.to_thread(write_legacy_tables, sync_url(db_url), suffix, fernet_key)
    su = SqlalchemyUtilsReader(SU_KEY, "aes_gcm")
    fernet = FernetReader([Fernet.generate_key(), fernet_key])  # MultiFernet order
    base, customer, note = aiocrypt_models(suffix, su, fernet)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    reenc = reencryption_engine(
        bound_service, engine, base.metadata, batch_size=500, checkpoint_table=f"ckpt_{suffix}"
    )
    try:
        async with sessions() as session:  # the window: both forms read
            assert (await session.get(customer, 42)).ssn == "000000042"  # type: ignore[union-attr]  # get() is Optional
            assert (await session.get(customer, 42)).balance == 420  # type: ignore[union-attr]  # get() is Optional
            assert (await session.get(note, 42)).body == "note 42"  # type: ignore[union-attr]  # get() is Optional
        assert legacy_reads[f"su_customers_{suffix}.ssn"] >= 1

        latest: dict[tuple[str, int], Any] = {}
        stop = asyncio.Event()
        writer = asyncio.ensure_future(_writer(sessions, customer, note, latest, stop))
        stopped: list[int] = []

        def interrupt(progress: Any) -> None:  # a crash after the second batch
            if progress.run_batches == 2 and not stopped:
                stopped.append(progress.last_pk)
                raise RuntimeError("worker killed")

        reenc.progress = interrupt
        with pytest.raises(RuntimeError):
            await reenc.reencrypt(customer.__tablename__)
        reenc.progress = None
        results = [
            await reenc.reencrypt(customer.__tablename__),
            await reenc.reencrypt(note.__tablename__),
        ]
        stop.set()
        writes = await writer
        assert writes >= 20
        assert results[0].resumed_from == stopped[0]
        assert all(r.complete for r in results)
        for table in (customer.__tablename__, note.__tablename__):
            census = await reenc.census(table)
            assert all(None not in by_key for by_key in census.counts.values()), census
    finally:
        await reenc.database.close()

    # every row through aiocrypt columns without any legacy reader: all aiocrypt form
    base2, customer2, note2 = aiocrypt_models(suffix, None, None)
    try:
        async with sessions() as session:
            customers = (await session.execute(sa.select(customer2))).scalars().all()
            notes = {n.id: n.body for n in (await session.execute(sa.select(note2))).scalars()}
        assert len(customers) == len(notes) == ROWS
        for row in customers:
            assert row.ssn == f"{row.id:09d}"
            assert row.balance == latest.get(("balance", row.id), row.id * 10)
            assert notes[row.id] == latest.get(("body", row.id), f"note {row.id}")
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(base2.metadata.drop_all)
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS ckpt_{suffix}"))


async def test_a_token_the_reader_cannot_open_is_refused(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    su = SqlalchemyUtilsReader(SU_KEY, "aes_gcm")
    base, customer, _ = aiocrypt_models(suffix, su, FernetReader([Fernet.generate_key()]))
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.create_all)
    table = customer.__tablename__
    other = AesGcmEngine()
    other._update_key("another key")
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(f"INSERT INTO {table} (id, ssn) VALUES (1, :t), (2, :p)"),
                {"t": other.encrypt("123"), "p": "123"},
            )  # plaintext too
        async with async_sessionmaker(engine)() as session:
            for key in (1, 2):
                with pytest.raises(DecryptionError):
                    await session.get(customer, key)
                session.expunge_all()
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(base.metadata.drop_all)


@pytest.mark.parametrize("padding", ["pkcs5", "oneandzeroes", "zeroes", "naive"])
async def test_alembic_encrypt_column_reads_aes_engine_tokens(
    service: EncryptionService, tmp_path: Any, padding: str
) -> None:
    """The Alembic helper migrates sqlalchemy-utils AesEngine tokens in place (sync)."""
    await service.key_manager.ensure_active(["pii"])
    url = f"sqlite:///{tmp_path}/alembic.db"
    sync_engine = sa.create_engine(url)
    metadata = sa.MetaData()
    accounts = sa.Table(
        "accounts",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("flag", StringEncryptedType(sa.Boolean, SU_KEY, AesEngine, padding)),
    )
    metadata.create_all(sync_engine)
    with sync_engine.begin() as conn:
        conn.execute(accounts.insert(), [{"id": i, "flag": i % 2 == 0} for i in range(1, 6)])
    reader = SqlalchemyUtilsReader(SU_KEY, "aes", padding=padding)
    with sync_engine.connect() as conn:
        context = MigrationContext.configure(conn)
        with Operations.context(context), context.begin_transaction(_per_migration=True):
            done = encrypt_column(
                "accounts",
                "flag",
                key_type="pii",
                value_type="bool",
                keyring=service.keyring,
                legacy=reader,
                batch_size=2,
            )
    assert done == 5
    with sync_engine.connect() as conn:
        tokens = conn.execute(sa.text("SELECT id, flag FROM accounts ORDER BY id")).all()
    sync_engine.dispose()
    assert [service.keyring.decrypt(t, "pii", "accounts.flag") for _, t in tokens] == [
        i % 2 == 0 for i in range(1, 6)
    ]
    with pytest.raises(LegacyTokenError):
        SqlalchemyUtilsReader(SU_KEY, "aes", padding="pkcs5").open("not base64!")


async def test_alembic_encrypt_column_seals_row_bound_values(
    service: EncryptionService, tmp_path: Any
) -> None:
    await service.key_manager.ensure_active(["pii"])
    sync_engine = sa.create_engine(f"sqlite:///{tmp_path}/bound.db")
    with sync_engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE people (id INTEGER PRIMARY KEY, ssn TEXT)"))
        conn.execute(sa.text("INSERT INTO people VALUES (7, '111'), (8, '222')"))
        encrypt_column(
            "people",
            "ssn",
            key_type="pii",
            value_type="str",
            keyring=service.keyring,
            row_bound=True,
            connection=conn,
        )
        rows = conn.execute(sa.text("SELECT id, ssn FROM people ORDER BY id")).all()
    sync_engine.dispose()
    assert [service.keyring.decrypt(t, "pii", f"people.ssn#{i}") for i, t in rows] == ["111", "222"]
    with pytest.raises(ValueError, match="deterministic"):
        encrypt_column(
            "people",
            "ssn",
            key_type="pii",
            value_type="str",
            keyring=service.keyring,
            row_bound=True,
            deterministic=True,
        )


def test_readers_take_binary_columns_and_refuse_what_they_cannot_open() -> None:
    engine = AesGcmEngine()
    engine._update_key(SU_KEY)
    token = engine.encrypt("42")
    reader = SqlalchemyUtilsReader(SU_KEY, "aes_gcm")
    assert reader.open(token.encode()) == "42"  # EncryptedType (bytes)
    assert reader.open("\\x" + token.encode().hex()) == "42"  # bytea cast to text
    for bad in ("\\xzz", "AAAA", token[:-4] + "AAAA", 42, "é" * 8):
        with pytest.raises(LegacyTokenError):
            reader.open(bad)
    fernet_key = Fernet.generate_key()
    su_fernet = SqlalchemyUtilsReader(SU_KEY.encode(), "fernet")
    with pytest.raises(LegacyTokenError):
        su_fernet.open(Fernet(fernet_key).encrypt(b"x").decode())
    assert FernetReader([fernet_key]).open(Fernet(fernet_key).encrypt(b"x").decode()) == "x"
    with pytest.raises(LegacyTokenError):  # older than ttl
        FernetReader([fernet_key], ttl=10).open(
            Fernet(fernet_key).encrypt_at_time(b"x", 1_000_000).decode()
        )
    for bad_args in ((lambda: SU_KEY, "aes_gcm"), (SU_KEY, "rot13")):
        with pytest.raises((TypeError, ValueError)):
            SqlalchemyUtilsReader(*bad_args)
    with pytest.raises(ValueError, match="padding"):
        SqlalchemyUtilsReader(SU_KEY, "aes", padding="spaces")
    with pytest.raises(TypeError):
        FernetReader(fernet_key)
    assert SU_KEY not in repr(reader) and "sqlalchemy_utils_aes_gcm" in repr(reader)
    with pytest.raises(TypeError, match="pickled"):
        import pickle

        pickle.dumps(reader)


async def test_an_engine_without_the_named_reader_refuses_the_column(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    base, customer, _ = aiocrypt_models(
        suffix, SqlalchemyUtilsReader(SU_KEY, "aes_gcm"), FernetReader([Fernet.generate_key()])
    )
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.create_all)
    reenc = reencryption_engine(
        bound_service, engine, base.metadata, legacy_readers=[], checkpoint_table=f"ckpt_{suffix}"
    )
    spec = reenc.table(customer.__tablename__)
    assert spec.columns[0].to_dict()["legacy_reader"] == "sqlalchemy_utils_aes_gcm"
    try:
        with pytest.raises(ValueError, match="no legacy reader named 'sqlalchemy_utils_aes_gcm'"):
            await reenc.reencrypt(spec.name)
    finally:
        await reenc.database.close()
        async with engine.begin() as conn:
            await conn.run_sync(base.metadata.drop_all)
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS ckpt_{suffix}"))
