"""EncryptionService: fields, batches, bulk data, sessions, cache entries, statistics."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import anyio
import pytest

from aiocrypt import (
    CacheEntryExpiredError,
    DecryptionError,
    EncryptedData,
    EncryptionConfig,
    EncryptionService,
    KeyType,
    Purpose,
    get_crypto_config,
    get_encryption_service,
    get_key_manager,
    reset_defaults,
)
from aiocrypt.testing import make_service


async def test_encrypt_many_and_decrypt_many(service: EncryptionService) -> None:
    values = [1, "two", 3.0, None, {"four": [4]}]
    tokens = await service.encrypt_many(values, KeyType.PII, context="t.c")
    assert len(set(tokens)) == len(tokens)
    assert await service.decrypt_many(tokens, KeyType.PII, context="t.c") == values
    contexts = [f"users.ssn#id={i}" for i in range(len(values))]
    tokens = await service.encrypt_many(values, KeyType.PII, contexts=contexts)
    assert await service.decrypt_many(tokens, KeyType.PII, contexts=contexts) == values
    with pytest.raises(DecryptionError):
        await service.decrypt_many(tokens, KeyType.PII, contexts=contexts[::-1])
    with pytest.raises(ValueError, match="contexts"):
        await service.encrypt_many(values, KeyType.PII, contexts=contexts[:2])
    big = ["x" * 30_000] * 5  # over the inline threshold: runs in a thread
    tokens = await service.encrypt_many(big, KeyType.PII)
    assert await service.decrypt_many(tokens, KeyType.PII) == big
    assert service.counters["threaded_operations"] >= 2


@pytest.mark.parametrize("size", [0, 1, 65_536, 65_537, 3 * 1024 * 1024 + 5])
async def test_bulk_round_trip_object_and_blob(service: EncryptionService, size: int) -> None:
    data = os.urandom(size)
    encrypted = await service.encrypt_bulk_data(data, KeyType.AUDIT_LOGS, context="exports/1")
    large = size > service.config.performance.inline_threshold
    assert encrypted.algorithm == ("AES_256_GCM_STREAM" if large else "AES_256_GCM")
    rebuilt = EncryptedData(
        encrypted_data=encrypted.encrypted_data,
        key_id=encrypted.key_id,
        algorithm=encrypted.algorithm,
        iv=encrypted.iv,
        tag=encrypted.tag,
        segment_size=encrypted.segment_size,
    )
    assert (
        await service.decrypt_bulk_data(rebuilt, context="exports/1", key_type=KeyType.AUDIT_LOGS)
        == data
    )
    blob = encrypted.to_bytes()
    assert EncryptedData.from_bytes(blob) == encrypted
    assert (
        await service.decrypt_bulk_data(blob, context="exports/1", key_type=KeyType.AUDIT_LOGS)
        == data
    )
    with pytest.raises(DecryptionError):
        await service.decrypt_bulk_data(blob, context="exports/1", key_type=KeyType.PII)


async def test_bulk_with_compression() -> None:
    service = make_service(EncryptionConfig(compression_enabled=True))
    async with service:
        data = b"highly repetitive audit line\n" * 10_000
        encrypted = await service.encrypt_bulk_data(data)
        assert encrypted.compressed and len(encrypted.encrypted_data) < len(data) // 10
        assert (
            await service.decrypt_bulk_data(encrypted.to_bytes(), key_type=KeyType.FINANCIAL_DATA)
            == data
        )
        token = await service.encrypt_field("note " * 50)
        assert await service.decrypt_field(token) == "note " * 50


async def test_large_bulk_work_does_not_block_the_loop(service: EncryptionService) -> None:
    data = os.urandom(32 * 1024 * 1024)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.001)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        encrypted = await service.encrypt_bulk_data(data)
        assert await service.decrypt_bulk_data(encrypted, key_type=KeyType.FINANCIAL_DATA) == data
        tg.cancel_scope.cancel()
    assert ticks > 0  # the loop kept running while the threads worked


async def test_session_data(service: EncryptionService) -> None:
    session = {"user_id": 7, "roles": ["admin"], "login": dt.datetime.now(dt.UTC)}
    token = await service.encrypt_session_data(session, context="sid-hash")
    assert token.startswith("ac2.session-v1-")
    assert await service.decrypt_session_data(token, context="sid-hash") == session
    with pytest.raises(DecryptionError):
        await service.decrypt_session_data(token, context="other-sid")
    with pytest.raises(TypeError, match="dict"):
        await service.encrypt_session_data(["not", "a", "dict"])  # type: ignore[arg-type]
    not_a_dict = service.keyring.encrypt([1], KeyType.SESSION, purpose=Purpose.SESSION)
    with pytest.raises(DecryptionError):
        await service.decrypt_session_data(not_a_dict)


async def test_cache_entries_are_deterministic_bound_and_expire() -> None:
    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    clock = lambda: now  # noqa: E731
    service = make_service(clock=clock)
    async with service:
        key1, value1 = await service.encrypt_cache_data("report:42", {"total": 99}, ttl=60)
        key2, value2 = await service.encrypt_cache_data("report:42", {"total": 99}, ttl=60)
        key3, _ = await service.encrypt_cache_data("report:43", {"total": 99}, ttl=60)
        assert key1 == key2 and value1 != value2 and key1 != key3
        assert await service.encrypt_cache_key("report:42") == key1
        assert "report" not in key1
        assert await service.decrypt_cache_data(key1, value1) == ("report:42", {"total": 99})
        with pytest.raises(DecryptionError):  # value moved under another key
            await service.decrypt_cache_data(key3, value1)
        now += dt.timedelta(seconds=59)
        assert (await service.decrypt_cache_data(key1, value1))[1] == {"total": 99}
        now += dt.timedelta(seconds=1)
        with pytest.raises(CacheEntryExpiredError):
            await service.decrypt_cache_data(key1, value1)
        forever_key, forever = await service.encrypt_cache_data("cfg", [1], ttl=None)
        now += dt.timedelta(days=3650)
        assert await service.decrypt_cache_data(forever_key, forever) == ("cfg", [1])
        for bad_ttl in (0, -5, "60", True):
            with pytest.raises(ValueError):
                await service.encrypt_cache_data("k", 1, ttl=bad_ttl)  # type: ignore[arg-type]
        # the cache has its own key, never a field key
        assert key1.startswith("ac2.cache-v1-")


async def test_stats_report_status_and_counters(service: EncryptionService) -> None:
    token = await service.encrypt_field(1)
    await service.decrypt_field(token)
    with pytest.raises(DecryptionError):
        await service.decrypt_field(token, context="wrong")
    stats = await service.get_encryption_stats()
    assert stats["encryption_service"] == "running"
    assert stats["counters"]["encryptions"] == 1
    assert stats["counters"]["decryptions"] == 1
    assert stats["counters"]["decrypt_failures"] == 1
    assert stats["active_keys"]["financial_data"] == token.split(".")[1]
    assert stats["key_store_reachable"] is True
    await service.close()
    assert (await service.get_encryption_stats())["encryption_service"] == "closed"


async def test_sync_keyring_snapshot_for_sync_code(service: EncryptionService) -> None:
    await service.key_manager.ensure_active([KeyType.PII])
    keyring = service.keyring
    token = keyring.encrypt("123-45-6789", KeyType.PII, "users.ssn")
    assert await service.decrypt_field(token, KeyType.PII, context="users.ssn") == "123-45-6789"
    assert keyring.decrypt(token, KeyType.PII, "users.ssn") == "123-45-6789"


async def test_process_wide_defaults_from_environment(
    monkeypatch: pytest.MonkeyPatch, key_path: Path, master_key_b64: str, clean_env: None
) -> None:
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY", master_key_b64)
    monkeypatch.setenv("ENCRYPTION_KEY_STORAGE_PATH", str(key_path))
    await reset_defaults()
    try:
        service = get_encryption_service()
        assert service is get_encryption_service()
        assert service.key_manager is get_key_manager()
        assert get_crypto_config().get_config().storage_path == str(key_path)
        token = await service.encrypt_field(75000.0, context="users.income")
        assert await service.decrypt_field(token, context="users.income") == 75000.0
        assert key_path.exists()
    finally:
        await reset_defaults()


async def test_defaults_report_every_config_problem(
    monkeypatch: pytest.MonkeyPatch, clean_env: None, tmp_path: Path
) -> None:
    from aiocrypt import ConfigurationError

    monkeypatch.setenv("ENCRYPTION_KEY_STORAGE_PATH", str(tmp_path / "missing" / "k.json"))
    await reset_defaults()
    try:
        with pytest.raises(ConfigurationError) as info:
            get_key_manager()
        message = str(info.value)
        assert "ENCRYPTION_MASTER_KEY is missing" in message
        assert "does not exist" in message
    finally:
        await reset_defaults()
