"""Drive the loopback KMS test servers with the real client libraries.

These tests check the test servers themselves (not aiocrypt): every call goes
over a socket on 127.0.0.1 through hvac, azure-keyvault-keys (aio),
google-cloud-kms (grpc.aio) and aiobotocore, exactly as a KEK provider would.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

hvac = pytest.importorskip("hvac")
pytest.importorskip("azure.keyvault.keys")
pytest.importorskip("google.cloud.kms_v1")
pytest.importorskip("aiobotocore")
pytest.importorskip("moto")

from aiobotocore.session import get_session  # noqa: E402
from azure.core.exceptions import (  # noqa: E402
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.keyvault.keys.aio import KeyClient  # noqa: E402
from azure.keyvault.keys.crypto import KeyWrapAlgorithm  # noqa: E402
from azure.keyvault.keys.crypto.aio import CryptographyClient  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402
from google.api_core import exceptions as gexc  # noqa: E402
from google.cloud import kms_v1  # noqa: E402

try:  # rootdir on sys.path (python -m pytest, or tests/ being a package)
    from tests.kms_servers import (
        start_azure_keyvault_server,
        start_gcp_kms_server,
        start_moto_kms_server,
        start_vault_server,
    )
    from tests.kms_servers.gcp import crc32c
except ImportError:  # plain `pytest` with rootdir-less sys.path: tests/ itself is on sys.path
    from kms_servers import (  # type: ignore[no-redef]
        start_azure_keyvault_server,
        start_gcp_kms_server,
        start_moto_kms_server,
        start_vault_server,
    )
    from kms_servers.gcp import crc32c

if TYPE_CHECKING:  # the servers' types, as mypy sees tests/kms_servers (as kms_servers)
    from kms_servers import ServerBase
    from kms_servers.azure import AzureKeyVaultServer
    from kms_servers.gcp import GcpKmsServer
    from kms_servers.moto_kms import MotoKmsServer
    from kms_servers.vault import VaultTransitServer

_Server = TypeVar("_Server", bound="ServerBase")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _fresh(server: _Server) -> _Server:
    server.access_denied = False
    server.denied_operations = set()
    server.calls.reset()
    return server


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def _vault_server() -> Iterator[VaultTransitServer]:
    with start_vault_server() as server:
        yield server


@pytest.fixture
def vault(_vault_server: VaultTransitServer) -> VaultTransitServer:
    return _fresh(_vault_server)


@pytest.fixture
def vault_client(vault: VaultTransitServer) -> Iterator[Any]:  # an hvac.Client (untyped)
    client = hvac.Client(url=vault.url, token=vault.token)
    yield client
    client.adapter.close()


@pytest.fixture(scope="module")
def _azure_server() -> Iterator[AzureKeyVaultServer]:
    with start_azure_keyvault_server() as server:
        yield server


@pytest.fixture
def azure_kv(_azure_server: AzureKeyVaultServer) -> AzureKeyVaultServer:
    return _fresh(_azure_server)


@pytest.fixture(scope="module")
def _gcp_server() -> Iterator[GcpKmsServer]:
    with start_gcp_kms_server() as server:
        yield server


@pytest.fixture
def gcp_kms(_gcp_server: GcpKmsServer) -> GcpKmsServer:
    return _fresh(_gcp_server)


@pytest.fixture(scope="module")
def _moto_server() -> Iterator[MotoKmsServer]:
    with start_moto_kms_server() as server:
        yield server


@pytest.fixture
def moto_kms(_moto_server: MotoKmsServer) -> MotoKmsServer:
    return _fresh(_moto_server)


# ----------------------------------------------------------------- Vault (hvac)


def test_vault_health_and_token_check(vault: VaultTransitServer, vault_client: Any) -> None:
    assert vault_client.is_authenticated() is True
    assert hvac.Client(url=vault.url, token="hvs.wrong").is_authenticated() is False
    health = vault_client.sys.read_health_status(method="GET")
    assert health["initialized"] is True and health["sealed"] is False
    assert vault.calls["lookup_self"] == 1
    assert vault.calls["permission_denied"] == 1

    bad = hvac.Client(url=vault.url, token="hvs.wrong")
    with pytest.raises(hvac.exceptions.Forbidden) as info:
        bad.secrets.transit.encrypt_data("any", plaintext=_b64(b"x"))
    assert info.value.json == {"errors": ["permission denied"]}
    assert vault.calls["encrypt"] == 0  # rejected before reaching the operation


def test_vault_derived_key_roundtrip_and_wrong_context(
    vault: VaultTransitServer, vault_client: Any
) -> None:
    transit = vault_client.secrets.transit
    transit.create_key("derived-kek", derived=True)
    ctx = _b64(b"tenant-a/users/email")
    dek = os.urandom(32)

    encrypted = transit.encrypt_data("derived-kek", plaintext=_b64(dek), context=ctx)
    ciphertext = encrypted["data"]["ciphertext"]
    assert ciphertext.startswith("vault:v1:")
    assert encrypted["data"]["key_version"] == 1

    decrypted = transit.decrypt_data("derived-kek", ciphertext=ciphertext, context=ctx)
    assert base64.b64decode(decrypted["data"]["plaintext"]) == dek

    with pytest.raises(hvac.exceptions.InvalidRequest) as info:
        transit.decrypt_data(
            "derived-kek", ciphertext=ciphertext, context=_b64(b"tenant-b/users/email")
        )
    assert info.value.errors == ["cipher: message authentication failed"]

    with pytest.raises(hvac.exceptions.InvalidRequest) as info:
        transit.encrypt_data("derived-kek", plaintext=_b64(dek))
    assert "missing 'context' for key derivation" in info.value.errors[0]

    prefix, body = ciphertext.rsplit(":", 1)
    raw = bytearray(base64.b64decode(body))
    raw[-1] ^= 1  # flip one bit of the GCM tag
    tampered = f"{prefix}:{_b64(bytes(raw))}"
    with pytest.raises(hvac.exceptions.InvalidRequest):
        transit.decrypt_data("derived-kek", ciphertext=tampered, context=ctx)

    assert vault.calls["create_key"] == 1
    assert vault.calls["encrypt"] == 2
    assert vault.calls["decrypt"] == 3


def test_vault_rotation_and_min_decryption_version(
    vault: VaultTransitServer, vault_client: Any
) -> None:
    transit = vault_client.secrets.transit
    transit.create_key("rotating-kek")
    old = transit.encrypt_data("rotating-kek", plaintext=_b64(b"old dek"))["data"]["ciphertext"]

    rotated = transit.rotate_key("rotating-kek")
    assert rotated["data"]["latest_version"] == 2
    new = transit.encrypt_data("rotating-kek", plaintext=_b64(b"new dek"))["data"]["ciphertext"]
    assert new.startswith("vault:v2:")

    key = transit.read_key("rotating-kek")["data"]
    assert key["latest_version"] == 2 and set(key["keys"]) == {"1", "2"}
    assert key["type"] == "aes256-gcm96" and key["derived"] is False

    # Both versions decrypt until min_decryption_version excludes v1.
    assert (
        base64.b64decode(transit.decrypt_data("rotating-kek", ciphertext=old)["data"]["plaintext"])
        == b"old dek"
    )
    transit.update_key_configuration("rotating-kek", min_decryption_version=2)
    with pytest.raises(hvac.exceptions.InvalidRequest) as info:
        transit.decrypt_data("rotating-kek", ciphertext=old)
    assert "too old" in info.value.errors[0]
    assert (
        base64.b64decode(transit.decrypt_data("rotating-kek", ciphertext=new)["data"]["plaintext"])
        == b"new dek"
    )
    assert vault.calls["rotate_key"] == 1 and vault.calls["update_key_config"] == 1


def test_vault_unknown_key_and_access_denied(vault: VaultTransitServer, vault_client: Any) -> None:
    transit = vault_client.secrets.transit
    with pytest.raises(hvac.exceptions.InvalidPath):
        transit.read_key("no-such-key")
    with pytest.raises(hvac.exceptions.InvalidRequest) as info:
        transit.decrypt_data("no-such-key", ciphertext="vault:v1:AAAA")
    assert info.value.errors == ["encryption key not found"]

    transit.create_key("denied-kek")
    vault.access_denied = True
    with pytest.raises(hvac.exceptions.Forbidden) as info:
        transit.encrypt_data("denied-kek", plaintext=_b64(b"x"))
    assert info.value.json == {"errors": ["permission denied"]}
    assert vault_client.is_authenticated() is True  # token itself is still valid
    assert vault.calls["encrypt"] == 1


def test_vault_custom_mount_point(vault: VaultTransitServer, vault_client: Any) -> None:
    vault_client.sys.enable_secrets_engine("transit", path="aiocrypt-transit")
    transit = vault_client.secrets.transit
    transit.create_key("kek", mount_point="aiocrypt-transit")
    ct = transit.encrypt_data("kek", plaintext=_b64(b"dek"), mount_point="aiocrypt-transit")[
        "data"
    ]["ciphertext"]
    pt = transit.decrypt_data("kek", ciphertext=ct, mount_point="aiocrypt-transit")["data"][
        "plaintext"
    ]
    assert base64.b64decode(pt) == b"dek"
    with pytest.raises(hvac.exceptions.InvalidRequest):  # key lives only under the other mount
        transit.decrypt_data("kek", ciphertext=ct)


# ----------------------------------------------------------------- Azure Key Vault (aio SDK)


@pytest.mark.asyncio
async def test_azure_create_wrap_unwrap_with_challenge(azure_kv: AzureKeyVaultServer) -> None:
    credential = azure_kv.async_credential()
    async with KeyClient(azure_kv.url, credential, **azure_kv.client_kwargs) as keys:
        key = await keys.create_rsa_key("aiocrypt-kek", size=2048)
    assert key.id.startswith(f"{azure_kv.url}/keys/aiocrypt-kek/")
    assert "wrapKey" in key.key_operations and "unwrapKey" in key.key_operations

    dek = os.urandom(32)
    async with CryptographyClient(key.id, credential, **azure_kv.client_kwargs) as crypto:
        wrapped = await crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
        assert wrapped.key_id == key.id and len(wrapped.encrypted_key) == 256
        unwrapped = await crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key)
    assert unwrapped.key == dek

    # The SDK answered the bearer challenge with a token for the vault resource and tenant.
    assert (("https://vault.azure.net/.default",), azure_kv.tenant_id) in credential.requests
    # Real SDK behaviour: GET the key, wrap locally with the public JWK, unwrap remotely.
    assert azure_kv.calls["create_key"] == 1
    assert azure_kv.calls["get_key"] == 1
    assert azure_kv.calls["wrap_key"] == 0
    assert azure_kv.calls["unwrap_key"] == 1


@pytest.mark.asyncio
async def test_azure_remote_wrap_when_get_is_forbidden(azure_kv: AzureKeyVaultServer) -> None:
    key_id = azure_kv.create_rsa_key("wrap-only-kek")
    azure_kv.denied_operations = {"get_key"}
    credential = azure_kv.async_credential()
    async with CryptographyClient(key_id, credential, **azure_kv.client_kwargs) as crypto:
        wrapped = await crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"k" * 32)
        unwrapped = await crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key)
    assert unwrapped.key == b"k" * 32
    assert azure_kv.calls["get_key"] == 1
    assert azure_kv.calls["wrap_key"] == 1
    assert azure_kv.calls["unwrap_key"] == 1


@pytest.mark.asyncio
async def test_azure_access_denied_is_403(azure_kv: AzureKeyVaultServer) -> None:
    key_id = azure_kv.create_rsa_key("denied-kek")
    azure_kv.access_denied = True
    async with CryptographyClient(
        key_id, azure_kv.async_credential(), **azure_kv.client_kwargs
    ) as crypto:
        with pytest.raises(HttpResponseError) as info:
            await crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"k" * 32)
    assert info.value.status_code == 403
    assert info.value.error is not None and info.value.error.code == "Forbidden"
    assert azure_kv.calls["wrap_key"] == 1


@pytest.mark.asyncio
async def test_azure_wrong_token_and_bad_ciphertext(azure_kv: AzureKeyVaultServer) -> None:
    key_id = azure_kv.create_rsa_key("auth-kek")
    info: pytest.ExceptionInfo[HttpResponseError]  # a ClientAuthenticationError, then a 400
    async with CryptographyClient(
        key_id, azure_kv.async_credential("not-the-token"), **azure_kv.client_kwargs
    ) as c:
        with pytest.raises(ClientAuthenticationError) as info:
            await c.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"\0" * 256)
    assert info.value.status_code == 401
    assert azure_kv.calls["unwrap_key"] == 0

    async with CryptographyClient(
        key_id, azure_kv.async_credential(), **azure_kv.client_kwargs
    ) as crypto:
        with pytest.raises(HttpResponseError) as info:
            await crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"\0" * 256)
    assert info.value.status_code == 400

    async with KeyClient(
        azure_kv.url, azure_kv.async_credential(), **azure_kv.client_kwargs
    ) as keys:
        with pytest.raises(ResourceNotFoundError):
            await keys.get_key("no-such-key")


@pytest.mark.asyncio
async def test_azure_rotation_keeps_old_versions(azure_kv: AzureKeyVaultServer) -> None:
    credential = azure_kv.async_credential()
    async with KeyClient(azure_kv.url, credential, **azure_kv.client_kwargs) as keys:
        v1 = await keys.create_rsa_key("rotating-kek", size=2048)
        v2 = await keys.rotate_key("rotating-kek")
        latest = await keys.get_key("rotating-kek")
    assert v1.properties.version != v2.properties.version
    assert latest.id == v2.id
    async with CryptographyClient(v1.id, credential, **azure_kv.client_kwargs) as crypto:
        wrapped = await crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep, b"old")
        assert (
            await crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep, wrapped.encrypted_key)
        ).key == b"old"


# ----------------------------------------------------------------- GCP Cloud KMS (grpc.aio)


async def _gcp_key(
    client: kms_v1.KeyManagementServiceAsyncClient, ring_id: str, key_id: str
) -> str:
    ring = await client.create_key_ring(
        request={
            "parent": "projects/test-project/locations/global",
            "key_ring_id": ring_id,
            "key_ring": {},
        }
    )
    key = await client.create_crypto_key(
        request={
            "parent": ring.name,
            "crypto_key_id": key_id,
            "crypto_key": {"purpose": kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT},
        }
    )
    assert key.primary.name == f"{key.name}/cryptoKeyVersions/1"
    name: str = key.name
    return name


@pytest.mark.asyncio
async def test_gcp_encrypt_decrypt_crc32c_and_aad(gcp_kms: GcpKmsServer) -> None:
    client = gcp_kms.async_client()
    try:
        name = await _gcp_key(client, "ring-a", "kek")
        dek, aad = os.urandom(32), b"tenant-a/users/email"
        enc = await client.encrypt(
            request={
                "name": name,
                "plaintext": dek,
                "additional_authenticated_data": aad,
                "plaintext_crc32c": crc32c(dek),
                "additional_authenticated_data_crc32c": crc32c(aad),
            }
        )
        assert enc.name == f"{name}/cryptoKeyVersions/1"
        assert enc.verified_plaintext_crc32c and enc.verified_additional_authenticated_data_crc32c
        assert enc.ciphertext_crc32c == crc32c(enc.ciphertext)
        assert enc.protection_level == kms_v1.ProtectionLevel.SOFTWARE

        dec = await client.decrypt(
            request={
                "name": name,
                "ciphertext": enc.ciphertext,
                "additional_authenticated_data": aad,
                "ciphertext_crc32c": crc32c(enc.ciphertext),
            }
        )
        assert dec.plaintext == dek and dec.used_primary
        assert dec.plaintext_crc32c == crc32c(dek)

        with pytest.raises(gexc.InvalidArgument, match="Decryption failed"):
            await client.decrypt(
                request={
                    "name": name,
                    "ciphertext": enc.ciphertext,
                    "additional_authenticated_data": b"tenant-b",
                }
            )
        with pytest.raises(gexc.InvalidArgument, match="plaintext_crc32c"):
            await client.encrypt(
                request={"name": name, "plaintext": dek, "plaintext_crc32c": crc32c(dek) ^ 1}
            )

        other = await client.create_crypto_key(
            request={
                "parent": name.rsplit("/cryptoKeys/", 1)[0],
                "crypto_key_id": "other",
                "crypto_key": {"purpose": kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT},
            }
        )
        with pytest.raises(gexc.InvalidArgument):
            await client.decrypt(
                request={
                    "name": other.name,
                    "ciphertext": enc.ciphertext,
                    "additional_authenticated_data": aad,
                }
            )
        assert gcp_kms.calls["encrypt"] == 2
        assert gcp_kms.calls["decrypt"] == 3
    finally:
        await client.transport.close()


@pytest.mark.asyncio
async def test_gcp_rotation_decrypts_old_ciphertext(gcp_kms: GcpKmsServer) -> None:
    client = gcp_kms.async_client()
    try:
        name = await _gcp_key(client, "ring-rot", "kek")
        old = await client.encrypt(request={"name": name, "plaintext": b"old"})
        version = await client.create_crypto_key_version(
            request={"parent": name, "crypto_key_version": {}}
        )
        assert version.name == f"{name}/cryptoKeyVersions/2"
        key = await client.update_crypto_key_primary_version(
            request={"name": name, "crypto_key_version_id": "2"}
        )
        assert key.primary.name == version.name
        new = await client.encrypt(request={"name": name, "plaintext": b"new"})
        assert new.name == version.name

        dec_old = await client.decrypt(request={"name": name, "ciphertext": old.ciphertext})
        assert dec_old.plaintext == b"old" and dec_old.used_primary is False
        dec_new = await client.decrypt(request={"name": name, "ciphertext": new.ciphertext})
        assert dec_new.plaintext == b"new" and dec_new.used_primary is True
        fetched = await client.get_crypto_key(request={"name": name})
        assert fetched.primary.name == version.name
    finally:
        await client.transport.close()


@pytest.mark.asyncio
async def test_gcp_not_found_and_permission_denied(gcp_kms: GcpKmsServer) -> None:
    client = gcp_kms.async_client()
    try:
        name = await _gcp_key(client, "ring-deny", "kek")
        with pytest.raises(gexc.NotFound):
            await client.encrypt(request={"name": name + "-missing", "plaintext": b"x"})
        gcp_kms.access_denied = True
        with pytest.raises(gexc.PermissionDenied, match="useToEncrypt"):
            await client.encrypt(request={"name": name, "plaintext": b"x"})
        gcp_kms.access_denied = False
        gcp_kms.denied_operations = {"decrypt"}
        enc = await client.encrypt(request={"name": name, "plaintext": b"x"})
        with pytest.raises(gexc.PermissionDenied, match="useToDecrypt"):
            await client.decrypt(request={"name": name, "ciphertext": enc.ciphertext})
        assert gcp_kms.calls["encrypt"] == 3 and gcp_kms.calls["decrypt"] == 1
    finally:
        await client.transport.close()


# ----------------------------------------------------------------- AWS KMS (moto, aiobotocore)


@pytest.mark.asyncio
async def test_moto_kms_roundtrip_context_and_counts(moto_kms: MotoKmsServer) -> None:
    async with get_session().create_client("kms", **moto_kms.client_kwargs) as kms:
        key_id = (await kms.create_key(Description="aiocrypt test KEK"))["KeyMetadata"]["KeyId"]
        dek = os.urandom(32)
        context = {"table": "users", "column": "email"}
        blob = (await kms.encrypt(KeyId=key_id, Plaintext=dek, EncryptionContext=context))[
            "CiphertextBlob"
        ]
        out = await kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)
        assert out["Plaintext"] == dek and out["KeyId"].endswith(key_id)

        with pytest.raises(ClientError) as info:
            await kms.decrypt(
                CiphertextBlob=blob, EncryptionContext={"table": "users", "column": "phone"}
            )
        assert info.value.response["Error"]["Code"] == "InvalidCiphertextException"

        data_key = await kms.generate_data_key(
            KeyId=key_id, KeySpec="AES_256", EncryptionContext=context
        )
        again = await kms.decrypt(
            CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext=context
        )
        assert again["Plaintext"] == data_key["Plaintext"]

    assert moto_kms.calls["create_key"] == 1
    assert moto_kms.calls["encrypt"] == 1
    assert moto_kms.calls["decrypt"] == 3
    assert moto_kms.calls["generate_data_key"] == 1


@pytest.mark.asyncio
async def test_moto_kms_access_denied(moto_kms: MotoKmsServer) -> None:
    async with get_session().create_client("kms", **moto_kms.client_kwargs) as kms:
        key_id = (await kms.create_key())["KeyMetadata"]["KeyId"]
        blob = (await kms.encrypt(KeyId=key_id, Plaintext=b"dek"))["CiphertextBlob"]
        moto_kms.denied_operations = {"decrypt"}
        with pytest.raises(ClientError) as info:
            await kms.decrypt(CiphertextBlob=blob)
        assert info.value.response["Error"]["Code"] == "AccessDeniedException"
        moto_kms.access_denied = True
        with pytest.raises(ClientError) as info:
            await kms.encrypt(KeyId=key_id, Plaintext=b"dek")
        assert info.value.response["Error"]["Code"] == "AccessDeniedException"
        assert key_id in info.value.response["Error"]["Message"]
    assert moto_kms.calls["decrypt"] == 1 and moto_kms.calls["encrypt"] == 2
