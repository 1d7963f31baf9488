"""The rarer paths of the key manager's parts: usage reservations, rewrapping, statistics.

Each test reaches one branch the rest of the suite leaves alone (issue 21) and
checks what happens there. The failing usage counters are real: the file key
store's counter file, overwritten with bytes that are not JSON.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest

from aiocrypt import EncryptionService, KeyManager, KeyStateError, KeyType
from aiocrypt.testing import FakeKekProvider, MemoryKeyStore, make_key_manager


def corrupt_usage_counters(key_path: Path) -> None:
    """Overwrite the file store's usage counters (``.keys.json.usage.json``) with junk."""
    usage = key_path.with_name(f".{key_path.name}.usage.json")
    assert usage.exists()
    usage.write_bytes(b"not json")


# -- usage reservations for sync callers -----------------------------------------


async def test_a_sync_seal_past_2_to_the_32_is_refused_whatever_the_allowance() -> None:
    manager = make_key_manager()
    async with EncryptionService(manager, preload=[KeyType.PII]) as service:
        keyring = service.keyring
        assert keyring.encrypt("x", KeyType.PII, "c")
        dk = keyring.active(KeyType.PII)
        dk.encryptions = 2**32
        dk.allowance = 2**32 + 10  # even an allowance beyond it does not let it seal
        with pytest.raises(KeyStateError, match=r"reached 2\*\*32 encryptions"):
            keyring.encrypt("x", KeyType.PII, "c")
        assert dk.encryptions == 2**32


def test_a_sync_seal_at_the_allowance_without_a_running_loop_is_refused() -> None:
    """The manager's loop has ended: nothing can reserve more, and nothing is started."""
    manager = make_key_manager()
    asyncio.run(manager.open())
    asyncio.run(manager.ensure_active([KeyType.PII]))
    try:
        dk = manager.keyring.active(KeyType.PII)
        dk.encryptions = dk.allowance
        with pytest.raises(KeyStateError, match=r"allowance of key .* is used up"):
            manager.keyring.encrypt("x", KeyType.PII, "c")
        assert dk.encryptions == dk.allowance
    finally:
        asyncio.run(manager.close())


def test_a_background_reservation_on_a_closed_loop_can_be_started_again() -> None:
    """The loop closed between the caller's check and the hand-over to it: the key
    type is not left marked as reserving, so the next sync call tries again."""
    manager = make_key_manager()
    asyncio.run(manager.open())
    asyncio.run(manager.close())
    usage = manager._usage
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            usage._reserve_in_background(KeyType.PII)
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(5)
    assert errors == []
    assert usage._reserving == set()
    assert usage._background == set()


async def test_a_failing_background_reservation_is_logged_and_retried_later(
    file_service: EncryptionService, key_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = file_service.key_manager
    await file_service.encrypt_field("x", KeyType.PII)
    corrupt_usage_counters(key_path)
    dk = manager.keyring.active(KeyType.PII)
    dk.encryptions = dk.refill_at  # the next sync seal starts a reservation ahead
    with caplog.at_level(logging.WARNING, logger="aiocrypt.keys"):
        token = file_service.keyring.encrypt("y", KeyType.PII, "c")
        assert manager._usage._reserving == {KeyType.PII}
        await asyncio.gather(*manager._usage._background)
    assert await file_service.decrypt_field(token, KeyType.PII, context="c") == "y"
    assert [r.getMessage() for r in caplog.records] == [
        "background usage reservation for pii keys failed (KeyStoreError)"
    ]
    assert manager._usage._reserving == set()  # the next sync call tries again


# -- statistics ----------------------------------------------------------------


async def test_statistics_show_usage_0_when_the_counters_are_unreadable(
    file_service: EncryptionService, key_path: Path
) -> None:
    manager = file_service.key_manager
    await file_service.encrypt_field("x", KeyType.PII)
    before = await manager.key_statistics()
    assert before.active_keys["pii"].usage_reserved > 0
    corrupt_usage_counters(key_path)
    after = await manager.key_statistics()
    assert after.active_keys["pii"].usage_reserved == 0
    assert after.active_keys["pii"].key_id == before.active_keys["pii"].key_id
    assert after.by_status == before.by_status


# -- rewrapping on a manager not opened yet -------------------------------------


async def test_master_key_rotation_and_rewrap_open_the_manager_first() -> None:
    store, old_kek = MemoryKeyStore(), FakeKekProvider("old")
    async with EncryptionService(KeyManager(store, old_kek), preload=[KeyType.PII]) as service:
        token = await service.encrypt_field("secret value", KeyType.PII)

    new_kek = FakeKekProvider("new")
    rotating = KeyManager(store, old_kek, watch=False)
    assert await rotating.rotate_master_key(new_kek) == 1
    assert rotating.kek is new_kek
    await rotating.close()

    rewrapping = KeyManager(store, new_kek, watch=False)
    assert await rewrapping.rewrap_keys(only_foreign=True) == 0
    await rewrapping.close()
    rewrapping = KeyManager(store, new_kek, watch=False)
    assert await rewrapping.rewrap_keys() == 1
    await rewrapping.close()

    unwraps = old_kek.calls["unwrap"]
    async with EncryptionService(KeyManager(store, new_kek)) as service:
        assert await service.decrypt_field(token, KeyType.PII) == "secret value"
    assert old_kek.calls["unwrap"] == unwraps  # the old KEK is no longer needed
