"""A private redis-server stopped mid-session under both extensions (issue 15's outage).

While Redis is down: a request that needs the session (or the cache) gets
503 with ``Retry-After`` and a body without a traceback or an exception name;
a page that never touches the session still answers; the health route
reports the Redis check failing. When Redis is back (AOF kept the data) the
same cookie finds the same session: nothing was lost. An app's own error
handler for ``StoreUnavailableError`` replaces the default answer.
"""

from __future__ import annotations

import json
from typing import Any

import flask
import pytest
import quart
from werkzeug.test import TestResponse

from aiocrypt import StoreUnavailableError
from aiocrypt.integrations import flask as flask_ext
from aiocrypt.integrations import quart as quart_ext
from aiocrypt.testing import make_service

from .conftest import free_port


def config(url: str) -> dict[str, Any]:
    return {
        "AIOCRYPT_REDIS_URL": url,
        "AIOCRYPT_RETRY_AFTER": 7,
        "TESTING": False,
        "AIOCRYPT_SESSION_PREFIX": "outage:s:",
        "AIOCRYPT_CACHE_PREFIX": "outage:c:",
    }


def check_outage_body(status: int, headers: Any, body: bytes) -> None:
    assert status == 503
    assert headers["Retry-After"] == "7"
    text = body.decode()
    assert json.loads(text) == {"error": "temporarily unavailable"}
    for leak in ("Traceback", "ConnectionError", "redis", "File "):
        assert leak not in text


def flask_app(url: str) -> tuple[flask.Flask, flask_ext.AioCrypt]:
    app = flask.Flask(__name__)
    app.config.update(config(url))
    crypt = flask_ext.AioCrypt(app, service=make_service())
    crypt.add_health_routes(app, metrics_path=None)

    @app.post("/login")
    def login() -> str:
        flask.session.regenerate()  # type: ignore[attr-defined]
        flask.session["user"] = "alice"
        return "in"

    @app.get("/me")
    def me() -> str:
        return str(flask.session.get("user"))

    @app.get("/public")
    def public() -> str:
        return "public"

    @app.get("/report")
    async def report() -> str:
        async def compute() -> str:
            return "report"

        return str(await crypt.cache.get_or_set("r", compute))

    return app, crypt


def test_flask_outage_answers_503_and_recovers(private_redis: Any) -> None:
    app, crypt = flask_app(private_redis.url)
    try:
        client = app.test_client()
        assert client.post("/login").text == "in"
        assert client.get("/me").text == "alice"
        assert client.get("/report").text == "report"

        private_redis.kill()
        for rv in (client.get("/me"), client.post("/login"), client.get("/report")):
            check_outage_body(rv.status_code, rv.headers, rv.data)
            assert "Set-Cookie" not in rv.headers  # the cookie the browser holds stays valid
        assert client.get("/public").text == "public"  # never touches the session
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json["checks"]["redis"]["status"] == "failing"  # type: ignore[index]  # JSON

        private_redis.start()
        assert client.get("/me").text == "alice"  # the same session: nothing lost
        assert client.get("/report").text == "report"
        assert client.get("/healthz").status_code == 200
    finally:
        crypt.close(app)


async def test_quart_outage_answers_503_and_recovers(private_redis: Any) -> None:
    app = quart.Quart(__name__)
    app.config.update(config(private_redis.url))
    crypt = quart_ext.AioCrypt(app, service=make_service())
    crypt.add_health_routes(app, metrics_path=None)

    @app.post("/login")
    async def login() -> str:
        quart.session.regenerate()  # type: ignore[attr-defined]
        quart.session["user"] = "alice"
        return "in"

    @app.get("/me")
    async def me() -> str:
        return str(quart.session.get("user"))

    @app.get("/public")
    async def public() -> str:
        return "public"

    @app.get("/report")
    async def report() -> str:
        async def compute() -> str:
            return "report"

        return str(await crypt.cache.get_or_set("r", compute))

    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert await (await client.post("/login")).get_data(as_text=True) == "in"
        assert await (await client.get("/me")).get_data(as_text=True) == "alice"

        private_redis.kill()
        for path, method in (("/me", "GET"), ("/login", "POST"), ("/report", "GET")):
            # Quart's TestClientProtocol marks every open() argument required, and types
            # get_data()'s default as text
            rv = await client.open(path, method=method)  # type: ignore[call-arg]
            check_outage_body(rv.status_code, rv.headers, await rv.get_data())  # type: ignore[arg-type]
            assert "Set-Cookie" not in rv.headers
        rv = await client.get("/public")  # the cookie's session could not be read: unused
        assert rv.status_code == 200
        health = await client.get("/healthz")
        assert health.status_code == 503
        assert (await health.get_json())["checks"]["redis"]["status"] == "failing"

        private_redis.start()
        assert await (await client.get("/me")).get_data(as_text=True) == "alice"
        assert await (await client.get("/report")).get_data(as_text=True) == "report"
        assert (await client.get("/healthz")).status_code == 200


@pytest.mark.parametrize("kind", ["flask", "quart"])
async def test_app_error_handler_catches_the_outage(kind: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    caught: list[str] = []

    def handler(exc: StoreUnavailableError) -> tuple[str, int]:
        caught.append(exc.store)
        return "maintenance", 503

    rv: TestResponse | quart.Response
    if kind == "flask":
        app, crypt = flask_app(url)
        app.register_error_handler(StoreUnavailableError, handler)
        try:
            client = app.test_client()
            rv = client.post("/login")
            assert (rv.status_code, rv.text) == (503, "maintenance")
        finally:
            crypt.close(app)
    else:
        qapp = quart.Quart(__name__)
        qapp.config.update(config(url))
        quart_ext.AioCrypt(qapp, service=make_service())
        qapp.register_error_handler(StoreUnavailableError, handler)

        @qapp.post("/login")
        async def login() -> str:
            quart.session["user"] = "alice"
            return "in"

        async with qapp.test_app() as test_app:
            rv = await test_app.test_client().post("/login")
            assert (rv.status_code, await rv.get_data(as_text=True)) == (503, "maintenance")
    assert caught == ["session"]
