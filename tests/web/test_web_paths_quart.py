"""Paths of the Quart extension the wider suite leaves unrun: the state before it is
started, a second start, the stopped health check, and sessions over a websocket
(which cannot carry a cookie)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from quart import Quart, got_websocket_exception, session, websocket
from quart.testing.connections import WebsocketDisconnectError

from aiocrypt import StoreUnavailableError
from aiocrypt.integrations.quart import AioCrypt, AioCryptState
from aiocrypt.testing import make_service

from .conftest import redis_dump

MakeApp = Callable[..., tuple[Quart, AioCrypt]]


@pytest.fixture
def make_app(redis_url: str, redis_prefix: str, aredis: aioredis.Redis) -> MakeApp:
    def make(**config: Any) -> tuple[Quart, AioCrypt]:
        app = Quart("quart_paths")
        app.config.update(
            TESTING=True,
            AIOCRYPT_REDIS_URL=redis_url,
            AIOCRYPT_SESSION_PREFIX=redis_prefix + "s:",
            AIOCRYPT_CACHE_PREFIX=redis_prefix + "c:",
        )
        app.config.update(config)
        crypt = AioCrypt(app, service=make_service())

        @app.websocket("/ws")
        async def ws() -> None:
            seen = session.get("seen", 0)  # read as the websocket opens
            await websocket.send("ready")
            await websocket.receive()
            session["seen"] = seen + 1
            await websocket.send(str(session["seen"]))

        @app.post("/login")
        async def login() -> str:
            session["seen"] = 0
            return "in"

        return app, crypt

    return make


async def test_state_before_start_and_a_second_start(make_app: MakeApp) -> None:
    app, crypt = make_app()
    state: AioCryptState = AioCrypt.state(app)
    with pytest.raises(RuntimeError, match="AioCrypt is not started: serve the app"):
        state.sessions  # noqa: B018
    stopped = await state.redis_check()
    assert (stopped.status, stopped.detail) == ("failing", {"state": "stopped"})
    async with app.test_app():
        sessions = state.sessions
        await state.start()  # started already: nothing is rebuilt
        assert state.sessions is sessions
        async with app.app_context():
            assert crypt.sessions is sessions
        assert (await state.redis_check()).status == "ok"


async def test_a_websocket_saves_a_stored_session_and_skips_a_new_one(
    make_app: MakeApp, aredis: aioredis.Redis, redis_prefix: str
) -> None:
    app, _ = make_app()
    async with app.test_app():
        client = app.test_client()
        async with client.websocket("/ws") as ws:  # no cookie: a new id could not reach it
            assert await ws.receive() == "ready"
            await ws.send("hi")
            assert await ws.receive() == "1"
        assert await redis_dump(aredis, redis_prefix + "s:") == {}
        assert (await client.post("/login")).status_code == 200
        (key,) = await redis_dump(aredis, redis_prefix + "s:")
        async with client.websocket("/ws") as ws:  # the cookie's session: kept
            assert await ws.receive() == "ready"
            await ws.send("hi")
            assert await ws.receive() == "1"
        async with client.websocket("/ws") as ws:
            assert await ws.receive() == "ready"
            await ws.send("hi")
            assert await ws.receive() == "2"
        assert list(await redis_dump(aredis, redis_prefix + "s:")) == [key]


async def test_a_websocket_session_that_cannot_be_saved_raises(
    make_app: MakeApp, private_redis: Any
) -> None:
    app, _ = make_app(AIOCRYPT_REDIS_URL=private_redis.url)
    raised: list[Exception] = []

    def record(sender: Quart, exception: Exception) -> None:
        raised.append(exception)

    got_websocket_exception.connect(record, app)
    async with app.test_app():
        client = app.test_client()
        assert (await client.post("/login")).status_code == 200
        async with client.websocket("/ws") as ws:
            assert await ws.receive() == "ready"  # the session was read
            private_redis.kill()
            await ws.send("hi")
            assert await ws.receive() == "1"  # the view ran; its session cannot be kept
            with pytest.raises(WebsocketDisconnectError):
                await ws.receive()
    assert [type(exc) for exc in raised] == [StoreUnavailableError]
    assert "session" in str(raised[0])
