"""Paths of the web integrations the wider suite leaves unrun: the session dict's
change tracking, old index keys on load, lazy and deleted sessions, the sync store."""

from __future__ import annotations

from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from werkzeug.wrappers import Response

from aiocrypt import EncryptionService
from aiocrypt.integrations.sessions import (
    SESSION_INDEX_KEY_TYPE,
    CookieAction,
    EncryptedSession,
    RedisSessionStore,
    SaveResult,
    SessionSettings,
    SyncRedisSessionStore,
    WebSettings,
    apply_cookie,
)

from .conftest import redis_dump


@pytest.fixture
def settings(redis_prefix: str) -> SessionSettings:
    return SessionSettings(ttl=60, lifetime=3600, prefix=redis_prefix + "s:")


@pytest.fixture
def store(
    service: EncryptionService, aredis: aioredis.Redis, settings: SessionSettings
) -> RedisSessionStore:
    return RedisSessionStore(service, aredis, settings)


@pytest.fixture
async def sync_store(
    service: EncryptionService, sync_redis: redis.Redis, settings: SessionSettings
) -> SyncRedisSessionStore:
    await service.key_manager.ensure_active(WebSettings.key_types())
    return SyncRedisSessionStore(lambda: service.keyring, sync_redis, settings)


async def _new(store: RedisSessionStore, **data: Any) -> str:
    session = await store.load(None)
    session.update(data)
    result = await store.save(session)
    assert result.session_id is not None
    sid: str = result.session_id
    return sid


# -- the session dict: every read marks it accessed, every change modified ----------


@pytest.mark.parametrize(
    ("read", "expected"),
    [
        (lambda s: list(s), ["a"]),
        (lambda s: list(s.values()), [1]),
        (lambda s: list(s.items()), [("a", 1)]),
        (lambda s: s.copy(), {"a": 1}),
    ],
)
def test_reads_mark_the_session_accessed_not_modified(read: Any, expected: Any) -> None:
    session = EncryptedSession({"a": 1})
    session.accessed = session.modified = False
    assert read(session) == expected
    assert session.accessed and not session.modified


def test_popitem_marks_the_session_modified() -> None:
    session = EncryptedSession({"a": 1})
    session.accessed = session.modified = False
    assert session.popitem() == ("a", 1)
    assert session.accessed and session.modified and not session


async def test_only_a_stored_unchanged_session_can_be_saved_without_a_cookie(
    store: RedisSessionStore,
) -> None:
    fresh = await store.load(None)
    fresh["a"] = 1
    assert not fresh.can_save_without_cookie()  # its new id must reach the client
    sid = await _new(store, a=1)
    loaded = await store.load(sid)
    assert loaded.can_save_without_cookie()
    loaded.regenerate()
    assert not loaded.can_save_without_cookie()


# -- sessions stored under an older index key ----------------------------------------


async def test_a_session_two_index_keys_old_is_found_and_moved(
    store: RedisSessionStore,
    service: EncryptionService,
    aredis: aioredis.Redis,
    settings: SessionSettings,
) -> None:
    sid = await _new(store, user_id=5)
    (v1_key,) = await redis_dump(aredis, settings.prefix)
    await service.key_manager.rotate_key(SESSION_INDEX_KEY_TYPE, force=True)
    await service.key_manager.rotate_key(SESSION_INDEX_KEY_TYPE, force=True)
    session = await store.load(sid)  # v3's key, then v2's (empty), then v1's
    assert dict(session) == {"user_id": 5}
    (moved,) = await redis_dump(aredis, settings.prefix)
    assert moved != v1_key


async def test_an_unknown_session_after_rotation_is_new(
    store: RedisSessionStore,
    service: EncryptionService,
) -> None:
    await _new(store, user_id=5)
    await service.key_manager.rotate_key(SESSION_INDEX_KEY_TYPE, force=True)
    assert (await store.load("x" * 43)).new


async def test_sync_store_finds_and_moves_a_session_under_an_old_index_key(
    store: RedisSessionStore,
    sync_store: SyncRedisSessionStore,
    service: EncryptionService,
    sync_redis: redis.Redis,
    settings: SessionSettings,
) -> None:
    sid = await _new(store, user_id=6)
    (old,) = list(sync_redis.scan_iter(match=settings.prefix + "*"))
    await service.key_manager.rotate_key(SESSION_INDEX_KEY_TYPE, force=True)
    assert dict(sync_store.load(sid)) == {"user_id": 6}
    (moved,) = list(sync_redis.scan_iter(match=settings.prefix + "*"))
    assert moved != old
    assert 0 < sync_redis.ttl(moved) <= settings.ttl  # type: ignore[operator]  # redis-py types a reply as Awaitable | Any
    assert sync_store.load("y" * 43).new  # no session under any key


# -- lazy, deleted and raced sessions ------------------------------------------------


async def test_sync_session_never_read_saves_nothing(
    store: RedisSessionStore,
    sync_store: SyncRedisSessionStore,
    aredis: aioredis.Redis,
    settings: SessionSettings,
) -> None:
    sid = await _new(store, user_id=7)
    before = await redis_dump(aredis, settings.prefix)
    session = sync_store.open(sid)  # lazy: Redis not read yet
    assert sync_store.save(session) == SaveResult(CookieAction.NONE)
    assert await redis_dump(aredis, settings.prefix) == before


async def test_sync_delete_removes_the_stored_session_now(
    store: RedisSessionStore,
    sync_store: SyncRedisSessionStore,
    aredis: aioredis.Redis,
    settings: SessionSettings,
) -> None:
    sid = await _new(store, user_id=8)
    session = sync_store.load(sid)
    sync_store.delete(session)
    assert not session and await redis_dump(aredis, settings.prefix) == {}
    assert sync_store.save(session).action is CookieAction.DELETE
    fresh = sync_store.load(None)
    sync_store.delete(fresh)  # nothing stored: nothing to delete
    assert sync_store.save(fresh).action is CookieAction.NONE


async def test_delete_of_a_session_never_stored(store: RedisSessionStore) -> None:
    session = await store.load(None)
    session["a"] = 1
    await store.delete(session)
    assert not session
    assert (await store.save(session)).action is CookieAction.NONE


async def test_sync_write_racing_with_a_logout_stays_logged_out(
    store: RedisSessionStore,
    sync_store: SyncRedisSessionStore,
    sync_redis: redis.Redis,
    settings: SessionSettings,
) -> None:
    sid = await _new(store, user_id=9)
    session = sync_store.load(sid)
    session["cart"] = [1]
    for key in list(
        sync_redis.scan_iter(match=settings.prefix + "*")
    ):  # another request logged out
        sync_redis.delete(key)
    assert sync_store.save(session).action is CookieAction.DELETE
    assert list(sync_redis.scan_iter(match=settings.prefix + "*")) == []


def test_no_cookie_for_a_session_never_accessed() -> None:
    session = EncryptedSession()
    session.accessed = False
    response = Response()
    apply_cookie(WebSettings(), session, SaveResult(CookieAction.SET, "x" * 43), response)
    assert "Set-Cookie" not in response.headers
    assert "Vary" not in response.headers
