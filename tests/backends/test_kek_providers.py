"""KEK providers beyond the contract: retries, outages, configuration, missing extras."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from aiocrypt import EncryptionConfig, KekProviderError
from aiocrypt.kek import KekProvider
from aiocrypt.kek._retry import RetryPolicy

from .conftest import FAST_RETRY, build_case, free_port, kms_servers, make_aws_key

CONTEXT = {"aiocrypt_key_id": "pii-v1-0a0b0c0d", "aiocrypt_key_type": "pii"}


class Flaky:
    """Proxy of a client whose ``method`` fails ``failures`` times with ``error()`` first."""

    def __init__(self, inner: Any, method: str, failures: int, error: Any) -> None:
        self._inner, self._method, self._error = inner, method, error
        self.failures = failures
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.failures > 0:
                self.failures -= 1
                raise self._error()
            return await attr(*args, **kwargs)

        return call


def _retries(caplog: pytest.LogCaptureFixture) -> int:
    return sum("retrying in" in r.getMessage() for r in caplog.records if r.name == "aiocrypt.kek")


# -- transient failures are retried, a bounded number of times ---------------------------


async def _aws_flaky(server: Any, failures: int) -> tuple[KekProvider, Flaky, Any]:
    from aiobotocore.session import get_session
    from botocore.exceptions import ClientError

    from aiocrypt.kek.aws import AwsKmsKekProvider

    arn = await make_aws_key(server)
    context = get_session().create_client("kms", **server.client_kwargs)
    client = await context.__aenter__()

    def throttled() -> Exception:
        error: Exception = ClientError(  # botocore ships no types
            {
                "Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            },
            "Encrypt",
        )
        return error

    flaky = Flaky(client, "encrypt", failures, throttled)
    return AwsKmsKekProvider(arn, client=flaky, retry=FAST_RETRY), flaky, context


@pytest.mark.parametrize("failures, succeeds", [(2, True), (3, False)])
async def test_aws_throttling_is_retried_with_backoff(
    moto_server: Any, failures: int, succeeds: bool, caplog: pytest.LogCaptureFixture
) -> None:
    provider, flaky, context = await _aws_flaky(moto_server, failures)
    try:
        if succeeds:
            wrapped = await provider.wrap(b"k" * 32, CONTEXT)
            assert await provider.unwrap(wrapped, CONTEXT) == b"k" * 32
            assert moto_server.calls["encrypt"] == 1  # the real call, after two throttles
        else:
            with pytest.raises(KekProviderError) as info:
                await provider.wrap(b"k" * 32, CONTEXT)
            assert info.value.retryable
            assert "ThrottlingException" in str(info.value)
            assert "gave up after 3 attempts" in str(info.value)
            assert moto_server.calls["encrypt"] == 0
        assert flaky.calls == 3  # FAST_RETRY allows three attempts, never more
        assert _retries(caplog) == 2
    finally:
        await provider.close()
        await context.__aexit__(None, None, None)


async def test_gcp_unavailable_is_retried(gcp_server: Any) -> None:
    from google.api_core import exceptions as gexc

    from aiocrypt.kek.gcp import GcpKmsKekProvider

    key_name = gcp_server.create_crypto_key(key_ring=f"ring-{os.urandom(4).hex()}")
    client = gcp_server.async_client()
    flaky = Flaky(client, "decrypt", 2, lambda: gexc.ServiceUnavailable("try again"))
    provider = GcpKmsKekProvider(key_name, client=flaky, retry=FAST_RETRY)
    try:
        wrapped = await provider.wrap(b"k" * 32, CONTEXT)
        assert await provider.unwrap(wrapped, CONTEXT) == b"k" * 32
        assert flaky.calls == 3 and gcp_server.calls["decrypt"] == 1
    finally:
        await client.transport.close()


async def test_vault_sealed_then_back_is_retried(
    vault_server: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    VaultError = sys.modules[type(vault_server).__module__].VaultError

    case = await build_case("vault", request)
    failures = {"left": 2, "seen": 0}
    real = vault_server._transit

    def sealed_twice(method: str, mount: str, rest: list[str], body: dict[str, Any]) -> Any:
        if rest and rest[0] == "encrypt":
            failures["seen"] += 1
            if failures["left"]:
                failures["left"] -= 1
                raise VaultError(503, "Vault is sealed")
        return real(method, mount, rest, body)

    monkeypatch.setattr(vault_server, "_transit", sealed_twice)
    try:
        wrapped = await case.provider.wrap(b"k" * 32, CONTEXT)
        assert await case.provider.unwrap(wrapped, CONTEXT) == b"k" * 32
        assert failures["seen"] == 3
    finally:
        await case.provider.close()


async def test_azure_503_on_unwrap_is_retried(
    azure_server: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    KeyVaultError = sys.modules[type(azure_server).__module__].KeyVaultError

    case = await build_case("azure", request)
    wrapped = await case.provider.wrap(b"k" * 32, CONTEXT)
    left = [1]
    real = azure_server._op

    def unavailable_once(op: str, name: str, fn: Any) -> Any:
        if op == "unwrap_key" and left[0]:
            left[0] -= 1
            azure_server.calls.incr(op)
            raise KeyVaultError(503, "ServiceUnavailable", "The service is unavailable.")
        return real(op, name, fn)

    monkeypatch.setattr(azure_server, "_op", unavailable_once)
    try:
        assert await case.provider.unwrap(wrapped, CONTEXT) == b"k" * 32
        assert azure_server.calls["unwrap_key"] == 2
    finally:
        await case.provider.close()


# -- outages: connection refused, and a server that never answers ------------------------


def _down_provider(name: str, port: int, retry: RetryPolicy) -> KekProvider:
    if name == "aws":
        from aiocrypt.kek.aws import AwsKmsKekProvider

        return AwsKmsKekProvider(
            "alias/aiocrypt",
            region="us-east-1",
            access_key_id="testing",
            secret_access_key="testing",
            endpoint_url=f"http://127.0.0.1:{port}",
            retry=retry,
        )
    if name == "vault":
        from aiocrypt.kek.vault import VaultTransitKekProvider

        return VaultTransitKekProvider(
            "kek", url=f"http://127.0.0.1:{port}", token="t", retry=retry
        )
    if name == "azure":
        from aiocrypt.kek.azure import AzureKeyVaultKekProvider

        return AzureKeyVaultKekProvider(
            f"https://127.0.0.1:{port}/keys/kek",
            credential=kms_servers.AsyncStaticTokenCredential("t"),
            retry=retry,
        )
    from aiocrypt.kek.gcp import GcpKmsKekProvider

    return GcpKmsKekProvider(
        "projects/p/locations/l/keyRings/r/cryptoKeys/k",
        endpoint=f"http://127.0.0.1:{port}",
        retry=retry,
    )


@pytest.mark.parametrize("name", ["aws", "vault", "azure", "gcp"])
async def test_unreachable_service_is_retried_then_reported(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    provider = _down_provider(name, free_port(), FAST_RETRY)
    try:
        started = time.monotonic()
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(b"k" * 32, CONTEXT)
        assert time.monotonic() - started < FAST_RETRY.total_timeout
    finally:
        await provider.close()
    assert info.value.retryable, info.value
    assert info.value.backend == provider.backend
    assert provider.kek_id in str(info.value)
    assert "gave up after 3 attempts" in str(info.value)
    assert _retries(caplog) == 2


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("name", ["aws", "vault", "gcp"])
async def test_silent_service_times_out(name: str, black_hole: int) -> None:
    policy = RetryPolicy(
        attempts=2, initial_delay=0.01, max_delay=0.01, call_timeout=0.3, total_timeout=5.0
    )
    provider = _down_provider(name, black_hole, policy)
    try:
        with anyio.fail_after(10):
            with pytest.raises(KekProviderError) as info:
                await provider.wrap(b"k" * 32, CONTEXT)
    finally:
        await provider.close()
    assert info.value.retryable
    assert provider.kek_id in str(info.value)


def test_retry_policy_backoff_is_bounded() -> None:
    policy = RetryPolicy(attempts=6, initial_delay=0.1, max_delay=1.0)
    delays = [policy.delay(n) for n in range(1, 7)]
    assert all(0.05 <= d <= 1.0 for d in delays)
    assert max(delays[4:]) <= 1.0 and delays[0] <= 0.1
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


# -- configuration ------------------------------------------------------------------------


async def test_aws_from_config_round_trip(moto_server: Any) -> None:
    from aiocrypt._factory import build_kek_provider
    from aiocrypt.kek.aws import AwsKmsKekProvider

    arn = await make_aws_key(moto_server)
    config = EncryptionConfig(
        storage_backend="aws_kms",
        aws_kms_key_id=arn,
        aws_region="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="s3cr3t-aws-value",
        aws_endpoint_url=moto_server.url,
    )
    provider = build_kek_provider(config)
    try:
        assert isinstance(provider, AwsKmsKekProvider)
        assert provider.kek_id == f"aws-kms://{arn}"
        assert "s3cr3t" not in repr(provider)
        assert await provider.unwrap(await provider.wrap(b"d" * 32, CONTEXT), CONTEXT) == b"d" * 32
    finally:
        await provider.close()


async def test_vault_from_config_round_trip(vault_server: Any) -> None:
    import hvac

    from aiocrypt._factory import build_kek_provider
    from aiocrypt.kek.vault import VaultTransitKekProvider

    mount = f"transit-{os.urandom(4).hex()}"
    admin = hvac.Client(url=vault_server.url, token=vault_server.token)
    admin.sys.enable_secrets_engine("transit", path=mount)
    admin.adapter.close()
    config = EncryptionConfig(
        storage_backend="vault",
        vault_url=vault_server.url,
        vault_token=vault_server.token,
        vault_transit_key="app-kek",
        vault_mount_point=mount,
    )
    provider = build_kek_provider(config)
    try:
        assert isinstance(provider, VaultTransitKekProvider)
        assert provider.kek_id == f"vault://{mount}/app-kek"
        assert vault_server.token not in repr(provider)
        assert await provider.unwrap(await provider.wrap(b"d" * 32, CONTEXT), CONTEXT) == b"d" * 32
        assert vault_server.key_names(mount) == ["app-kek"]
    finally:
        await provider.close()


async def test_gcp_from_config_round_trip(gcp_server: Any) -> None:
    from aiocrypt._factory import build_kek_provider
    from aiocrypt.kek.gcp import GcpKmsKekProvider

    gcp_server.create_crypto_key(
        project="proj-1", location="europe-west1", key_ring="ring-cfg", key="app-kek"
    )
    config = EncryptionConfig(
        storage_backend="gcp_kms",
        gcp_project_id="proj-1",
        gcp_location="europe-west1",
        gcp_keyring="ring-cfg",
        gcp_key_name="app-kek",
        gcp_endpoint=f"http://{gcp_server.target}",
    )
    provider = build_kek_provider(config)
    try:
        assert isinstance(provider, GcpKmsKekProvider)
        assert provider.kek_id == (
            "gcp-kms://projects/proj-1/locations/europe-west1/keyRings/ring-cfg/cryptoKeys/app-kek"
        )
        assert await provider.unwrap(await provider.wrap(b"d" * 32, CONTEXT), CONTEXT) == b"d" * 32
    finally:
        await provider.close()


async def test_azure_from_config_builds_a_secret_credential() -> None:
    from aiocrypt._factory import build_kek_provider
    from aiocrypt.kek.azure import AzureKeyVaultKekProvider

    config = EncryptionConfig(
        storage_backend="azure_kv",
        azure_vault_url="https://my-vault.vault.azure.net/",
        azure_key_name="app-kek/0123456789abcdef0123456789abcdef",
        azure_tenant_id="tenant",
        azure_client_id="client",
        azure_client_secret="s3cr3t-azure-value",
    )
    provider = build_kek_provider(config)
    try:
        assert isinstance(provider, AzureKeyVaultKekProvider)
        assert provider.kek_id == (
            "azure-kv://my-vault.vault.azure.net/keys/app-kek/0123456789abcdef0123456789abcdef"
        )
        assert "s3cr3t" not in repr(provider)
        provider._client(None)  # builds the SDK client (no request yet) and the credential
        assert type(provider._credential).__name__ == "ClientSecretCredential"
    finally:
        await provider.close()


async def test_azure_refuses_an_envelope_from_another_key_version(azure_server: Any) -> None:
    from aiocrypt.kek.azure import AzureKeyVaultKekProvider

    kid = azure_server.create_rsa_key(f"kek-{os.urandom(4).hex()}")
    pinned = AzureKeyVaultKekProvider(
        kid, credential=azure_server.async_credential(), client_kwargs=azure_server.client_kwargs
    )
    try:
        assert pinned.kek_id.endswith(kid.rsplit("/", 1)[1])
        wrapped = await pinned.wrap(b"d" * 32, CONTEXT)
        assert await pinned.unwrap(wrapped, CONTEXT) == b"d" * 32
        rotated = azure_server.create_rsa_key(kid.split("/keys/")[1].split("/")[0])
        other = AzureKeyVaultKekProvider(
            rotated,
            credential=azure_server.async_credential(),
            client_kwargs=azure_server.client_kwargs,
        )
        with pytest.raises(KekProviderError, match="key version"):
            await other.unwrap(wrapped, CONTEXT)
        await other.close()
    finally:
        await pinned.close()


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"storage_backend": "aws_kms"}, "ENCRYPTION_AWS_KMS_KEY_ID"),
        ({"storage_backend": "vault"}, "ENCRYPTION_VAULT_URL"),
        ({"storage_backend": "azure_kv"}, "ENCRYPTION_AZURE_VAULT_URL"),
        ({"storage_backend": "gcp_kms", "gcp_project_id": "p"}, "ENCRYPTION_GCP_LOCATION"),
    ],
)
def test_from_config_names_what_is_missing(kwargs: dict[str, Any], problem: str) -> None:
    from aiocrypt import ConfigurationError
    from aiocrypt._factory import build_kek_provider

    with pytest.raises(ConfigurationError, match=problem):
        build_kek_provider(EncryptionConfig(**kwargs))


def test_missing_extra_names_it() -> None:
    code = textwrap.dedent("""
        import importlib, sys
        cases = {"aiocrypt.kek.aws": ("aiobotocore", "aws"),
                 "aiocrypt.kek.vault": ("hvac", "vault"),
                 "aiocrypt.kek.azure": ("azure", "azure"),
                 "aiocrypt.kek.gcp": ("google.cloud", "gcp"),
                 "aiocrypt.keystore.redis": ("redis", "redis"),
                 "aiocrypt.keystore.postgres": ("asyncpg", "postgres")}
        for module, (dependency, extra) in cases.items():
            saved = {k: v for k, v in sys.modules.items()
                     if k == dependency or k.startswith(dependency + ".")}
            for k in saved:
                del sys.modules[k]
            sys.modules[dependency] = None
            try:
                importlib.import_module(module)
            except ImportError as exc:
                assert f"pip install 'aiocrypt[{extra}]'" in str(exc), (module, str(exc))
            else:
                raise AssertionError(module + " imported without " + dependency)
            finally:
                del sys.modules[dependency]
                sys.modules.update(saved)
        print("ok")
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
