"""Key lifecycle (issue 3): policy rotation, expiry and grace, usage limits, compromise,
cleanup against a census, minimum decryption versions, master-key rotation, audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from aiocrypt import (
    DecryptionError,
    EncryptionConfig,
    EncryptionService,
    KekProviderError,
    KeyManager,
    KeyStateError,
    KeyStatus,
    KeyStoreIntegrityError,
    KeyType,
)
from aiocrypt.audit import Auditor, MemoryAuditSink
from aiocrypt.kek import KekProvider, LocalKekProvider
from aiocrypt.keystore import FileKeyStore, KeyStore, MemoryKeyStore
from aiocrypt.testing import FakeKekProvider, ManualClock

Clock = ManualClock


def build(
    clock: Clock | None = None,
    config: EncryptionConfig | None = None,
    sink: MemoryAuditSink | None = None,
) -> EncryptionService:
    clock = clock or Clock()
    manager = KeyManager(
        MemoryKeyStore(),
        FakeKekProvider(),
        config,
        clock=clock,
        refresh_interval=0.0,
        watch=False,
        auditor=Auditor([sink or MemoryAuditSink()]),
    )
    return EncryptionService(manager, clock=clock)


async def test_policy_rotation_expiry_and_grace() -> None:
    clock, sink = Clock(), MemoryAuditSink()
    async with build(clock, sink=sink) as service:
        manager = service.key_manager
        v1 = await manager.get_active_key(KeyType.FINANCIAL_DATA)
        token = await service.encrypt_field(75000.0, context="users.income")

        clock.advance(days=89)
        assert (await manager.rotate_keys_due())["rotated"] == []
        clock.advance(days=1)  # 90 days: due by age
        report = await manager.rotate_keys_due()
        assert [(r["old_key_id"], r["reason"]) for r in report["rotated"]] == [(v1.key_id, "age")]
        assert report["reencrypt"] == [v1.key_id]
        assert (await manager.get_key(v1.key_id)).status is KeyStatus.DECRYPT_ONLY

        clock.advance(days=275)  # 365 days: past max age
        report = await manager.rotate_keys_due()
        assert v1.key_id in report["expired"]
        assert (await manager.get_key(v1.key_id)).status is KeyStatus.EXPIRED
        # inside the grace period: still decrypts, loudly and audited
        assert await service.decrypt_field(token, context="users.income") == 75000.0
        assert "expired_key_used" in sink.names()

        clock.advance(days=30)  # past grace
        await manager.refresh(force=True)
        with pytest.raises(DecryptionError):
            await service.decrypt_field(token, context="users.income")
        # re-encryption may still read it
        assert (
            service.keyring.decrypt(
                token, KeyType.FINANCIAL_DATA, "users.income", for_reencryption=True
            )
            == 75000.0
        )
        assert {"key_generated", "key_rotated", "key_expired", "policy_run"} <= set(sink.names())


async def test_active_key_past_max_age_rotates_even_without_auto_rotation() -> None:
    clock = Clock()
    config = EncryptionConfig(
        rotation_policies={
            "pii": {  # type: ignore[dict-item]  # a dict, read by from_dict
                "rotation_interval_days": 10,
                "max_key_age_days": 20,
                "auto_rotation": False,
            }
        }
    )
    async with build(clock, config) as service:
        manager = service.key_manager
        v1 = await manager.get_active_key(KeyType.PII)
        clock.advance(days=15)
        assert (await manager.rotate_keys_due())["rotated"] == []
        stats = await manager.get_key_statistics()
        assert stats["rotation_needed"] == [
            {"key_type": "pii", "key_id": v1.key_id, "reason": "age"}
        ]
        clock.advance(days=5)
        report = await manager.rotate_keys_due()
        assert report["rotated"][0]["reason"] == "expiry"


_USAGE_WORKER = textwrap.dedent("""
    import asyncio, base64, sys
    from aiocrypt import EncryptionConfig, EncryptionService, KeyManager, KeyType
    from aiocrypt.kek import LocalKekProvider
    from aiocrypt.keystore import FileKeyStore
    async def main():
        kek = LocalKekProvider(base64.b64decode(sys.argv[2]))
        config = EncryptionConfig(rotation_policies={"pii": {"max_encryptions": 100}})
        manager = KeyManager(FileKeyStore(sys.argv[1], kek), kek, config, watch=False)
        async with EncryptionService(manager) as service:
            for i in range(150):
                token = await service.encrypt_field(i, KeyType.PII)
                print(token.split(".")[1], flush=True)
    asyncio.run(main())
""")


async def test_usage_limit_is_shared_by_processes(
    key_path: Path, master_key: bytes, master_key_b64: str
) -> None:
    kek = LocalKekProvider(master_key)
    async with KeyManager(FileKeyStore(key_path, kek), kek, watch=False) as manager:
        first = await manager.get_active_key(KeyType.PII)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _USAGE_WORKER, str(key_path), master_key_b64],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0].split() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    used = [key_id for out in outputs for key_id in out]
    assert len(used) == 300
    under_first = used.count(first.key_id)
    assert 0 < under_first <= 100  # never more than the limit under one key
    versions = {key_id.split("-")[1] for key_id in used}
    assert len(versions) >= 3  # 300 encryptions at <=100 each: >= 3 keys
    store = FileKeyStore(key_path, kek)
    keys = (await store.read()).keys
    assert sum(k.status is KeyStatus.ACTIVE for k in keys) == 1
    for key in keys:
        assert used.count(key.key_id) <= 100


async def test_mark_compromised_stops_encryption_and_asks_for_reencryption() -> None:
    sink = MemoryAuditSink()
    async with build(sink=sink) as service:
        manager = service.key_manager
        old = await manager.get_active_key(KeyType.API_KEYS)
        token = await service.encrypt_field("sk_live_x", KeyType.API_KEYS)
        marked = await manager.mark_compromised(old.key_id, "found in a public repo")
        assert marked.status is KeyStatus.COMPROMISED and marked.reencrypt_required
        new_token = await service.encrypt_field("sk_live_y", KeyType.API_KEYS)
        assert not new_token.startswith(f"ac2.{old.key_id}.")
        with pytest.raises(DecryptionError):
            await service.decrypt_field(token, KeyType.API_KEYS)
        assert (
            service.keyring.decrypt(token, KeyType.API_KEYS, for_reencryption=True) == "sk_live_x"
        )
        assert old.key_id in (await manager.rotate_keys_due())["reencrypt"]
        stats = await manager.get_key_statistics()
        assert {"key_type": "api_keys", "key_id": old.key_id, "reason": "compromise"} in stats[
            "rotation_needed"
        ]
        assert "key_compromised" in sink.names()


async def test_cleanup_consults_the_census() -> None:
    clock, sink = Clock(), MemoryAuditSink()
    async with build(clock, sink=sink) as service:
        manager = service.key_manager
        a = await manager.get_active_key(KeyType.SESSION)
        token_a = await service.encrypt_field({"u": 1}, KeyType.SESSION)
        b = await manager.rotate_key(KeyType.SESSION, force=True)
        await manager.rotate_key(KeyType.SESSION, force=True)
        clock.advance(days=90 + 30)  # a and b past max age + grace
        census = {a.key_id: 0, b.key_id: 42}  # rows per key id, from SQL
        report = await manager.cleanup_report(census=census)
        assert [d["key_id"] for d in report["destroyed"]] == [a.key_id]
        assert [k["key_id"] for k in report["kept"]] == [b.key_id]
        assert "census reports 42 rows" in report["kept"][0]["reason"]
        assert (await manager.get_key(b.key_id)).status is KeyStatus.EXPIRED
        with pytest.raises(DecryptionError) as info:
            await service.decrypt_field(token_a, KeyType.SESSION)
        assert str(info.value) == f"decryption failed: key {a.key_id} was destroyed"
        # no census at all: nothing is destroyed
        assert await manager.cleanup_expired_keys() == 0
        assert "key_destroy_refused" in sink.names() and "key_destroyed" in sink.names()


async def test_min_decryption_version_requires_no_references() -> None:
    async with build() as service:
        manager = service.key_manager
        v1 = await manager.get_active_key(KeyType.PII)
        token = await service.encrypt_field("x", KeyType.PII)
        await manager.rotate_key(KeyType.PII, force=True)
        with pytest.raises(KeyStateError, match="re-encrypt it first"):
            await manager.set_min_decryption_version(KeyType.PII, 2)
        with pytest.raises(ValueError, match="above the active"):
            await manager.set_min_decryption_version(KeyType.PII, 3)
        await manager.set_min_decryption_version(KeyType.PII, 2, confirm_unreferenced=[v1.key_id])
        assert await manager.get_min_decryption_version(KeyType.PII) == 2
        with pytest.raises(DecryptionError):
            service.keyring.decrypt(token, KeyType.PII, for_reencryption=True)
        await manager.set_min_decryption_version(KeyType.PII, 1)  # lowering re-enables
        assert await service.decrypt_field(token, KeyType.PII) == "x"


class FlakyKek(KekProvider):
    """A KEK that fails after ``fail_after`` wraps (an interrupted rewrap)."""

    backend = "flaky"

    def __init__(self, inner: LocalKekProvider, fail_after: int) -> None:
        self.inner, self.fail_after, self.wraps = inner, fail_after, 0

    @property
    def kek_id(self) -> str:
        return self.inner.kek_id

    async def wrap(self, plaintext: bytes, context: dict[str, str]) -> bytes:  # type: ignore[override]
        self.wraps += 1
        if self.wraps > self.fail_after:
            raise KekProviderError("flaky KEK: network down", backend="flaky")
        return await self.inner.wrap(plaintext, context)

    async def unwrap(self, wrapped: bytes, context: dict[str, str]) -> bytes:  # type: ignore[override]
        return await self.inner.unwrap(wrapped, context)


async def test_master_key_rotation_rewraps_resumes_and_locks_out_the_old_key(
    key_path: Path, master_key: bytes
) -> None:
    old_kek = LocalKekProvider(master_key)
    new_master = os.urandom(32)
    tokens = {}
    manager = KeyManager(FileKeyStore(key_path, old_kek), old_kek, watch=False)
    async with EncryptionService(manager) as service:
        for key_type in KeyType.builtin():
            tokens[key_type] = await service.encrypt_field(f"v-{key_type}", key_type)
        await manager.rotate_key(KeyType.PII, force=True)
        # first attempt dies after 3 keys are rewrapped
        flaky = FlakyKek(LocalKekProvider(new_master), fail_after=3)
        with pytest.raises(KekProviderError):
            await manager.rotate_master_key(flaky, batch_size=1)
        kek_ids = {k.kek_id for k in await manager.list_keys()}
        assert kek_ids == {old_kek.kek_id, flaky.kek_id}  # half done, all readable
        for key_type, token in tokens.items():
            assert await service.decrypt_field(token, key_type) == f"v-{key_type}"
        # resume: only the rest is rewrapped
        resumed = LocalKekProvider(new_master)
        assert await manager.rotate_master_key(resumed) == 6 - 3
        assert {k.kek_id for k in await manager.list_keys()} == {resumed.kek_id}
    # the new master key alone opens everything
    new_kek = LocalKekProvider(new_master)
    async with EncryptionService(
        KeyManager(FileKeyStore(key_path, new_kek), new_kek, watch=False)
    ) as fresh:
        for key_type, token in tokens.items():
            assert await fresh.decrypt_field(token, key_type) == f"v-{key_type}"
    # the old one no longer opens the store
    with pytest.raises(KeyStoreIntegrityError, match="sealed under KEK"):
        await FileKeyStore(key_path, LocalKekProvider(master_key)).read()


_ENCRYPT_LOOP = textwrap.dedent("""
    import asyncio, base64, sys, time
    from aiocrypt import EncryptionService, KeyManager, KeyType
    from aiocrypt.kek import LocalKekProvider
    from aiocrypt.keystore import FileKeyStore
    async def main():
        kek = LocalKekProvider(base64.b64decode(sys.argv[2]))
        manager = KeyManager(FileKeyStore(sys.argv[1], kek), kek, refresh_interval=0.5)
        async with EncryptionService(manager) as service:
            print("ready", flush=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                token = await service.encrypt_field(1, KeyType.PII)
                print(token.split(".")[1], time.time(), flush=True)
                await asyncio.sleep(0.05)
    asyncio.run(main())
""")


async def test_other_process_uses_the_new_key_within_the_refresh_interval(
    key_path: Path, master_key: bytes, master_key_b64: str
) -> None:
    kek = LocalKekProvider(master_key)
    async with KeyManager(FileKeyStore(key_path, kek), kek, watch=False) as manager:
        await manager.get_active_key(KeyType.PII)
        with subprocess.Popen(
            [sys.executable, "-c", _ENCRYPT_LOOP, str(key_path), master_key_b64],
            stdout=subprocess.PIPE,
            text=True,
        ) as proc:
            try:
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "ready"
                proc.stdout.readline()
                new = await manager.rotate_key(KeyType.PII, force=True)
                rotated_at = time.time()
                while True:
                    key_id, stamp = proc.stdout.readline().split()
                    if key_id == new.key_id:
                        break
                    assert float(stamp) - rotated_at < 5.0, "new key not picked up in time"
                # promised: refresh_interval (0.5 s) plus one loop step; 5 s is the bound
                assert float(stamp) - rotated_at < 5.0
            finally:
                proc.kill()


async def test_decrypt_failure_flood_is_one_loud_event() -> None:
    sink = MemoryAuditSink()
    async with build(sink=sink) as service:
        good = await service.encrypt_many(list(range(12)), KeyType.PII)
        bad = [t[:-4] + "AAA=" for t in good[:10]] + good[10:]
        with pytest.raises(DecryptionError):
            await service.decrypt_many(bad, KeyType.PII)
        for _ in range(30):
            with pytest.raises(DecryptionError):
                await service.decrypt_field(good[0][:-2] + "==", KeyType.PII)
        assert sink.names().count("decrypt_failure_spike") == 1
        spike = next(e for e in sink.events if e.event == "decrypt_failure_spike")
        assert spike.details["batch_failures"] == 10 and spike.details["batch_size"] == 12
        assert "AAA" not in json.dumps(spike.to_dict())
        assert service.counters["decrypt_failures"] == 40


async def test_statistics_report_usage_and_health() -> None:
    async with build() as service:
        for _ in range(3):
            await service.encrypt_field("x", KeyType.PII)
        stats = await service.key_manager.get_key_statistics()
        pii = stats["active_keys"]["pii"]
        assert 3 <= pii["usage"] <= pii["usage_limit"] == 2**31
        assert pii["days_to_expiry"] == 730.0
        health = await service.key_manager.health()
        assert health == {"key_store_reachable": True, "kek_provider_reachable": True}
        svc = await service.get_encryption_stats()
        assert svc["aes_ni"] in (True, False, None)
        assert svc["usage_by_key"][pii["key_id"]] == 3
        assert svc["encryption_service"] == "running" and svc["dek_cache"]["hits"] >= 1
        kek = service.key_manager.kek
        assert isinstance(kek, FakeKekProvider)
        kek.deny()
        svc = await service.get_encryption_stats()
        assert svc["encryption_service"] == "degraded"
        assert svc["kek_provider_reachable"] is False and svc["key_store_reachable"] is True
        # a KMS outage does not stop fields with loaded keys
        assert await service.decrypt_field(await service.encrypt_field(5, "pii"), "pii") == 5


def test_usage_block_leaves_headroom() -> None:
    from aiocrypt._config import KeyRotationPolicy
    from aiocrypt._policy import usage_block

    # "pii" is coerced to KeyType
    assert usage_block(KeyRotationPolicy("pii", max_encryptions=100), 65536) == 12  # type: ignore[arg-type]
    assert usage_block(KeyRotationPolicy("pii"), 65536) == 65536  # type: ignore[arg-type]


class _Rival:
    """Another process that uses up each new key between our rotation and our reservation
    (mixed into a real store class: the rival's usage goes where the fleet's goes)."""

    limit = 0
    rounds_left = 0

    async def add_usage(self, increments: Mapping[str, int]) -> dict[str, int]:
        store = super()  # the store class this is mixed into, which mypy does not see
        if self.rounds_left:
            self.rounds_left -= 1
            await store.add_usage(dict.fromkeys(increments, self.limit))  # type: ignore[attr-defined]
        return await store.add_usage(increments)  # type: ignore[attr-defined,no-any-return]


class _RivalMemoryStore(_Rival, MemoryKeyStore):
    pass


RivalStore = Callable[[int, int], KeyStore]


@pytest.fixture(params=["memory", "postgres"])
async def rival_store(request: pytest.FixtureRequest) -> AsyncIterator[RivalStore]:
    """Builds a rival-fleet store on the memory store, and on the real PostgreSQL (a
    schema of its own, dropped afterwards): the reservation must hold on both."""
    made: list[Any] = []

    def make(limit: int, rounds: int) -> KeyStore:
        store: Any
        if request.param == "memory":
            store = _RivalMemoryStore()
        else:
            from aiocrypt.keystore.postgres import PostgresKeyStore

            rival = type("_RivalPostgresStore", (_Rival, PostgresKeyStore), {})
            store = rival(
                request.getfixturevalue("postgres_dsn"),
                schema=f"test_rival_{uuid.uuid4().hex[:12]}",
            )
            made.append(store)
        store.limit, store.rounds_left = limit, rounds
        return store  # type: ignore[no-any-return]

    yield make
    for store in made:
        store.rounds_left = 0
        await store.drop()
        await store.close()


@pytest.mark.parametrize("lost_rounds", [8, 40])
async def test_usage_reservation_outlasts_a_rival_that_wins_many_rounds(
    lost_rounds: int, rival_store: RivalStore
) -> None:
    # CI once saw a worker lose six rounds in a row under a tiny limit (three processes,
    # limit 40) and give up with KeyStateError; losing rounds is fleet progress, not failure.
    sink = MemoryAuditSink()
    config = EncryptionConfig(rotation_policies={"pii": {"max_encryptions": 40}})  # type: ignore[dict-item]  # a dict, read by KeyRotationPolicy.from_dict
    store = rival_store(40, lost_rounds)
    manager = KeyManager(
        store, FakeKekProvider(), config, refresh_interval=0.0, watch=False, auditor=Auditor([sink])
    )
    async with EncryptionService(manager) as service:
        token = await service.encrypt_field("x", KeyType.PII)
        assert await service.decrypt_field(token, KeyType.PII) == "x"
        usage = await store.get_usage()
    assert sink.names().count("usage_limit_reached") == lost_rounds
    key_id = token.split(".")[1]
    assert key_id.startswith(f"pii-v{lost_rounds + 1}-")
    assert all(n >= 40 for kid, n in usage.items() if kid != key_id)
    assert len(usage) == lost_rounds + 1


async def test_usage_reservation_gives_up_after_the_lock_timeout(rival_store: RivalStore) -> None:
    config = EncryptionConfig(rotation_policies={"pii": {"max_encryptions": 40}})  # type: ignore[dict-item]  # a dict, read by KeyRotationPolicy.from_dict
    store = rival_store(40, 10**6)
    manager = KeyManager(
        store, FakeKekProvider(), config, refresh_interval=0.0, watch=False, lock_timeout=0.2
    )
    async with EncryptionService(manager) as service:
        with pytest.raises(KeyStateError, match=r"within 0\.2 s"):
            await service.encrypt_field("x", KeyType.PII)


async def test_a_policy_run_is_typed_and_its_dict_the_same() -> None:
    clock = ManualClock()
    async with build(clock=clock) as service:
        manager = service.key_manager
        old = await manager.get_active_key(KeyType.PII)
        clock.advance(days=400)
        run = await manager.run_rotation_policy()
        [rotation] = [r for r in run.rotated if r.key_type == "pii"]
        assert rotation.old_key_id == old.key_id and rotation.reason
        assert rotation.new_key_id == (await manager.get_active_key(KeyType.PII)).key_id
        assert old.key_id in run.reencrypt
        assert run.to_dict()["rotated"][0]["old_key_id"] == run.rotated[0].old_key_id
        again = await manager.rotate_keys_due()
        assert again["rotated"] == [] and set(again) == {
            "checked_at",
            "rotated",
            "expired",
            "reencrypt",
        }


async def test_encryptions_past_the_allowance_are_recorded_at_the_next_refresh() -> None:
    """The re-encryption engine seals with ``DataKey.seal_text`` and counts without a
    reservation; the next keyring refresh records what went past the allowance, so the
    store's shared counter holds every encryption the key made."""
    store = MemoryKeyStore()
    kek = FakeKekProvider()
    async with KeyManager(store, kek, refresh_interval=0.0, watch=False, usage_block=8) as manager:
        dk = (await manager.ensure_active([KeyType.PII])).active(KeyType.PII)
        assert dk.allowance == 8
        for _ in range(20):
            dk.seal_text(b"value", b"")
        assert (await store.add_usage({dk.key_id: 0}))[dk.key_id] == 8
        await manager.current_keyring()
        recorded = (await store.add_usage({dk.key_id: 0}))[dk.key_id]
        assert recorded >= 20  # the 12 past the allowance, and a block ahead
        assert dk.encryptions == 20 < dk.allowance
