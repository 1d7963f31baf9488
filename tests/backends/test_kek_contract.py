"""The KekProvider contract, run over every provider.

local and aiocrypt.testing.FakeKekProvider run in process; AWS KMS runs on moto
in server mode; Vault Transit, Azure Key Vault and Cloud KMS run on the
protocol-faithful loopback servers of tests/kms_servers, through the real
client libraries. Every provider must: round-trip, refuse a wrong context and
a tampered wrapped key (without retrying), carry a URI key id, serve a
KeyManager through generate / rotate / reload, be called a handful of times
for 10,000 fields, and report access denied clearly, once.
"""

from __future__ import annotations

import os
import re

import pytest

from aiocrypt import EncryptionService, KekProviderError, KeyManager, KeyStatus, KeyType
from aiocrypt.keystore import MemoryKeyStore

from .conftest import KekCase

CONTEXT = {"aiocrypt_key_id": "pii-v1-0a0b0c0d", "aiocrypt_key_type": "pii"}
OTHER_CONTEXT = {"aiocrypt_key_id": "pii-v2-0e0f0a0b", "aiocrypt_key_type": "pii"}

KEK_ID_FORMS = {
    "local": r"^local:[0-9a-f]{16}$",
    "fake": r"^fake-kms://fake/[0-9a-f]{16}$",
    "aws": r"^aws-kms://arn:aws:kms:us-east-1:\d{12}:key/[0-9a-f-]{36}$",
    "vault": r"^vault://transit/kek-[0-9a-f]{8}$",
    "azure": r"^azure-kv://127\.0\.0\.1:\d+/keys/kek-[0-9a-f]{8}$",
    "gcp": r"^gcp-kms://projects/test-project/locations/global/keyRings/ring-[0-9a-f]{8}"
    r"/cryptoKeys/kek$",
}
# Names a backend goes by in its messages.
LABELS = {
    "local": "local KEK",
    "fake": "fake KMS",
    "aws": "AWS KMS",
    "vault": "Vault Transit",
    "azure": "Azure Key Vault",
    "gcp": "Cloud KMS",
}


async def forget_public_key(case: KekCase) -> None:
    """Azure keeps the key version it wraps with until close(): drop it, so that the next
    wrap fetches the key again, as a process starting while access is denied would."""
    if case.name == "azure":
        await case.provider.close()


async def test_round_trip(kek_case: KekCase) -> None:
    dek = os.urandom(32)
    wrapped = await kek_case.provider.wrap(dek, CONTEXT)
    assert dek not in wrapped
    assert await kek_case.provider.unwrap(wrapped, CONTEXT) == dek
    # wrapping is randomised: the same DEK never wraps to the same bytes twice
    assert await kek_case.provider.wrap(dek, CONTEXT) != wrapped


async def test_kek_id_is_a_stable_uri(kek_case: KekCase) -> None:
    kek_id = kek_case.provider.kek_id
    assert re.match(KEK_ID_FORMS[kek_case.name], kek_id), kek_id
    assert kek_id in repr(kek_case.provider)


async def test_wrong_context_is_refused_once(kek_case: KekCase) -> None:
    wrapped = await kek_case.provider.wrap(os.urandom(32), CONTEXT)
    kek_case.reset_calls()
    with pytest.raises(KekProviderError) as info:
        await kek_case.provider.unwrap(wrapped, OTHER_CONTEXT)
    assert not info.value.retryable
    assert kek_case.provider.kek_id in str(info.value)
    assert LABELS[kek_case.name] in str(info.value)
    assert kek_case.calls() <= (2 if kek_case.name == "azure" else 1)  # Azure: get + unwrap


@pytest.mark.parametrize("where", ["first", "middle", "last", "truncated"])
async def test_tampered_wrapped_key_is_refused_without_retry(kek_case: KekCase, where: str) -> None:
    wrapped = bytearray(await kek_case.provider.wrap(os.urandom(32), CONTEXT))
    if where == "truncated":
        tampered = bytes(wrapped[:-5])
    else:
        index = {"first": 0, "middle": len(wrapped) // 2, "last": -1}[where]
        wrapped[index] ^= 0x01
        tampered = bytes(wrapped)
    kek_case.reset_calls()
    with pytest.raises(KekProviderError) as info:
        await kek_case.provider.unwrap(tampered, CONTEXT)
    assert not info.value.retryable, info.value
    assert kek_case.calls() <= (2 if kek_case.name == "azure" else 1)


async def test_manager_generates_rotates_and_reloads(kek_case: KekCase) -> None:
    store = MemoryKeyStore()
    manager = KeyManager(store, kek_case.provider, watch=False)
    service = EncryptionService(manager)
    await manager.open()
    old = await service.encrypt_field(
        {"iban": "DE89370400440532013000"}, KeyType.PII, context="accounts.iban"
    )
    first = await manager.get_active_key(KeyType.PII)
    assert first.kek_id == kek_case.provider.kek_id
    second = await manager.rotate_key(KeyType.PII, force=True)
    assert second.version == first.version + 1
    new = await service.encrypt_field(7, KeyType.PII, context="accounts.iban")

    # a second manager over the same records unwraps everything through the provider
    fresh = EncryptionService(KeyManager(store, kek_case.provider, watch=False))
    await fresh.key_manager.refresh(force=True)
    await fresh.start()
    assert await fresh.decrypt_field(old, KeyType.PII, context="accounts.iban") == {
        "iban": "DE89370400440532013000"
    }
    assert await fresh.decrypt_field(new, KeyType.PII, context="accounts.iban") == 7
    statuses = {k.key_id: k.status for k in await fresh.key_manager.list_keys(KeyType.PII)}
    assert statuses == {first.key_id: KeyStatus.DECRYPT_ONLY, second.key_id: KeyStatus.ACTIVE}


async def test_ten_thousand_fields_make_a_handful_of_kms_calls(kek_case: KekCase) -> None:
    if kek_case.name == "local":
        pytest.skip("the local KEK makes no calls to count")
    kek_case.reset_calls()
    service = EncryptionService(KeyManager(MemoryKeyStore(), kek_case.provider, watch=False))
    async with service:
        tokens = [
            await service.encrypt_field(f"{i:08d}", KeyType.FINANCIAL_DATA, context="ledger.amount")
            for i in range(10_000)
        ]
        assert (
            await service.decrypt_field(
                tokens[1234], KeyType.FINANCIAL_DATA, context="ledger.amount"
            )
            == "00001234"
        )
    # a wrap or two (the DEK; a store may wrap a key of its own), nothing per field; Azure
    # signs each wrap and fetches the public key once
    assert 1 <= kek_case.calls() <= (4 if kek_case.name == "azure" else 3), (
        kek_case.server.calls if kek_case.server else None
    )


async def test_access_denied_is_clear_and_not_retried(remote_case: KekCase) -> None:
    provider = remote_case.provider
    wrapped = await provider.wrap(os.urandom(32), CONTEXT)
    await forget_public_key(remote_case)
    remote_case.reset_calls()
    remote_case.deny()
    with pytest.raises(KekProviderError) as info:
        await provider.wrap(os.urandom(32), CONTEXT)
    message = str(info.value)
    assert not info.value.retryable
    assert info.value.backend == provider.backend
    assert provider.kek_id in message and LABELS[remote_case.name] in message
    assert re.search(r"denied|permission", message, re.I), message
    calls = remote_case.server.calls.snapshot()
    assert sum(calls.values()) == 1, calls  # Azure: the GET of the key, which it needs first

    remote_case.reset_calls()
    with pytest.raises(KekProviderError) as info:
        await provider.unwrap(wrapped, CONTEXT)
    assert not info.value.retryable and provider.kek_id in str(info.value)
    calls = remote_case.server.calls.snapshot()
    operation = {"aws": "decrypt", "vault": "decrypt", "azure": "unwrap_key", "gcp": "decrypt"}
    assert calls.get(operation[remote_case.name]) == 1, calls
    assert sum(calls.values()) <= (2 if remote_case.name == "azure" else 1), calls


async def test_failed_wrap_leaves_no_half_written_key(kek_case: KekCase) -> None:
    if kek_case.name == "local":
        pytest.skip("the local KEK cannot fail")
    store = MemoryKeyStore()
    manager = KeyManager(store, kek_case.provider, watch=False)
    service = EncryptionService(manager)
    await manager.open()
    token = await service.encrypt_field("kept", KeyType.PII, context="t.c")
    before = await store.read()
    await forget_public_key(kek_case)
    kek_case.deny()
    with pytest.raises(KekProviderError):
        await manager.rotate_key(KeyType.PII, force=True)
    after = await store.read()
    assert after == before  # nothing written: same revision, same records
    assert (await manager.get_active_key(KeyType.PII)).version == 1
    assert await service.decrypt_field(token, KeyType.PII, context="t.c") == "kept"
    kek_case.allow()
    assert (await manager.rotate_key(KeyType.PII, force=True)).version == 2
