"""The Quart and Flask extensions: lifecycle, config, cookies, Flask's event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from flask import Flask
from quart import Quart

from aiocrypt import EncryptionConfig, EncryptionService, KeyType, build_key_manager
from aiocrypt.integrations import flask as flask_ext
from aiocrypt.integrations import quart as quart_ext
from aiocrypt.integrations.sessions import SESSION_INDEX_KEY_TYPE
from aiocrypt.testing import make_service

from .conftest import redis_dump


@pytest.fixture
def config(redis_url: str, redis_prefix: str) -> dict[str, Any]:
    return {
        "AIOCRYPT_REDIS_URL": redis_url,
        "AIOCRYPT_SESSION_PREFIX": redis_prefix + "s:",
        "AIOCRYPT_CACHE_PREFIX": redis_prefix + "c:",
        "AIOCRYPT_SESSION_TTL": 120,
    }


def quart_app(config: dict[str, Any], service: EncryptionService) -> Quart:
    app = Quart(__name__)
    app.config.update(config)
    quart_ext.AioCrypt(app, service=service)

    @app.post("/remember")
    async def remember() -> dict[str, bool]:
        from quart import session

        session.permanent = True
        session["n"] = 1
        return {"ok": True}

    @app.get("/peek")
    async def peek() -> dict[str, Any]:
        from quart import session

        return {"n": session.get("n")}

    return app


async def test_quart_starts_and_closes_the_service(
    config: dict[str, Any], aredis: aioredis.Redis
) -> None:
    service = make_service()
    app = quart_app(config, service)
    state = quart_ext.AioCrypt.state(app)
    assert not state.started
    async with app.test_app():
        stats = await service.get_encryption_stats()
        assert stats["encryption_service"] == "running"
        for key_type in (KeyType.SESSION, SESSION_INDEX_KEY_TYPE, KeyType.CACHE):
            assert key_type in service.keyring.active_keys
        assert state.started and state.redis_client is not None
        await state.cache.set("k", "v")
        assert await state.cache.get("k") == "v"
    assert (await service.get_encryption_stats())["encryption_service"] == "closed"
    assert not state.started and state.redis_client is None
    with pytest.raises(RuntimeError, match="not started"):
        state.cache  # noqa: B018


async def test_quart_permanent_session_cookie(
    config: dict[str, Any], aredis: aioredis.Redis
) -> None:
    config["AIOCRYPT_COOKIE_SAMESITE"] = "Strict"
    config["SESSION_COOKIE_SECURE"] = True
    app = quart_app(config, make_service())
    async with app.test_app() as test_app:
        client = test_app.test_client()
        response = await client.post("/remember")
        header = response.headers["Set-Cookie"]
        for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Max-Age=120", "Path=/"):
            assert flag in header
        # A persistent cookie is refreshed on every response (sliding, like the Redis TTL).
        client.set_cookie("localhost", "session", header.split(";")[0].split("=", 1)[1])
        response = await client.get("/peek")
        assert (await response.get_json()) == {"n": 1}
        assert "Max-Age=120" in response.headers["Set-Cookie"]
        assert len(await redis_dump(aredis, config["AIOCRYPT_SESSION_PREFIX"])) == 1


def test_init_twice_and_missing_init() -> None:
    service = make_service()
    app = Quart(__name__)
    app.config["AIOCRYPT_REDIS_URL"] = "redis://127.0.0.1:6379/15"
    ext = quart_ext.AioCrypt(service=service)
    ext.init_app(app)
    with pytest.raises(RuntimeError, match="already"):
        quart_ext.AioCrypt(app, service=service)
    with pytest.raises(RuntimeError, match="init_app"):
        quart_ext.AioCrypt.state(Quart("other"))
    flask_app = Flask(__name__)
    flask_app.config["SESSION_URI"] = "redis://127.0.0.1:6379/15"
    flask_ext.AioCrypt(flask_app, service=service)
    with pytest.raises(RuntimeError, match="already"):
        flask_ext.AioCrypt(flask_app, service=service)
    assert "redis" not in repr(ext).lower()


# -- Flask ------------------------------------------------------------------------


def flask_app(config: dict[str, Any], service: EncryptionService) -> tuple[Flask, Any]:
    from flask import request, session

    app = Flask(__name__)
    app.config.update(config)
    crypt = flask_ext.AioCrypt(app, service=service)

    @app.get("/async")
    async def async_view() -> dict[str, Any]:
        await asyncio.sleep(0)
        session["seen"] = request.args["q"]  # the request context is visible here
        token = await crypt.service.encrypt_field("x", KeyType.PII, context="t.c")
        await crypt.cache.set("k", request.args["q"])
        return {
            "thread": threading.current_thread().name,
            "token": token[:4],
            "cached": await crypt.cache.get("k"),
        }

    @app.get("/sync")
    def sync_view() -> dict[str, Any]:
        return {
            "thread": threading.current_thread().name,
            "cached": crypt.run(crypt.cache.get("k")),
            "seen": session.get("seen"),
        }

    return app, crypt


async def test_flask_async_views_run_on_the_extension_loop(
    config: dict[str, Any], aredis: aioredis.Redis
) -> None:
    service = make_service()
    app, crypt = flask_app(config, service)
    state = flask_ext.AioCrypt.state(app)
    assert not state.started  # started by the first request
    try:
        client = app.test_client()
        first = (await asyncio.to_thread(client.get, "/async?q=hello")).get_json()
        assert first["thread"] == "aiocrypt-flask" and first["cached"] == "hello"
        second = (await asyncio.to_thread(client.get, "/sync")).get_json()
        assert second["thread"] != "aiocrypt-flask"
        assert second["cached"] == "hello" and second["seen"] == "hello"
        assert state.started
    finally:
        await asyncio.to_thread(crypt.close, app)
    assert (await service.get_encryption_stats())["encryption_service"] == "closed"
    assert not any(t.name == "aiocrypt-flask" for t in threading.enumerate())
    await asyncio.to_thread(crypt.close, app)  # idempotent


async def test_flask_keeps_the_sync_keyring_fresh(
    config: dict[str, Any], tmp_path: Path, master_key_b64: str, aredis: aioredis.Redis
) -> None:
    # Two processes' worth of services over one key file: a rotation made by the
    # other one reaches the Flask app's sync keyring without any request.
    key_config = EncryptionConfig(
        master_key=master_key_b64, storage_path=str(tmp_path / "keys.json")
    )
    mine = EncryptionService(build_key_manager(key_config, refresh_interval=0.05))
    app, crypt = flask_app(config, mine)
    await asyncio.to_thread(crypt.start, app)
    try:
        async with EncryptionService(build_key_manager(key_config)) as other:
            rotated = await other.key_manager.rotate_key(KeyType.SESSION, force=True)
            for _ in range(100):
                if mine.keyring.active(KeyType.SESSION).key_id == rotated.key_id:
                    break
                await asyncio.sleep(0.02)
            assert mine.keyring.active(KeyType.SESSION).key_id == rotated.key_id
    finally:
        await asyncio.to_thread(crypt.close, app)


async def test_flask_run_refuses_to_deadlock(
    config: dict[str, Any], aredis: aioredis.Redis
) -> None:
    app, crypt = flask_app(config, make_service())
    state = flask_ext.AioCrypt.state(app)
    try:

        async def nested() -> None:
            state.run(asyncio.sleep(0))

        with pytest.raises(RuntimeError, match="own event loop"):
            await asyncio.to_thread(state.run, nested())
    finally:
        await asyncio.to_thread(crypt.close, app)
