"""Flask's session tests and Flask-Session 0.8's Redis tests, against aiocrypt's Flask extension.

Each test names its source. Flask's are copied from the Flask 3.1.3 sdist's
tests/test_basic.py; Flask-Session 0.8's sdist ships no tests, so those ports
follow the cases of its repository's tests/ (abs_test.py run by
test_redis.py, conftest.py's app_utils) as described in each docstring.
They are ported as written except where aiocrypt differs on purpose, and then
the test says so and checks aiocrypt's behaviour instead:

* configuration is read once, by ``init_app``: an app is built per
  configuration, and an invalid value fails there (``ConfigurationError``)
  instead of at the first request;
* sessions are server-side: no ``SECRET_KEY`` is needed, the Redis key is an
  HMAC of the session id (never the id) and the value is ciphertext;
* a request that never touches the session is left alone: no Redis call, no
  cookie refresh, no ``Vary``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import flask
import pytest
import redis
from flask.globals import request_ctx
from markupsafe import Markup
from werkzeug.http import parse_date

from aiocrypt import ConfigurationError, KeyType
from aiocrypt.integrations.flask import AioCrypt
from aiocrypt.testing import make_service

MakeApp = Callable[..., flask.Flask]


class CountingPool(redis.ConnectionPool):
    """A real connection pool that counts how often a command (or pipeline) takes a connection."""

    commands = 0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        type(self).commands += 1
        return super().get_connection(*args, **kwargs)


@pytest.fixture
def make_app(redis_url: str, redis_prefix: str, sync_redis: redis.Redis) -> Iterator[MakeApp]:
    """Flask's ``app`` fixture (tests/conftest.py), with the extension set up on it."""
    crypts: list[tuple[AioCrypt, flask.Flask]] = []

    def make(**config: Any) -> flask.Flask:
        app = flask.Flask("flask_test")
        app.config.update(
            TESTING=True,
            SESSION_URI=redis_url,
            SESSION_KEY_PREFIX=redis_prefix + "session:",
            AIOCRYPT_CACHE_PREFIX=redis_prefix + "cache:",
        )
        app.config.update(config)
        crypts.append((AioCrypt(app, service=make_service()), app))
        return app

    yield make
    for crypt, app in crypts:
        crypt.close(app)


def stored(client: redis.Redis, prefix: str) -> dict[bytes, bytes]:
    keys = list(client.scan_iter(match=prefix + "*"))
    # redis-py types every reply as Awaitable | Any, sync client or not
    return dict(zip(keys, client.mget(keys), strict=True)) if keys else {}  # type: ignore[arg-type]


# -- Flask tests/test_basic.py ----------------------------------------------------


def test_session_accessed(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_session_accessed."""
    app = make_app()
    client = app.test_client()

    @app.post("/")
    def do_set() -> str:
        flask.session["value"] = flask.request.form["value"]
        return "value set"

    @app.get("/")
    def do_get() -> str:
        return str(flask.session.get("value", "None"))

    @app.get("/nothing")
    def do_nothing() -> str:
        return ""

    # request_ctx._session (SessionMixin | None to mypy) is set inside `with client:`
    with client:
        rv = client.get("/nothing")
        assert "cookie" not in rv.vary
        assert not request_ctx._session.accessed  # type: ignore[union-attr]
        assert not request_ctx._session.modified  # type: ignore[union-attr]

    with client:
        rv = client.post(data={"value": "42"})
        assert rv.text == "value set"
        assert "cookie" in rv.vary
        assert request_ctx._session.accessed  # type: ignore[union-attr]
        assert request_ctx._session.modified  # type: ignore[union-attr]

    with client:
        rv = client.get()
        assert rv.text == "42"
        assert "cookie" in rv.vary
        assert request_ctx._session.accessed  # type: ignore[union-attr]
        assert not request_ctx._session.modified  # type: ignore[union-attr]

    with client:
        rv = client.get("/nothing")
        assert rv.text == ""
        assert "cookie" not in rv.vary
        assert not request_ctx._session.accessed  # type: ignore[union-attr]
        assert not request_ctx._session.modified  # type: ignore[union-attr]


def test_untouched_session_costs_no_redis_call(make_app: MakeApp, redis_url: str) -> None:
    """aiocrypt's addition to test_session_accessed: an untouched session sends nothing to Redis."""
    client_redis = redis.Redis(connection_pool=CountingPool.from_url(redis_url))
    app = flask.Flask("flask_test")
    app.config.update(
        TESTING=True,
        AIOCRYPT_SESSION_PREFIX="test:web:count:s:",
        AIOCRYPT_CACHE_PREFIX="test:web:count:c:",
    )
    crypt = AioCrypt(app, service=make_service(), redis=client_redis)
    try:

        @app.get("/set")
        def set_() -> str:
            flask.session["v"] = 1
            return ""

        @app.get("/nothing")
        def nothing() -> str:
            return ""

        client = app.test_client()
        client.get("/set")
        assert CountingPool.commands > 0
        CountingPool.commands = 0
        client.get("/nothing")  # carries the cookie, never touches the session
        assert CountingPool.commands == 0
        client.get("/set")
        assert CountingPool.commands > 0
        client_redis.delete(*client_redis.keys("test:web:count:*"))  # type: ignore[misc]  # Awaitable | Any
    finally:
        crypt.close(app)
        client_redis.connection_pool.disconnect()


def test_session_path(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_session_path."""
    app = make_app(APPLICATION_ROOT="/foo")
    client = app.test_client()

    @app.route("/")
    def index() -> str:
        flask.session["testing"] = 42
        return "Hello World"

    rv = client.get("/", "http://example.com:8080/foo")
    assert "path=/foo" in rv.headers["set-cookie"].lower()


def test_session_using_application_root(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_session_using_application_root."""

    class PrefixPathMiddleware:
        def __init__(self, app: Any, prefix: str) -> None:
            self.app = app
            self.prefix = prefix

        def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            environ["SCRIPT_NAME"] = self.prefix
            return self.app(environ, start_response)

    app = make_app(APPLICATION_ROOT="/bar")
    app.wsgi_app = PrefixPathMiddleware(app.wsgi_app, "/bar")  # type: ignore[method-assign]
    client = app.test_client()

    @app.route("/")
    def index() -> str:
        flask.session["testing"] = 42
        return "Hello World"

    rv = client.get("/", "http://example.com:8080/")
    assert "path=/bar" in rv.headers["set-cookie"].lower()


def test_session_using_session_settings(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_session_using_session_settings."""
    app = make_app(
        SERVER_NAME="www.example.com:8080",
        APPLICATION_ROOT="/test",
        SESSION_COOKIE_DOMAIN=".example.com",
        SESSION_COOKIE_HTTPONLY=False,
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_PARTITIONED=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_PATH="/",
    )
    client = app.test_client()

    @app.route("/")
    def index() -> str:
        flask.session["testing"] = 42
        return "Hello World"

    @app.route("/clear")
    def clear() -> str:
        flask.session.pop("testing", None)
        return "Goodbye World"

    rv = client.get("/", "http://www.example.com:8080/test/")
    cookie = rv.headers["set-cookie"].lower()
    assert "domain=example.com" in cookie or "domain=.example.com" in cookie
    assert "path=/" in cookie
    assert "secure" in cookie
    assert "httponly" not in cookie
    assert "samesite" in cookie
    assert "partitioned" in cookie

    rv = client.get("/clear", "http://www.example.com:8080/test/")
    cookie = rv.headers["set-cookie"].lower()
    assert "session=;" in cookie
    assert "domain=example.com" in cookie or "domain=.example.com" in cookie
    assert "path=/" in cookie
    assert "secure" in cookie
    assert "samesite" in cookie
    assert "partitioned" in cookie


def test_session_using_samesite_attribute(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_session_using_samesite_attribute.

    Deliberate difference: the invalid value is refused by ``init_app``
    (naming the key), not by the first request.
    """
    with pytest.raises(ConfigurationError, match="SESSION_COOKIE_SAMESITE"):
        make_app(SESSION_COOKIE_SAMESITE="invalid")

    for samesite, expected in (
        (None, None),
        ("Strict", "samesite=strict"),
        ("Lax", "samesite=lax"),
    ):
        app = make_app(SESSION_COOKIE_SAMESITE=samesite)

        @app.route("/")
        def index() -> str:
            flask.session["testing"] = 42
            return "Hello World"

        cookie = app.test_client().get("/").headers["set-cookie"].lower()
        if expected is None:
            assert "samesite" not in cookie
        else:
            assert expected in cookie


def test_missing_session(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_missing_session.

    Deliberate difference: server-side sessions need no ``SECRET_KEY`` (the id
    is random, the payload encrypted with aiocrypt's keys), so without one the
    session works instead of being unavailable.
    """
    app = make_app(SECRET_KEY=None)

    @app.route("/")
    def index() -> str:
        assert flask.session.get("missing_key") is None
        flask.session["foo"] = 42
        assert flask.session.pop("foo") == 42
        return "ok"

    assert app.test_client().get("/").text == "ok"


def test_session_secret_key_fallbacks(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_session_secret_key_fallbacks.

    Deliberate difference: the keys are aiocrypt's ``session`` keys, not
    ``SECRET_KEY``. A session written before a rotation still loads after it.
    """
    app = make_app()
    client = app.test_client()

    @app.post("/")
    def set_session() -> str:
        flask.session["a"] = 1
        return ""

    @app.get("/")
    def get_session() -> dict[str, Any]:
        return dict(flask.session)

    client.post()
    assert client.get().json == {"a": 1}
    with app.app_context():
        crypt_state = AioCrypt.state(app)
        old = crypt_state.service.keyring.active(KeyType.SESSION).key_id
        crypt_state.run(crypt_state.service.key_manager.rotate_key(KeyType.SESSION, force=True))
        assert crypt_state.service.keyring.active(KeyType.SESSION).key_id != old
    assert client.get().json == {"a": 1}


def test_session_expiration(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_session_expiration (Max-Age and the Redis TTL follow
    PERMANENT_SESSION_LIFETIME)."""
    app = make_app()
    client = app.test_client()
    permanent = True

    @app.route("/")
    def index() -> str:
        flask.session["test"] = 42
        flask.session.permanent = permanent
        return ""

    @app.route("/test")
    def test() -> str:
        return str(flask.session.permanent)

    rv = client.get("/")
    assert "set-cookie" in rv.headers
    match = re.search(r"(?i)\bexpires=([^;]+)", rv.headers["set-cookie"])
    assert match is not None
    expires = parse_date(match.group())
    expected = datetime.now(UTC) + app.permanent_session_lifetime
    assert expires is not None
    assert (expires.year, expires.month, expires.day) == (
        expected.year,
        expected.month,
        expected.day,
    )

    rv = client.get("/test")
    assert rv.data == b"True"

    permanent = False
    rv = client.get("/")
    assert "set-cookie" in rv.headers
    match = re.search(r"\bexpires=([^;]+)", rv.headers["set-cookie"])
    assert match is None


def test_session_stored_last(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_session_stored_last."""
    app = make_app()
    client = app.test_client()

    @app.after_request
    def modify_session(response: flask.Response) -> flask.Response:
        flask.session["foo"] = 42
        return response

    @app.route("/")
    def dump_session_contents() -> str:
        return repr(flask.session.get("foo"))

    assert client.get("/").data == b"None"
    assert client.get("/").data == b"42"


def test_session_special_types(
    make_app: MakeApp, sync_redis: redis.Redis, redis_prefix: str
) -> None:
    """Flask tests/test_basic.py::test_session_special_types, plus: the stored payload is
    ciphertext (none of the values appears in Redis)."""
    app = make_app()
    client = app.test_client()
    now = datetime.now(UTC).replace(microsecond=0)
    the_uuid = uuid.uuid4()

    @app.route("/")
    def dump_session_contents() -> tuple[str, int]:
        flask.session["t"] = (1, 2, 3)
        flask.session["b"] = b"\xff"
        flask.session["m"] = Markup("<html>")
        flask.session["u"] = the_uuid
        flask.session["d"] = now
        flask.session["t_tag"] = {" t": "not-a-tuple"}
        flask.session["di_t_tag"] = {" t__": "not-a-tuple"}
        flask.session["di_tag"] = {" di": "not-a-dict"}
        return "", 204

    @app.route("/check")
    def check() -> tuple[str, int]:
        s = flask.session
        assert s["t"] == (1, 2, 3)
        assert type(s["b"]) is bytes
        assert s["b"] == b"\xff"
        assert type(s["m"]) is Markup
        assert s["m"] == Markup("<html>")
        assert s["u"] == the_uuid
        assert s["d"] == now
        assert s["t_tag"] == {" t": "not-a-tuple"}
        assert s["di_t_tag"] == {" t__": "not-a-tuple"}
        assert s["di_tag"] == {" di": "not-a-dict"}
        return "", 204

    # Flask reads the session back in the same client context; here it must come
    # back from Redis, so a second request checks it.
    client.get("/")
    assert client.get("/check").status_code == 204
    (payload,) = stored(sync_redis, redis_prefix + "session:").values()
    for clear in (b"not-a-tuple", b"<html>", str(the_uuid).encode(), b" di"):
        assert clear not in payload


def test_session_cookie_setting(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_session_cookie_setting (an app per configuration)."""
    for is_permanent, refresh, expect_header in (
        (True, True, True),
        (True, False, False),
        (False, True, False),
        (False, False, False),
    ):
        app = make_app(SESSION_REFRESH_EACH_REQUEST=refresh)

        @app.route("/bump")
        def bump(is_permanent: bool = is_permanent) -> str:
            rv = flask.session["foo"] = flask.session.get("foo", 0) + 1
            flask.session.permanent = is_permanent
            return str(rv)

        @app.route("/read")
        def read() -> str:
            return str(flask.session.get("foo", 0))

        with app.test_client() as c:
            assert c.get("/bump").data == b"1"
            assert c.get("/bump").data == b"2"
            assert c.get("/bump").data == b"3"

            rv = c.get("/read")
            set_cookie = rv.headers.get("set-cookie")
            assert (set_cookie is not None) == expect_header
            assert rv.data == b"3"


def test_session_vary_cookie(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_session_vary_cookie."""
    app = make_app()
    client = app.test_client()

    @app.route("/set")
    def set_session() -> str:
        flask.session["test"] = "test"
        return ""

    @app.route("/get")
    def get() -> str:
        return str(flask.session.get("test"))

    @app.route("/getitem")
    def getitem() -> str:
        return str(flask.session["test"])

    @app.route("/setdefault")
    def setdefault() -> str:
        return str(flask.session.setdefault("test", "default"))

    @app.route("/clear")
    def clear() -> str:
        flask.session.clear()
        return ""

    @app.route("/vary-cookie-header-set")
    def vary_cookie_header_set() -> flask.Response:
        response = flask.Response()
        response.vary.add("Cookie")
        flask.session["test"] = "test"
        return response

    @app.route("/vary-header-set")
    def vary_header_set() -> flask.Response:
        response = flask.Response()
        response.vary.update(("Accept-Encoding", "Accept-Language"))
        flask.session["test"] = "test"
        return response

    @app.route("/no-vary-header")
    def no_vary_header() -> str:
        return ""

    def expect(path: str, header_value: str | None = "Cookie") -> None:
        rv = client.get(path)
        if header_value:
            assert len(rv.headers.get_all("Vary")) == 1
            assert rv.headers["Vary"] == header_value
        else:
            assert "Vary" not in rv.headers

    expect("/set")
    expect("/get")
    expect("/getitem")
    expect("/setdefault")
    expect("/clear")
    expect("/vary-cookie-header-set")
    expect("/vary-header-set", "Accept-Encoding, Accept-Language, Cookie")
    expect("/no-vary-header", None)


def test_session_refresh_vary(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_session_refresh_vary.

    Deliberate difference: Flask re-sends a permanent cookie (and Vary) on a
    request that never touches the session; aiocrypt leaves such a request
    alone (refreshing the cookie without refreshing the Redis TTL would
    mislead, and that costs a Redis call). The refresh comes with the first
    request that reads the session.
    """
    app = make_app()
    client = app.test_client()

    @app.get("/login")
    def login() -> str:
        flask.session["user_id"] = 1
        flask.session.permanent = True
        return ""

    @app.get("/ignored")
    def ignored() -> str:
        return ""

    @app.get("/read")
    def read() -> str:
        return str(flask.session.get("user_id"))

    rv = client.get("/login")
    assert rv.headers["Vary"] == "Cookie"
    rv = client.get("/ignored")
    assert "Vary" not in rv.headers and "Set-Cookie" not in rv.headers
    rv = client.get("/read")
    assert rv.headers["Vary"] == "Cookie" and "Max-Age" in rv.headers["Set-Cookie"]


def test_flashes(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_flashes."""
    app = make_app()
    with app.test_request_context():
        assert not flask.session.modified
        flask.flash("Zap")
        flask.session.modified = False
        flask.flash("Zip")
        assert flask.session.modified
        assert list(flask.get_flashed_messages()) == ["Zap", "Zip"]


def test_extended_flashing(make_app: MakeApp) -> None:
    """Flask tests/test_basic.py::test_extended_flashing (categories are tuples, Markup stays)."""
    app = make_app()

    @app.route("/")
    def index() -> str:
        flask.flash("Hello World")
        flask.flash("Hello World", "error")
        flask.flash(Markup("<em>Testing</em>"), "warning")
        return ""

    @app.route("/test_with_categories/")
    def test_with_categories() -> str:
        messages = flask.get_flashed_messages(with_categories=True)
        assert list(messages) == [
            ("message", "Hello World"),
            ("error", "Hello World"),
            ("warning", Markup("<em>Testing</em>")),
        ]
        assert type(messages[2][1]) is Markup
        return ""

    @app.route("/test_filter/")
    def test_filter() -> str:
        messages = flask.get_flashed_messages(category_filter=["message"], with_categories=True)
        assert list(messages) == [("message", "Hello World")]
        return ""

    for path in ("/test_with_categories/", "/test_filter/"):
        client = app.test_client()
        client.get("/")
        assert client.get(path).status_code == 200


# -- Flask-Session 0.8 tests/test_redis.py ------------------------------------------


def test_redis_default(
    make_app: MakeApp, sync_redis: redis.Redis, redis_prefix: str, redis_url: str
) -> None:
    """Flask-Session 0.8's default Redis case (tests/test_redis.py, through tests/abs_test.py
    ``_default_test``: tests/conftest.py ``app_utils.test_session`` (/set, /get, /delete) and
    ``test_session_with_cookie``, then the stored session looked up by the cookie's id).

    Deliberate difference: Flask-Session stores ``session:<id>`` -> JSON; aiocrypt
    stores ``<prefix><HMAC of the id>`` -> ciphertext, so the test checks that
    the cookie's id is nowhere in Redis and the value is not readable there.
    """
    client_redis = redis.Redis.from_url(redis_url)
    app = make_app(SESSION_TYPE="redis", SESSION_REDIS=client_redis, SESSION_URI=None)

    @app.route("/set", methods=["POST"])
    def app_set() -> str:
        flask.session["value"] = flask.request.form["value"]
        return "value set"

    @app.route("/get")
    def app_get() -> str:
        return str(flask.session.get("value", ""))

    @app.route("/delete", methods=["POST"])
    def app_del() -> str:
        del flask.session["value"]
        return "value deleted"

    client = app.test_client()
    assert client.post("/set", data={"value": "42"}).data == b"value set"
    assert client.get("/get").data == b"42"
    cookie = client.get_cookie("session")
    assert cookie is not None
    entries = stored(sync_redis, redis_prefix + "session:")
    ((key, payload),) = entries.items()
    # the session's JSON ({"value": "42"}) is not there in clear (b"42" alone turns up by
    # chance in a random key id or in base64, about once in 30 runs)
    assert cookie.value.encode() not in key and b"value" not in payload
    assert re.fullmatch(rb"[0-9a-f]{64}", key[len(redis_prefix + "session:") :])
    assert client.post("/delete").data == b"value deleted"
    assert client.get("/get").data == b""
    client_redis.close()


def test_redis_key_prefix_ttl_and_permanent(
    make_app: MakeApp, sync_redis: redis.Redis, redis_prefix: str
) -> None:
    """Flask-Session 0.8's lifetime case (tests/abs_test.py ``_test_lifetime``, run by
    tests/test_redis.py) with SESSION_KEY_PREFIX and SESSION_PERMANENT: the Redis TTL is
    PERMANENT_SESSION_LIFETIME and the cookie is persistent by default.

    Deliberate difference: Flask-Session's test sleeps past the lifetime; this one
    reads the TTL Redis holds instead (no timing asserts here)."""
    app = make_app(
        SESSION_KEY_PREFIX=redis_prefix + "fs:",
        SESSION_PERMANENT=True,
        PERMANENT_SESSION_LIFETIME=timedelta(minutes=5),
    )

    @app.route("/set")
    def app_set() -> str:
        flask.session["value"] = "1"
        return str(flask.session.permanent)

    rv = app.test_client().get("/set")
    assert rv.text == "True" and "Max-Age=300" in rv.headers["Set-Cookie"]
    (key,) = stored(sync_redis, redis_prefix + "fs:")
    assert 290 <= sync_redis.ttl(key) <= 300  # type: ignore[operator]  # redis-py types a reply as Awaitable | Any


def test_redis_non_permanent_lifetime(
    make_app: MakeApp, sync_redis: redis.Redis, redis_prefix: str
) -> None:
    """Flask-Session 0.8's non-permanent case (tests/abs_test.py
    ``_test_non_permanent_lifetime``): SESSION_PERMANENT=False gives a browser-session
    cookie, while the stored session still expires after PERMANENT_SESSION_LIFETIME."""
    app = make_app(SESSION_PERMANENT=False, PERMANENT_SESSION_LIFETIME=120)

    @app.route("/set")
    def app_set() -> str:
        flask.session["value"] = "1"
        return str(flask.session.permanent)

    rv = app.test_client().get("/set")
    assert rv.text == "False"
    assert "Max-Age" not in rv.headers["Set-Cookie"]
    assert "Expires" not in rv.headers["Set-Cookie"]
    (key,) = stored(sync_redis, redis_prefix + "session:")
    assert 110 <= sync_redis.ttl(key) <= 120  # type: ignore[operator]  # redis-py types a reply as Awaitable | Any


def test_redis_session_id_length(make_app: MakeApp) -> None:
    """Flask-Session 0.8's SESSION_ID_LENGTH: honoured, with aiocrypt's floor of 32 random
    bytes (Flask-Session accepts less; aiocrypt refuses it at init_app)."""
    with pytest.raises(ConfigurationError, match="SESSION_ID_LENGTH"):
        make_app(SESSION_ID_LENGTH=16)
    app = make_app(SESSION_ID_LENGTH=48)

    @app.route("/set")
    def app_set() -> str:
        flask.session["value"] = "1"
        return ""

    client = app.test_client()
    client.get("/set")
    cookie = client.get_cookie("session")
    assert cookie is not None and len(cookie.value) == 64  # 48 bytes, base64url


def test_regenerate(make_app: MakeApp, sync_redis: redis.Redis, redis_prefix: str) -> None:
    """Flask-Session 0.8's regenerate case (tests/conftest.py
    ``app_utils.test_regenerate_session``, part of the default Redis test):
    ``app.session_interface.regenerate`` gives a new id, the old one stops working, the data
    moves."""
    app = make_app()

    @app.route("/set")
    def app_set() -> str:
        flask.session["value"] = "v"
        return ""

    @app.route("/regenerate")
    def regenerate() -> str:
        app.session_interface.regenerate(flask.session)  # type: ignore[attr-defined]
        return ""

    @app.route("/get")
    def app_get() -> str:
        return str(flask.session.get("value", ""))

    client = app.test_client()
    client.get("/set")
    old = client.get_cookie("session")
    assert old is not None
    client.get("/regenerate")
    new = client.get_cookie("session")
    assert new is not None and new.value != old.value
    assert client.get("/get").text == "v"
    assert len(stored(sync_redis, redis_prefix + "session:")) == 1
    replay = app.test_client()
    replay.set_cookie("session", old.value)
    assert replay.get("/get").text == ""


def test_config_errors_name_the_key(make_app: MakeApp) -> None:
    """aiocrypt: invalid values refused at init_app, naming the key; no Redis, no start."""
    for config, key in (
        ({"SESSION_COOKIE_SECURE": "sometimes"}, "SESSION_COOKIE_SECURE"),
        ({"PERMANENT_SESSION_LIFETIME": "soon"}, "PERMANENT_SESSION_LIFETIME"),
        ({"SESSION_TYPE": "filesystem"}, "SESSION_TYPE"),
        ({"SESSION_REDIS": "redis://x"}, "SESSION_REDIS"),
        ({"SESSION_URI": None}, "AIOCRYPT_REDIS_URL"),
    ):
        with pytest.raises(ConfigurationError, match=key):
            make_app(**config)
