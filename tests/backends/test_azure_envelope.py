"""The Azure Key Vault envelope holds against whoever can write the key store (issue 14).

RSA wrapping needs only the public key, which Key Vault hands to anyone allowed
``get``. An attacker who can write the key store and has that public key wraps a
DEK of their choice; the provider must refuse it, in the old (0x01, HMAC keyed
by the DEK) and the new (0x02, signed by the vault key) layout alike, before
Key Vault unwraps anything. Everything runs against the HTTPS Key Vault test
server through the real azure-keyvault-keys SDK. The frozen vectors
(tests/vectors/azure_kek.json) pin both envelope versions.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("azure.keyvault.keys")

from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys.aio import KeyClient
from azure.keyvault.keys.crypto import KeyWrapAlgorithm, SignatureAlgorithm
from azure.keyvault.keys.crypto.aio import CryptographyClient
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from aiocrypt import EncryptionConfig, KekProviderError
from aiocrypt._crypto import derive_key
from aiocrypt.kek._base import canonical_context
from aiocrypt.kek.azure import AzureKeyVaultKekProvider, from_config

from .conftest import FAST_RETRY

CONTEXT = {"aiocrypt_key_id": "pii-v1-0a0b0c0d", "aiocrypt_key_type": "pii"}
OTHER_CONTEXT = {"aiocrypt_key_id": "pii-v2-0e0f0a0b", "aiocrypt_key_type": "pii"}
VECTORS = json.loads(
    (Path(__file__).parents[1] / "vectors" / "azure_kek.json").read_text(encoding="utf-8")
)


@pytest.fixture
async def key_name(azure_server: Any) -> str:
    name = f"kek-{secrets.token_hex(4)}"
    azure_server.create_rsa_key(name)
    azure_server.calls.reset()
    return name


def provider(
    server: Any, name: str, version: str | None = None, **kwargs: Any
) -> AzureKeyVaultKekProvider:
    suffix = f"/{version}" if version else ""
    return AzureKeyVaultKekProvider(
        f"{server.url}/keys/{name}{suffix}",
        credential=server.async_credential(),
        client_kwargs=server.client_kwargs,
        retry=FAST_RETRY,
        **kwargs,
    )


@pytest.fixture
async def kek(azure_server: Any, key_name: str) -> AsyncIterator[AzureKeyVaultKekProvider]:
    kek = provider(azure_server, key_name)
    try:
        yield kek
    finally:
        await kek.close()


def parse(envelope: bytes) -> tuple[str, bytes, bytes]:
    """(version, body, trailer) of an envelope, read independently of the provider."""
    vlen = envelope[1]
    version = envelope[2 : 2 + vlen].decode()
    clen = int.from_bytes(envelope[2 + vlen : 4 + vlen], "big")
    end = 4 + vlen + clen
    trailer = envelope[end:] if envelope[0] == 1 else envelope[end + 2 :]
    return version, envelope[:end], trailer


def signed_digest(body: bytes, context: dict[str, str]) -> bytes:
    return hashlib.sha256(
        b"aiocrypt/azure-kv/envelope/v2\x00" + body + canonical_context(context)
    ).digest()


def dek_keyed_tag(dek: bytes, body: bytes, context: dict[str, str]) -> bytes:
    """The 0x01 tag: anyone who chose the DEK can compute it."""
    return hmac.new(
        derive_key(dek, b"azure-kv-context"), body + canonical_context(context), hashlib.sha256
    ).digest()


# -- the attacker: read and write access to the key store, the public key, no sign ----------


FORGERIES = [
    "legacy layout, HMAC keyed by the chosen DEK",
    "signed layout, random signature",
    "signed layout, HMAC keyed by the chosen DEK",
    "signed layout, the signature of a genuine envelope",
    "signed layout, no signature",
]


async def forge(
    server: Any, name: str, dek: bytes, context: dict[str, str], genuine: bytes
) -> dict[str, bytes]:
    """Envelopes wrapping ``dek`` (the attacker's choice), one per entry of FORGERIES."""
    # all the attacker learns from the vault: the public key, as the SDK's get_key gives it
    async with KeyClient(server.url, server.async_credential(), **server.client_kwargs) as keys:
        key = await keys.get_key(name)
    version = (key.properties.version or "").encode()
    # wrapped exactly as the provider wraps: the SDK, locally, with the public key alone
    async with CryptographyClient.from_jwk(key.key) as local:
        encrypted = (await local.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)).encrypted_key
    head = len(version).to_bytes(1, "big") + version + len(encrypted).to_bytes(2, "big") + encrypted
    legacy, signed = b"\x01" + head, b"\x02" + head
    tag = dek_keyed_tag(dek, signed, context)
    stolen = parse(genuine)[2]
    envelopes = [
        legacy + dek_keyed_tag(dek, legacy, context),
        signed + (256).to_bytes(2, "big") + os.urandom(256),
        signed + len(tag).to_bytes(2, "big") + tag,
        signed + len(stolen).to_bytes(2, "big") + stolen,
        signed + b"\x00\x00",
    ]
    return dict(zip(FORGERIES, envelopes, strict=True))


@pytest.mark.parametrize("forgery", FORGERIES)
async def test_a_public_key_holder_cannot_mint_a_wrapped_dek(
    azure_server: Any, key_name: str, kek: AzureKeyVaultKekProvider, forgery: str
) -> None:
    genuine = await kek.wrap(os.urandom(32), CONTEXT)
    chosen = os.urandom(32)
    envelope = (await forge(azure_server, key_name, chosen, CONTEXT, genuine))[forgery]
    azure_server.calls.reset()
    with pytest.raises(KekProviderError) as info:
        await kek.unwrap(envelope, CONTEXT)
    assert not info.value.retryable
    assert chosen.hex() not in str(info.value)
    assert azure_server.calls["unwrap_key"] == 0  # refused before Key Vault unwraps anything
    # a fresh provider (a restarted process) refuses it too
    fresh = provider(azure_server, key_name)
    try:
        with pytest.raises(KekProviderError):
            await fresh.unwrap(envelope, CONTEXT)
    finally:
        await fresh.close()
    assert azure_server.calls["unwrap_key"] == 0


async def test_the_legacy_option_admits_forgeries_which_is_why_it_is_off(
    azure_server: Any, key_name: str, kek: AzureKeyVaultKekProvider
) -> None:
    chosen = os.urandom(32)
    genuine = await kek.wrap(os.urandom(32), CONTEXT)
    envelope = (await forge(azure_server, key_name, chosen, CONTEXT, genuine))[FORGERIES[0]]
    legacy = provider(azure_server, key_name, allow_unsigned_legacy=True)
    try:
        assert await legacy.unwrap(envelope, CONTEXT) == chosen
    finally:
        await legacy.close()
    with pytest.raises(KekProviderError, match="aiocrypt keys rewrap"):
        await kek.unwrap(envelope, CONTEXT)


# -- the signed envelope --------------------------------------------------------------------


async def test_the_envelope_is_signed_by_the_vault_key(
    azure_server: Any, key_name: str, kek: AzureKeyVaultKekProvider
) -> None:
    dek = os.urandom(32)
    envelope = await kek.wrap(dek, CONTEXT)
    version, body, signature = parse(envelope)
    assert envelope[0] == 2 and dek not in envelope
    assert version == azure_server.key_id(key_name).rsplit("/", 1)[1]
    # PS256 (RFC 7518: MGF1-SHA-256, 32-byte salt) by the private key, over the documented digest
    azure_server.public_key(key_name).verify(
        signature,
        signed_digest(body, CONTEXT),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        Prehashed(hashes.SHA256()),
    )
    calls = azure_server.calls.snapshot()
    assert calls.get("sign") == 1 and calls.get("wrap_key", 0) == 0, calls  # wrapped locally
    assert await kek.unwrap(envelope, CONTEXT) == dek
    assert azure_server.calls["unwrap_key"] == 1


async def test_a_fresh_process_unwraps_with_one_get_and_one_unwrap(
    azure_server: Any, key_name: str, kek: AzureKeyVaultKekProvider
) -> None:
    dek = os.urandom(32)
    envelope = await kek.wrap(dek, CONTEXT)
    azure_server.calls.reset()
    fresh = provider(azure_server, key_name)
    try:
        assert await fresh.unwrap(envelope, CONTEXT) == dek
        assert await fresh.unwrap(envelope, CONTEXT) == dek
    finally:
        await fresh.close()
    assert azure_server.calls.snapshot() == {"get_key": 1, "unwrap_key": 2}


async def test_another_context_is_refused_before_unwrapping(
    azure_server: Any, kek: AzureKeyVaultKekProvider
) -> None:
    envelope = await kek.wrap(os.urandom(32), CONTEXT)
    azure_server.calls.reset()
    with pytest.raises(KekProviderError, match="does not belong to this context") as info:
        await kek.unwrap(envelope, OTHER_CONTEXT)
    assert kek.kek_id in str(info.value) and not info.value.retryable
    assert azure_server.calls.total() == 0


async def test_key_versions_are_recorded_and_cannot_be_relabelled(
    azure_server: Any, key_name: str, kek: AzureKeyVaultKekProvider
) -> None:
    first_dek = os.urandom(32)
    first = await kek.wrap(first_dek, CONTEXT)
    rotated = azure_server.create_rsa_key(key_name).rsplit("/", 1)[1]
    await kek.close()  # a versionless provider picks the newest version when it restarts
    second_dek = os.urandom(32)
    second = await kek.wrap(second_dek, CONTEXT)
    assert parse(second)[0] == rotated != parse(first)[0]
    assert await kek.unwrap(first, CONTEXT) == first_dek
    assert await kek.unwrap(second, CONTEXT) == second_dek
    # the same signature under the other version's label: the version is signed too
    relabelled = first.replace(parse(first)[0].encode(), rotated.encode(), 1)
    azure_server.calls.reset()
    with pytest.raises(KekProviderError, match="does not belong to this context"):
        await kek.unwrap(relabelled, CONTEXT)
    assert azure_server.calls["unwrap_key"] == 0


async def test_wrapping_needs_sign_permission(
    azure_server: Any, key_name: str, kek: AzureKeyVaultKekProvider
) -> None:
    azure_server.denied_operations = {"sign"}
    with pytest.raises(KekProviderError, match=r"sign: access denied .*\bsign\b") as info:
        await kek.wrap(os.urandom(32), CONTEXT)
    assert not info.value.retryable


# -- frozen envelopes -------------------------------------------------------------------------


@pytest.fixture
def vector_key(azure_server: Any) -> str:
    """The vectors' fixed RSA key, under a fresh name (envelopes record only the version)."""
    key = serialization.load_pem_private_key(VECTORS["private_key_pem"].encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    name = f"vector-{secrets.token_hex(4)}"
    azure_server.import_rsa_key(name, key, VECTORS["key_version"])
    azure_server.calls.reset()
    return name


def vector_cases(envelope: int) -> pytest.MarkDecorator:
    cases = [v for v in VECTORS["vectors"] if v["envelope"] == envelope]
    assert len(cases) >= 2
    return pytest.mark.parametrize(
        "vector", cases, ids=[f"v{envelope}-{i}" for i in range(len(cases))]
    )


def vector_provider(
    server: Any, name: str, vector: dict[str, Any], **kwargs: Any
) -> AzureKeyVaultKekProvider:
    version = VECTORS["key_version"] if vector["configured_version"] else None
    return provider(server, name, version, **kwargs)


@vector_cases(2)
async def test_frozen_signed_envelopes_unwrap(
    azure_server: Any, vector_key: str, vector: dict[str, Any]
) -> None:
    kek = vector_provider(azure_server, vector_key, vector)
    envelope = bytes.fromhex(vector["wrapped"])
    try:
        assert await kek.unwrap(envelope, vector["context"]) == bytes.fromhex(vector["dek"])
        with pytest.raises(KekProviderError, match="does not belong to this context"):
            await kek.unwrap(envelope, OTHER_CONTEXT)
    finally:
        await kek.close()


@vector_cases(1)
async def test_frozen_legacy_envelopes_unwrap_only_with_the_option(
    azure_server: Any, vector_key: str, vector: dict[str, Any]
) -> None:
    envelope, dek = bytes.fromhex(vector["wrapped"]), bytes.fromhex(vector["dek"])
    strict = vector_provider(azure_server, vector_key, vector)
    try:
        with pytest.raises(KekProviderError) as info:
            await strict.unwrap(envelope, vector["context"])
    finally:
        await strict.close()
    message = str(info.value)
    assert "unsigned 0x01 envelope" in message and "can forge" in message
    assert "ENCRYPTION_AZURE_ALLOW_UNSIGNED_LEGACY=true aiocrypt keys rewrap" in message
    assert not info.value.retryable and azure_server.calls["unwrap_key"] == 0

    legacy = vector_provider(azure_server, vector_key, vector, allow_unsigned_legacy=True)
    try:
        assert await legacy.unwrap(envelope, vector["context"]) == dek
        with pytest.raises(KekProviderError, match="does not belong to this context"):
            await legacy.unwrap(envelope, OTHER_CONTEXT)
        # adoption, as `aiocrypt keys rewrap` does it: unwrap, wrap again (now signed)
        adopted = await legacy.wrap(dek, vector["context"])
    finally:
        await legacy.close()
    assert adopted[0] == 2
    strict = vector_provider(azure_server, vector_key, vector)
    try:
        assert await strict.unwrap(adopted, vector["context"]) == dek
    finally:
        await strict.close()


@pytest.mark.parametrize(
    "value, expected", [(None, False), ("false", False), ("true", True), ("1", True)]
)
async def test_the_legacy_option_from_the_environment(
    value: str | None, expected: bool, tmp_path: Path
) -> None:
    environ = {
        "ENCRYPTION_KEY_STORAGE_BACKEND": "azure_kv",
        "ENCRYPTION_AZURE_VAULT_URL": "https://my-vault.vault.azure.net",
        "ENCRYPTION_AZURE_KEY_NAME": "app-kek",
        "ENCRYPTION_AZURE_TENANT_ID": "t",
        "ENCRYPTION_AZURE_CLIENT_ID": "c",
        "ENCRYPTION_AZURE_CLIENT_SECRET": "s",
    }
    if value is not None:
        environ["ENCRYPTION_AZURE_ALLOW_UNSIGNED_LEGACY"] = value
    (tmp_path / "encryption.json").write_text("{}")
    config = EncryptionConfig.from_env(environ, config_file=tmp_path / "encryption.json")
    kek = from_config(config)
    try:
        assert kek.allow_unsigned_legacy is expected
    finally:
        await kek.close()


# -- the test server's sign / verify, through the SDK -----------------------------------------


@pytest.mark.parametrize(
    "algorithm", [SignatureAlgorithm.ps256, SignatureAlgorithm.rs256, SignatureAlgorithm.ps512]
)
async def test_server_signs_as_key_vault_does(
    azure_server: Any, key_name: str, algorithm: SignatureAlgorithm
) -> None:
    hash_type = hashes.SHA512 if algorithm is SignatureAlgorithm.ps512 else hashes.SHA256
    digest = hashlib.new(hash_type.name, b"envelope").digest()
    credential = azure_server.async_credential()
    kid = azure_server.key_id(key_name)
    async with CryptographyClient(kid, credential, **azure_server.client_kwargs) as crypto:
        signed = await crypto.sign(algorithm, digest)  # remote: a public key cannot sign
        assert signed.key_id == kid
        # the SDK verifies locally with the public key it fetched
        assert (await crypto.verify(algorithm, digest, signed.signature)).is_valid
        assert not (await crypto.verify(algorithm, bytes(len(digest)), signed.signature)).is_valid
        with pytest.raises(HttpResponseError) as info:
            await crypto.sign(algorithm, digest[:20])
        assert info.value.status_code == 400
    assert azure_server.calls["sign"] == 2 and azure_server.calls["verify"] == 0
    # without get permission the SDK verifies remotely
    azure_server.denied_operations = {"get_key"}
    async with CryptographyClient(kid, credential, **azure_server.client_kwargs) as remote:
        assert (await remote.verify(algorithm, digest, signed.signature)).is_valid
        assert not (await remote.verify(algorithm, bytes(len(digest)), signed.signature)).is_valid
    assert azure_server.calls["verify"] == 2
