"""Redis and PostgreSQL key stores beyond the contract (tests/test_store_contract.py).

Real services from conftest.py; every test uses its own random prefix / schema
and drops it afterwards.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from aiocrypt import EncryptionConfig, KeyStoreError, LockTimeoutError
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import KeyStore

from .conftest import free_port, record

redis_asyncio = pytest.importorskip("redis.asyncio")
asyncpg = pytest.importorskip("asyncpg")

from aiocrypt.keystore.postgres import PostgresKeyStore  # noqa: E402
from aiocrypt.keystore.redis import RedisKeyStore  # noqa: E402

StoreMaker = Callable[..., KeyStore]


@pytest.fixture
async def redis_stores(redis_url: str) -> AsyncIterator[StoreMaker]:
    """Make RedisKeyStores over one random prefix (all closed, the prefix dropped, after)."""
    prefix = f"aiocrypt-test-{secrets.token_hex(6)}:"
    made: list[KeyStore] = []

    def make(**kwargs: Any) -> KeyStore:
        store = RedisKeyStore(kwargs.pop("client", redis_url), prefix=prefix, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()
    cleaner = RedisKeyStore(redis_url, prefix=prefix)
    await cleaner.drop()
    await cleaner.close()


@pytest.fixture
async def postgres_stores(postgres_dsn: str) -> AsyncIterator[StoreMaker]:
    schema = f"aiocrypt_test_{secrets.token_hex(6)}"
    made: list[KeyStore] = []

    def make(**kwargs: Any) -> KeyStore:
        store = PostgresKeyStore(
            kwargs.pop("pool", postgres_dsn), schema=kwargs.pop("schema", schema), **kwargs
        )
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()
    for name in {s.schema for s in made if isinstance(s, PostgresKeyStore)} | {schema}:
        cleaner = PostgresKeyStore(postgres_dsn, schema=name)
        await cleaner.drop()
        await cleaner.close()


@pytest.fixture(params=["redis", "postgres"])
def stores(request: pytest.FixtureRequest) -> StoreMaker:
    maker: StoreMaker = request.getfixturevalue(f"{request.param}_stores")
    return maker


# -- sharing between processes (two instances stand for two processes) ---------------------


async def test_usage_counters_are_shared_and_atomic(stores: StoreMaker) -> None:
    first, second = stores(), stores()

    async def bump(store: KeyStore) -> None:
        for _ in range(25):
            await store.add_usage({"k1": 1, "k2": 2})

    async with anyio.create_task_group() as tg:
        for store in (first, second, first, second):
            tg.start_soon(bump, store)
    assert await first.get_usage() == {"k1": 100, "k2": 200}
    assert await second.add_usage({"k1": 1}) == {"k1": 101}


async def test_change_made_by_another_instance_is_notified(stores: StoreMaker) -> None:
    watcher, writer = stores(), stores()
    seen: list[int] = []

    async def watch() -> None:
        # a long poll interval: the notification, not the polling, must deliver it
        async for revision in watcher.changes(poll_interval=30):
            seen.append(revision)
            return

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await anyio.sleep(0.3)
        revision = await writer.write([record("pii-v1-cccccccc")], expected_revision=0)
        with anyio.fail_after(5):
            while not seen:
                await anyio.sleep(0.02)
    assert seen == [revision]


async def test_lock_is_exclusive_across_instances(stores: StoreMaker) -> None:
    first, second = stores(), stores()
    async with first.lock("rotation", timeout=2):
        with pytest.raises(LockTimeoutError, match="held elsewhere"):
            async with second.lock("rotation", timeout=0.2):
                pass
        async with second.lock("other-name", timeout=1):
            pass
    async with second.lock("rotation", timeout=1):
        pass


async def test_redis_lock_lease_is_renewed_while_held(redis_stores: StoreMaker) -> None:
    holder, other = redis_stores(lock_lease=0.6), redis_stores(lock_lease=0.6)
    async with holder.lock("rotation", timeout=1):
        await anyio.sleep(1.5)  # more than two leases: renewal keeps it
        with pytest.raises(LockTimeoutError):
            async with other.lock("rotation", timeout=0.1):
                pass
    async with other.lock("rotation", timeout=1):
        pass


# -- clients the caller built ----------------------------------------------------------------


async def test_redis_store_over_a_callers_client(redis_url: str, redis_stores: StoreMaker) -> None:
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        store = redis_stores(client=client)
        await store.open()
        assert await store.write([record("pii-v1-aaaaaaaa")], expected_revision=0) == 1
        await store.close()  # the caller's client stays open
        assert await client.ping()
        assert "redis://127.0.0.1:6379/15" in repr(store)
    finally:
        await client.aclose()


async def test_postgres_store_over_a_callers_pool(
    postgres_dsn: str, postgres_stores: StoreMaker
) -> None:
    pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=4)
    try:
        store = postgres_stores(pool=pool)
        other = postgres_stores()
        await store.open()
        async with store.lock("rotation", timeout=2):
            with pytest.raises(LockTimeoutError):
                async with other.lock("rotation", timeout=0.2):
                    pass
        assert await store.write([record("pii-v1-aaaaaaaa")], expected_revision=0) == 1
        assert (await other.read()).revision == 1
        await store.close()  # the caller's pool stays open
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


# -- PostgreSQL schema -------------------------------------------------------------------------


async def test_postgres_schemas_keep_apart(postgres_stores: StoreMaker) -> None:
    one = postgres_stores(schema=f"aiocrypt_test_{secrets.token_hex(6)}")
    two = postgres_stores(schema=f"aiocrypt_test_{secrets.token_hex(6)}")
    await one.write([record("pii-v1-aaaaaaaa")], expected_revision=0)
    assert (await two.read()).keys == ()
    with pytest.raises(ValueError, match="schema"):
        PostgresKeyStore("postgresql://x/y", schema='bad"; DROP TABLE x; --')


async def test_postgres_without_auto_migrate_needs_migrate(postgres_stores: StoreMaker) -> None:
    store = postgres_stores(auto_migrate=False)
    assert isinstance(store, PostgresKeyStore)
    with pytest.raises(KeyStoreError, match="PostgreSQL key store"):
        await store.read()
    await store.migrate()
    await store.migrate()  # idempotent
    assert (await store.read()).revision == 0


# -- configuration, reprs and errors ----------------------------------------------------------


async def test_stores_from_config(redis_url: str, postgres_dsn: str) -> None:
    from aiocrypt._factory import build_key_store

    kek = LocalKekProvider.generate()
    redis_store = build_key_store(
        EncryptionConfig(storage_backend="redis", redis_url=redis_url), kek
    )
    postgres_store = build_key_store(
        EncryptionConfig(storage_backend="postgres", postgres_dsn=postgres_dsn), kek
    )
    try:
        assert isinstance(redis_store, RedisKeyStore) and redis_store.prefix == "aiocrypt:"
        assert isinstance(postgres_store, PostgresKeyStore)
        assert postgres_store.schema == "aiocrypt"
    finally:
        await redis_store.close()
        await postgres_store.close()


async def test_reprs_and_errors_never_show_passwords() -> None:
    port = free_port()
    redis_store = RedisKeyStore(
        f"redis://app:hunter2@127.0.0.1:{port}/3?password=hunter2", socket_timeout=2
    )
    postgres_store = PostgresKeyStore(
        f"postgresql://app:hunter2@127.0.0.1:{port}/db?sslpassword=hunter2", command_timeout=2
    )
    assert (
        repr(redis_store)
        == f"<RedisKeyStore redis://app:***@127.0.0.1:{port}/3 prefix='aiocrypt:'>"
    )
    assert (
        repr(postgres_store)
        == f"<PostgresKeyStore postgresql://app:***@127.0.0.1:{port}/db schema='aiocrypt'>"
    )
    for store, name in ((redis_store, "Redis"), (postgres_store, "PostgreSQL")):
        with pytest.raises(KeyStoreError) as info:
            await store.open()
        message = str(info.value)
        assert "hunter2" not in message and name in message
        assert f"127.0.0.1:{port}" in message
        await store.close()
