"""Retiring keys when the census says so (issue 17): ``KeyManager.retire_key`` and
``retire_key_type``, over a real file key store and a real census of a SQLite table
(the re-encryption engine's ``key_usage``, counted in SQL)."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aiocrypt import (
    DecryptionError,
    EncryptionConfig,
    EncryptionService,
    KeyManager,
    KeyNotFoundError,
    KeyStateError,
    KeyStatus,
    KeyType,
)
from aiocrypt._manager import KeyRetirement, RetirementReason
from aiocrypt.audit import Auditor, MemoryAuditSink
from aiocrypt.integrations.sqlalchemy import (
    EncryptedString,
    reencryption_engine,
    set_encryption_service,
)
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore
from aiocrypt.testing import ManualClock

ROWS = 30


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    ssn: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))


@pytest.fixture
def master_key() -> bytes:
    return os.urandom(32)


def open_service(
    path: Path,
    master_key: bytes,
    sink: MemoryAuditSink | None = None,
    clock: ManualClock | None = None,
    config: EncryptionConfig | None = None,
) -> EncryptionService:
    """A service over the file key store at ``path`` (a fresh manager each time, as a
    restarted process would have)."""
    kek = LocalKekProvider(master_key)
    config = config or EncryptionConfig(
        master_key=base64.b64encode(master_key).decode(), storage_path=str(path)
    )
    manager = KeyManager(
        FileKeyStore(path, kek),
        kek,
        config,
        watch=False,
        refresh_interval=0.0,
        clock=clock or ManualClock(),
        auditor=Auditor([sink or MemoryAuditSink()]),
    )
    return EncryptionService(manager)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield engine
    await engine.dispose()


async def fill(service: EncryptionService, engine: AsyncEngine) -> None:
    set_encryption_service(service)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(Patient), [{"id": i, "ssn": f"{i:03d}-12-3456"} for i in range(ROWS)]
            )
    finally:
        set_encryption_service(None)


async def test_retire_destroys_the_old_key_after_a_full_reencryption_only(
    tmp_path: Path, master_key: bytes, engine: AsyncEngine
) -> None:
    store, sink = tmp_path / "keys.json", MemoryAuditSink()
    async with open_service(store, master_key, sink) as service:
        manager = service.key_manager
        v1 = await manager.get_active_key(KeyType.PII)
        await fill(service, engine)
        old_token = await service.encrypt_field("kept aside", KeyType.PII, context="x.y")
        v2 = await manager.rotate_key(KeyType.PII, force=True)
        reencryption = reencryption_engine(service, engine, Base.metadata, batch_size=7)
        try:
            # every row is still on v1: refused, naming the rows, confirmed or not
            for confirm in ((), (v1.key_id,)):
                with pytest.raises(KeyStateError, match=f"census counts {ROWS} rows"):
                    await manager.retire_key(
                        v1.key_id, census=reencryption.key_usage, confirm_unreferenced=confirm
                    )
            # cleanup, the old way, keeps it: it is not past max age + grace
            report = await manager.cleanup_report(census={v1.key_id: 0})
            assert report["destroyed"] == []

            await reencryption.reencrypt("patients")
            assert (await reencryption.key_usage()) == {v1.key_id: 0, v2.key_id: ROWS}
            manager.census = reencryption.key_usage  # the census as an app wires it
            retired = await manager.retire_key(v1.key_id)
        finally:
            await reencryption.database.close()
        assert retired == KeyRetirement(
            KeyType.PII, retired.keys, 1, 2, type_retired=False, dry_run=False
        )
        [key] = retired.keys
        assert (key.key_id, key.version, key.status_before, key.reason) == (
            v1.key_id,
            1,
            KeyStatus.DECRYPT_ONLY,
            RetirementReason.CENSUS_NO_ROWS,
        )
        events = [e for e in sink.events if e.event == "key_destroyed"]
        assert [(e.key_id, e.details["reason"]) for e in events] == [
            (v1.key_id, "retired: census shows no rows")
        ]
        assert "min_decryption_version_raised" in sink.names()

    # what a restarted process sees: destroyed, no material, minimum version 2
    async with open_service(store, master_key) as service:
        manager = service.key_manager
        destroyed = await manager.get_key(v1.key_id)
        assert destroyed.status is KeyStatus.DESTROYED and destroyed.wrapped_key is None
        assert destroyed.decrypt_disabled
        assert await manager.get_min_decryption_version(KeyType.PII) == 2
        assert (await manager.get_active_key(KeyType.PII)).key_id == v2.key_id
        with pytest.raises(DecryptionError):
            await service.decrypt_field(old_token, KeyType.PII, context="x.y")
        set_encryption_service(service)
        try:
            async with engine.connect() as conn:
                ssns = (await conn.execute(sa.select(Patient.ssn).order_by(Patient.id))).all()
        finally:
            set_encryption_service(None)
        assert [s for (s,) in ssns] == [f"{i:03d}-12-3456" for i in range(ROWS)]


async def test_dry_run_confirmation_and_refusals(tmp_path: Path, master_key: bytes) -> None:
    store, sink = tmp_path / "keys.json", MemoryAuditSink()
    async with open_service(store, master_key, sink) as service:
        manager = service.key_manager
        v1 = await manager.get_active_key(KeyType.SESSION)
        v2 = await manager.rotate_key(KeyType.SESSION, force=True)
        with pytest.raises(KeyStateError, match="no census was given; confirm"):
            await manager.retire_key(v1.key_id)
        with pytest.raises(KeyStateError, match="the census does not cover it"):
            await manager.retire_key(v1.key_id, census={"session-v9-00000000": 0})
        with pytest.raises(KeyStateError, match="is the active session key: rotate first"):
            await manager.retire_key(v2.key_id, confirm_unreferenced=[v2.key_id])
        with pytest.raises(KeyNotFoundError):
            await manager.retire_key("session-v9-00000000", confirm_unreferenced=["x"])

        revision = await manager.store.revision()
        events = len(sink.events)
        plan = await manager.retire_key(v1.key_id, confirm_unreferenced=[v1.key_id], dry_run=True)
        assert plan.dry_run and [k.key_id for k in plan.keys] == [v1.key_id]
        assert plan.keys[0].reason is RetirementReason.CONFIRMED_UNREFERENCED
        assert (plan.min_decryption_version_before, plan.min_decryption_version) == (1, 2)
        assert await manager.store.revision() == revision
        assert len(sink.events) == events
        assert (await manager.get_key(v1.key_id)).status is KeyStatus.DECRYPT_ONLY

        done = await manager.retire_key(v1.key_id, confirm_unreferenced=[v1.key_id])
        assert not done.dry_run and done.keys == plan.keys
        assert (await manager.get_key(v1.key_id)).status is KeyStatus.DESTROYED
        assert [e.details["reason"] for e in sink.events if e.event == "key_destroyed"] == [
            "confirmed unreferenced"
        ]
        with pytest.raises(KeyStateError, match="already destroyed"):
            await manager.retire_key(v1.key_id, confirm_unreferenced=[v1.key_id])


async def test_retiring_a_version_above_a_live_older_one_keeps_the_minimum(
    tmp_path: Path, master_key: bytes
) -> None:
    async with open_service(tmp_path / "keys.json", master_key) as service:
        manager = service.key_manager
        v1 = await manager.get_active_key(KeyType.PII)
        token = await service.encrypt_field("still on v1", KeyType.PII)
        v2 = await manager.rotate_key(KeyType.PII, force=True)
        v3 = await manager.rotate_key(KeyType.PII, force=True)
        retired = await manager.retire_key(
            v2.key_id, census={v1.key_id: 1, v2.key_id: 0, v3.key_id: 0}
        )
        assert (retired.min_decryption_version_before, retired.min_decryption_version) == (1, 1)
        assert await service.decrypt_field(token, KeyType.PII) == "still on v1"
        # v1 goes later: the floor passes both destroyed versions
        retired = await manager.retire_key(v1.key_id, census={v1.key_id: 0})
        assert retired.min_decryption_version == 3
        assert await manager.get_min_decryption_version(KeyType.PII) == 3


async def test_a_mistaken_key_type_is_retired_without_a_new_version(
    tmp_path: Path, master_key: bytes
) -> None:
    store, sink = tmp_path / "keys.json", MemoryAuditSink()
    encoded = base64.b64encode(master_key).decode()
    # the typo got into the store while something declared it (or before types were declared)
    typo_config = EncryptionConfig(
        master_key=encoded, storage_path=str(store), key_types=frozenset({"financal_data"})
    )
    async with open_service(store, master_key, config=typo_config) as service:
        first = await service.key_manager.generate_key("financal_data")
        second = await service.key_manager.generate_key("financal_data")
        await service.key_manager.get_active_key(KeyType.PII)

    async with open_service(store, master_key, sink) as service:
        manager = service.key_manager
        typo = KeyType("financal_data")
        with pytest.raises(KeyStateError, match="pii is a declared key type"):
            await manager.retire_key_type(KeyType.PII, census={})
        with pytest.raises(KeyStateError, match="financal_data is a declared key type"):
            await KeyManager(manager.store, manager.kek, typo_config).retire_key_type(
                typo, confirm_unreferenced=[first.key_id, second.key_id]
            )
        with pytest.raises(KeyStateError, match=f"key {second.key_id}: the census counts 3"):
            await manager.retire_key_type(typo, census={first.key_id: 0, second.key_id: 3})
        with pytest.raises(KeyStateError, match="no census was given"):
            await manager.retire_key_type(typo, confirm_unreferenced=[first.key_id])
        assert (await manager.get_key(second.key_id)).status is KeyStatus.ACTIVE  # all or none

        plan = await manager.retire_key_type(
            typo, confirm_unreferenced=[first.key_id, second.key_id], dry_run=True
        )
        assert plan.type_retired and {k.key_id for k in plan.keys} == {first.key_id, second.key_id}
        assert (await manager.get_key(second.key_id)).status is KeyStatus.ACTIVE

        before = {k.key_id for k in await manager.list_keys()}
        retired = await manager.retire_key_type(
            "financal_data", confirm_unreferenced=[first.key_id, second.key_id]
        )
        assert retired.type_retired and retired.min_decryption_version == 3
        keys = await manager.list_keys()
        assert {k.key_id for k in keys} == before  # no new version was created
        assert {k.status for k in keys if k.key_type == typo} == {KeyStatus.DESTROYED}
        assert not manager.keyring.has_active(typo)
        assert {e.key_id for e in sink.events if e.event == "key_destroyed"} == {
            first.key_id,
            second.key_id,
        }
        [event] = [e for e in sink.events if e.event == "key_type_retired"]
        assert event.key_type == "financal_data"
        # the pii key was not touched, and the typo does not come back by accident
        assert (await manager.get_active_key(KeyType.PII)).status is KeyStatus.ACTIVE
        with pytest.raises(ValueError, match="did you mean financial_data"):
            await service.encrypt_field("1.00", "financal_data")
        assert {k.key_id for k in await manager.list_keys()} == before
        with pytest.raises(KeyStateError, match="already destroyed"):
            await manager.retire_key_type(typo, confirm_unreferenced=[first.key_id])
        with pytest.raises(KeyNotFoundError):
            await manager.retire_key_type("never_made", confirm_unreferenced=[])


async def test_cleanup_says_why_a_confirmed_key_was_not_destroyed(
    tmp_path: Path, master_key: bytes
) -> None:
    clock = ManualClock()
    async with open_service(tmp_path / "keys.json", master_key, clock=clock) as service:
        manager = service.key_manager
        v1 = await manager.get_active_key(KeyType.FINANCIAL_DATA)
        v2 = await manager.rotate_key(KeyType.FINANCIAL_DATA, force=True)
        report = await manager.cleanup_report(
            confirm_unreferenced=[v1.key_id, v2.key_id, "pii-v9-00000000"]
        )
        assert report["destroyed"] == []
        reasons = {item["key_id"]: item["reason"] for item in report["kept"]}
        assert reasons[v1.key_id].startswith("not past max age + grace (until 2027-01-31)")
        assert f"aiocrypt keys retire {v1.key_id}" in reasons[v1.key_id]
        assert reasons[v2.key_id].startswith("the active financial_data key is never destroyed")
        assert reasons["pii-v9-00000000"] == "no such key in this store"
        clock.advance(days=365 + 30)
        report = await manager.cleanup_report(confirm_unreferenced=[v1.key_id])
        assert [d["key_id"] for d in report["destroyed"]] == [v1.key_id]


async def test_a_confirmation_never_outweighs_the_census(tmp_path: Path, master_key: bytes) -> None:
    """The census counts a row on v1: neither raising the minimum decryption version
    nor cleanup past grace destroys or disables v1, whatever the caller confirms."""
    clock = ManualClock()
    async with open_service(tmp_path / "keys.json", master_key, clock=clock) as service:
        manager = service.key_manager
        v1 = await manager.get_active_key(KeyType.PII)
        token = await service.encrypt_field("123-45-6789", KeyType.PII, context="p.ssn")
        await manager.rotate_key(KeyType.PII, force=True)
        census = {v1.key_id: 1}
        with pytest.raises(KeyStateError, match=f"may still reference {v1.key_id}"):
            await manager.set_min_decryption_version(
                KeyType.PII, 2, census=census, confirm_unreferenced=[v1.key_id]
            )
        clock.advance(days=5 * 365)
        report = await manager.cleanup_report(census=census, confirm_unreferenced=[v1.key_id])
        assert report["destroyed"] == []
        assert [item["reason"] for item in report["kept"]] == [
            "data may still reference it: the census reports 1 rows"
        ]
        assert await manager.get_min_decryption_version(KeyType.PII) == 1
        # past grace, v1 still opens for the re-encryption that will move the row
        assert (
            service.keyring.decrypt(token, KeyType.PII, context="p.ssn", for_reencryption=True)
            == "123-45-6789"
        )
        # the census at 0 is evidence enough, with or without a confirmation
        assert await manager.set_min_decryption_version(KeyType.PII, 2, census={v1.key_id: 0}) == 2


async def test_cleanup_reports_forced_destruction_as_a_flag(
    tmp_path: Path, master_key: bytes
) -> None:
    """The typed report says which keys went without a reference check (not a word
    hidden in a reason string)."""
    clock = ManualClock()
    async with open_service(tmp_path / "keys.json", master_key, clock=clock) as service:
        manager = service.key_manager
        v1 = await manager.get_active_key(KeyType.PII)
        await manager.rotate_key(KeyType.PII, force=True)
        w1 = await manager.get_active_key(KeyType.FINANCIAL_DATA)
        await manager.rotate_key(KeyType.FINANCIAL_DATA, force=True)
        clock.advance(days=5 * 365)
        report = await manager.cleanup(census={v1.key_id: 0}, force=True)
        by_id = {entry.key_id: entry for entry in report.destroyed}
        assert set(by_id) == {v1.key_id, w1.key_id}
        assert by_id[v1.key_id].forced is False
        assert by_id[v1.key_id].reason == "census: no rows left"
        assert by_id[w1.key_id].forced is True
        assert report.kept == ()
        assert report.to_dict()["destroyed"] == [
            {"key_id": e.key_id, "reason": e.reason} for e in report.destroyed
        ]
