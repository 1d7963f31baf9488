"""The key store's service dies in the middle of a rotation.

Each test runs its own redis-server / PostgreSQL cluster on a free port (the
shared services on 6379 / 5432 are never touched), kills it from a KEK wrap
hook -- after the rotation read the store and before it writes -- and starts
it again on the same data. Expected: the rotation fails with a clear
KeyStoreError, the previous key stays active, nothing is lost, and the same
rotation succeeds once the service is back.

Redis runs with AOF and ``appendfsync always`` (as a key store should: without
persistence a restart loses every key); PostgreSQL is stopped with ``-m
immediate`` (a crash: recovery from WAL on restart).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import pytest
from _private_services import PrivatePostgres, PrivateRedis

from aiocrypt import (
    EncryptionService,
    KeyManager,
    KeyStatus,
    KeyStoreError,
    KeyType,
)
from aiocrypt.kek import KekProvider, LocalKekProvider
from aiocrypt.keystore import KeyStore

pytest.importorskip("redis.asyncio")
pytest.importorskip("asyncpg")


class HookedKek(KekProvider):
    """The local KEK, with a one-shot hook run inside the next ``wrap``."""

    backend = "local"

    def __init__(self) -> None:
        self.inner = LocalKekProvider.generate()
        self.on_wrap: Callable[[], Awaitable[None] | None] | None = None

    @property
    def kek_id(self) -> str:
        return self.inner.kek_id

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        hook, self.on_wrap = self.on_wrap, None
        if hook is not None:
            result = hook()
            if result is not None:
                await result
        return await self.inner.wrap(plaintext, context)

    async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        return await self.inner.unwrap(wrapped, context)


async def _rotation_survives_a_crash(
    store: KeyStore, crash: Callable[[], None], restart: Callable[[], None], where: str
) -> None:
    kek = HookedKek()
    manager = KeyManager(store, kek, watch=False, lock_timeout=10)
    service = EncryptionService(manager)
    await manager.open()
    try:
        token = await service.encrypt_field(
            "4111 1111 1111 1111", KeyType.PII, context="cards.number"
        )
        v1 = await manager.get_active_key(KeyType.PII)
        before = await store.read()

        kek.on_wrap = crash  # the store dies after the rotation read it, before it writes
        with pytest.raises(KeyStoreError) as info:
            await manager.rotate_key(KeyType.PII, force=True)
        message = str(info.value)
        assert where in message and "write failed" in message, message
        assert (await manager.get_active_key(KeyType.PII)).key_id == v1.key_id

        restart()
        after = await store.read()
        assert after == before  # nothing lost, nothing half-written
        assert [(k.key_id, k.status) for k in after.keys] == [(v1.key_id, KeyStatus.ACTIVE)]
        assert (
            await service.decrypt_field(token, KeyType.PII, context="cards.number")
            == "4111 1111 1111 1111"
        )

        v2 = await manager.rotate_key(KeyType.PII, force=True)
        assert v2.version == 2
        statuses = {k.key_id: k.status for k in (await store.read()).keys}
        assert statuses == {v1.key_id: KeyStatus.DECRYPT_ONLY, v2.key_id: KeyStatus.ACTIVE}
        assert (
            await service.decrypt_field(token, KeyType.PII, context="cards.number")
            == "4111 1111 1111 1111"
        )
        fresh = await service.encrypt_field("new", KeyType.PII, context="cards.number")
        assert v2.key_id in fresh  # the key id sits in the token in clear
    finally:
        await manager.close()


async def test_redis_killed_mid_rotation(private_redis: PrivateRedis) -> None:
    from aiocrypt.keystore.redis import RedisKeyStore

    store = RedisKeyStore(private_redis.url, prefix="faults:", lock_lease=5.0, socket_timeout=5)
    await _rotation_survives_a_crash(
        store,
        private_redis.kill,
        private_redis.start,
        f"Redis key store redis://127.0.0.1:{private_redis.port}/0",
    )


async def test_postgres_crashed_mid_rotation(private_postgres: PrivatePostgres) -> None:
    from aiocrypt.keystore.postgres import PostgresKeyStore

    store = PostgresKeyStore(private_postgres.dsn, schema="faults", command_timeout=5)
    await _rotation_survives_a_crash(
        store,
        lambda: private_postgres.stop("immediate"),
        private_postgres.start,
        f"PostgreSQL key store postgresql://postgres@127.0.0.1:{private_postgres.port}/postgres",
    )
