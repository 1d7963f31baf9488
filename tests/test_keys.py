"""KeyManager: generation, rotation, revocation, cleanup, statistics."""

from __future__ import annotations

import pickle

import pytest

from aiocrypt import (
    DecryptionError,
    EncryptionConfig,
    EncryptionService,
    KeyManager,
    KeyNotFoundError,
    KeyStatus,
    KeyType,
    UnknownKeyTypeError,
)
from aiocrypt.testing import FakeKekProvider, ManualClock, MemoryKeyStore, make_service

Clock = ManualClock


async def test_forced_rotation_changes_active_key_and_old_tokens_decrypt(
    service: EncryptionService,
) -> None:
    manager = service.key_manager
    before = await manager.get_active_key(KeyType.FINANCIAL_DATA)
    old_token = await service.encrypt_field(75000.0, context="users.income")
    assert old_token.startswith(f"ac2.{before.key_id}.")

    after = await manager.rotate_key(KeyType.FINANCIAL_DATA, force=True)
    assert after.key_id != before.key_id
    assert after.version == before.version + 1
    assert (await manager.get_key(before.key_id)).status is KeyStatus.DECRYPT_ONLY

    new_token = await service.encrypt_field(75000.0, context="users.income")
    assert new_token.startswith(f"ac2.{after.key_id}.")
    assert await service.decrypt_field(old_token, context="users.income") == 75000.0
    assert await service.decrypt_field(new_token, context="users.income") == 75000.0


async def test_rotation_follows_the_policy_interval() -> None:
    clock = Clock()
    service = make_service(clock=clock)
    async with service:
        manager = service.key_manager
        first = await manager.get_active_key(KeyType.SESSION)
        clock.advance(days=29)
        assert (await manager.rotate_key(KeyType.SESSION)).key_id == first.key_id
        clock.advance(days=2)  # session keys rotate every 30 days
        rotated = await manager.rotate_key(KeyType.SESSION)
        assert rotated.key_id != first.key_id
        stats = await manager.get_key_statistics()
        assert stats["rotation_needed"] == []
        clock.advance(days=31)
        stats = await manager.get_key_statistics()
        assert stats["rotation_needed"] == [
            {"key_type": "session", "key_id": rotated.key_id, "reason": "age"}
        ]


async def test_generate_key_validates_input(service: EncryptionService) -> None:
    with pytest.raises(ValueError, match="256"):
        await service.key_manager.generate_key(KeyType.PII, key_size=128)
    with pytest.raises(ValueError, match="invalid key type"):
        await service.key_manager.generate_key("Not A Type")
    with pytest.raises(UnknownKeyTypeError, match="ENCRYPTION_KEY_TYPES"):  # not declared
        await service.key_manager.generate_key("tax_ids", key_size=256)
    async with make_service(EncryptionConfig(key_types=["tax_ids"])) as declared:
        key = await declared.key_manager.generate_key("tax_ids", key_size=256)
    assert key.key_type == KeyType("tax_ids") and key.key_type is KeyType("tax_ids")


async def test_user_defined_key_type_gets_default_policy() -> None:
    async with make_service(EncryptionConfig(key_types=["tax_ids"])) as service:
        token = await service.encrypt_field("AB123", "tax_ids", context="t.c")
        assert await service.decrypt_field(token, KeyType("tax_ids"), context="t.c") == "AB123"
        assert service.config.rotation_policy("tax_ids").rotation_interval_days == 90


async def test_revoked_key_refuses_reads_and_is_replaced(service: EncryptionService) -> None:
    manager = service.key_manager
    token = await service.encrypt_field("k-123", KeyType.API_KEYS)
    old = await manager.get_active_key(KeyType.API_KEYS)
    revoked = await manager.revoke_key(old.key_id, "leaked in a log")
    assert revoked.status is KeyStatus.REVOKED and revoked.status_reason == "leaked in a log"
    replacement = await manager.get_active_key(KeyType.API_KEYS)
    assert replacement.key_id != old.key_id
    with pytest.raises(DecryptionError):
        await service.decrypt_field(token, KeyType.API_KEYS)
    # re-encryption may still read it
    assert service.keyring.decrypt(token, KeyType.API_KEYS, for_reencryption=True) == "k-123"
    new_token = await service.encrypt_field("k-123", KeyType.API_KEYS)
    assert new_token.startswith(f"ac2.{replacement.key_id}.")


async def test_unknown_key_operations_raise_key_not_found(service: EncryptionService) -> None:
    with pytest.raises(KeyNotFoundError):
        await service.key_manager.get_key("pii-v1-deadbeef")
    with pytest.raises(KeyNotFoundError):
        await service.key_manager.revoke_key("pii-v1-deadbeef")


async def test_cleanup_destroys_only_confirmed_keys_past_grace() -> None:
    clock = Clock()
    service = make_service(clock=clock)
    async with service:
        manager = service.key_manager
        v1 = await manager.get_active_key(KeyType.FINANCIAL_DATA)
        v2 = await manager.rotate_key(KeyType.FINANCIAL_DATA, force=True)
        clock.advance(days=366)  # past max age (365), inside grace (30)
        assert await manager.cleanup_expired_keys(confirm_unreferenced=[v1.key_id]) == 0
        assert (await manager.get_key(v1.key_id)).status is KeyStatus.EXPIRED
        clock.advance(days=30)  # past grace
        assert await manager.cleanup_expired_keys() == 0  # not confirmed: kept
        assert (await manager.get_key(v1.key_id)).status is KeyStatus.EXPIRED
        assert await manager.cleanup_expired_keys(confirm_unreferenced=[v1.key_id]) == 1
        destroyed = await manager.get_key(v1.key_id)
        assert destroyed.status is KeyStatus.DESTROYED and destroyed.wrapped_key is None
        # the active key is never destroyed by cleanup, however old
        assert (await manager.get_key(v2.key_id)).status is KeyStatus.ACTIVE
        assert await manager.cleanup_expired_keys(force=True) == 0


async def test_statistics_count_by_type_and_status(service: EncryptionService) -> None:
    manager = service.key_manager
    for key_type in KeyType.builtin():
        await manager.generate_key(key_type)
    await manager.rotate_key(KeyType.PII, force=True)
    stats = await manager.get_key_statistics()
    assert stats["total_keys"] == 6
    assert stats["by_status"]["active"] == 5 and stats["by_status"]["decrypt_only"] == 1
    assert stats["by_type"]["pii"] == {"decrypt_only": 1, "active": 1}
    assert set(stats["active_keys"]) == {kt.value for kt in KeyType.builtin()}
    assert stats["kek_provider"] == "fake"


async def test_two_managers_on_one_store_see_each_others_rotation() -> None:
    store, kek = MemoryKeyStore(), FakeKekProvider()
    a = EncryptionService(KeyManager(store, kek, refresh_interval=0.0))
    b = EncryptionService(KeyManager(store, kek, refresh_interval=3600.0))
    async with a, b:
        token_b = await b.encrypt_field(1, KeyType.PII)
        rotated = await a.key_manager.rotate_key(KeyType.PII, force=True)
        token_a = await a.encrypt_field(2, KeyType.PII)
        assert token_a.startswith(f"ac2.{rotated.key_id}.")
        # b has not refreshed (long interval) yet meets the new key id: it loads it once
        assert await b.decrypt_field(token_a, KeyType.PII) == 2
        assert await a.decrypt_field(token_b, KeyType.PII) == 1


async def test_concurrent_first_use_creates_one_key() -> None:
    import anyio

    store, kek = MemoryKeyStore(), FakeKekProvider()
    services = [EncryptionService(KeyManager(store, kek)) for _ in range(5)]
    async with anyio.create_task_group() as tg:
        for svc in services:
            tg.start_soon(svc.encrypt_field, "x", KeyType.PII)
    keys = [k for k in (await store.read()).keys if k.key_type == KeyType.PII]
    assert len(keys) == 1
    for svc in services:
        await svc.close()


def test_key_objects_refuse_pickling() -> None:
    key = Clock()  # placeholder to get a timestamp
    from aiocrypt import EncryptionKey

    record = EncryptionKey(
        key_id="pii-v1-00000000",
        key_type="pii",  # type: ignore[arg-type]  # coerced to KeyType
        version=1,
        status="active",  # type: ignore[arg-type]  # coerced to KeyStatus
        created_at=key.now,
        expires_at=key.now,
        wrapped_key=b"w" * 40,
    )
    with pytest.raises(TypeError):
        pickle.dumps(record)
    assert "wrapped_key" not in repr(record)


async def test_kek_failure_leaves_previous_key_active(service: EncryptionService) -> None:
    manager = service.key_manager
    before = await manager.get_active_key(KeyType.PII)
    kek = manager.kek
    assert isinstance(kek, FakeKekProvider)
    kek.deny()
    with pytest.raises(Exception, match="access denied"):
        await manager.rotate_key(KeyType.PII, force=True)
    kek.fail_with = None
    assert (await manager.get_active_key(KeyType.PII)).key_id == before.key_id
    assert len(await manager.list_keys(KeyType.PII)) == 1
