"""The Redis ACLs of docs/arq.md, on the real Redis: the key store's user cannot write the
queue, the queue's user cannot write the key store, and a real worker holding one URL
of each rotates a key enqueued through the queue's user."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq_helpers import ArqSetup, job
from redis.exceptions import NoPermissionError

from aiocrypt import KeyManager, KeyType
from aiocrypt.integrations.arq import ArqWorkerConfig, create_job_pool, enqueue_rotation
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore.redis import RedisKeyStore

pytestmark = pytest.mark.services


def acl_rules(store_prefix: str, queue: str, job_prefix: str) -> dict[str, list[str]]:
    """The two users' rules, as docs/arq.md gives them (names made per test here)."""
    common = [
        "on",
        "resetkeys",
        "resetchannels",
        "-@all",
        "+@read",
        "+@write",
        "+@scripting",
        "+@transaction",
        "+@connection",
        "-@dangerous",
    ]
    return {
        "keys": [
            *common,
            f"~{store_prefix}*",
            f"&{store_prefix}changes",
            "+subscribe",
            "+unsubscribe",
            "+publish",
        ],
        "queue": [*common, "~arq:*", f"~{queue}", f"~{queue}:*", f"~{job_prefix}:*", "+info"],
    }


@pytest.fixture
async def acl_urls(redis: aioredis.Redis, prefix: str) -> AsyncIterator[dict[str, str]]:
    """Two Redis users made for the test (deleted afterwards): their URLs by role."""
    store_prefix, job_prefix = f"{prefix}-keys:", f"{prefix}-jobs"
    rules = acl_rules(store_prefix, f"{prefix}:queue", job_prefix)
    urls = {"store_prefix": store_prefix, "job_prefix": job_prefix}
    users = []
    try:
        for role, user_rules in rules.items():
            user, password = f"{prefix}-{role}", secrets.token_hex(16)
            await redis.execute_command("ACL", "SETUSER", user, f">{password}", *user_rules)
            users.append(user)
            urls[role] = f"redis://{user}:{password}@127.0.0.1:6379/15"
        yield urls
    finally:
        if users:
            await redis.execute_command("ACL", "DELUSER", *users)


async def test_separate_users_for_the_queue_and_the_key_store(
    arq_setup: ArqSetup, redis: aioredis.Redis, arq_redis: ArqRedis, acl_urls: dict[str, str]
) -> None:
    setup = arq_setup
    store_prefix = acl_urls["store_prefix"]
    keys_user = aioredis.Redis.from_url(acl_urls["keys"])
    queue_user = aioredis.Redis.from_url(acl_urls["queue"])
    try:
        for client, key in (
            (keys_user, "arq:job:planted"),
            (keys_user, setup.queue),
            (queue_user, f"{store_prefix}keys"),
            (queue_user, f"{store_prefix}revision"),
        ):
            with pytest.raises(NoPermissionError):
                await client.set(key, b"x")
        with pytest.raises(NoPermissionError):
            await keys_user.zadd(setup.queue, {"planted": 1})
    finally:
        await keys_user.aclose()
        await queue_user.aclose()

    # A key store under the key store's user, a worker with one URL of each.
    kek = LocalKekProvider(setup.master_key)
    async with KeyManager(
        RedisKeyStore(acl_urls["keys"], prefix=store_prefix), kek, setup.config, watch=False
    ) as seeding:
        v1 = (await seeding.get_active_key(KeyType.PII)).key_id
    setup.env.update(
        ENCRYPTION_KEY_STORAGE_BACKEND="redis",
        ENCRYPTION_REDIS_URL=acl_urls["keys"],
        ENCRYPTION_REDIS_KEY_PREFIX=store_prefix,
        ENCRYPTION_ARQ_REDIS_URL=acl_urls["queue"],
        ENCRYPTION_ARQ_PREFIX=acl_urls["job_prefix"],
        ENCRYPTION_ARQ_RUN_AT_STARTUP="rotation",
    )
    pool = await create_job_pool(ArqWorkerConfig.from_env(setup.env))
    try:
        rotation = await enqueue_rotation(pool, KeyType.PII, force=True)
    finally:
        await pool.aclose()
    assert rotation is not None
    await setup.run_burst("w")

    info = await job(arq_redis, rotation).result_info()
    assert info is not None and info.success, setup.log_text()
    assert info.result["old_key_id"] == v1 and info.result["rotated"] is True
    async with KeyManager(
        RedisKeyStore(acl_urls["keys"], prefix=store_prefix), kek, setup.config, watch=False
    ) as manager:
        assert (await manager.get_active_key(KeyType.PII)).version == 2
    log = setup.log_text()
    assert "NOPERM" not in log and "Traceback" not in log, log
    for role in ("keys", "queue"):
        assert acl_urls[role].split(":")[2].split("@")[0] not in log  # the password
    await redis.delete(f"arq:result:{rotation}")
