"""The example apps served for real (Quart on hypercorn, Flask on werkzeug), over HTTP.

Every test runs against both apps (the ``server`` fixture is parametrized).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie

import httpx
import pytest
import redis.asyncio as aioredis

from .conftest import Server, redis_dump

COOKIE = "session"
PLAINTEXT = (
    "alice",
    "85000.00",
    "12000.50",
    "123-45-6789",
    "user_id",
    "username",
    "csrf_token",
    "savings_rate",
)


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, follow_redirects=False, timeout=10) as http:
        yield http


async def login(
    client: httpx.AsyncClient,
    username: str = "alice",
    password: str = "correct horse battery staple",
) -> httpx.Response:
    token = (await client.get("/login")).json()["csrf_token"]
    return await client.post(
        "/login", data={"username": username, "password": password, "csrf_token": token}
    )


def client_with_cookie(server: Server, session_id: str) -> httpx.AsyncClient:
    """A client presenting ``session_id`` as a browser would (replaceable by the server)."""
    http = httpx.AsyncClient(base_url=server.url, follow_redirects=False, timeout=10)
    http.cookies.set(COOKIE, session_id, domain="127.0.0.1")
    return http


def set_cookie_headers(response: httpx.Response) -> list[SimpleCookie]:
    cookies = []
    for header in response.headers.get_list("set-cookie"):
        cookie: SimpleCookie = SimpleCookie()
        cookie.load(header)
        cookies.append(cookie)
    return cookies


async def assert_no_secrets_in_redis(aredis: aioredis.Redis, server: Server, *secrets: str) -> int:
    dump = await redis_dump(aredis, server.prefix)
    for key, value in dump.items():
        for text in (*PLAINTEXT, *secrets):
            assert text.encode() not in key, (text, key)
            assert text.encode() not in value, (text, key)
    return len(dump)


async def test_login_session_logout(
    server: Server, client: httpx.AsyncClient, aredis: aioredis.Redis
) -> None:
    assert (await client.get("/me")).status_code == 401
    form = await client.get("/login")
    before_login = client.cookies[COOKIE]
    csrf = form.json()["csrf_token"]
    response = await client.post(
        "/login",
        data={"username": "alice", "password": "correct horse battery staple", "csrf_token": csrf},
    )
    assert response.status_code == 302 and response.headers["location"].endswith("/me")
    after_login = client.cookies[COOKIE]
    assert after_login != before_login  # a new session id at login (fixation)

    me = await client.get("/me")
    assert me.status_code == 200
    assert me.json() == {
        "id": 1,
        "username": "alice",
        "income": "85000.00",
        "savings": "12000.50",
        "ssn": "***-**-6789",
    }
    assert me.headers["cache-control"] == "private, no-store"  # Back after logout shows nothing
    assert me.headers["vary"] == "Cookie"
    health = await client.get("/healthz")
    assert health.status_code == 200 and health.json()["checks"]["redis"] == {"status": "ok"}
    assert (await client.get("/whoami")).json() == {"username": "alice"}
    assert (await client.post("/visits")).json() == {"visits": 1}
    assert (await client.post("/visits")).json() == {"visits": 2}

    # Redis: one session, keyed by neither session id, holding no plaintext.
    assert await assert_no_secrets_in_redis(aredis, server, before_login, after_login, csrf) == 1

    # The pre-login id is dead: presenting it again gives an anonymous session.
    async with client_with_cookie(server, before_login) as other:
        assert (await other.get("/whoami")).json() == {"username": None}

    response = await client.post("/logout")
    assert response.status_code == 302
    assert COOKIE not in client.cookies
    assert (await client.get("/me")).status_code == 401
    assert await redis_dump(aredis, server.prefix + "session:") == {}
    async with client_with_cookie(server, after_login) as replay:
        assert (await replay.get("/me")).status_code == 401  # logout is final


async def test_cookie_flags(server: Server, client: httpx.AsyncClient) -> None:
    response = await client.get("/login")
    (cookie,) = set_cookie_headers(response)
    morsel = cookie[COOKIE]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Lax"
    assert morsel["secure"] == ""  # AIOCRYPT_COOKIE_SECURE=False in these tests
    assert morsel["path"] == "/"
    assert len(morsel.value) == 43
    assert "Cookie" in response.headers["vary"]
    # An anonymous page that never touches the session sets no cookie.
    async with httpx.AsyncClient(base_url=server.url) as fresh:
        assert "set-cookie" not in (await fresh.get("/")).headers


@pytest.mark.parametrize("kind", ["flipped", "garbage", "unknown"])
async def test_tampered_cookie_gets_a_fresh_session(
    server: Server, client: httpx.AsyncClient, kind: str
) -> None:
    assert (await login(client)).status_code == 302
    sid = client.cookies[COOKIE]
    bad = {
        "flipped": sid[:-1] + ("A" if sid[-1] != "A" else "B"),
        "garbage": "../../etc/passwd",
        "unknown": "Q" * 43,
    }[kind]
    async with client_with_cookie(server, bad) as attacker:
        response = await attacker.get("/whoami")
        assert response.status_code == 200 and response.json() == {"username": None}
        # The unusable cookie is cleared.
        (cookie,) = set_cookie_headers(response)
        assert cookie[COOKIE].value == "" and cookie[COOKIE]["expires"]
        assert (await attacker.get("/me")).status_code == 401
        assert (await login(attacker)).status_code == 302  # and can still log in
    assert (await client.get("/whoami")).json() == {"username": "alice"}


async def test_tampered_redis_payload_gets_a_fresh_session(
    server: Server, client: httpx.AsyncClient, aredis: aioredis.Redis
) -> None:
    assert (await login(client)).status_code == 302
    ((key, value),) = (await redis_dump(aredis, server.prefix + "session:")).items()
    await aredis.set(key, value[:40] + (b"A" if value[40:41] != b"A" else b"B") + value[41:])
    response = await client.get("/whoami")
    assert response.status_code == 200 and response.json() == {"username": None}
    assert (await client.get("/me")).status_code == 401


async def test_report_is_cached_encrypted_and_expires(
    server: Server, client: httpx.AsyncClient, aredis: aioredis.Redis
) -> None:
    assert (await client.get("/report")).status_code == 401
    assert (await login(client)).status_code == 302
    first = (await client.get("/report")).json()
    assert first["computations"] == 1
    assert first["report"] == {
        "username": "alice",
        "annual_income": "85000.00",
        "savings": "12000.50",
        "savings_rate": "0.1412",
        "months_of_runway": "1.7",
        "ssn_last4": "6789",
    }
    second = (await client.get("/report")).json()
    assert second == first  # decrypted from Redis, not computed again
    assert server.reports.computations == 1

    cache = await redis_dump(aredis, server.prefix + "cache:")
    assert len(cache) == 1
    await assert_no_secrets_in_redis(aredis, server, client.cookies[COOKIE], "6789", "report")
    (cache_key,) = cache
    assert 0 < await aredis.pttl(cache_key) <= 1000  # REPORT_CACHE_TTL = 1 s

    await asyncio.sleep(1.1)
    third = (await client.get("/report")).json()
    assert third["computations"] == 2 and third["report"] == first["report"]


async def test_wrong_password_and_bad_csrf(server: Server, client: httpx.AsyncClient) -> None:
    assert (await login(client, password="wrong")).status_code == 401
    assert (await login(client, username="mallory")).status_code == 401
    await client.get("/login")
    response = await client.post(
        "/login",
        data={
            "username": "alice",
            "csrf_token": "forged",
            "password": "correct horse battery staple",
        },
    )
    assert response.status_code == 400
    assert (await client.get("/whoami")).json() == {"username": None}


async def test_concurrent_clients_keep_their_own_sessions(server: Server) -> None:
    async def user(name: str) -> list[str | None]:
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await login(http, username=name)).status_code == 302
            return [(await http.get("/whoami")).json()["username"] for _ in range(5)]

    alice, bob = await asyncio.gather(user("alice"), user("bob"))
    assert alice == ["alice"] * 5 and bob == ["bob"] * 5


async def test_users_table_holds_only_tokens(
    server: Server, client: httpx.AsyncClient, tmp_path: object
) -> None:
    import sqlite3
    from pathlib import Path

    assert (await login(client)).status_code == 302
    assert (await client.get("/me")).json()["income"] == "85000.00"
    db = Path(str(tmp_path)) / "data" / "app.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT income, savings, ssn FROM users").fetchall()
    assert len(rows) == 2
    for row in rows:
        for value in row:
            assert value.startswith("ac2.")
    raw = db.read_bytes()
    for text in ("85000", "12000.50", "123-45-6789", "987-65-4321"):
        assert text.encode() not in raw
