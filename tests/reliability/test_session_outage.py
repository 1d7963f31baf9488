"""Encrypted Redis sessions (integrations/sessions.py) when Redis resets, restarts or goes silent.

``RedisSessionStore`` over a private redis-server (AOF, ``appendfsync always``)
reached through a :class:`FaultProxy`; 40 sessions are created, then the
connections are reset, Redis is killed and restarted, and the link is
blackholed, with loads and saves attempted during each fault.

What must hold: during an outage a load or save fails with
``StoreUnavailableError`` (redis-py's ``ConnectionError`` / ``TimeoutError`` as
its cause; the web layer answers 503) -- never a wrong or empty session handed
out as if valid, never a hang; after each fault every session written before it loads again with
its data (AOF keeps them across the restart), and new sessions are created,
saved and loaded normally.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from aiocrypt import StoreUnavailableError
from aiocrypt.testing import make_service

aioredis = pytest.importorskip("redis.asyncio")
from redis.exceptions import RedisError  # noqa: E402

from aiocrypt.integrations.sessions import (  # noqa: E402
    RedisSessionStore,
    SessionSettings,
)

SESSIONS = 40
OUTAGE = (RedisError, StoreUnavailableError)  # the store translates, the client's ping does not


async def test_sessions_survive_redis_faults(
    private_redis: Any, fault_proxy: Any, summary: Callable[..., None]
) -> None:
    """Reset, restart and blackhole: clear RedisError during the fault, every session back
    after it, new sessions work."""
    proxy = await fault_proxy("127.0.0.1", private_redis.port)
    client = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{proxy.port}/0", socket_timeout=1.0, socket_connect_timeout=1.0
    )
    errors: Counter[str] = Counter()
    operations = 0
    async with make_service() as service:
        store = RedisSessionStore(
            service, client, SessionSettings(ttl=600, prefix=f"rel:{secrets.token_hex(4)}:session:")
        )
        sessions: dict[str, dict[str, Any]] = {}

        async def create(n: int) -> None:
            nonlocal operations
            session = await store.load(None)
            data = {"user_id": n, "cart": [n, n + 1], "token": secrets.token_hex(8)}
            session.update(data)
            result = await store.save(session)
            assert result.session_id is not None
            sessions[result.session_id] = data
            operations += 2

        async def check_all() -> None:
            nonlocal operations
            for sid, data in sessions.items():
                loaded = await store.load(sid)
                operations += 1
                assert not loaded.new and dict(loaded) == data

        async def during_fault() -> None:
            """Loads and saves fail with a RedisError, within the socket timeout."""
            nonlocal operations
            sid = next(iter(sessions))
            for attempt in range(3):
                async with asyncio.timeout(15):  # a hang guard, not a timing assert
                    with pytest.raises(StoreUnavailableError) as info:
                        if attempt % 2:
                            await store.load(sid)
                        else:
                            session = await store.load(None)
                            session["x"] = 1
                            await store.save(session)
                assert isinstance(info.value.__cause__, RedisError)
                errors[type(info.value.__cause__).__name__] += 1
                operations += 1

        async def recovered() -> None:
            for _ in range(100):  # the client reconnects on its own
                try:
                    await client.ping()
                    return
                except OUTAGE:
                    await asyncio.sleep(0.1)
            raise AssertionError("Redis did not come back")

        for n in range(SESSIONS):
            await create(n)
        await check_all()

        proxy.drop()  # every connection reset at once
        for _ in range(3):
            try:
                await check_all()
                break
            except OUTAGE as exc:  # the first command on a reset connection may fail
                errors[type(exc).__name__] += 1
        await check_all()

        await asyncio.to_thread(private_redis.kill)
        await during_fault()
        await asyncio.to_thread(private_redis.start)
        await recovered()
        await check_all()
        await create(SESSIONS)

        proxy.blackhole()
        await during_fault()
        proxy.heal()
        await recovered()
        await check_all()
        await create(SESSIONS + 1)
        await check_all()

        keys = [k async for k in client.scan_iter(match=store.settings.prefix + "*")]
        assert len(keys) == len(sessions)
        await client.delete(*keys)
    await client.aclose()
    summary(
        sessions=len(sessions),
        operations=operations,
        faults_injected=len(proxy.stats.faults) + 1,
        errors_by_class=dict(errors),
        sessions_lost=0,
    )
