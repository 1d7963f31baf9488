"""The behaviours of test_flask_ports.py (Flask's tests/test_basic.py session cases and
Flask-Session 0.8's tests/test_redis.py), against aiocrypt's Quart extension.

Each test names the Flask / Flask-Session test it mirrors. Differences on
purpose are those of test_flask_ports.py, plus one of Quart's making: Quart
hands views the session synchronously, so a request that carries the session
cookie reads it from Redis before the view runs; a request without the cookie
makes no Redis call, and an untouched session still gets no ``Vary``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from markupsafe import Markup
from quart import Quart, Response, flash, get_flashed_messages, request, session

from aiocrypt import ConfigurationError
from aiocrypt.integrations.quart import AioCrypt
from aiocrypt.testing import make_service

from .test_flask_ports import stored

MakeApp = Callable[..., Quart]


@pytest.fixture
async def make_app(
    redis_url: str, redis_prefix: str, sync_redis: redis.Redis
) -> AsyncIterator[MakeApp]:
    def make(**config: Any) -> Quart:
        app = Quart("quart_test")
        app.config.update(
            TESTING=True,
            SESSION_URI=redis_url,
            SESSION_KEY_PREFIX=redis_prefix + "session:",
            AIOCRYPT_CACHE_PREFIX=redis_prefix + "cache:",
        )
        app.config.update(config)
        AioCrypt(app, service=make_service())
        return app

    yield make


def cookie_value(response: Any) -> str:
    match = re.match(r"session=([^;]*)", response.headers["Set-Cookie"])
    assert match is not None
    return match.group(1)


async def test_session_accessed_and_vary(make_app: MakeApp) -> None:
    """Flask test_session_accessed and test_session_vary_cookie."""
    app = make_app()

    @app.post("/")
    async def do_set() -> str:
        session["value"] = (await request.form)["value"]
        return "value set"

    @app.get("/")
    async def do_get() -> str:
        return str(session.get("value", "None"))

    @app.get("/in")
    async def contains() -> str:
        return str("value" in session)

    @app.get("/clear")
    async def clear() -> str:
        session.clear()
        return ""

    @app.get("/vary-header-set")
    async def vary_header_set() -> Response:
        response = Response("")
        response.vary.update(("Accept-Encoding", "Accept-Language"))
        session["value"] = "x"
        return response

    @app.get("/nothing")
    async def do_nothing() -> str:
        return ""

    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert "Vary" not in (await client.get("/nothing")).headers
        rv = await client.post("/", form={"value": "42"})
        assert rv.headers.get_all("Vary") == ["Cookie"]
        rv = await client.get("/")
        assert await rv.get_data(as_text=True) == "42" and rv.headers["Vary"] == "Cookie"
        rv = await client.get("/in")
        assert await rv.get_data(as_text=True) == "True" and rv.headers["Vary"] == "Cookie"
        rv = await client.get("/nothing")
        assert "Vary" not in rv.headers and "Set-Cookie" not in rv.headers
        rv = await client.get("/vary-header-set")
        assert rv.headers["Vary"] == "Accept-Encoding, Accept-Language, Cookie"
        rv = await client.get("/clear")
        assert rv.headers["Vary"] == "Cookie" and "session=;" in rv.headers["Set-Cookie"]


async def test_session_using_session_settings(make_app: MakeApp) -> None:
    """Flask test_session_using_session_settings and test_session_path."""
    app = make_app(
        SESSION_COOKIE_DOMAIN=".example.com",
        SESSION_COOKIE_HTTPONLY=False,
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_PARTITIONED=True,
        SESSION_COOKIE_SAMESITE="Lax",
        APPLICATION_ROOT="/foo",
        SESSION_COOKIE_NAME="sid",
    )

    @app.route("/")
    async def index() -> str:
        session["testing"] = 42
        return "Hello World"

    async with app.test_app() as test_app:
        cookie = (await test_app.test_client().get("/")).headers["set-cookie"].lower()
    assert cookie.startswith("sid=")
    assert "domain=example.com" in cookie or "domain=.example.com" in cookie
    assert "path=/foo" in cookie and "secure" in cookie and "httponly" not in cookie
    assert "samesite=lax" in cookie and "partitioned" in cookie


async def test_session_using_samesite_attribute(make_app: MakeApp) -> None:
    """Flask test_session_using_samesite_attribute (invalid: refused by init_app)."""
    with pytest.raises(ConfigurationError, match="SESSION_COOKIE_SAMESITE"):
        make_app(SESSION_COOKIE_SAMESITE="invalid")
    for samesite, expected in ((None, None), ("Strict", "samesite=strict")):
        app = make_app(SESSION_COOKIE_SAMESITE=samesite)

        @app.route("/")
        async def index() -> str:
            session["testing"] = 42
            return ""

        async with app.test_app() as test_app:
            cookie = (await test_app.test_client().get("/")).headers["set-cookie"].lower()
        assert ("samesite" not in cookie) if expected is None else (expected in cookie)


async def test_session_expiration_and_cookie_setting(make_app: MakeApp) -> None:
    """Flask test_session_expiration and test_session_cookie_setting."""
    for is_permanent, refresh, expect_header in (
        (True, True, True),
        (True, False, False),
        (False, True, False),
    ):
        app = make_app(
            SESSION_REFRESH_EACH_REQUEST=refresh, PERMANENT_SESSION_LIFETIME=timedelta(days=2)
        )

        @app.route("/bump")
        async def bump(is_permanent: bool = is_permanent) -> str:
            rv = session["foo"] = session.get("foo", 0) + 1
            session.permanent = is_permanent
            return str(rv)

        @app.route("/read")
        async def read() -> str:
            return str(session.get("foo", 0))

        async with app.test_app() as test_app:
            client = test_app.test_client()
            rv = await client.get("/bump")
            assert ("Max-Age=172800" in rv.headers["Set-Cookie"]) == is_permanent
            assert (await (await client.get("/bump")).get_data()) == b"2"
            rv = await client.get("/read")
            assert ("Set-Cookie" in rv.headers) == expect_header
            assert await rv.get_data() == b"2"


async def test_session_stored_last(make_app: MakeApp) -> None:
    """Flask test_session_stored_last."""
    app = make_app()

    @app.after_request
    async def modify_session(response: Response) -> Response:
        session["foo"] = 42
        return response

    @app.route("/")
    async def dump_session_contents() -> str:
        return repr(session.get("foo"))

    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert await (await client.get("/")).get_data() == b"None"
        assert await (await client.get("/")).get_data() == b"42"


async def test_session_special_types_and_flashing(
    make_app: MakeApp, sync_redis: redis.Redis, redis_prefix: str
) -> None:
    """Flask test_session_special_types and test_extended_flashing."""
    app = make_app()
    now = datetime.now(UTC).replace(microsecond=0)
    the_uuid = uuid.uuid4()

    @app.route("/")
    async def write() -> tuple[str, int]:
        session["t"] = (1, 2, 3)
        session["b"] = b"\xff"
        session["m"] = Markup("<html>")
        session["u"] = the_uuid
        session["d"] = now
        session["di_tag"] = {" di": "not-a-dict"}
        await flash("Hello World", "error")
        await flash(Markup("<em>Testing</em>"), "warning")
        return "", 204

    @app.route("/check")
    async def check() -> tuple[str, int]:
        assert session["t"] == (1, 2, 3)
        assert type(session["b"]) is bytes and session["b"] == b"\xff"
        assert type(session["m"]) is Markup
        assert session["u"] == the_uuid and session["d"] == now
        assert session["di_tag"] == {" di": "not-a-dict"}
        assert get_flashed_messages(with_categories=True) == [
            ("error", "Hello World"),
            ("warning", Markup("<em>Testing</em>")),
        ]
        return "", 204

    async with app.test_app() as test_app:
        client = test_app.test_client()
        await client.get("/")
        assert (await client.get("/check")).status_code == 204
    (payload,) = stored(sync_redis, redis_prefix + "session:").values()
    assert b"not-a-dict" not in payload and b"Hello World" not in payload


async def test_redis_default_prefix_and_regenerate(
    make_app: MakeApp, sync_redis: redis.Redis, redis_prefix: str, redis_url: str
) -> None:
    """Flask-Session 0.8 tests/test_redis.py::test_redis_default (SESSION_REDIS client; keys
    are HMACs, values ciphertext), SESSION_KEY_PREFIX, SESSION_ID_LENGTH and regenerate()."""
    client_redis = aioredis.Redis.from_url(redis_url)
    with pytest.raises(ConfigurationError, match="SESSION_ID_LENGTH"):
        make_app(SESSION_ID_LENGTH=31)
    app = make_app(
        SESSION_TYPE="redis",
        SESSION_REDIS=client_redis,
        SESSION_URI=None,
        SESSION_KEY_PREFIX=redis_prefix + "qs:",
        SESSION_ID_LENGTH=40,
    )

    @app.post("/set")
    async def app_set() -> str:
        session["value"] = (await request.form)["value"]
        return "value set"

    @app.get("/get")
    async def app_get() -> str:
        return str(session.get("value", ""))

    @app.get("/regenerate")
    async def regenerate() -> str:
        app.session_interface.regenerate(session)  # type: ignore[attr-defined]
        return ""

    async with app.test_app() as test_app:
        client = test_app.test_client()
        rv = await client.post("/set", form={"value": "42"})
        old = cookie_value(rv)
        assert len(old) == 54  # 40 bytes, base64url
        assert await (await client.get("/get")).get_data() == b"42"
        ((key, payload),) = stored(sync_redis, redis_prefix + "qs:").items()
        # the session's JSON ({"value": "42"}) is not there in clear (b"42" alone turns up
        # by chance in a random key id or in base64, about once in 30 runs)
        assert old.encode() not in key and b"value" not in payload
        new = cookie_value(await client.get("/regenerate"))
        assert new != old
        assert await (await client.get("/get")).get_data() == b"42"
        assert len(stored(sync_redis, redis_prefix + "qs:")) == 1
        replay = test_app.test_client()
        replay.set_cookie("localhost", "session", old)
        assert await (await replay.get("/get")).get_data() == b""
    await client_redis.aclose()


async def test_config_errors_name_the_key(make_app: MakeApp) -> None:
    """aiocrypt: invalid values refused at init_app, naming the key; no Redis configured."""
    for config, key in (
        ({"SESSION_COOKIE_HTTPONLY": "maybe"}, "SESSION_COOKIE_HTTPONLY"),
        ({"SESSION_REDIS": redis.Redis()}, "SESSION_REDIS"),
        ({"SESSION_URI": None}, "AIOCRYPT_REDIS_URL"),
    ):
        with pytest.raises(ConfigurationError, match=key):
            make_app(**config)


class CountingPool(aioredis.ConnectionPool):
    """A real asyncio connection pool that counts commands (and pipelines) sent."""

    commands = 0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        type(self).commands += 1
        return await super().get_connection(*args, **kwargs)


async def test_redis_calls_only_where_the_session_is_needed(
    redis_url: str, redis_prefix: str, sync_redis: redis.Redis
) -> None:
    """Flask test_session_accessed's point, as Quart allows it: no cookie, no Redis call;
    with the cookie, Quart's synchronous session needs the one load before the view
    (the deliberate difference above), and still no write, cookie or Vary."""
    client_redis = aioredis.Redis(connection_pool=CountingPool.from_url(redis_url))
    app = Quart("quart_test")
    app.config.update(
        AIOCRYPT_SESSION_PREFIX=redis_prefix + "s:", AIOCRYPT_CACHE_PREFIX=redis_prefix + "c:"
    )
    AioCrypt(app, service=make_service(), redis=client_redis)

    @app.get("/set")
    async def set_() -> str:
        session["v"] = 1
        return ""

    @app.get("/nothing")
    async def nothing() -> str:
        return ""

    async with app.test_app() as test_app:
        CountingPool.commands = 0
        assert (await test_app.test_client().get("/nothing")).status_code == 200
        assert CountingPool.commands == 0
        client = test_app.test_client()
        await client.get("/set")
        CountingPool.commands = 0
        rv = await client.get("/nothing")
        assert CountingPool.commands == 1  # the GETEX, nothing else
        assert "Vary" not in rv.headers and "Set-Cookie" not in rv.headers
    await client_redis.aclose(close_connection_pool=True)
