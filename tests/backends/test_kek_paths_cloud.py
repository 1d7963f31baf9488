"""Cloud KMS and Azure Key Vault paths the contract does not reach.

Cloud KMS runs on the loopback gRPC server and Azure Key Vault on the loopback
HTTPS server of tests/kms_servers, through the real SDKs. An answer corrupted
in transit is made by a proxy around the real client (as ``Flaky`` in
test_kek_providers.py does for outages); a service-side answer is injected into
the test server the way test_kek_providers.py injects a 503.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from aiocrypt import ConfigurationError, EncryptionConfig, KekProviderError
from aiocrypt.kek._retry import RetryPolicy

from .conftest import FAST_RETRY, kms_servers

CONTEXT = {"aiocrypt_key_id": "pii-v1-0a0b0c0d", "aiocrypt_key_type": "pii"}
DEK = bytes(range(32))
ONE_TRY = RetryPolicy(attempts=1, call_timeout=5.0, total_timeout=5.0)


# -- Cloud KMS ---------------------------------------------------------------------------------


class _Answers:
    """Proxy of a Cloud KMS client whose ``method`` answers go through ``change`` first."""

    def __init__(self, inner: Any, method: str, change: Callable[[Any], Any]) -> None:
        self._inner, self._method, self._change = inner, method, change
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self._change(await attr(*args, **kwargs))

        return call


def _gcp_provider(gcp_server: Any, client: Any = None, **kwargs: Any) -> Any:
    from aiocrypt.kek.gcp import GcpKmsKekProvider

    key_name = gcp_server.create_crypto_key(key_ring=f"ring-{os.urandom(4).hex()}")
    if client is None:
        kwargs.setdefault("endpoint", f"http://{gcp_server.target}")
    return GcpKmsKekProvider(key_name, client=client, **{"retry": FAST_RETRY, **kwargs})


def _set(field: str, value: Any) -> Callable[[Any], Any]:
    def change(response: Any) -> Any:
        setattr(response, field, value)
        return response

    return change


@pytest.mark.parametrize(
    "field, value, what",
    [
        ("verified_plaintext_crc32c", False, "plaintext not verified"),
        ("verified_additional_authenticated_data_crc32c", False, "associated data not verified"),
        ("ciphertext_crc32c", 12345, "ciphertext checksum"),
    ],
)
async def test_gcp_encrypt_answer_failing_its_integrity_check_is_retried(
    gcp_server: Any, field: str, value: Any, what: str
) -> None:
    client = gcp_server.async_client()
    proxy = _Answers(client, "encrypt", _set(field, value))
    provider = _gcp_provider(gcp_server, proxy)
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await client.transport.close()
    assert info.value.retryable
    assert f"Encrypt answer failed its integrity check ({what}); corrupted in transit" in str(
        info.value
    )
    assert "gave up after 3 attempts" in str(info.value)
    assert proxy.calls == 3 and gcp_server.calls["encrypt"] == 3


async def test_gcp_encrypt_answered_for_another_key_is_refused(gcp_server: Any) -> None:
    client = gcp_server.async_client()
    other = "projects/p/locations/l/keyRings/r/cryptoKeys/other/cryptoKeyVersions/1"
    proxy = _Answers(client, "encrypt", _set("name", other))
    provider = _gcp_provider(gcp_server, proxy)
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await client.transport.close()
    assert str(info.value) == (
        f"Cloud KMS key {provider.kek_id}: Encrypt answered for another key ({other})"
    )
    assert not info.value.retryable
    assert proxy.calls == 1


async def test_gcp_decrypt_answer_with_a_wrong_checksum_is_retried_then_accepted(
    gcp_server: Any,
) -> None:
    client = gcp_server.async_client()
    corrupt = {"left": 1}

    def once(response: Any) -> Any:
        if corrupt["left"]:
            corrupt["left"] -= 1
            flipped = bytes([response.plaintext[0] ^ 1]) + response.plaintext[1:]
            response.plaintext = flipped  # its checksum no longer holds
        return response

    proxy = _Answers(client, "decrypt", once)
    provider = _gcp_provider(gcp_server, proxy)
    try:
        wrapped = await provider.wrap(DEK, CONTEXT)
        assert await provider.unwrap(wrapped, CONTEXT) == DEK
    finally:
        await client.transport.close()
    assert proxy.calls == 2 and gcp_server.calls["decrypt"] == 2


async def test_gcp_disabled_key_version_is_reported(gcp_server: Any) -> None:
    provider = _gcp_provider(gcp_server)
    gcp_server.set_version_state(f"{provider.key_name}/cryptoKeyVersions/1", enabled=False)
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    assert "the key version is disabled or destroyed" in str(info.value)
    assert "is not enabled, current state is: DISABLED" in str(info.value)
    assert not info.value.retryable
    assert gcp_server.calls["encrypt"] == 1


async def test_gcp_unknown_key_is_reported_with_the_settings(gcp_server: Any) -> None:
    from aiocrypt.kek.gcp import GcpKmsKekProvider

    name = "projects/test-project/locations/global/keyRings/none/cryptoKeys/none"
    provider = GcpKmsKekProvider(name, endpoint=f"http://{gcp_server.target}", retry=FAST_RETRY)
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    assert f"Encrypt: key not found (CryptoKey {name} not found.)" in str(info.value)
    assert "ENCRYPTION_GCP_PROJECT_ID" in str(info.value)
    assert not info.value.retryable


@pytest.fixture
def bare_grpc_server() -> Iterator[int]:
    """A gRPC server that serves no Cloud KMS at all (every call: UNIMPLEMENTED)."""
    import grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


async def test_gcp_endpoint_without_the_service_names_the_error(bare_grpc_server: int) -> None:
    from aiocrypt.kek.gcp import GcpKmsKekProvider

    provider = GcpKmsKekProvider(
        "projects/p/locations/l/keyRings/r/cryptoKeys/k",
        endpoint=f"http://127.0.0.1:{bare_grpc_server}",
        retry=FAST_RETRY,
    )
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    assert ": Encrypt failed: MethodNotImplemented: " in str(info.value)
    assert not info.value.retryable  # a 501 is a ServerError, but retrying cannot help


async def test_gcp_endpoint_without_http_scheme_uses_tls(gcp_server: Any) -> None:
    from google.auth.credentials import AnonymousCredentials

    provider = _gcp_provider(
        gcp_server,
        endpoint=gcp_server.target,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        retry=ONE_TRY,
    )
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
        host = provider._client.transport._host
    finally:
        await provider.close()
    # the endpoint is used as given, over TLS: the plaintext test server fails the handshake
    assert host == gcp_server.target
    assert info.value.retryable and "ServiceUnavailable" in str(info.value)
    assert "Ssl handshake failed" in str(info.value)
    assert gcp_server.calls["encrypt"] == 0


async def test_gcp_without_credentials_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from aiocrypt.kek.gcp import GcpKmsKekProvider

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    provider = GcpKmsKekProvider("projects/p/locations/l/keyRings/r/cryptoKeys/k", retry=FAST_RETRY)
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    assert "no usable Google credentials (DefaultCredentialsError)" in str(info.value)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(info.value)
    assert not info.value.retryable


class _Raising:
    """Proxy of a Cloud KMS client whose ``encrypt`` raises ``error`` (a transport failure)."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    async def encrypt(self, **kwargs: Any) -> Any:
        self.calls += 1
        raise self.error


@pytest.mark.parametrize(
    "error, expected, retryable",
    [
        (ConnectionResetError("peer reset"), "cannot reach Cloud KMS (ConnectionResetError)", True),
        (RuntimeError("s3cr3t detail"), "Encrypt failed unexpectedly (RuntimeError)", False),
    ],
)
async def test_gcp_client_failures_are_translated(
    gcp_server: Any, error: Exception, expected: str, retryable: bool
) -> None:
    client = _Raising(error)
    provider = _gcp_provider(gcp_server, client)
    with pytest.raises(KekProviderError) as info:
        await provider.wrap(DEK, CONTEXT)
    assert str(info.value).startswith(f"Cloud KMS key {provider.kek_id}: ")
    assert expected in str(info.value) and "s3cr3t" not in str(info.value)
    assert info.value.retryable is retryable
    assert client.calls == (3 if retryable else 1)


def test_gcp_refuses_a_malformed_key_name() -> None:
    from aiocrypt.kek.gcp import GcpKmsKekProvider

    with pytest.raises(ValueError, match="must look like projects/<p>/locations/<l>"):
        GcpKmsKekProvider("projects/p/keyRings/r/cryptoKeys/k")


def test_gcp_from_config_reports_a_malformed_name_as_configuration() -> None:
    from aiocrypt._factory import build_kek_provider

    config = EncryptionConfig(
        storage_backend="gcp_kms",
        gcp_project_id="p/extra",
        gcp_location="global",
        gcp_keyring="r",
        gcp_key_name="k",
    )
    with pytest.raises(ConfigurationError, match="gcp_kms backend: the Cloud KMS key name"):
        build_kek_provider(config)


# -- Azure Key Vault ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key_id, kwargs, message",
    [
        ("http://v.vault.azure.net/keys/k", {"credential": object()}, "must look like https://"),
        ("https://v.vault.azure.net/secrets/k", {"credential": object()}, "must look like"),
        ("https://v.vault.azure.net/keys/k_1", {"credential": object()}, "must look like"),
        ("https://v.vault.azure.net/keys/k/v-1", {"credential": object()}, "must look like"),
        ("https://v.vault.azure.net/keys/k", {"tenant_id": "t"}, "give an async credential"),
    ],
)
def test_azure_refuses_bad_settings(key_id: str, kwargs: dict[str, Any], message: str) -> None:
    from aiocrypt.kek.azure import AzureKeyVaultKekProvider

    with pytest.raises(ValueError, match=message):
        AzureKeyVaultKekProvider(key_id, **kwargs)


def test_azure_from_config_reports_missing_credentials_as_configuration() -> None:
    from aiocrypt._factory import build_kek_provider

    config = EncryptionConfig(
        storage_backend="azure_kv",
        azure_vault_url="https://my-vault.vault.azure.net/",
        azure_key_name="app-kek",
        azure_tenant_id="tenant",
    )
    with pytest.raises(ConfigurationError, match="azure_kv backend: give an async credential"):
        build_kek_provider(config)


def _azure(azure_server: Any, key_id: str | None = None, **kwargs: Any) -> Any:
    from aiocrypt.kek.azure import AzureKeyVaultKekProvider

    if key_id is None:
        name = f"kek-{os.urandom(4).hex()}"
        azure_server.create_rsa_key(name)
        key_id = f"{azure_server.url}/keys/{name}"
    kwargs.setdefault("credential", azure_server.async_credential())
    return AzureKeyVaultKekProvider(
        key_id, client_kwargs=azure_server.client_kwargs, **{"retry": FAST_RETRY, **kwargs}
    )


def _inject(azure_server: Any, monkeypatch: pytest.MonkeyPatch, op: str, fault: Any) -> None:
    """Answer ``op`` with ``fault(real answer)`` (or the exception it raises)."""
    real = azure_server._op

    def answer(operation: str, name: str, fn: Any) -> Any:
        if operation == op:
            return fault(real(operation, name, fn))
        return real(operation, name, fn)

    monkeypatch.setattr(azure_server, "_op", answer)


async def test_azure_rejected_token_is_an_authentication_failure(azure_server: Any) -> None:
    provider = _azure(azure_server, credential=azure_server.async_credential("wrong-token"))
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    assert ": get: authentication failed (" in str(info.value)
    assert "ENCRYPTION_AZURE_CLIENT_SECRET" in str(info.value)
    assert "wrong-token" not in str(info.value)
    assert not info.value.retryable
    assert azure_server.calls["get_key"] == 0


async def test_azure_unknown_key_names_the_settings(azure_server: Any) -> None:
    provider = _azure(azure_server, f"{azure_server.url}/keys/no-such-key")
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    assert ": get: key not found (" in str(info.value)
    assert "ENCRYPTION_AZURE_KEY_NAME" in str(info.value)
    assert not info.value.retryable


async def test_azure_legacy_envelope_with_bad_ciphertext_is_refused(azure_server: Any) -> None:
    provider = _azure(azure_server, allow_unsigned_legacy=True)
    name = provider.key_name
    version = azure_server.key_id(name).rsplit("/", 1)[1]
    encrypted = os.urandom(256)
    envelope = (
        b"\x01"
        + bytes([len(version)])
        + version.encode()
        + len(encrypted).to_bytes(2, "big")
        + encrypted
        + os.urandom(32)
    )
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.unwrap(envelope, CONTEXT)
    finally:
        await provider.close()
    assert ": unwrapKey refused (" in str(info.value)
    assert "the wrapped key was altered or was made under another key" in str(info.value)
    assert not info.value.retryable
    assert azure_server.calls["unwrap_key"] == 1


async def test_azure_other_http_status_is_reported_with_its_code(
    azure_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    KeyVaultError = sys.modules[type(azure_server).__module__].KeyVaultError

    def conflict(answer: Any) -> Any:
        raise KeyVaultError(409, "Conflict", "The key is being recovered.")

    _inject(azure_server, monkeypatch, "sign", conflict)
    provider = _azure(azure_server)
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    assert ": sign failed with HTTP 409: " in str(info.value)
    assert "The key is being recovered." in str(info.value)
    assert not info.value.retryable


async def test_azure_key_that_is_not_rsa_is_refused(
    azure_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def elliptic(answer: Any) -> Any:
        status, bundle = answer
        bundle["key"] = {"kid": bundle["key"]["kid"], "kty": "EC", "crv": "P-256"}
        return status, bundle

    _inject(azure_server, monkeypatch, "get_key", elliptic)
    provider = _azure(azure_server)
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    assert str(info.value) == (
        f"Azure Key Vault key {provider.kek_id}: Key Vault returned no RSA key for version newest"
    )
    assert azure_server.calls["sign"] == 0


async def test_azure_signature_that_does_not_verify_fails_the_wrap(
    azure_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def flipped(answer: Any) -> Any:
        status, body = answer
        value = body["value"]
        body["value"] = ("B" if value[0] == "A" else "A") + value[1:]
        return status, body

    _inject(azure_server, monkeypatch, "sign", flipped)
    provider = _azure(azure_server)
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    assert "Key Vault's PS256 signature does not verify with the public key of version" in str(
        info.value
    )
    assert not info.value.retryable
    assert azure_server.calls["sign"] == 1


class _FailingCredential:
    """An async credential whose token request fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        raise self.error

    async def get_token_info(self, *scopes: str, **kwargs: Any) -> Any:
        raise self.error

    async def close(self) -> None:
        pass


def _azure_errors() -> list[tuple[Exception, str]]:
    from azure.core.exceptions import AzureError

    return [
        (AzureError("token cache unavailable"), "get failed: AzureError: token cache unavailable"),
        (RuntimeError("s3cr3t detail"), "get failed unexpectedly (RuntimeError)"),
    ]


@pytest.mark.parametrize("index", [0, 1])
async def test_azure_credential_failures_are_translated(azure_server: Any, index: int) -> None:
    error, expected = _azure_errors()[index]
    provider = _azure(azure_server, credential=_FailingCredential(error))
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    assert str(info.value).startswith(f"Azure Key Vault key {provider.kek_id}: ")
    assert expected in str(info.value) and "s3cr3t" not in str(info.value)
    assert not info.value.retryable


@pytest.mark.parametrize(
    "version", [b"\xff\xfe", b"ab-c"], ids=["not ascii", "not a Key Vault version"]
)
async def test_azure_envelope_with_a_bad_version_is_malformed(version: bytes) -> None:
    from aiocrypt.kek.azure import AzureKeyVaultKekProvider

    provider = AzureKeyVaultKekProvider(
        "https://v.vault.azure.net/keys/k",
        credential=kms_servers.AsyncStaticTokenCredential("t"),
    )
    envelope = b"\x02" + bytes([len(version)]) + version + b"\x00\x01x\x00\x01s"
    try:
        with pytest.raises(KekProviderError, match="the wrapped key is malformed") as info:
            await provider.unwrap(envelope, CONTEXT)
    finally:
        await provider.close()
    assert not info.value.retryable
