"""A bounded soak of the Quart example app: fields, sessions and cache under load and rotation.

The example (examples/quart_app.py) runs in its own process under hypercorn
(``_soak_server.py``), with sessions and the report cache in the real Redis and,
since the example keeps its users in SQLite, PostgreSQL exercised through a
Postgres key store and a Postgres audit sink. Eight HTTP clients (httpx) log in
and loop over ``/me`` (decrypts user fields), ``/report`` (encrypted cache,
1 s TTL: hits and recomputes), ``POST /visits`` (session write) and
``/whoami`` (session read), logging out and in again every 40 rounds (session
id regeneration). Meanwhile this process rotates the financial, PII and
session keys every 10 s through its own key manager on the same store.

Duration: 5 s warm-up, then ``AIOCRYPT_SOAK_SECONDS`` (default 25) measured.

What must hold: zero errors (every answer has the expected status and content;
the visit counter of every session counts up by one per request, across
rotations); the server's RSS grows by less than 50 MiB between the end of the
warm-up and the end (a leak check, not a speed check); the audit chain
written by both processes verifies. Throughput is printed, not asserted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _private_services import free_port

from aiocrypt import KeyManager, KeyType
from aiocrypt.kek import LocalKekProvider

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
pytest.importorskip("quart")
pytest.importorskip("hypercorn")
pytest.importorskip("asyncpg")
aioredis = pytest.importorskip("redis.asyncio")

if TYPE_CHECKING:
    from httpx import Response

ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).with_name("_soak_server.py")
SOAK_SECONDS = float(os.environ.get("AIOCRYPT_SOAK_SECONDS", "25"))
WARMUP_SECONDS = 5.0
CLIENTS = 8
ROTATE_EVERY = 10.0
MAX_RSS_GROWTH = 50 * 1024 * 1024
PASSWORD = "correct horse battery staple"  # the example's demo users


class Stats:
    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.samples: list[str] = []

    def error(self, what: str) -> None:
        self.errors[what.split(":")[0]] += 1
        if len(self.samples) < 5:
            self.samples.append(what)


async def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient() as http:
        while True:
            assert proc.poll() is None, "the example server exited at startup"
            try:
                if (await http.get(url + "/")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the example server did not come up"
            await asyncio.sleep(0.1)


async def _client(url: str, index: int, until: float, stats: Stats) -> None:
    username = ("alice", "bob")[index % 2]

    async def expect(response: Response, status: int, what: str) -> bool:
        stats.ops[what] += 1
        if response.status_code != status:
            stats.error(f"{what}: status {response.status_code}")
            return False
        return True

    async with httpx.AsyncClient(base_url=url, timeout=30, follow_redirects=False) as http:

        async def login() -> None:
            form = await http.get("/login")
            if await expect(form, 200, "login_form"):
                await expect(
                    await http.post(
                        "/login",
                        data={
                            "username": username,
                            "password": PASSWORD,
                            "csrf_token": form.json()["csrf_token"],
                        },
                    ),
                    302,
                    "login",
                )

        await login()
        visits, rounds = 0, 0
        while time.monotonic() < until:
            rounds += 1
            try:
                me = await http.get("/me")
                if await expect(me, 200, "field_decrypt") and me.json()["username"] != username:
                    stats.error("field_decrypt: wrong user")
                if await expect(await http.get("/report"), 200, "cache"):
                    pass
                posted = await http.post("/visits")
                if await expect(posted, 200, "session_write"):
                    visits += 1
                    if posted.json()["visits"] != visits:
                        stats.error(f"session_write: visits {posted.json()['visits']} != {visits}")
                        visits = posted.json()["visits"]
                who = await http.get("/whoami")
                if await expect(who, 200, "session_read") and who.json()["username"] != username:
                    stats.error("session_read: wrong user")
                if rounds % 40 == 0:
                    await expect(await http.post("/logout"), 302, "logout")
                    await login()
                    visits = 0
            except httpx.HTTPError as exc:
                stats.error(f"transport: {type(exc).__name__}")
                await asyncio.sleep(0.1)


@pytest.mark.scale
async def test_soak_quart_example(
    redis_url: str,
    postgres_dsn: str,
    master_key: bytes,
    tmp_path: Path,
    summary: Callable[..., None],
) -> None:
    """Mixed field / session / cache load with key rotation: no error, flat memory."""
    from aiocrypt.audit import Auditor
    from aiocrypt.audit.postgres import PostgresAuditSink
    from aiocrypt.keystore.postgres import PostgresKeyStore

    tag = secrets.token_hex(4)
    settings: dict[str, Any] = {  # as JSON to the server process
        "port": free_port(),
        "redis_url": redis_url,
        "prefix": f"rel:soak:{tag}:",
        "dsn": postgres_dsn,
        "schema": f"rel_soak_{tag}",
        "audit_table": f"rel_soak_audit_{tag}",
        "data_dir": str(tmp_path / "data"),
    }
    url = f"http://127.0.0.1:{settings['port']}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ENCRYPTION_MASTER_KEY": base64.b64encode(master_key).decode(),
    }
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), json.dumps(settings)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    kek = LocalKekProvider(master_key)
    audit = PostgresAuditSink(postgres_dsn, table=settings["audit_table"])
    rotator = KeyManager(
        PostgresKeyStore(postgres_dsn, schema=settings["schema"]),
        kek,
        auditor=Auditor([audit]),
        watch=False,
    )
    stats = Stats()
    rotations = 0
    try:
        await _wait_up(url, proc)
        server = psutil.Process(proc.pid)
        started = time.monotonic()
        until = started + WARMUP_SECONDS + SOAK_SECONDS
        clients = [asyncio.create_task(_client(url, i, until, stats)) for i in range(CLIENTS)]

        await asyncio.sleep(WARMUP_SECONDS)
        rss_start = server.memory_info().rss
        ops_start = sum(stats.ops.values())
        rss_samples = [rss_start]
        measured_from = time.monotonic()
        next_rotation = measured_from + ROTATE_EVERY
        while time.monotonic() < until:
            await asyncio.sleep(min(1.0, max(0.0, until - time.monotonic())))
            rss_samples.append(server.memory_info().rss)
            if time.monotonic() >= next_rotation and time.monotonic() < until - 2:
                for kt in (KeyType.FINANCIAL_DATA, KeyType.PII, KeyType.SESSION):
                    await rotator.rotate_key(kt, force=True)
                rotations += 1
                next_rotation += ROTATE_EVERY
        await asyncio.gather(*clients)
        measured = time.monotonic() - measured_from
        ops = sum(stats.ops.values()) - ops_start
        rss_end = server.memory_info().rss
        assert proc.poll() is None, "the server died during the soak"

        verification = await audit.verify()
        assert verification.ok, verification.problems
        key_versions = len(await rotator.list_keys())
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        await rotator.close()
        cleanup = PostgresKeyStore(postgres_dsn, schema=settings["schema"])
        await cleanup.drop()
        await cleanup.close()
        import asyncpg

        conn = await asyncpg.connect(postgres_dsn)
        await conn.execute(
            f"DROP TABLE IF EXISTS {settings['audit_table']}, {settings['audit_table']}_head"
        )
        await conn.close()
        await audit.close()
        client = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=settings["prefix"] + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()

    mib = 1024 * 1024
    summary(
        seconds=round(measured, 1),
        clients=CLIENTS,
        requests=ops,
        requests_by_kind=dict(stats.ops),
        errors=sum(stats.errors.values()),
        error_samples=stats.samples,
        rotations=rotations * 3,
        key_versions=key_versions,
        audit_rows_verified=verification.rows,
        rss_start_mib=round(rss_start / mib, 1),
        rss_end_mib=round(rss_end / mib, 1),
        rss_max_mib=round(max(rss_samples) / mib, 1),
        throughput_rps=round(ops / measured, 1),
    )
    assert not stats.errors, (dict(stats.errors), stats.samples)
    assert rss_end - rss_start < MAX_RSS_GROWTH, (rss_start, rss_end)
