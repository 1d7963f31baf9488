"""Subject keys on the real stores (Redis, PostgreSQL, the file), and the store attacker.

The attacker writes the stores directly and holds no KEK (docs/threat-model.md).
A forgotten subject key whose row they put back from a backup stays refused: its
id is in the sealed keyset's forgotten-set. Rolling the keyset back to before the
forget is refused by the guard's high-water mark. A record moved to another
subject or swapped with another's fails authentication instead of serving the
wrong key.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from security.test_storage_attacker import STORES, Victim, integrity_events

from aiocrypt import (
    DecryptionError,
    DecryptionFailure,
    EncryptionConfig,
    EncryptionService,
    KeyStoreIntegrityError,
    KeyType,
)
from aiocrypt._subjects import SubjectKeyRecord

PII = KeyType.PII


@pytest.fixture(params=STORES)
async def victim(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    v = Victim(request.param, tmp_path)
    try:
        yield v
    finally:
        await v.cleanup()


async def put_row(victim: Victim, record: SubjectKeyRecord) -> None:
    """The attacker writes a subject-key row back as it was (a backup's copy)."""
    if victim.kind == "redis":
        prefix = f"aiocrypt-attack-{victim.suffix}:subjects:"
        r = victim.raw.r  # type: ignore[attr-defined]
        await r.hset(f"{prefix}id", record.key_id, record.to_json())
        await r.hset(f"{prefix}lookup", record.lookup, record.key_id)
        await r.zadd(f"{prefix}wrap:{record.wrapping_key_id}", {record.key_id: 0})
    elif victim.kind == "postgres":
        conn = await victim.raw._c()  # type: ignore[attr-defined]
        await conn.execute(
            f'DELETE FROM "attack_{victim.suffix}".subject_keys WHERE lookup = $1 AND id <> $2',
            record.lookup,
            record.key_id,
        )
        await conn.execute(
            f'INSERT INTO "attack_{victim.suffix}".subject_keys VALUES ($1, $2, $3, true, $4) '
            "ON CONFLICT (id) DO UPDATE SET lookup = EXCLUDED.lookup, live = true, "
            "wrapping_key_id = EXCLUDED.wrapping_key_id, record = EXCLUDED.record",
            record.key_id,
            record.lookup,
            record.wrapping_key_id,
            record.to_json(),
        )
    else:
        path = victim.tmp_path / ".keys.json.subjects.json"
        doc = json.loads(path.read_bytes())
        doc["records"] = [r for r in doc["records"] if json.loads(r)["key_id"] != record.key_id]
        doc["records"].append(record.to_json())
        path.write_text(json.dumps(doc))


def service(victim: Victim, **kwargs: Any) -> tuple[EncryptionService, Any]:
    manager, sink = victim.manager(**kwargs)
    return EncryptionService(manager), sink


async def row_of(svc: EncryptionService, subject: str) -> SubjectKeyRecord:
    store = await svc.key_manager.subjects.store()
    record = await store.find(await svc.subject_reference(subject, PII))
    assert record is not None
    return record


async def refused(svc: EncryptionService, token: str) -> None:
    with pytest.raises(DecryptionError) as info:
        await svc.decrypt_field(token, PII, context="users.email")
    assert info.value.reason is DecryptionFailure.SUBJECT_FORGOTTEN


async def test_round_trip_forget_and_restart(victim: Victim) -> None:
    svc, _ = service(victim)
    async with svc:
        token = await svc.encrypt_field(
            "a@example.com", PII, context="users.email", subject="user:1"
        )
        other = await svc.encrypt_field(
            "b@example.com", PII, context="users.email", subject="user:2"
        )
        await svc.forget_subject("user:1", key_type=PII)
        await refused(svc, token)
    svc, _ = service(victim)  # a process started after the forget
    async with svc:
        await refused(svc, token)
        assert await svc.decrypt_field(other, PII, context="users.email") == "b@example.com"
        again = await svc.encrypt_field(
            "c@example.com", PII, context="users.email", subject="user:1"
        )
        assert again.split(".")[1] != token.split(".")[1]
        assert await svc.decrypt_field(again, PII, context="users.email") == "c@example.com"
        census = await svc.key_manager.subject_census(PII)
        assert sum(census.values()) == 2


async def test_two_processes_making_one_subjects_first_key_end_with_one(victim: Victim) -> None:
    a, _ = service(victim)
    b, _ = service(victim)
    async with a, b:
        await a.encrypt_field(0, PII)  # the key type exists before the race
        await b.key_manager.refresh(force=True)
        ta, tb = await asyncio.gather(
            a.encrypt_field(1, PII, subject="user:9"), b.encrypt_field(2, PII, subject="user:9")
        )
        assert ta.split(".")[1] == tb.split(".")[1]
        assert await a.decrypt_field(tb, PII) == 2 and await b.decrypt_field(ta, PII) == 1


async def test_a_forget_reaches_another_process_with_the_key_cached(victim: Victim) -> None:
    a, _ = service(victim)
    b, _ = service(victim)
    async with a, b:
        token = await a.encrypt_field("x", PII, context="users.email", subject="user:3")
        assert await b.decrypt_field(token, PII, context="users.email") == "x"  # b caches it
        await a.forget_subject("user:3")
        await b.key_manager.refresh(force=True)  # what its change feed does
        await refused(b, token)


async def test_a_forgotten_row_put_back_from_a_backup_stays_refused(victim: Victim) -> None:
    svc, _ = service(victim)
    async with svc:
        token = await svc.encrypt_field(
            "a@example.com", PII, context="users.email", subject="user:1"
        )
        backup = await row_of(svc, "user:1")
        await svc.forget_subject("user:1", key_type=PII)
        await put_row(victim, backup)
        await refused(svc, token)
        # nor does the subject get the revived key back
        again = await svc.encrypt_field("n", PII, context="users.email", subject="user:1")
        assert again.split(".")[1] != backup.key_id
    svc, _ = service(victim)  # nor in a fresh process
    async with svc:
        await put_row(victim, backup)
        await refused(svc, token)


async def test_rolling_the_keyset_back_to_before_the_forget_is_refused(
    victim: Victim, tmp_path: Path
) -> None:
    config = EncryptionConfig(keyset_state_path=str(tmp_path / "state.json"))
    svc, sink = service(victim, config=config)
    async with svc:
        token = await svc.encrypt_field("a", PII, context="users.email", subject="user:1")
        keyset_before = await victim.raw.get_raw()
        backup = await row_of(svc, "user:1")
        await svc.forget_subject("user:1", key_type=PII)
        await victim.raw.set_raw(keyset_before)
        await put_row(victim, backup)
        await svc.key_manager.refresh(force=True)
        assert integrity_events(sink)  # the rollback was seen and refused
        await refused(svc, token)
    svc, _ = service(victim, config=config)  # a restart on the same host
    with pytest.raises(KeyStoreIntegrityError):
        await svc.start()


async def test_a_record_moved_to_another_subject_fails_authentication(victim: Victim) -> None:
    svc, sink = service(victim)
    async with svc:
        await svc.encrypt_field("a", PII, subject="user:1")
        await svc.encrypt_field("b", PII, subject="user:2")
        one, two = await row_of(svc, "user:1"), await row_of(svc, "user:2")
        # user:2's lookup now files user:1's wrapped DEK under user:2's key id
        await put_row(
            victim,
            SubjectKeyRecord(
                two.key_id, PII, two.lookup, one.wrapping_key_id, one.wrapped, one.created_at
            ),
        )
        svc.key_manager.subjects.clear()
        with pytest.raises(KeyStoreIntegrityError):
            await svc.encrypt_field("c", PII, subject="user:2")
        assert integrity_events(sink)
