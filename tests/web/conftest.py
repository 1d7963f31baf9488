"""Fixtures of the web tests: a Redis key prefix per test, real servers for the example apps.

Everything a test writes to Redis (database 15) sits under its own random
prefix, and the fixtures delete exactly those keys afterwards.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis


@pytest.fixture
def redis_prefix() -> str:
    return f"test:web:{secrets.token_hex(6)}:"


@pytest.fixture
async def aredis(redis_url: str, redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=redis_prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def sync_redis(redis_url: str, redis_prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = list(client.scan_iter(match=redis_prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


async def redis_dump(client: aioredis.Redis, prefix: str) -> dict[bytes, bytes]:
    """Every key under ``prefix`` with its value (all are strings)."""
    keys = [key async for key in client.scan_iter(match=prefix + "*")]
    values = await client.mget(keys) if keys else []
    return dict(zip(keys, values, strict=True))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    kind: str
    url: str
    app: Any
    prefix: str

    @property
    def reports(self) -> Any:
        return self.app.extensions["example"]["reports"]


@pytest.fixture
def app_config(
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
    master_key_b64: str,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY", master_key_b64)
    return {
        "EXAMPLE_DATA_DIR": str(tmp_path / "data"),
        "AIOCRYPT_REDIS_URL": redis_url,
        "AIOCRYPT_SESSION_PREFIX": redis_prefix + "session:",
        "AIOCRYPT_CACHE_PREFIX": redis_prefix + "cache:",
        "AIOCRYPT_COOKIE_SECURE": False,  # plain HTTP on loopback
        "REPORT_CACHE_TTL": 1,
    }


async def _wait_until_up(url: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(url + "/")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"server at {url} did not come up")
            await asyncio.sleep(0.02)


async def serve_quart_app(app: Any) -> AsyncIterator[str]:
    """Serve a Quart app with hypercorn on a free loopback port; yield its URL."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    port = free_port()
    hyper = Config()
    hyper.bind = [f"127.0.0.1:{port}"]
    hyper.graceful_timeout = 1.0
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, hyper, shutdown_trigger=stop.wait))
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_until_up(url)
        yield url
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def serve_flask_app(app: Any, wait: bool = True) -> AsyncIterator[str]:
    """Serve a Flask app with werkzeug (threaded) on a free loopback port; yield its URL.

    ``wait=False`` yields at once (for an app whose ``/`` is not 200)."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        if wait:
            await _wait_until_up(url)
        yield url
    finally:
        await asyncio.to_thread(server.shutdown)
        thread.join(10)
        server.server_close()


async def _serve_quart(config: dict[str, Any], prefix: str) -> AsyncIterator[Server]:
    from examples.quart_app import create_app

    app = create_app(config)
    async for url in serve_quart_app(app):
        yield Server("quart", url, app, prefix)


async def _serve_flask(config: dict[str, Any], prefix: str) -> AsyncIterator[Server]:
    from examples.flask_app import create_app

    app = create_app(config)
    try:
        async for url in serve_flask_app(app):
            yield Server("flask", url, app, prefix)
    finally:
        await asyncio.to_thread(app.extensions["example"]["close"])


@pytest.fixture(params=["quart", "flask"])
async def server(
    request: pytest.FixtureRequest,
    app_config: dict[str, Any],
    redis_prefix: str,
    aredis: aioredis.Redis,
) -> AsyncIterator[Server]:
    """An example app served over real HTTP on 127.0.0.1 (hypercorn / werkzeug)."""
    serve = _serve_quart if request.param == "quart" else _serve_flask
    async for running in serve(app_config, redis_prefix):
        yield running
