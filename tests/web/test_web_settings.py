"""Where each web setting comes from, the envelope versions, and the response headers."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import flask
import pytest
import redis
import redis.asyncio as aioredis
from flask.json.tag import TaggedJSONSerializer

from aiocrypt import ConfigurationError, EncryptionService
from aiocrypt.integrations.flask import AioCrypt
from aiocrypt.integrations.sessions import (
    EncryptedSession,
    RedisSessionStore,
    SessionSettings,
    WebSettings,
)
from aiocrypt.testing import make_service

URL = {"AIOCRYPT_REDIS_URL": "redis://127.0.0.1:6379/15"}


def test_aiocrypt_keys_win_only_where_set() -> None:
    framework = {
        **URL,
        "SESSION_COOKIE_SECURE": True,
        "SESSION_COOKIE_SAMESITE": "Strict",
        "PERMANENT_SESSION_LIFETIME": timedelta(hours=2),
        "SESSION_KEY_PREFIX": "fs:",
        "SESSION_COOKIE_HTTPONLY": False,
        "SESSION_COOKIE_NAME": "sid",
        "SESSION_COOKIE_PATH": None,
        "APPLICATION_ROOT": "/app",
    }
    settings = WebSettings.from_config(
        {**framework, "AIOCRYPT_COOKIE_SECURE": None, "AIOCRYPT_SESSION_TTL": None}
    )
    assert settings.cookie_secure is True and settings.cookie_samesite == "Strict"
    assert settings.session.ttl == 7200 and settings.session.prefix == "fs:"
    assert settings.cookie_httponly is False and settings.cookie_name == "sid"
    assert settings.cookie_path == "/app"
    overridden = WebSettings.from_config(
        {
            **framework,
            "AIOCRYPT_COOKIE_SECURE": "false",
            "AIOCRYPT_COOKIE_SAMESITE": "lax",
            "AIOCRYPT_SESSION_TTL": 60,
            "AIOCRYPT_SESSION_PREFIX": "a:",
        }
    )
    assert overridden.cookie_secure is False and overridden.cookie_samesite == "Lax"
    assert overridden.session.ttl == 60 and overridden.session.prefix == "a:"


def test_where_redis_comes_from() -> None:
    client = redis.Redis()
    both = WebSettings.from_config({"SESSION_REDIS": client, "SESSION_URI": "redis://b/1"})
    assert both.redis_client is client and both.redis_url is None  # the client first
    assert WebSettings.from_config({"SESSION_URI": "redis://b/1"}).redis_url == "redis://b/1"
    url = WebSettings.from_config({**URL, "SESSION_REDIS": client})
    assert url.redis_client is None and url.redis_url == URL["AIOCRYPT_REDIS_URL"]
    with pytest.raises(ConfigurationError, match="AIOCRYPT_REDIS_URL"):
        WebSettings.from_config({"SESSION_COOKIE_SECURE": True})
    assert "b/1" not in repr(WebSettings.from_config({"SESSION_URI": "redis://:pw@b/1"}))
    client.close()


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"SESSION_COOKIE_SAMESITE": "sometimes"}, "SESSION_COOKIE_SAMESITE"),
        (
            {"SESSION_COOKIE_SAMESITE": "None", "SESSION_COOKIE_SECURE": False},
            "SESSION_COOKIE_SECURE",
        ),
        ({"SESSION_COOKIE_PARTITIONED": "perhaps"}, "SESSION_COOKIE_PARTITIONED"),
        ({"SESSION_REFRESH_EACH_REQUEST": 2}, "SESSION_REFRESH_EACH_REQUEST"),
        ({"SESSION_PERMANENT": "always"}, "SESSION_PERMANENT"),
        ({"PERMANENT_SESSION_LIFETIME": timedelta(0)}, "PERMANENT_SESSION_LIFETIME"),
        ({"SESSION_ID_LENGTH": 31}, "SESSION_ID_LENGTH"),
        ({"SESSION_ID_LENGTH": True}, "SESSION_ID_LENGTH"),
        ({"SESSION_KEY_PREFIX": ""}, "SESSION_KEY_PREFIX"),
        ({"SESSION_COOKIE_DOMAIN": 7}, "SESSION_COOKIE_DOMAIN"),
        ({"AIOCRYPT_RETRY_AFTER": 0}, "AIOCRYPT_RETRY_AFTER"),
        ({"AIOCRYPT_SESSION_CACHE_CONTROL": 3}, "AIOCRYPT_SESSION_CACHE_CONTROL"),
        ({"SESSION_TYPE": "mongodb"}, "SESSION_TYPE"),
    ],
)
def test_invalid_values_name_their_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigurationError, match=key):
        WebSettings.from_config({**URL, **config})


async def test_version_1_payloads_stay_readable(
    service: EncryptionService, aredis: aioredis.Redis, redis_prefix: str
) -> None:
    """Sessions written before the tagged-JSON envelope (v1) load in the extensions' store (v2)."""
    settings = SessionSettings(prefix=redis_prefix + "s:")
    old = RedisSessionStore(service, aredis, settings)
    new = RedisSessionStore(service, aredis, settings, serializer=TaggedJSONSerializer())
    session = await old.load(None)
    session.update(user_id=3, flashes=[["message", "hi"]])
    sid = (await old.save(session)).session_id
    loaded = await new.load(sid)
    assert not loaded.new and dict(loaded) == {"user_id": 3, "flashes": [["message", "hi"]]}
    loaded["flashes"] = [("message", "hi")]
    await new.save(loaded)  # rewritten as version 2: the tuple now survives
    again = await new.load(sid)
    assert again["flashes"] == [("message", "hi")]
    assert (await old.load(sid)).new  # a v1-only reader cannot read v2: a fresh session


def make_app(redis_url: str, redis_prefix: str, **config: Any) -> tuple[flask.Flask, AioCrypt]:
    app = flask.Flask(__name__)
    app.config.update(
        AIOCRYPT_SESSION_PREFIX=redis_prefix + "s:",
        AIOCRYPT_CACHE_PREFIX=redis_prefix + "c:",
        **config,
    )
    if "SESSION_REDIS" not in config:
        app.config["AIOCRYPT_REDIS_URL"] = redis_url
    crypt = AioCrypt(app, service=make_service())

    @app.get("/set")
    def set_() -> str:
        flask.session["user"] = "alice"
        return "set"

    @app.get("/read")
    def read() -> flask.Response:
        response = flask.make_response(str(flask.session.get("user")))
        if flask.request.args.get("public"):
            response.headers["Cache-Control"] = "public, max-age=60"
        return response

    @app.get("/cached")
    async def cached() -> str:
        await crypt.cache.set("k", "v")
        return str(await crypt.cache.get("k"))

    return app, crypt


def test_cache_control_on_session_pages_only(
    redis_url: str, redis_prefix: str, sync_redis: redis.Redis
) -> None:
    app, crypt = make_app(redis_url, redis_prefix)
    try:
        client = app.test_client()
        assert "Cache-Control" not in client.get("/read").headers  # an empty new session
        assert client.get("/set").headers["Cache-Control"] == "private, no-store"
        assert client.get("/read").headers["Cache-Control"] == "private, no-store"
        assert client.get("/read?public=1").headers["Cache-Control"] == "public, max-age=60"
        assert "Cache-Control" not in client.get("/cached").headers
    finally:
        crypt.close(app)
    app, crypt = make_app(redis_url, redis_prefix, AIOCRYPT_SESSION_CACHE_CONTROL="")
    try:
        client = app.test_client()
        client.get("/set")
        assert "Cache-Control" not in client.get("/read").headers
    finally:
        crypt.close(app)


def test_flask_session_redis_client_serves_the_cache_too(
    redis_url: str, redis_prefix: str, sync_redis: redis.Redis
) -> None:
    """SESSION_REDIS alone (Flask-Session style): the cache's asyncio client reaches it too."""
    client_redis = redis.Redis.from_url(redis_url)
    app, crypt = make_app(redis_url, redis_prefix, SESSION_REDIS=client_redis)
    try:
        client = app.test_client()
        assert client.get("/set").text == "set" and client.get("/read").text == "alice"
        assert client.get("/cached").text == "v"
        assert len(list(sync_redis.scan_iter(match=redis_prefix + "c:*"))) == 1
    finally:
        crypt.close(app)
        client_redis.close()


def test_lazy_session_is_a_plain_dict_once_read() -> None:
    loads: list[str] = []
    session = EncryptedSession()
    session._pending = lambda: loads.append("load")
    assert not session.accessed and loads == []
    assert "x" not in session and loads == ["load"]
    session["x"] = 1
    assert loads == ["load"] and session.accessed and session.modified


def test_envelope_layouts_are_pinned() -> None:
    """The plaintext inside the session ciphertext, both versions (a change is a new version)."""
    from aiocrypt.integrations.sessions import _SessionCodec

    codec = _SessionCodec(SessionSettings(), lambda: 1_700_000_000.0, TaggedJSONSerializer())
    session = EncryptedSession({"t": (1, 2), "b": b"\xff"})
    session._created_ms = 1_699_999_999_000
    assert codec.envelope(session) == {
        "v": 2,
        "s": '{"t":{" t":[1,2]},"b":{" b":"/w=="}}',
        "c": 1_699_999_999_000,
    }
    assert codec.unpack({"v": 2, "s": '{"t":{" t":[1,2]}}', "c": 1_699_999_999_000}) == (
        {"t": (1, 2)},
        1_699_999_999_000,
    )
    assert codec.unpack({"d": {"t": [1, 2]}, "c": 1_699_999_999_000}) == (
        {"t": [1, 2]},
        1_699_999_999_000,
    )  # version 1
    v1 = _SessionCodec(SessionSettings(), lambda: 1_700_000_000.0)
    assert v1.envelope(session) == {"d": {"t": [1, 2], "b": b"\xff"}, "c": 1_699_999_999_000}
    assert not session.accessed  # saving is no access
    assert codec.unpack({"v": 2, "s": "not json", "c": 1}) is None
