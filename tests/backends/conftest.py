"""Fixtures of the backend tests: the loopback KMS test servers and KEK providers on them.

One server of each kind per session (moto keeps its state process-wide anyway);
each test gets its own key (random name) and fresh counters / access switches.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from aiocrypt import EncryptionKey, KeyType
from aiocrypt.kek import KekProvider, LocalKekProvider
from aiocrypt.kek._retry import RetryPolicy
from aiocrypt.testing import FakeKekProvider

try:  # rootdir on sys.path (python -m pytest)
    from tests import kms_servers as kms_servers  # re-exported to the tests here
except ImportError:  # plain `pytest`: tests/ itself is on sys.path
    import kms_servers as kms_servers

#: Fast retries for tests: the same policy shape, shorter waits.
FAST_RETRY = RetryPolicy(
    attempts=3, initial_delay=0.01, max_delay=0.05, call_timeout=5.0, total_timeout=15.0
)
KEK_BACKENDS = ["local", "fake", "aws", "vault", "azure", "gcp"]
REMOTE_BACKENDS = ["aws", "vault", "azure", "gcp"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def record(key_id: str, version: int = 1) -> EncryptionKey:
    """A key record as a store holds it (random bytes stand for the wrapped DEK)."""
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return EncryptionKey(
        key_id=key_id,
        key_type=KeyType.PII,
        version=version,
        status="active",  # type: ignore[arg-type]  # coerced to KeyStatus
        created_at=now,
        expires_at=now + dt.timedelta(days=1),
        wrapped_key=os.urandom(60),
        kek_id="k",
    )


def _fresh(server: Any) -> Any:
    server.access_denied = False
    server.denied_operations = set()
    server.calls.reset()
    return server


@pytest.fixture(scope="session")
def _moto() -> Iterator[Any]:
    pytest.importorskip("moto")
    with kms_servers.start_moto_kms_server() as server:
        yield server


@pytest.fixture(scope="session")
def _vault() -> Iterator[Any]:
    pytest.importorskip("hvac")
    with kms_servers.start_vault_server() as server:
        yield server


@pytest.fixture(scope="session")
def _azure() -> Iterator[Any]:
    pytest.importorskip("azure.keyvault.keys")
    with kms_servers.start_azure_keyvault_server() as server:
        yield server


@pytest.fixture(scope="session")
def _gcp() -> Iterator[Any]:
    pytest.importorskip("google.cloud.kms_v1")
    with kms_servers.start_gcp_kms_server() as server:
        yield server


@pytest.fixture
def moto_server(_moto: Any) -> Any:
    return _fresh(_moto)


@pytest.fixture
def vault_server(_vault: Any) -> Any:
    return _fresh(_vault)


@pytest.fixture
def azure_server(_azure: Any) -> Any:
    return _fresh(_azure)


@pytest.fixture
def gcp_server(_gcp: Any) -> Any:
    return _fresh(_gcp)


@dataclass
class KekCase:
    """A KEK provider under test and the server it talks to (None for in-process ones)."""

    name: str
    provider: KekProvider
    server: Any = None

    def calls(self) -> int:
        """KMS calls seen so far (at the server; the fake counts its own)."""
        if self.server is not None:
            return int(self.server.calls.total())
        if isinstance(self.provider, FakeKekProvider):
            return sum(self.provider.calls.values())
        return 0

    def reset_calls(self) -> None:
        if self.server is not None:
            self.server.calls.reset()
        elif isinstance(self.provider, FakeKekProvider):
            self.provider.calls.clear()

    def deny(self) -> None:
        if self.server is not None:
            self.server.access_denied = True
        elif isinstance(self.provider, FakeKekProvider):
            self.provider.deny()
        else:
            pytest.skip("an in-process KEK cannot be denied")

    def allow(self) -> None:
        if self.server is not None:
            self.server.access_denied = False
        elif isinstance(self.provider, FakeKekProvider):
            self.provider.fail_with = None


async def make_aws_key(server: Any) -> str:
    from aiobotocore.session import get_session

    async with get_session().create_client("kms", **server.client_kwargs) as kms:
        return str((await kms.create_key(Description="aiocrypt test KEK"))["KeyMetadata"]["Arn"])


async def build_case(name: str, request: pytest.FixtureRequest) -> KekCase:
    tag = secrets.token_hex(4)
    if name == "local":
        return KekCase(name, LocalKekProvider.generate())
    if name == "fake":
        return KekCase(name, FakeKekProvider())
    if name == "aws":
        from aiocrypt.kek.aws import AwsKmsKekProvider

        server = request.getfixturevalue("moto_server")
        arn = await make_aws_key(server)
        provider: KekProvider = AwsKmsKekProvider(
            arn,
            access_key_id="testing",
            secret_access_key="testing",
            endpoint_url=server.url,
            retry=FAST_RETRY,
        )
        server.calls.reset()
        return KekCase(name, provider, server)
    if name == "vault":
        from aiocrypt.kek.vault import VaultTransitKekProvider

        server = request.getfixturevalue("vault_server")
        vault = VaultTransitKekProvider(
            f"kek-{tag}", url=server.url, token=server.token, retry=FAST_RETRY
        )
        await vault.ensure_key()
        server.calls.reset()
        return KekCase(name, vault, server)
    if name == "azure":
        from aiocrypt.kek.azure import AzureKeyVaultKekProvider

        server = request.getfixturevalue("azure_server")
        server.create_rsa_key(f"kek-{tag}")
        provider = AzureKeyVaultKekProvider(
            f"{server.url}/keys/kek-{tag}",
            credential=server.async_credential(),
            client_kwargs=server.client_kwargs,
            retry=FAST_RETRY,
        )
        return KekCase(name, provider, server)
    if name == "gcp":
        from aiocrypt.kek.gcp import GcpKmsKekProvider

        server = request.getfixturevalue("gcp_server")
        key_name = server.create_crypto_key(key_ring=f"ring-{tag}")
        provider = GcpKmsKekProvider(key_name, endpoint=f"http://{server.target}", retry=FAST_RETRY)
        return KekCase(name, provider, server)
    raise AssertionError(name)


@pytest.fixture(params=KEK_BACKENDS)
async def kek_case(request: pytest.FixtureRequest) -> AsyncIterator[KekCase]:
    case = await build_case(request.param, request)
    try:
        yield case
    finally:
        await case.provider.close()


@pytest.fixture(params=REMOTE_BACKENDS)
async def remote_case(request: pytest.FixtureRequest) -> AsyncIterator[KekCase]:
    case = await build_case(request.param, request)
    try:
        yield case
    finally:
        await case.provider.close()
