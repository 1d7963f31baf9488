"""Paths of the Flask extension the wider suite leaves unrun: its loop thread's
cancelled coroutines, clients given to it, and the background key refresher when a
refresh fails."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from typing import Any

import flask
import pytest
import redis
import redis.asyncio as aioredis

from aiocrypt import EncryptionService, KeyManager, KeyType
from aiocrypt.integrations.flask import AioCrypt, AioCryptState
from aiocrypt.testing import FakeKekProvider, MemoryKeyStore, make_service


def _app(redis_url: str, redis_prefix: str, **config: Any) -> flask.Flask:
    app = flask.Flask("flask_paths")
    app.config.update(
        TESTING=True,
        AIOCRYPT_REDIS_URL=redis_url,
        AIOCRYPT_SESSION_PREFIX=redis_prefix + "s:",
        AIOCRYPT_CACHE_PREFIX=redis_prefix + "c:",
    )
    app.config.update(config)
    return app


@pytest.fixture
def crypt_app(redis_url: str, redis_prefix: str) -> Iterator[tuple[AioCrypt, flask.Flask]]:
    app = _app(redis_url, redis_prefix)
    crypt = AioCrypt(app, service=make_service())
    try:
        yield crypt, app
    finally:
        crypt.close(app)


async def _answer() -> int:
    await asyncio.sleep(0)
    return 42


async def _cancelled() -> int:
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    await asyncio.sleep(0)
    return 0


def test_run_returns_results_and_cancellations(crypt_app: tuple[AioCrypt, flask.Flask]) -> None:
    crypt, app = crypt_app
    state: AioCryptState = AioCrypt.state(app)
    assert repr(state) == "<AioCryptState stopped>"
    crypt.start(app)
    assert repr(state) == "<AioCryptState running>"
    with app.app_context():
        assert crypt.run(_answer()) == 42
        with pytest.raises(concurrent.futures.CancelledError):
            crypt.run(_cancelled())


def test_clients_given_are_used_and_left_open(
    redis_url: str, redis_prefix: str, sync_redis: redis.Redis
) -> None:
    app = _app(redis_url, redis_prefix)
    given_async = aioredis.Redis.from_url(redis_url)
    crypt = AioCrypt(app, service=make_service(), redis=sync_redis, async_redis=given_async)
    try:
        crypt.start(app)
        state = AioCrypt.state(app)
        assert state.cache.redis is given_async
        with app.app_context():
            crypt.run(state.cache.set("k", {"v": 1}))
            assert crypt.run(state.cache.get("k")) == {"v": 1}
            crypt.run(given_async.aclose())  # the caller's to close, on the loop it used
    finally:
        crypt.close(app)
    assert sync_redis.ping()  # the caller's sync client: not closed by the extension


async def test_a_failing_key_refresh_keeps_the_keys_and_says_so(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store, kek = MemoryKeyStore(), FakeKekProvider()
    service = EncryptionService(KeyManager(store, kek, refresh_interval=0.02, watch=False))
    app = _app(redis_url, redis_prefix)
    crypt = AioCrypt(app, service=service)
    try:
        crypt.start(app)
        before = list(service.keyring)
        async with KeyManager(store, kek, watch=False) as other:
            await other.rotate_key(KeyType.SESSION, force=True)  # a new key to unwrap
        kek.deny()
        for _ in range(100):
            if any("refreshing aiocrypt keys failed" in r.getMessage() for r in caplog.records):
                break
            time.sleep(0.01)
        messages = [r.getMessage() for r in caplog.records if "refreshing" in r.getMessage()]
        assert messages and messages[0] == (
            "refreshing aiocrypt keys failed (KekProviderError); will retry"
        )
        assert list(service.keyring) == before  # the last good keys
    finally:
        crypt.close(app)


def test_a_session_sealed_under_a_key_rotated_elsewhere_is_read(
    redis_url: str, redis_prefix: str
) -> None:
    store, kek = MemoryKeyStore(), FakeKekProvider()
    apps = []
    for _ in range(2):  # the writer, then the reader
        app = _app(redis_url, redis_prefix, SECRET_KEY="unused")
        crypt = AioCrypt(app, service=EncryptionService(KeyManager(store, kek, watch=False)))
        apps.append((app, crypt))

        @app.post("/set")
        def set_() -> str:
            flask.session["user"] = "alice"
            return "ok"

        @app.get("/get")
        def get() -> str:
            return str(flask.session.get("user"))

    (writer, writer_crypt), (reader, reader_crypt) = apps
    try:
        writer_crypt.start(writer)
        reader_crypt.start(reader)  # holds the session key of now
        with writer.app_context():
            manager = AioCrypt.state(writer).service.key_manager
            writer_crypt.run(manager.rotate_key(KeyType.SESSION, force=True))
        client = writer.test_client()
        assert client.post("/set").status_code == 200  # sealed under the new key
        cookie = client.get_cookie("session")
        assert cookie is not None
        reading = reader.test_client()
        reading.set_cookie("session", cookie.value)
        assert reading.get("/get").get_data(as_text=True) == "alice"
        with reader.app_context():
            assert reader_crypt.sessions is AioCrypt.state(reader).sessions
    finally:
        for app, crypt in apps:
            crypt.close(app)
