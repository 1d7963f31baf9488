"""The storage attacker: writes Postgres, Redis and the key file, holds no KEK.

Each test mounts one attack from issue 14 against a real store (the Redis and
PostgreSQL services, the file store on disk) through the store's own raw
interface (redis-py, asyncpg, the file's bytes), exactly as someone with write
access would, and shows it fail: the application never encrypts under a key the
attacker chose, revived or relabelled; a tampered keyset raises
``KeyStoreIntegrityError`` (naming the key id) and is audited; the running
process keeps serving the keys it last verified; rollback is refused; usage
counters do not go down. docs/threat-model.md points here, attack by attack.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from _services import PG_HOST, PG_PORT, REDIS_HOST, REDIS_PORT, require_service

from aiocrypt import (
    DecryptionError,
    EncryptionConfig,
    EncryptionService,
    KeyManager,
    KeyStatus,
    KeyStoreIntegrityError,
    KeyType,
)
from aiocrypt.audit import Auditor, MemoryAuditSink
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore, KeyStore

REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/14"
POSTGRES_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"


class RawStore:
    """What the attacker reaches: the store's raw records, revision, seal and counters."""

    async def records(self) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    async def put_record(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    async def get_raw(self) -> Any:
        raise NotImplementedError

    async def set_raw(self, snapshot: Any) -> None:
        raise NotImplementedError

    async def set_usage(self, key_id: str, value: int) -> None:
        raise NotImplementedError

    async def drop_seal(self) -> None:
        raise NotImplementedError

    async def delete_record(self, key_id: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class RawRedis(RawStore):
    def __init__(self, prefix: str) -> None:
        import redis.asyncio as aioredis

        self.r = aioredis.Redis.from_url(REDIS_URL)
        self.prefix = prefix

    async def records(self) -> dict[str, dict[str, Any]]:
        raw = await self.r.hgetall(f"{self.prefix}keys")
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    async def put_record(self, record: dict[str, Any]) -> None:
        await self.r.hset(f"{self.prefix}keys", record["key_id"], json.dumps(record))

    async def get_raw(self) -> Any:
        return (
            await self.r.hgetall(f"{self.prefix}keys"),
            await self.r.get(f"{self.prefix}revision"),
            await self.r.get(f"{self.prefix}seal"),
        )

    async def set_raw(self, snapshot: Any) -> None:
        keys, revision, seal = snapshot
        await self.r.delete(f"{self.prefix}keys")
        await self.r.hset(f"{self.prefix}keys", mapping=keys)
        await self.r.set(f"{self.prefix}revision", revision)
        await self.r.set(f"{self.prefix}seal", seal)

    async def set_usage(self, key_id: str, value: int) -> None:
        await self.r.hset(f"{self.prefix}usage", key_id, value)

    async def drop_seal(self) -> None:
        await self.r.delete(f"{self.prefix}seal")

    async def delete_record(self, key_id: str) -> None:
        await self.r.hdel(f"{self.prefix}keys", key_id)

    async def close(self) -> None:
        await self.r.aclose()


class RawPostgres(RawStore):
    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.conn: Any = None

    async def _c(self) -> Any:
        import asyncpg

        if self.conn is None:
            self.conn = await asyncpg.connect(POSTGRES_DSN)
        return self.conn

    async def records(self) -> dict[str, dict[str, Any]]:
        rows = await (await self._c()).fetch(f'SELECT key_id, record FROM "{self.schema}".keys')
        return {r["key_id"]: json.loads(r["record"]) for r in rows}

    async def put_record(self, record: dict[str, Any]) -> None:
        await (await self._c()).execute(
            f'INSERT INTO "{self.schema}".keys (key_id, record, revision) VALUES ($1, $2, 0) '
            "ON CONFLICT (key_id) DO UPDATE SET record = EXCLUDED.record",
            record["key_id"],
            json.dumps(record),
        )

    async def get_raw(self) -> Any:
        c = await self._c()
        return (
            await c.fetch(f'SELECT key_id, record::text, revision FROM "{self.schema}".keys'),
            await c.fetchrow(f'SELECT revision, seal FROM "{self.schema}".revision'),
        )

    async def set_raw(self, snapshot: Any) -> None:
        rows, head = snapshot
        c = await self._c()
        async with c.transaction():
            await c.execute(f'DELETE FROM "{self.schema}".keys')
            for row in rows:
                await c.execute(
                    f'INSERT INTO "{self.schema}".keys VALUES ($1, $2::jsonb, $3)',
                    row["key_id"],
                    row["record"],
                    row["revision"],
                )
            await c.execute(
                f'UPDATE "{self.schema}".revision SET revision = $1, seal = $2',
                head["revision"],
                head["seal"],
            )

    async def set_usage(self, key_id: str, value: int) -> None:
        await (await self._c()).execute(
            f'INSERT INTO "{self.schema}".usage VALUES ($1, $2) '
            "ON CONFLICT (key_id) DO UPDATE SET count = EXCLUDED.count",
            key_id,
            value,
        )

    async def drop_seal(self) -> None:
        await (await self._c()).execute(f'UPDATE "{self.schema}".revision SET seal = NULL')

    async def delete_record(self, key_id: str) -> None:
        await (await self._c()).execute(
            f'DELETE FROM "{self.schema}".keys WHERE key_id = $1', key_id
        )

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


class RawFile(RawStore):
    """The file store is MAC'd as a whole, so its attacker replays whole files."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def get_raw(self) -> Any:
        return self.path.read_bytes()

    async def set_raw(self, snapshot: Any) -> None:
        self.path.write_bytes(snapshot)

    async def records(self) -> dict[str, dict[str, Any]]:
        doc = json.loads(self.path.read_bytes())
        return {r["key_id"]: r for r in doc["keys"]}

    async def put_record(self, record: dict[str, Any]) -> None:
        doc = json.loads(self.path.read_bytes())
        doc["keys"] = [record if r["key_id"] == record["key_id"] else r for r in doc["keys"]]
        self.path.write_text(json.dumps(doc))

    async def set_usage(self, key_id: str, value: int) -> None:
        usage = self.path.with_name(f".{self.path.name}.usage.json")
        data = json.loads(usage.read_bytes()) if usage.exists() else {}
        data[key_id] = value
        usage.write_text(json.dumps(data))

    async def drop_seal(self) -> None:
        doc = json.loads(self.path.read_bytes())
        doc.pop("seal", None)
        self.path.write_text(json.dumps(doc))


STORES = ["redis", "postgres", "file"]


class Victim:
    """The application's side: a store, the KEK, a manager per process, its audit events."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.kek = LocalKekProvider(os.urandom(32))
        self.suffix = secrets.token_hex(5)
        self.raw: RawStore
        if kind == "redis":
            require_service("Redis", REDIS_HOST, REDIS_PORT)
            self.raw = RawRedis(f"aiocrypt-attack-{self.suffix}:")
        elif kind == "postgres":
            require_service("PostgreSQL", PG_HOST, PG_PORT)
            self.raw = RawPostgres(f"attack_{self.suffix}")
        else:
            self.raw = RawFile(tmp_path / "keys.json")
        self.managers: list[KeyManager] = []

    def store(self) -> KeyStore:
        if self.kind == "redis":
            from aiocrypt.keystore.redis import RedisKeyStore

            return RedisKeyStore(REDIS_URL, prefix=f"aiocrypt-attack-{self.suffix}:")
        if self.kind == "postgres":
            from aiocrypt.keystore.postgres import PostgresKeyStore

            return PostgresKeyStore(POSTGRES_DSN, schema=f"attack_{self.suffix}")
        return FileKeyStore(self.tmp_path / "keys.json", self.kek)

    def manager(
        self, config: EncryptionConfig | None = None, **kwargs: Any
    ) -> tuple[KeyManager, MemoryAuditSink]:
        sink = MemoryAuditSink()
        manager = KeyManager(
            self.store(), self.kek, config, watch=False, auditor=Auditor([sink]), **kwargs
        )
        self.managers.append(manager)
        return manager, sink

    async def cleanup(self) -> None:
        for manager in self.managers:
            await manager.close()
        store = self.store()
        if hasattr(store, "drop"):
            await store.drop()
        await store.close()
        await self.raw.close()


@pytest.fixture(params=STORES)
async def victim(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Victim]:
    v = Victim(request.param, tmp_path)
    try:
        yield v
    finally:
        await v.cleanup()


def integrity_events(sink: MemoryAuditSink) -> list[Any]:
    return [e for e in sink.events if e.event == "keystore_integrity_failure"]


def key_id_of(token: str) -> str:
    return token.split(".")[1]


async def revive(victim: Victim, key_id: str, **changes: Any) -> None:
    """The attacker rewrites one record in place (status, version, flags...)."""
    records = await victim.raw.records()
    record = dict(records[key_id])
    record.update(changes)
    await victim.raw.put_record(record)


# -- 2. key records edited in the store ---------------------------------------------


@pytest.mark.parametrize("withdraw", ["compromised", "revoked"])
async def test_withdrawn_key_edited_back_to_active_is_refused(
    victim: Victim, withdraw: str
) -> None:
    if victim.kind == "file":
        pytest.skip(
            "the file store's own MAC refuses any edit (test_file_store); "
            "its attacker replays old files: see the rollback tests"
        )
    manager, sink = victim.manager()
    service = EncryptionService(manager)
    async with service:
        old = await manager.get_active_key(KeyType.PII)
        if withdraw == "compromised":
            await manager.mark_compromised(old.key_id, "laptop stolen")
        else:
            await manager.revoke_key(old.key_id, "left the company")
        new = await manager.get_active_key(KeyType.PII)
        assert new.key_id != old.key_id

        # The attacker makes the withdrawn key active again, as the newest version, and
        # retires the real one, so a process that trusted the records would encrypt with
        # a DEK the attacker already holds.
        await revive(
            victim, old.key_id, status="active", version=old.version, reencrypt_required=False
        )
        await revive(victim, new.key_id, status="decrypt_only")

        await manager.refresh(force=True)  # a running process: keeps what it verified
        assert isinstance(manager.integrity_error, KeyStoreIntegrityError)
        assert manager.integrity_error.key_id in (old.key_id, new.key_id)
        token = await service.encrypt_field("4111 1111 1111 1111", KeyType.PII, context="c")
        assert key_id_of(token) == new.key_id
        events = integrity_events(sink)
        assert events and events[-1].key_id in (old.key_id, new.key_id)
        with pytest.raises(KeyStoreIntegrityError):
            await manager.list_keys()

    fresh, fresh_sink = victim.manager()  # a process started after the edit: refuses
    with pytest.raises(KeyStoreIntegrityError) as info:
        await EncryptionService(fresh).encrypt_field("x", KeyType.PII, context="c")
    assert info.value.key_id in (old.key_id, new.key_id)
    assert integrity_events(fresh_sink)


async def test_destroyed_key_resurrected_from_an_old_record_copy_is_refused(victim: Victim) -> None:
    if victim.kind == "file":
        pytest.skip("the file store's own MAC refuses any edit; rollback tests cover it")
    manager, _ = victim.manager()
    async with manager:
        old = await manager.get_active_key(KeyType.PII)
        copy = (await victim.raw.records())[old.key_id]  # the attacker keeps a copy
        await manager.rotate_key(KeyType.PII, force=True)
        await manager.revoke_key(old.key_id)
        await manager.cleanup_expired_keys(confirm_unreferenced=[old.key_id], force=True)
        await victim.raw.put_record(copy)  # material and "active" back
        fresh, fresh_sink = victim.manager()
        with pytest.raises(KeyStoreIntegrityError) as info:
            await fresh.open()
        assert info.value.key_id == old.key_id
        assert integrity_events(fresh_sink)[0].key_id == old.key_id


async def test_relabelled_cached_key_is_refused_by_a_running_process(victim: Victim) -> None:
    """The DEK cache used to reuse an unwrapped key when its wrapped bytes were unchanged,
    so a record relabelled to another key type / a new version / active again was served
    from cache. Now every record is authenticated before the cache is consulted."""
    if victim.kind == "file":
        pytest.skip("the file store's own MAC refuses any edit")
    manager, _ = victim.manager()
    async with manager:
        pii = await manager.get_active_key(KeyType.PII)
        fin = await manager.get_active_key(KeyType.FINANCIAL_DATA)
        # relabel the PII key as the newest financial_data key (same wrapped bytes)
        await revive(victim, pii.key_id, key_type="financial_data", version=fin.version + 1)
        await manager.refresh(force=True)
        assert manager.integrity_error is not None
        assert manager.integrity_error.key_id == pii.key_id
        assert manager.keyring.active(KeyType.FINANCIAL_DATA).key_id == fin.key_id
        assert manager.keyring.active(KeyType.PII).key_id == pii.key_id


@pytest.mark.parametrize("attack", ["drop_seal", "forged_record", "revision_bumped"])
async def test_unsealed_forged_or_renumbered_keysets_are_refused(
    victim: Victim, attack: str
) -> None:
    if victim.kind == "file":
        pytest.skip("the file store's own MAC refuses any edit")
    manager, sink = victim.manager()
    async with manager:
        key = await manager.get_active_key(KeyType.PII)
        if attack == "drop_seal":
            await victim.raw.drop_seal()
        elif attack == "forged_record":
            record = dict((await victim.raw.records())[key.key_id])
            record.update(key_id="pii-v9-aaaaaaaa", version=9)
            await victim.raw.put_record(record)
        else:
            snapshot = await victim.raw.get_raw()
            if victim.kind == "redis":
                await victim.raw.set_raw((snapshot[0], int(snapshot[1]) + 5, snapshot[2]))
            else:
                rows, head = snapshot
                await victim.raw.set_raw(
                    (rows, {"revision": head["revision"] + 5, "seal": head["seal"]})
                )
        await manager.refresh(force=True)
        assert manager.integrity_error is not None
        assert manager.keyring.active(KeyType.PII).key_id == key.key_id
        assert integrity_events(sink)
    fresh, _ = victim.manager()
    with pytest.raises(KeyStoreIntegrityError):
        await fresh.open()


# -- 4. rollback ----------------------------------------------------------------------


async def test_rollback_to_an_older_authentic_store_is_refused(
    victim: Victim, tmp_path: Path
) -> None:
    """Restore a backup taken before `keys compromise`: authentic, but older."""
    state = tmp_path / "host-state"
    state.mkdir()
    config = EncryptionConfig(keyset_state_path=str(state / "keyset.json"))
    manager, sink = victim.manager(config)
    async with manager:
        old = await manager.get_active_key(KeyType.PII)
        backup = await victim.raw.get_raw()
        await manager.mark_compromised(old.key_id, "leaked")
        new = await manager.get_active_key(KeyType.PII)
        await victim.raw.set_raw(backup)

        await manager.refresh(force=True)  # the running process
        assert manager.integrity_error is not None
        assert "went back from revision" in str(manager.integrity_error)
        assert manager.keyring.active(KeyType.PII).key_id == new.key_id
        assert integrity_events(sink)

    # A process started later on the same host: the persisted high-water mark refuses it.
    fresh, _ = victim.manager(config)
    with pytest.raises(KeyStoreIntegrityError, match="went back from revision"):
        await fresh.open()
    assert oct((state / "keyset.json").stat().st_mode & 0o777) == "0o600"


async def test_usage_counters_cannot_be_reset_or_made_negative(victim: Victim) -> None:
    """The counter set negative (or back to 0) used to let a key encrypt forever."""
    config = EncryptionConfig(rotation_policies={"pii": {"max_encryptions": 40}})  # type: ignore[dict-item]  # read by from_dict
    manager, sink = victim.manager(config)
    service = EncryptionService(manager)
    async with service:
        tokens = [await service.encrypt_field(i, KeyType.PII, context="c") for i in range(30)]
        first = key_id_of(tokens[0])
        for value in (-(10**9), 0):
            await victim.raw.set_usage(first, value)
            tokens += [await service.encrypt_field(i, KeyType.PII, context="c") for i in range(30)]
        per_key: dict[str, int] = {}
        for token in tokens:
            per_key[key_id_of(token)] = per_key.get(key_id_of(token), 0) + 1
        assert max(per_key.values()) <= 40, per_key
        assert len(per_key) >= 2  # the key rotated at its limit
        assert "usage_counter_rolled_back" in sink.names()

    # A fresh process without a host state file: a negative counter counts from zero.
    await victim.raw.set_usage(first, -(10**9))
    fresh, _ = victim.manager(config)
    async with fresh:
        dk = (await fresh.reserve_usage(KeyType.PII)).active(KeyType.PII)
        assert dk.allowance <= 40


# -- adoption of a store written before seals ---------------------------------------


LEGACY = Path(__file__).parent.parent / "vectors" / "legacy_store"


async def test_a_store_written_by_the_previous_release_is_adopted_once(tmp_path: Path) -> None:
    """tests/vectors/legacy_store/ was written by aiocrypt 0.1.0 (commit e543e0e): a file
    store with rotated, revoked and compromised keys and tokens made under them."""
    meta = json.loads((LEGACY / "meta.json").read_text())
    shutil.copy(LEGACY / "keys.json", tmp_path / "keys.json")
    os.chmod(tmp_path / "keys.json", 0o600)
    kek = LocalKekProvider(bytes.fromhex(meta["master_key_hex"]))
    sink = MemoryAuditSink()
    manager = KeyManager(
        FileKeyStore(tmp_path / "keys.json", kek), kek, watch=False, auditor=Auditor([sink])
    )
    with pytest.raises(KeyStoreIntegrityError, match="keys adopt"):
        await manager.open()
    report = await manager.adopt_store()
    assert not report.already_sealed and set(report.key_ids) == set(meta["statuses"])
    assert "keystore_adopted" in sink.names()
    async with manager:
        for key in await manager.list_keys():
            assert key.status.value == meta["statuses"][key.key_id]
        service = EncryptionService(manager)
        for item in meta["tokens"]:
            status = meta["statuses"][key_id_of(item["token"])]
            if status in ("compromised", "revoked"):  # withdrawn: plain reads refuse
                with pytest.raises(DecryptionError):
                    await service.decrypt_field(
                        item["token"], item["key_type"], context=item["context"]
                    )
            else:
                assert (
                    await service.decrypt_field(
                        item["token"], item["key_type"], context=item["context"]
                    )
                    == item["value"]
                )
        assert (await manager.adopt_store()).already_sealed
    # and every status stays as adopted: no compromised key is active
    compromised = [k for k, s in meta["statuses"].items() if s == KeyStatus.COMPROMISED.value]
    assert compromised


async def test_legacy_records_in_redis_or_postgres_are_adopted_once(victim: Victim) -> None:
    """The same 0.1.0 records, written to Redis / Postgres as 0.1.0 wrote them (no seal)."""
    if victim.kind == "file":
        pytest.skip("the file store's adoption is the test above")
    from aiocrypt import EncryptionKey

    meta = json.loads((LEGACY / "meta.json").read_text())
    records = [
        EncryptionKey.from_dict(r) for r in json.loads((LEGACY / "keys.json").read_text())["keys"]
    ]
    store = victim.store()
    await store.open()
    await store.write(records, expected_revision=0)  # what 0.1.0 did: records, no seal
    await store.close()
    kek = LocalKekProvider(bytes.fromhex(meta["master_key_hex"]))
    sink = MemoryAuditSink()
    manager = KeyManager(victim.store(), kek, watch=False, auditor=Auditor([sink]))
    victim.managers.append(manager)
    with pytest.raises(KeyStoreIntegrityError, match="keys adopt"):
        await manager.open()
    # A record planted before adoption is not adopted: a genuine wrapped PII DEK copied
    # under a new id does not unwrap (the wrap binds the key id), random bytes neither.
    pii = next(r for r in records if r.key_type is KeyType.PII)
    for wrapped in (pii.wrapped_key, os.urandom(60)):
        assert wrapped is not None
        await victim.raw.put_record(
            {
                **pii.to_dict(),
                "key_id": "pii-v7-0badc0de",
                "version": 7,
                "status": "decrypt_only",
                "wrapped_key": base64.b64encode(wrapped).decode(),
            }
        )
        with pytest.raises(KeyStoreIntegrityError, match=r"pii-v7-0badc0de.*does not unwrap"):
            await manager.adopt_store()
    await victim.raw.delete_record("pii-v7-0badc0de")
    report = await manager.adopt_store()
    assert not report.already_sealed
    await manager.open()
    assert {k.key_id: k.status.value for k in await manager.list_keys()} == meta["statuses"]
    assert "keystore_adopted" in sink.names()
