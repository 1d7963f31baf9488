"""Shared fixtures.

Real services: Redis at 127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432 (trust
auth, database ``test``). ``./dev test`` starts them when they are down. A test
that needs one and cannot reach it is skipped locally and FAILS when CI=true.
"""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from _private_services import PrivatePostgres, PrivateRedis
from _services import PG_HOST, PG_PORT, REDIS_HOST, REDIS_PORT, require_service

from aiocrypt import EncryptionConfig, EncryptionService, KeyManager
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore
from aiocrypt.testing import make_service

#: coverage.py's setting that makes the Python subprocesses tests start measure
#: themselves too (``patch = ["subprocess"]`` in pyproject.toml)
_SUBPROCESS_COVERAGE = "COVERAGE_PROCESS_CONFIG"


@pytest.fixture(autouse=True)
def _scale_tests_run_untraced(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """A test marked ``scale`` (tens of thousands of rows or keys, a soak) runs without
    coverage's line tracer, in this process and in the processes it starts: the tracer
    doubles their time, and their lines are the small tests' lines (docs/testing.md).
    Autouse in the root conftest: set up before, torn down after, every fixture of the
    test."""
    if request.node.get_closest_marker("scale") is None:
        yield
        return
    import coverage

    cov = coverage.Coverage.current()
    monkeypatch.delenv(_SUBPROCESS_COVERAGE, raising=False)
    if cov is None:
        yield
        return
    cov.stop()
    try:
        yield
    finally:
        cov.start()


@pytest.fixture
def redis_url() -> str:
    """URL of the real Redis (database 15 is left to tests; flushed by users of it)."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/15"


@pytest.fixture
def postgres_dsn() -> str:
    """DSN of the real PostgreSQL ``test`` database."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"


@pytest.fixture
def master_key() -> bytes:
    """A fresh random master key per test (never a fixed one)."""
    return os.urandom(32)


@pytest.fixture
def master_key_b64(master_key: bytes) -> str:
    return base64.b64encode(master_key).decode("ascii")


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    return directory / "keys.json"


@pytest.fixture
async def service() -> AsyncIterator[EncryptionService]:
    """A started service over a memory store and a fake KMS."""
    svc = make_service()
    async with svc:
        yield svc


@pytest.fixture
def file_config(master_key_b64: str, key_path: Path) -> EncryptionConfig:
    return EncryptionConfig(master_key=master_key_b64, storage_path=str(key_path))


@pytest.fixture
async def file_service(
    file_config: EncryptionConfig, master_key: bytes, key_path: Path
) -> AsyncIterator[EncryptionService]:
    """A started service over a file store and the local master key."""
    kek = LocalKekProvider(master_key)
    manager = KeyManager(FileKeyStore(key_path, kek), kek, file_config)
    svc = EncryptionService(manager)
    async with svc:
        yield svc


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ENCRYPTION_* variables from the outside environment."""
    for name in list(os.environ):
        if name.startswith("ENCRYPTION_"):
            monkeypatch.delenv(name)
    yield


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of the test's own (AOF on), to kill and restart; see _private_services."""
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of the session's own, to crash and restart."""
    cluster = PrivatePostgres()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
