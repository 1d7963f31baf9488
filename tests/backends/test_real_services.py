"""The KEK providers against the real services, when their settings are in the environment.

Skipped unless configured (nothing here can run on a machine without cloud access):

* Vault: ``VAULT_ADDR`` and ``VAULT_TOKEN`` (transit mount ``ENCRYPTION_VAULT_MOUNT_POINT``,
  default ``transit``; a derived key ``aiocrypt-test`` is created if missing);
* AWS KMS: ``ENCRYPTION_AWS_KMS_KEY_ID`` and ``ENCRYPTION_AWS_REGION`` (credentials from
  ``ENCRYPTION_AWS_*`` or the default chain), with no ``ENCRYPTION_AWS_ENDPOINT_URL``;
* Azure Key Vault: ``ENCRYPTION_AZURE_VAULT_URL``, ``ENCRYPTION_AZURE_KEY_NAME`` and
  ``ENCRYPTION_AZURE_TENANT_ID`` / ``_CLIENT_ID`` / ``_CLIENT_SECRET``;
* Cloud KMS: ``GOOGLE_APPLICATION_CREDENTIALS`` and ``ENCRYPTION_GCP_PROJECT_ID`` /
  ``_LOCATION`` / ``_KEYRING`` / ``_KEY_NAME``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from aiocrypt import EncryptionConfig, EncryptionService, KekProviderError, KeyManager, KeyType
from aiocrypt.kek import KekProvider
from aiocrypt.keystore import MemoryKeyStore

CONTEXT = {"aiocrypt_key_id": "pii-v1-0a0b0c0d", "aiocrypt_key_type": "pii"}


def _need(*names: str) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        pytest.skip("real-service test: set " + ", ".join(missing))


@pytest.fixture(params=["vault", "aws", "azure", "gcp"])
async def real_provider(request: pytest.FixtureRequest) -> AsyncIterator[KekProvider]:
    config = EncryptionConfig.from_env()
    provider: KekProvider
    if request.param == "vault":
        _need("VAULT_ADDR", "VAULT_TOKEN")
        from aiocrypt.kek.vault import VaultTransitKekProvider

        vault = VaultTransitKekProvider(
            "aiocrypt-test",
            url=os.environ["VAULT_ADDR"],
            token=os.environ["VAULT_TOKEN"],
            mount_point=config.vault_mount_point,
            namespace=os.environ.get("VAULT_NAMESPACE"),
        )
        await vault.ensure_key()
        provider = vault
    elif request.param == "aws":
        _need("ENCRYPTION_AWS_KMS_KEY_ID", "ENCRYPTION_AWS_REGION")
        if config.aws_endpoint_url:
            pytest.skip("ENCRYPTION_AWS_ENDPOINT_URL is set: not the real AWS")
        from aiocrypt.kek.aws import from_config as aws_from_config

        provider = aws_from_config(config)
    elif request.param == "azure":
        _need(
            "ENCRYPTION_AZURE_VAULT_URL",
            "ENCRYPTION_AZURE_KEY_NAME",
            "ENCRYPTION_AZURE_TENANT_ID",
            "ENCRYPTION_AZURE_CLIENT_ID",
            "ENCRYPTION_AZURE_CLIENT_SECRET",
        )
        from aiocrypt.kek.azure import from_config as azure_from_config

        provider = azure_from_config(config)
    else:
        _need(
            "GOOGLE_APPLICATION_CREDENTIALS",
            "ENCRYPTION_GCP_PROJECT_ID",
            "ENCRYPTION_GCP_LOCATION",
            "ENCRYPTION_GCP_KEYRING",
            "ENCRYPTION_GCP_KEY_NAME",
        )
        from aiocrypt.kek.gcp import from_config as gcp_from_config

        provider = gcp_from_config(config)
    try:
        yield provider
    finally:
        await provider.close()


async def test_real_round_trip_and_context_binding(real_provider: KekProvider) -> None:
    dek = os.urandom(32)
    wrapped = await real_provider.wrap(dek, CONTEXT)
    assert await real_provider.unwrap(wrapped, CONTEXT) == dek
    with pytest.raises(KekProviderError) as info:
        await real_provider.unwrap(wrapped, {**CONTEXT, "aiocrypt_key_id": "pii-v2-00000000"})
    assert not info.value.retryable


async def test_real_manager_rotation(real_provider: KekProvider) -> None:
    store = MemoryKeyStore()
    service = EncryptionService(KeyManager(store, real_provider, watch=False))
    await service.key_manager.open()
    token = await service.encrypt_field("real", KeyType.PII, context="t.c")
    await service.key_manager.rotate_key(KeyType.PII, force=True)
    fresh = EncryptionService(KeyManager(store, real_provider, watch=False))
    await fresh.start()
    assert await fresh.decrypt_field(token, KeyType.PII, context="t.c") == "real"
