"""/healthz and /metrics of the Quart and Flask extensions, served over real HTTP.

The Quart app keeps its keys in a private redis-server that the test kills to
watch the probe turn 503; the Flask app is pointed at a port where nothing
listens. Metrics are scraped and parsed as Prometheus would.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from flask import Flask
from flask import request as flask_request
from prometheus_client.parser import text_string_to_metric_families
from quart import Quart
from quart import request as quart_request

from aiocrypt import DecryptionError, EncryptionService, KeyManager, KeyType
from aiocrypt.integrations import flask as flask_ext
from aiocrypt.integrations import quart as quart_ext
from aiocrypt.keystore.redis import RedisKeyStore
from aiocrypt.testing import FakeKekProvider, make_service

from .conftest import free_port, serve_flask_app, serve_quart_app


class PrivateRedis:
    """A redis-server of this test's own, on a free port, that the test may kill."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed", pytrace=False)
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError("private redis-server did not start") from None
                time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def web_config(redis_url: str, redis_prefix: str) -> dict[str, Any]:
    return {
        "AIOCRYPT_REDIS_URL": redis_url,
        "AIOCRYPT_SESSION_PREFIX": redis_prefix + "s:",
        "AIOCRYPT_CACHE_PREFIX": redis_prefix + "c:",
        "AIOCRYPT_COOKIE_SECURE": False,
    }


def tamper(token: str) -> str:
    return token[:-1] + ("A" if token[-1] != "A" else "B")


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of metric ``name`` in a scrape, keyed by their sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def material_forms(service: EncryptionService) -> list[str]:
    forms = []
    for dk in service.keyring:
        forms += [dk._material.hex(), base64.b64encode(dk._material).decode()]
    return forms


# -- Quart ------------------------------------------------------------------


def quart_app(config: dict[str, Any], service: EncryptionService) -> Quart:
    app = Quart(__name__)
    app.config.update(config)
    crypt = quart_ext.AioCrypt(app, service=service)
    crypt.add_health_routes(app)

    @app.get("/")
    async def index() -> dict[str, bool]:
        return {"up": True}

    @app.post("/people")
    async def people() -> dict[str, list[str]]:
        names = (await quart_request.get_json())["names"]
        return {
            "tokens": [
                await crypt.service.encrypt_field(n, KeyType.PII, context="people.name")
                for n in names
            ]
        }

    @app.post("/reveal")
    async def reveal() -> tuple[dict[str, Any], int]:
        token = (await quart_request.get_json())["token"]
        try:
            return {
                "name": await crypt.service.decrypt_field(token, KeyType.PII, context="people.name")
            }, 200
        except DecryptionError:
            return {"error": "cannot decrypt"}, 400

    return app


async def serve_quart(app: Quart) -> AsyncIterator[str]:
    async for url in serve_quart_app(app):
        yield url


async def test_quart_health_and_metrics_over_http(
    private_redis: PrivateRedis, web_config: dict[str, Any], aredis: aioredis.Redis
) -> None:
    kek = FakeKekProvider()
    store = RedisKeyStore(
        private_redis.url, prefix=f"test:health:{secrets.token_hex(4)}:", socket_timeout=2.0
    )
    service = EncryptionService(KeyManager(store, kek, watch=False))
    app = quart_app(web_config, service)
    async for url in serve_quart(app):
        async with httpx.AsyncClient(base_url=url, timeout=20) as client:
            response = await client.get("/healthz")
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            assert "set-cookie" not in response.headers  # probes get no session
            body = response.json()
            assert body["status"] == "ok"
            assert body["checks"]["key_store"] == {
                "status": "ok",
                "backend": "redis",
                "reachable": True,
            }
            assert body["checks"]["kek_provider"]["backend"] == "fake"
            # the session keys the extension made at startup are reported
            assert body["checks"]["active_keys"]["key_types"]["session"]["status"] == "ok"

            tokens = (await client.post("/people", json={"names": ["ada", "bob", "cy"]})).json()[
                "tokens"
            ]
            assert (await client.post("/reveal", json={"token": tokens[0]})).json() == {
                "name": "ada"
            }
            assert (
                await client.post("/reveal", json={"token": tamper(tokens[1])})
            ).status_code == 400

            response = await client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            text = response.text
            ops = samples(text, "aiocrypt_operations_total")
            assert ops[(("key_type", "pii"), ("operation", "encrypt"), ("outcome", "ok"))] == 3
            assert ops[(("key_type", "all"), ("operation", "decrypt"), ("outcome", "ok"))] == 1
            assert ops[(("key_type", "pii"), ("operation", "decrypt"), ("outcome", "failure"))] == 1
            kms = samples(text, "aiocrypt_kms_call_duration_seconds_count")
            wraps = kms[(("operation", "wrap"), ("outcome", "ok"), ("provider", "fake"))]
            assert wraps == kek.calls["wrap"] and wraps >= 4  # session, index, cache, pii keys
            ages = samples(text, "aiocrypt_key_age_seconds")
            assert (("key_type", "pii"), ("status", "active"), ("version", "1")) in ages
            for form in material_forms(service):
                assert form not in text

            private_redis.kill()  # the key store dies
            response = await client.get("/healthz")
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "failing"
            assert body["checks"]["key_store"]["status"] == "failing"
            assert body["checks"]["key_store"]["reachable"] is False
            assert body["checks"]["key_store"]["error"].endswith("Error")
            assert body["checks"]["kek_provider"]["status"] == "ok"
            for form in material_forms(service):
                assert form not in response.text
            # metrics still answer: they only read counters
            assert (await client.get("/metrics")).status_code == 200


# -- Flask ------------------------------------------------------------------


def flask_app(config: dict[str, Any], service: EncryptionService) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    crypt = flask_ext.AioCrypt(app, service=service)
    crypt.add_health_routes(app, key_types=["pii"])

    @app.post("/people")
    async def people() -> dict[str, list[str]]:
        names = (flask_request.get_json() or {})["names"]
        return {"tokens": [await crypt.service.encrypt_field(n, KeyType.PII) for n in names]}

    return app


async def serve_flask(app: Flask) -> AsyncIterator[str]:
    try:
        async for url in serve_flask_app(app, wait=False):
            yield url
    finally:
        await asyncio.to_thread(flask_ext.AioCrypt.state(app).close)


async def test_flask_health_and_metrics_over_http(
    web_config: dict[str, Any], aredis: aioredis.Redis
) -> None:
    service = make_service()
    app = flask_app(web_config, service)
    async for url in serve_flask(app):
        async with httpx.AsyncClient(base_url=url, timeout=20) as client:
            tokens = (await client.post("/people", json={"names": ["a", "b", "c"]})).json()[
                "tokens"
            ]
            assert len(tokens) == 3
            response = await client.get("/healthz")
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == "ok"
            assert body["checks"]["active_keys"]["key_types"]["pii"]["version"] == 1
            response = await client.get("/metrics")
            assert response.status_code == 200
            ops = samples(response.text, "aiocrypt_operations_total")
            assert ops[(("key_type", "pii"), ("operation", "encrypt"), ("outcome", "ok"))] == 3


async def test_flask_health_is_503_when_the_key_store_is_unreachable(
    web_config: dict[str, Any], aredis: aioredis.Redis
) -> None:
    closed_port = free_port()  # nothing listens there
    store = RedisKeyStore(f"redis://127.0.0.1:{closed_port}/0", socket_timeout=1.0)
    service = EncryptionService(KeyManager(store, FakeKekProvider(), watch=False))
    app = flask_app(web_config, service)
    async for url in serve_flask(app):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            response = await client.get("/healthz")
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "failing"
            assert body["checks"]["service"]["status"] == "failing"
            assert body["checks"]["service"]["error"]  # a class name, no details
            assert str(closed_port) not in response.text
            assert (await client.get("/metrics")).status_code == 200
