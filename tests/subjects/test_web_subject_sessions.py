"""Sessions and cache entries bound to a data subject (issue 20): forgetting the user
empties their sessions (a fresh session, no error) and turns their cache entries into
misses, in the async and the sync store and through the Quart extension; everyone
else's stay."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from quart import Quart
from web.conftest import aredis, redis_dump, redis_prefix, sync_redis
from web.test_sessions import new_session

from aiocrypt import ConfigurationError, EncryptionService
from aiocrypt.integrations import quart as quart_ext
from aiocrypt.integrations.cache import EncryptedCache
from aiocrypt.integrations.sessions import (
    RedisSessionStore,
    SessionSettings,
    SyncRedisSessionStore,
    WebSettings,
)

__all__ = ["aredis", "redis_prefix", "sync_redis"]  # fixtures shared with tests/web


@pytest.fixture
def settings(redis_prefix: str) -> SessionSettings:
    return SessionSettings(prefix=redis_prefix + "s:", subject_field="user_id")


@pytest.fixture
def store(
    service: EncryptionService, aredis: aioredis.Redis, settings: SessionSettings
) -> RedisSessionStore:
    return RedisSessionStore(service, aredis, settings)


async def test_forgetting_a_user_empties_their_sessions_only(
    store: RedisSessionStore,
    service: EncryptionService,
    aredis: aioredis.Redis,
    settings: SessionSettings,
) -> None:
    mine = [await new_session(store, user_id=42, cart=[1, 2]) for _ in range(2)]
    theirs = await new_session(store, user_id=43, cart=[3])
    anonymous = await new_session(store, cart=[4])
    tokens = list((await redis_dump(aredis, settings.prefix)).values())
    assert sum(t.startswith(b"ac2.S-") for t in tokens) == 3  # the anonymous one is not

    await service.forget_subject("user:42")

    for sid in mine:
        session = await store.load(sid)
        assert session.new and dict(session) == {}  # a fresh session, no error
    assert len(await redis_dump(aredis, settings.prefix)) == 2  # the dead payloads are gone
    assert dict(await store.load(theirs)) == {"user_id": 43, "cart": [3]}
    assert dict(await store.load(anonymous)) == {"cart": [4]}
    # a new login of the same id gets a new key (no tombstone asked for)
    again = await new_session(store, user_id=42)
    assert dict(await store.load(again)) == {"user_id": 42}


async def test_login_moves_the_session_under_the_users_key(
    store: RedisSessionStore,
    service: EncryptionService,
    aredis: aioredis.Redis,
    settings: SessionSettings,
) -> None:
    sid = await new_session(store, visits=1)
    session = await store.load(sid)
    session["user_id"] = "alice"
    session.regenerate()
    result = await store.save(session)
    assert result.session_id is not None
    [token] = (await redis_dump(aredis, settings.prefix)).values()
    assert token.startswith(b"ac2.S-")
    await service.forget_subject("user:alice")
    assert dict(await store.load(result.session_id)) == {}


async def test_a_subject_value_that_cannot_name_anyone_is_refused(store: RedisSessionStore) -> None:
    session = await store.load(None)
    session["user_id"] = 4.5
    with pytest.raises(TypeError, match="'user_id'") as caught:
        await store.save(session)
    assert "4.5" not in str(caught.value)


def test_settings_read_the_subject_keys(redis_url: str) -> None:
    base = {"AIOCRYPT_REDIS_URL": redis_url, "AIOCRYPT_COOKIE_SECURE": True}
    assert WebSettings.from_config(base).session.subject_field is None
    settings = WebSettings.from_config(
        {**base, "AIOCRYPT_SESSION_SUBJECT": "uid", "AIOCRYPT_SESSION_SUBJECT_PREFIX": "customer"}
    )
    assert (settings.session.subject_field, settings.session.subject_prefix) == ("uid", "customer")
    assert settings.session.subject_of({"uid": 7}) == "customer:7"
    with pytest.raises(ConfigurationError, match="AIOCRYPT_SESSION_SUBJECT_PREFIX"):
        WebSettings.from_config(
            {**base, "AIOCRYPT_SESSION_SUBJECT": "uid", "AIOCRYPT_SESSION_SUBJECT_PREFIX": "a:b"}
        )
    with pytest.raises(ConfigurationError, match="AIOCRYPT_SESSION_SUBJECT"):
        WebSettings.from_config({**base, "AIOCRYPT_SESSION_SUBJECT": ""})
    with pytest.raises(ConfigurationError, match="subject field"):
        SessionSettings(subject_field="")
    with pytest.raises(ConfigurationError, match="session id length"):  # still checked
        SessionSettings(subject_field="uid", sid_bytes=16)


async def test_sync_store_seals_and_opens_through_the_service(
    store: RedisSessionStore,
    service: EncryptionService,
    sync_redis: redis.Redis,
    settings: SessionSettings,
) -> None:
    with pytest.raises(ConfigurationError, match="service= and run="):
        SyncRedisSessionStore(lambda: service.keyring, sync_redis, settings)
    await service.key_manager.ensure_active(WebSettings.key_types())  # as the extension does
    loop = asyncio.get_running_loop()

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    sync_store = SyncRedisSessionStore(
        lambda: service.keyring, sync_redis, settings, service=service, run=run
    )

    def login(user: int) -> str:
        session = sync_store.load(None)
        session["user_id"] = user
        sid = sync_store.save(session).session_id
        assert isinstance(sid, str)
        return sid

    sid, other = await asyncio.to_thread(login, 42), await asyncio.to_thread(login, 43)
    assert dict(await store.load(sid)) == {"user_id": 42}  # the async store reads it
    assert dict(await asyncio.to_thread(sync_store.load, sid)) == {"user_id": 42}
    await service.forget_subject("user:42")
    assert dict(await asyncio.to_thread(sync_store.load, sid)) == {}
    assert dict(await asyncio.to_thread(sync_store.load, other)) == {"user_id": 43}


async def test_quart_app_forgets_a_user_without_an_error_page(
    service: EncryptionService, redis_url: str, redis_prefix: str, aredis: aioredis.Redis
) -> None:
    app = Quart(__name__)
    app.config.update(
        {
            "AIOCRYPT_REDIS_URL": redis_url,
            "AIOCRYPT_SESSION_PREFIX": redis_prefix + "s:",
            "AIOCRYPT_CACHE_PREFIX": redis_prefix + "c:",
            "AIOCRYPT_COOKIE_SECURE": False,
            "AIOCRYPT_SESSION_SUBJECT": "user_id",
        }
    )
    quart_ext.AioCrypt(app, service=service)

    @app.post("/login/<int:user>")
    async def login(user: int) -> dict[str, bool]:
        from quart import session

        session["user_id"] = user
        return {"ok": True}

    @app.get("/me")
    async def me() -> dict[str, Any]:
        from quart import session

        return {"user": session.get("user_id")}

    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert (await client.post("/login/42")).status_code == 200
        assert await (await client.get("/me")).get_json() == {"user": 42}
        await service.forget_subject("user:42")
        response = await client.get("/me")
        assert response.status_code == 200
        assert await response.get_json() == {"user": None}


async def test_cache_entries_of_a_forgotten_subject_are_misses(
    service: EncryptionService, aredis: aioredis.Redis, redis_prefix: str
) -> None:
    cache = EncryptedCache(service, aredis, prefix=redis_prefix + "c:")
    await cache.set("profile:42", {"name": "Ann"}, subject="user:42")
    await cache.set("profile:43", {"name": "Bob"}, subject="user:43")
    await cache.set("motd", "hello")
    assert await cache.get_or_set("orders:42", _compute, subject="user:42") == [1, 2]
    await service.forget_subject("user:42")
    assert await cache.get("profile:42", "gone") == "gone"
    assert await cache.get("orders:42", "gone") == "gone"
    assert len(await redis_dump(aredis, redis_prefix + "c:")) == 2  # deleted as unreadable
    assert await cache.get("profile:43") == {"name": "Bob"}
    assert await cache.get("motd") == "hello"


async def _compute() -> list[int]:
    return [1, 2]


async def test_flask_app_forgets_a_user_without_an_error_page(
    redis_url: str, redis_prefix: str, aredis: aioredis.Redis
) -> None:
    from flask import Flask, session

    from aiocrypt.integrations import flask as flask_ext
    from aiocrypt.testing import make_service

    app = Flask(__name__)
    app.config.update(
        {
            "AIOCRYPT_REDIS_URL": redis_url,
            "AIOCRYPT_SESSION_PREFIX": redis_prefix + "s:",
            "AIOCRYPT_CACHE_PREFIX": redis_prefix + "c:",
            "AIOCRYPT_COOKIE_SECURE": False,
            "AIOCRYPT_SESSION_SUBJECT": "user_id",
        }
    )
    service = make_service()
    crypt = flask_ext.AioCrypt(app, service=service)

    @app.post("/login/<int:user>")
    def login(user: int) -> dict[str, bool]:
        session["user_id"] = user
        return {"ok": True}

    @app.get("/me")
    def me() -> dict[str, Any]:
        return {"user": session.get("user_id")}

    try:
        client = app.test_client()
        other = app.test_client()
        assert (await asyncio.to_thread(client.post, "/login/42")).status_code == 200
        assert (await asyncio.to_thread(other.post, "/login/43")).status_code == 200
        assert (await asyncio.to_thread(client.get, "/me")).get_json() == {"user": 42}
        tokens = (await redis_dump(aredis, redis_prefix + "s:")).values()
        assert all(t.startswith(b"ac2.S-") for t in tokens) and len(tokens) == 2
        state = flask_ext.AioCrypt.state(app)
        await asyncio.to_thread(state.run, service.forget_subject("user:42"))
        response = await asyncio.to_thread(client.get, "/me")
        assert response.status_code == 200 and response.get_json() == {"user": None}
        assert (await asyncio.to_thread(other.get, "/me")).get_json() == {"user": 43}
    finally:
        await asyncio.to_thread(crypt.close, app)
