"""The encrypted Redis session store, async and sync, against the real Redis."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from aiocrypt import ConfigurationError, EncryptionService, Keyring, KeyStatus, KeyType
from aiocrypt.integrations.sessions import (
    SESSION_INDEX_KEY_TYPE,
    CookieAction,
    EncryptedSession,
    RedisSessionStore,
    SessionSettings,
    SyncRedisSessionStore,
    WebSettings,
)
from aiocrypt.testing import make_service

from .conftest import redis_dump


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(redis_prefix: str) -> SessionSettings:
    return SessionSettings(ttl=60, lifetime=3600, prefix=redis_prefix + "s:")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(
    service: EncryptionService, aredis: aioredis.Redis, settings: SessionSettings, clock: Clock
) -> RedisSessionStore:
    return RedisSessionStore(service, aredis, settings, clock=clock)


async def new_session(store: RedisSessionStore, **data: Any) -> str:
    session = await store.load(None)
    session.update(data)
    result = await store.save(session)
    assert result.action is CookieAction.SET and result.session_id is not None
    session_id: str = result.session_id
    return session_id


async def test_round_trip_keeps_types_and_tracks_changes(store: RedisSessionStore) -> None:
    session = await store.load(None)
    assert session.new and not session and not session.modified
    sid = await new_session(
        store, user_id=7, name="Zoë", balance=12.5, tags=["a", "b"], nested={"k": None}
    )
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", sid)

    loaded = await store.load(sid)
    assert not loaded.new and not loaded.modified
    assert loaded.accessed is False  # loading is not reading
    assert dict(loaded) == {
        "user_id": 7,
        "name": "Zoë",
        "balance": 12.5,
        "tags": ["a", "b"],
        "nested": {"k": None},
    }
    assert loaded.accessed and not loaded.modified
    assert (await store.save(loaded)).action is CookieAction.KEEP

    loaded["user_id"] = 8
    assert (await store.save(loaded)).action is CookieAction.SET
    assert (await store.load(sid))["user_id"] == 8


async def test_redis_holds_no_session_id_and_no_plaintext(
    store: RedisSessionStore, aredis: aioredis.Redis, settings: SessionSettings
) -> None:
    sids = [
        await new_session(store, username="alice-in-redis", ssn="123-45-6789") for _ in range(3)
    ]
    assert len(set(sids)) == 3
    dump = await redis_dump(aredis, settings.prefix)
    assert len(dump) == 3
    for key, value in dump.items():
        blob = key + b" " + value
        for secret in [*sids, "alice-in-redis", "123-45-6789", "username", "ssn"]:
            assert secret.encode() not in blob
        assert re.fullmatch(rb"[0-9a-f]{64}", key[len(settings.prefix) :])
        assert await aredis.ttl(key) == settings.ttl


async def test_empty_new_session_writes_nothing(
    store: RedisSessionStore, aredis: aioredis.Redis, settings: SessionSettings
) -> None:
    session = await store.load(None)
    assert (await store.save(session)).action is CookieAction.NONE
    assert await redis_dump(aredis, settings.prefix) == {}


async def test_ttl_slides_on_every_load(
    store: RedisSessionStore, aredis: aioredis.Redis, settings: SessionSettings
) -> None:
    sid = await new_session(store, n=1)
    (key,) = await redis_dump(aredis, settings.prefix)
    await aredis.expire(key, 5)
    await store.load(sid)
    assert await aredis.ttl(key) == settings.ttl


async def test_idle_session_expires(
    service: EncryptionService, aredis: aioredis.Redis, redis_prefix: str
) -> None:
    store = RedisSessionStore(service, aredis, SessionSettings(ttl=1, prefix=redis_prefix))
    sid = await new_session(store, n=1)
    await asyncio.sleep(1.2)
    session = await store.load(sid)
    assert session.new and not session


async def test_absolute_lifetime_ends_even_an_active_session(
    store: RedisSessionStore, clock: Clock, aredis: aioredis.Redis, settings: SessionSettings
) -> None:
    sid = await new_session(store, user_id=1)
    clock.now += settings.lifetime - 10
    session = await store.load(sid)  # still valid, and in use
    session["seen"] = True
    await store.save(session)
    clock.now += 20
    session = await store.load(sid)
    assert session.new and not session
    assert await redis_dump(aredis, settings.prefix) == {}


async def test_regenerate_moves_data_to_a_new_id(
    store: RedisSessionStore, aredis: aioredis.Redis, settings: SessionSettings
) -> None:
    old = await new_session(store, csrf="x")
    session = await store.load(old)
    session.regenerate()
    session["user_id"] = 5
    result = await store.save(session)
    assert result.action is CookieAction.SET and result.session_id not in (None, old)
    assert (await store.load(old)).new
    assert dict(await store.load(result.session_id)) == {"csrf": "x", "user_id": 5}
    assert len(await redis_dump(aredis, settings.prefix)) == 1


async def test_clear_deletes_the_stored_session(
    store: RedisSessionStore, aredis: aioredis.Redis, settings: SessionSettings
) -> None:
    sid = await new_session(store, user_id=5)
    session = await store.load(sid)
    session.clear()
    assert (await store.save(session)).action is CookieAction.DELETE
    assert await redis_dump(aredis, settings.prefix) == {}
    assert (await store.load(sid)).new


async def test_clear_then_write_gets_a_new_id(store: RedisSessionStore) -> None:
    sid = await new_session(store, user_id=5)
    session = await store.load(sid)
    session.clear()
    session["flash"] = "logged out"
    result = await store.save(session)
    assert result.action is CookieAction.SET and result.session_id != sid
    assert (await store.load(sid)).new
    assert dict(await store.load(result.session_id)) == {"flash": "logged out"}


async def test_a_request_racing_with_logout_cannot_revive_the_session(
    store: RedisSessionStore,
) -> None:
    sid = await new_session(store, user_id=5)
    logout, other = await store.load(sid), await store.load(sid)
    logout.clear()
    await store.save(logout)
    other["cart"] = ["book"]
    assert (await store.save(other)).action is CookieAction.DELETE
    assert (await store.load(sid)).new


@pytest.mark.parametrize("cookie", ["", "short", "x" * 43, "A" * 42 + "!", "é" * 43, "a" * 500])
async def test_unusable_cookie_gives_a_fresh_session(store: RedisSessionStore, cookie: str) -> None:
    session = await store.load(cookie)
    assert session.new and not session
    assert (await store.save(session)).action is CookieAction.DELETE  # drop the bad cookie


async def test_tampered_payload_gives_a_fresh_session_and_is_deleted(
    store: RedisSessionStore, aredis: aioredis.Redis, settings: SessionSettings
) -> None:
    sid = await new_session(store, user_id=5)
    ((key, value),) = (await redis_dump(aredis, settings.prefix)).items()
    i = len(value) - 10
    await aredis.set(key, value[:i] + (b"A" if value[i : i + 1] != b"A" else b"B") + value[i + 1 :])
    session = await store.load(sid)
    assert session.new and not session
    assert await redis_dump(aredis, settings.prefix) == {}


@pytest.mark.parametrize("junk", [b"", b"not a token", b"\xff\xfe", b"aiocrypt-garbage." * 9])
async def test_garbage_payload_gives_a_fresh_session(
    store: RedisSessionStore, aredis: aioredis.Redis, settings: SessionSettings, junk: bytes
) -> None:
    sid = await new_session(store, user_id=5)
    (key,) = await redis_dump(aredis, settings.prefix)
    await aredis.set(key, junk)
    assert (await store.load(sid)).new


async def test_payload_moved_to_another_session_does_not_decrypt(
    store: RedisSessionStore, aredis: aioredis.Redis, settings: SessionSettings
) -> None:
    victim = await new_session(store, user_id=1, role="admin")
    attacker = await new_session(store, user_id=2, role="user")
    redis_keys = await store._redis_keys()
    victim_key, attacker_key = redis_keys(victim)[0], redis_keys(attacker)[0]
    await aredis.set(attacker_key, await aredis.get(victim_key))
    session = await store.load(attacker)
    assert session.new and not session


async def test_payload_of_another_deployment_does_not_decrypt(
    aredis: aioredis.Redis, settings: SessionSettings, service: EncryptionService
) -> None:
    async with make_service() as other_service:
        other = RedisSessionStore(other_service, aredis, settings)
        sid = await new_session(other, user_id=1)
    # Same Redis, same prefix, different keys: the id does not even map to the same key.
    mine = RedisSessionStore(service, aredis, settings)
    assert (await mine.load(sid)).new


async def test_index_key_rotation_keeps_live_sessions(
    store: RedisSessionStore,
    service: EncryptionService,
    aredis: aioredis.Redis,
    settings: SessionSettings,
) -> None:
    sid = await new_session(store, user_id=3)
    (old_key,) = await redis_dump(aredis, settings.prefix)
    await service.key_manager.rotate_key(SESSION_INDEX_KEY_TYPE, force=True)

    session = await store.load(sid)
    assert dict(session) == {"user_id": 3}
    (new_key,) = await redis_dump(aredis, settings.prefix)
    assert new_key != old_key  # moved under the new index key
    assert await aredis.ttl(new_key) == settings.ttl
    session["more"] = 1
    await store.save(session)
    assert dict(await store.load(sid)) == {"user_id": 3, "more": 1}


async def test_revoked_index_key_ends_its_sessions(
    store: RedisSessionStore, service: EncryptionService
) -> None:
    sid = await new_session(store, user_id=3)
    active = service.keyring.active(SESSION_INDEX_KEY_TYPE)
    await service.key_manager.revoke_key(active.key_id, reason="test")
    assert (await store.load(sid)).new


async def test_session_key_rotation_keeps_sessions_and_reencrypts_on_write(
    store: RedisSessionStore,
    service: EncryptionService,
    aredis: aioredis.Redis,
    settings: SessionSettings,
) -> None:
    sid = await new_session(store, user_id=3)
    old_id = service.keyring.active(KeyType.SESSION).key_id
    new = await service.key_manager.rotate_key(KeyType.SESSION, force=True)
    session = await store.load(sid)
    assert dict(session) == {"user_id": 3}
    (value,) = (await redis_dump(aredis, settings.prefix)).values()
    assert f".{old_id}.".encode() in value
    session["x"] = 1
    await store.save(session)
    (value,) = (await redis_dump(aredis, settings.prefix)).values()
    assert f".{new.key_id}.".encode() in value


async def test_compromised_session_key_logs_everyone_out(
    store: RedisSessionStore, service: EncryptionService
) -> None:
    sid = await new_session(store, user_id=3)
    key_id = service.keyring.active(KeyType.SESSION).key_id
    await service.key_manager.revoke_key(key_id, reason="leaked")
    assert service.keyring.get(key_id).key.status is KeyStatus.REVOKED  # type: ignore[union-attr]
    assert (await store.load(sid)).new


async def test_tuples_are_stored_as_lists(store: RedisSessionStore) -> None:
    sid = await new_session(store, _flashes=[("info", "saved"), ("error", "oops")])
    assert (await store.load(sid))["_flashes"] == [["info", "saved"], ["error", "oops"]]


async def test_unsupported_value_is_a_type_error(store: RedisSessionStore) -> None:
    session = await store.load(None)
    session["s"] = {1, 2}
    with pytest.raises(TypeError) as info:
        await store.save(session)
    assert "{1, 2}" not in str(info.value)


async def test_repr_shows_no_id_and_no_data(store: RedisSessionStore) -> None:
    sid = await new_session(store, secret_value="hunter2")
    session = await store.load(sid)
    result = await store.save(session)
    for text in (repr(session), str(session.__class__), repr(result), repr(store)):
        assert sid not in text and "hunter2" not in text
    session["x"] = 1
    result = await store.save(session)
    assert sid not in repr(result)


# -- the sync twin --------------------------------------------------------------


@pytest.fixture
async def sync_store(
    service: EncryptionService, sync_redis: redis.Redis, settings: SessionSettings, clock: Clock
) -> SyncRedisSessionStore:
    await service.key_manager.ensure_active(WebSettings.key_types())  # as the Flask extension
    return SyncRedisSessionStore(lambda: service.keyring, sync_redis, settings, clock=clock)


async def test_sync_and_async_stores_read_each_other(
    store: RedisSessionStore, sync_store: SyncRedisSessionStore
) -> None:
    sid = await new_session(store, user_id=9, name="async")
    session = sync_store.load(sid)
    assert dict(session) == {"user_id": 9, "name": "async"}
    session["name"] = "sync"
    assert sync_store.save(session).action is CookieAction.SET

    created = sync_store.load(None)
    created["from"] = "sync"
    result = sync_store.save(created)
    assert result.session_id is not None
    assert dict(await store.load(result.session_id)) == {"from": "sync"}
    assert (await store.load(sid))["name"] == "sync"


async def test_sync_store_lifecycle(
    sync_store: SyncRedisSessionStore, sync_redis: redis.Redis, settings: SessionSettings
) -> None:
    session = sync_store.load(None)
    session["csrf"] = "t"
    first = sync_store.save(session).session_id
    session = sync_store.load(first)
    session.regenerate()
    session["user_id"] = 1
    second = sync_store.save(session).session_id
    assert second not in (None, first)
    assert sync_store.load(first).new
    session = sync_store.load(second)
    assert dict(session) == {"csrf": "t", "user_id": 1}
    session.clear()
    assert sync_store.save(session).action is CookieAction.DELETE
    assert list(sync_redis.scan_iter(match=settings.prefix + "*")) == []
    assert sync_store.load("x" * 43).new


async def test_sync_store_loads_a_key_rotated_elsewhere(
    store: RedisSessionStore,
    service: EncryptionService,
    sync_redis: redis.Redis,
    settings: SessionSettings,
) -> None:
    await service.key_manager.ensure_active([KeyType.SESSION, SESSION_INDEX_KEY_TYPE])
    stale = service.keyring  # what a sync process saw before another process rotated
    await service.key_manager.rotate_key(KeyType.SESSION, force=True)
    sid = await new_session(store, user_id=4)
    fresh: dict[str, Keyring] = {}
    loaded: list[str] = []

    def load_key(key_id: str) -> None:
        loaded.append(key_id)
        fresh["keyring"] = service.keyring

    sync = SyncRedisSessionStore(
        lambda: fresh.get("keyring", stale),
        sync_redis,
        settings,
        load_key=load_key,
        clock=store._codec.clock,
    )
    assert dict(sync.load(sid)) == {"user_id": 4}
    assert loaded == [service.keyring.active(KeyType.SESSION).key_id]
    no_loader = SyncRedisSessionStore(lambda: stale, sync_redis, settings, clock=store._codec.clock)
    assert no_loader.load(sid).new


def test_settings_from_config() -> None:
    settings = WebSettings.from_config(
        {
            "AIOCRYPT_SESSION_TTL": "120",
            "AIOCRYPT_COOKIE_SECURE": "false",
            "AIOCRYPT_COOKIE_SAMESITE": "strict",
            "AIOCRYPT_REDIS_URL": "redis://:pw@host/1",
        }
    )
    assert settings.session.ttl == 120 and settings.session.lifetime == 86400
    assert settings.cookie_secure is False and settings.cookie_samesite == "Strict"
    assert "pw" not in repr(settings)
    assert WebSettings.from_config({}, client_given=True) == WebSettings()
    url = {"AIOCRYPT_REDIS_URL": "redis://host/1"}
    for bad, key in (
        ({"AIOCRYPT_SESSION_TTL": 0}, "AIOCRYPT_SESSION_TTL"),
        ({"AIOCRYPT_SESSION_TTL": "soon"}, "AIOCRYPT_SESSION_TTL"),
        ({"AIOCRYPT_COOKIE_SAMESITE": "sometimes"}, "AIOCRYPT_COOKIE_SAMESITE"),
        ({"AIOCRYPT_COOKIE_SECURE": "maybe"}, "AIOCRYPT_COOKIE_SECURE"),
        (
            {"AIOCRYPT_COOKIE_SAMESITE": "None", "AIOCRYPT_COOKIE_SECURE": False},
            "SESSION_COOKIE_SAMESITE",
        ),
        ({"AIOCRYPT_CACHE_PREFIX": "p:", "AIOCRYPT_SESSION_PREFIX": "p:"}, "AIOCRYPT_CACHE_PREFIX"),
    ):
        with pytest.raises(ConfigurationError, match=key):
            WebSettings.from_config({**url, **bad})


def test_session_class_is_a_plain_dict_to_callers() -> None:
    session = EncryptedSession({"a": 1})
    session.setdefault("b", 2)
    assert session.modified
    session.modified = False
    assert session.pop("missing", None) is None and not session.modified
    assert session.pop("a") == 1 and session.modified
    session |= {"c": 3}
    assert dict(session) == {"b": 2, "c": 3}


async def test_delete_now_and_text_responses(
    service: EncryptionService, redis_url: str, settings: SessionSettings, aredis: aioredis.Redis
) -> None:
    # A client with decode_responses=True hands back str instead of bytes.
    text_client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        store = RedisSessionStore(service, text_client, settings)
        sid = await new_session(store, user_id=1)
        session = await store.load(sid)
        assert dict(session) == {"user_id": 1}
        await store.delete(session)  # e.g. an admin ending a session mid-request
        assert not session and await redis_dump(aredis, settings.prefix) == {}
        assert (await store.save(session)).action is CookieAction.DELETE  # drop the cookie
        assert (await store.load(sid)).new
    finally:
        await text_client.aclose()
