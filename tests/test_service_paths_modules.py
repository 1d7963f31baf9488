"""Paths of the service's helper modules the rest of the suite leaves untaken (issue 21):
compression limits, the GIL probe on one core, key records, the DEK cache, the
factory's backend loading and the health report's failure branches."""

from __future__ import annotations

import copy
import datetime as dt
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiocrypt import (
    ConfigurationError,
    EncryptionConfig,
    KekProviderError,
    KeyManager,
    KeyStatus,
    KeyType,
    _compression,
    _factory,
    _gil,
    get_key_manager,
    reset_defaults,
)
from aiocrypt._dek_cache import wrap_context
from aiocrypt._health import health
from aiocrypt._keys import EncryptionKey
from aiocrypt.keystore import FileKeyStore
from aiocrypt.testing import FakeKekProvider, ManualClock, make_key_manager, make_service

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _key(**changes: object) -> EncryptionKey:
    fields: dict[str, object] = {
        "key_id": "pii_v1",
        "key_type": KeyType.PII,
        "version": 1,
        "status": KeyStatus.ACTIVE,
        "created_at": NOW,
        "expires_at": NOW + dt.timedelta(days=365),
    }
    fields.update(changes)
    return EncryptionKey(**fields)  # type: ignore[arg-type]


# -- _compression -------------------------------------------------------------


def _two_records() -> tuple[bytes, bytes]:
    first = _compression.compress_record(b"a" * 5000, 3)
    second = _compression.compress_record(b"b" * 5000, 3)
    return first, second


def test_records_with_a_short_header_are_cut_short() -> None:
    first, _ = _two_records()
    with pytest.raises(ValueError, match="compressed data cut short"):
        _compression.decompress_payload(first + b"\x00\x00")


def test_a_record_running_past_the_end_is_cut_short() -> None:
    first, second = _two_records()
    with pytest.raises(ValueError, match="compressed data cut short"):
        _compression.decompress_payload(first + second[:-1])
    assert _compression.decompress_payload(first + second) == b"a" * 5000 + b"b" * 5000


def test_records_past_max_size_are_refused_before_decompressing() -> None:
    first, second = _two_records()
    with pytest.raises(ValueError, match="decompressed size over the limit"):
        _compression.decompress_payload(first + second, max_size=5000)


# -- _gil ---------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity call")
def test_gil_probe_on_one_core_says_holds_without_measuring() -> None:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        assert _gil.usable_cores() == 1
        assert _gil.aead_releases_gil.__wrapped__() is False
    finally:
        os.sched_setaffinity(0, before)
    assert _gil.usable_cores() == len(before)


# -- _keys ----------------------------------------------------------------------


def test_key_version_starts_at_one() -> None:
    with pytest.raises(ValueError, match="key version starts at 1"):
        _key(version=0)


def test_key_timestamps_must_be_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _key(created_at=NOW.replace(tzinfo=None))
    with pytest.raises(ValueError, match="timezone-aware"):
        _key(expires_at=NOW.replace(tzinfo=None))


def test_key_refuses_reduce_and_copies_to_itself() -> None:
    key = _key(wrapped_key=b"w" * 40)
    with pytest.raises(TypeError, match="cannot be pickled"):
        key.__reduce__()
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(key)
    assert copy.copy(key) is key
    assert copy.deepcopy({"k": key})["k"] is key
    assert key.is_active
    assert not key.replace(status=KeyStatus.DECRYPT_ONLY).is_active


# -- _dek_cache -------------------------------------------------------------------


async def test_adopting_new_material_hands_the_usage_over() -> None:
    async with make_service() as service:
        await service.encrypt_field("x", KeyType.PII)
        manager = service.key_manager
        old = manager.keyring.active(KeyType.PII)
        keyset = manager._records
        new_material = os.urandom(32)
        manager._deks.adopt(keyset, {old.key_id: new_material, "nobody_v1": os.urandom(32)})
        fresh, _ = await manager._deks.build(keyset)
        (adopted,) = [dk for dk in fresh if dk.key_id == old.key_id]
        # another DEK under the same id: a new object that took the usage over
        assert adopted is not old and adopted.holds(new_material)
        assert adopted.encryptions == old.encryptions == 1
        assert old.allowance == 0 and adopted.allowance > 0
        assert all(dk.key_id != "nobody_v1" for dk in fresh)


async def test_a_dek_of_the_wrong_size_is_a_kek_error() -> None:
    async with make_service() as service:
        manager = service.key_manager
        await service.encrypt_field("x", KeyType.PII)
        record = manager._records.by_id()[manager.keyring.active(KeyType.PII).key_id]
        short = record.replace(wrapped_key=await manager.kek.wrap(b"k" * 16, wrap_context(record)))
        with pytest.raises(KekProviderError, match="unwrapped to a key of the wrong size"):
            await manager._deks.check_unwraps(short)
        await manager._deks.check_unwraps(record)


# -- _factory ---------------------------------------------------------------------


def test_an_unknown_backend_module_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="backend 'nosuch' is not available"):
        _factory._load("aiocrypt.kek.nosuch", "from_config", "nosuch", "nosuch")


@pytest.fixture
def without_hvac(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """aiocrypt.kek.vault imported afresh with hvac not installed."""
    monkeypatch.setitem(sys.modules, "hvac", None)
    monkeypatch.delitem(sys.modules, "aiocrypt.kek.vault", raising=False)
    yield


@pytest.mark.usefixtures("without_hvac")
def test_a_backend_without_its_dependency_names_the_pip_install() -> None:
    config = EncryptionConfig(storage_backend="vault")
    with pytest.raises(ImportError, match=r"pip install 'aiocrypt\[vault\]'") as info:
        _factory.build_kek_provider(config)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_a_store_backend_without_its_url_says_which_variable() -> None:
    config = EncryptionConfig(storage_backend="redis")
    with pytest.raises(ConfigurationError, match="ENCRYPTION_REDIS_URL"):
        _factory.build_key_store(config, FakeKekProvider())


@pytest.mark.usefixtures("clean_env")
async def test_reset_defaults_closes_a_manager_built_without_a_service(
    monkeypatch: pytest.MonkeyPatch, master_key_b64: str, key_path: Path
) -> None:
    monkeypatch.setenv("ENCRYPTION_MASTER_KEY", master_key_b64)
    monkeypatch.setenv("ENCRYPTION_KEY_STORAGE_PATH", str(key_path))
    await reset_defaults()
    try:
        manager = get_key_manager()
        await manager.open()
        await manager.ensure_active([KeyType.PII])
        assert manager.keyring.get_active(KeyType.PII) is not None
        await reset_defaults()
        assert manager.keyring.get_active(KeyType.PII) is None  # closed: keys dropped
        assert get_key_manager() is not manager
    finally:
        await reset_defaults()


# -- _health ------------------------------------------------------------------------


async def test_health_of_a_bare_manager_has_no_service_check() -> None:
    manager = make_key_manager()
    await manager.open()
    try:
        await manager.ensure_active([KeyType.PII])
        report = await health(manager)
        assert "service" not in report.checks
        assert report.status == "ok"
        assert list(report.checks["active_keys"].detail["key_types"]) == ["pii"]
    finally:
        await manager.close()


def _unreadable_store_manager(tmp_path: Path) -> KeyManager:
    """A manager whose file key store lies under a regular file: every read fails."""
    (tmp_path / "a_file").write_bytes(b"")
    kek = FakeKekProvider()
    return KeyManager(FileKeyStore(tmp_path / "a_file" / "keys.json", kek), kek)


async def test_health_with_an_unreachable_store_names_the_error_class(tmp_path: Path) -> None:
    manager = _unreadable_store_manager(tmp_path)
    report = await health(manager, key_types=[])
    store = report.checks["key_store"]
    assert store.status == "failing" and store.detail["reachable"] is False
    assert store.detail["error"] == "KeyStoreError"  # translated at the store's boundary
    assert report.status == "failing" and report.http_status == 503


async def test_health_probe_past_its_timeout_is_failing(tmp_path: Path) -> None:
    manager = _unreadable_store_manager(tmp_path)
    report = await health(manager, key_types=[], timeout=0)
    assert report.checks["key_store"].detail == {
        "backend": "file",
        "reachable": False,
        "error": "TimeoutError",
    }
    assert report.checks["kek_provider"].detail["reachable"] is None
    assert report.status == "failing"


async def test_health_of_an_active_key_past_its_maximum_age_is_degraded() -> None:
    clock = ManualClock()
    async with make_service(clock=clock, preload=[KeyType.PII]) as service:
        clock.advance(days=800)  # past PII's 730-day maximum, keyring not reloaded
        report = await health(service)
        entry = report.checks["active_keys"].detail["key_types"]["pii"]
        assert entry["status"] == "degraded"
        assert entry["problem"] == "active key is past its maximum age"
        assert report.status == "degraded" and report.http_status == 200
