"""Usage limits hold on every path, the sync ones included (issue 14, item 8).

The sync paths (SQLAlchemy column types, the Flask session interface and every
other caller of ``Keyring.encrypt`` from a thread) used to only *count*: 50,000
encryptions went under a key limited to 1,000 before anything rotated. Now the
keyring checks the key's reserved allowance on every seal (one integer
comparison), reserves the next block ahead in the background, waits for it
from a thread that is not the event loop's, and refuses on the loop's own
thread rather than exceed the limit.
"""

from __future__ import annotations

import collections
import secrets
import threading
from collections.abc import AsyncIterator

import anyio
import pytest
import sqlalchemy as sa
from _services import PG_HOST, PG_PORT, require_service
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aiocrypt import (
    EncryptionConfig,
    EncryptionService,
    KeyManager,
    KeyStateError,
    KeyType,
)
from aiocrypt.integrations.sqlalchemy import EncryptedString
from aiocrypt.kek import LocalKekProvider

LIMIT = 1000
POSTGRES_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"


def per_key(tokens: list[str]) -> collections.Counter[str]:
    return collections.Counter(token.split(".")[1] for token in tokens)


@pytest.fixture
async def pg_service() -> AsyncIterator[EncryptionService]:
    """A service on the real Postgres key store, PII keys limited to 1,000 encryptions."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    from aiocrypt.keystore.postgres import PostgresKeyStore

    schema = f"limits_{secrets.token_hex(5)}"
    kek = LocalKekProvider.generate()
    config = EncryptionConfig(rotation_policies={"pii": {"max_encryptions": LIMIT}})  # type: ignore[dict-item]  # read by from_dict
    service = EncryptionService(
        KeyManager(PostgresKeyStore(POSTGRES_DSN, schema=schema), kek, config, watch=False),
        preload=[KeyType.PII],
    )
    await service.start()
    try:
        yield service
    finally:
        await service.close()
        store = PostgresKeyStore(POSTGRES_DSN, schema=schema)
        await store.drop()
        await store.close()


async def test_sync_encryption_from_threads_never_exceeds_the_limit(
    pg_service: EncryptionService,
) -> None:
    """Flask's request threads call ``service.keyring.encrypt`` while the loop runs."""
    tokens: list[str] = []
    lock = threading.Lock()

    def request_thread(n: int) -> None:
        for i in range(n):
            token = pg_service.keyring.encrypt(f"v{i}", KeyType.PII, "sessions.data")
            with lock:
                tokens.append(token)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(anyio.to_thread.run_sync, request_thread, 2500)
    counts = per_key(tokens)
    assert len(tokens) == 10_000
    assert max(counts.values()) <= LIMIT, counts
    assert len(counts) >= 10  # it rotated at the limit, fleet-wide through Postgres


async def test_sync_encryption_on_the_loop_thread_refuses_at_the_limit(
    pg_service: EncryptionService,
) -> None:
    """Sync code on the loop's own thread cannot wait for a reservation: it gets
    ``KeyStateError`` at the hard allowance, never a token beyond it."""
    keyring = pg_service.keyring
    tokens: list[str] = []
    with pytest.raises(KeyStateError, match="allowance"):
        for i in range(3 * LIMIT):
            tokens.append(keyring.encrypt(i, KeyType.PII, "c"))
    assert max(per_key(tokens).values()) <= LIMIT
    # the async path reserves (and rotates) and goes on
    await anyio.sleep(0.2)
    token = await pg_service.encrypt_field(1, KeyType.PII, context="c")
    assert token


async def test_orm_flush_of_many_rows_rotates_at_the_limit(pg_service: EncryptionService) -> None:
    """Column types under an AsyncSession seal in a greenlet: they reserve as they go."""

    class Base(DeclarativeBase):
        pass

    class Person(Base):
        __tablename__ = f"people_{secrets.token_hex(4)}"
        id: Mapped[int] = mapped_column(primary_key=True)
        ssn: Mapped[str] = mapped_column(EncryptedString(KeyType.PII, service=pg_service))

    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with async_sessionmaker(engine)() as session:
            session.add_all(Person(ssn=f"{i:09d}") for i in range(3 * LIMIT + 500))
            await session.commit()
        async with engine.connect() as conn:
            rows = (
                (await conn.execute(sa.text(f"SELECT ssn FROM {Person.__tablename__}")))
                .scalars()
                .all()
            )
    finally:
        await engine.dispose()
    counts = per_key(list(rows))
    assert sum(counts.values()) == 3 * LIMIT + 500
    assert max(counts.values()) <= LIMIT, counts
    assert len(counts) >= 4


def test_a_standalone_keyring_is_held_to_2_to_the_32() -> None:
    """A keyring built by hand has no store to reserve from: only NIST's limit applies."""
    import asyncio

    from aiocrypt.testing import make_key_manager

    manager = make_key_manager()
    asyncio.run(manager.open())
    asyncio.run(manager.ensure_active([KeyType.PII]))
    from aiocrypt._keyring import Keyring

    dk = manager.keyring.active(KeyType.PII)
    keyring = Keyring([dk])
    assert keyring.encrypt("x", KeyType.PII, "c")
    dk.encryptions = 2**32
    with pytest.raises(KeyStateError, match="2\\*\\*32"):
        keyring.encrypt("x", KeyType.PII, "c")
    asyncio.run(manager.close())
