"""Subject-key paths the API tests leave: malformed records, rows an attacker moved or
edited, a process whose keyset is older than a forget, the bounded caches, and the
store that keeps no subject keys.

The memory store throughout; the attacker writes its subject-key maps directly (as
tests/subjects/test_subject_stores.py does on the real stores) and holds no KEK.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import pickle
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aiocrypt import (
    DecryptionError,
    DecryptionFailure,
    EncryptionKey,
    EncryptionService,
    KeyManager,
    KeyStateError,
    KeyStatus,
    KeyStoreIntegrityError,
    KeyType,
)
from aiocrypt._crypto import DataKey
from aiocrypt._subjects import (
    SubjectKeyRecord,
    new_subject_key_id,
    token_key_id,
    tombstone_record,
    unwrap_subject_key,
    wrap_subject_key,
)
from aiocrypt.audit import Auditor, MemoryAuditSink
from aiocrypt.keystore import KeySet, KeyStore, MemoryKeyStore
from aiocrypt.keystore._subjects_memory import MemorySubjectKeyStore
from aiocrypt.testing import FakeKekProvider, make_service

PII = KeyType.PII
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
WHERE = "test store"


@pytest.fixture
async def svc() -> AsyncIterator[Any]:
    sink = MemoryAuditSink()
    service: Any = make_service(auditor=Auditor([sink]), watch=False)
    service.sink = sink
    async with service:
        yield service


def rows(manager: KeyManager) -> MemorySubjectKeyStore:
    store = manager.store.subject_store()
    assert isinstance(store, MemorySubjectKeyStore)
    return store


def put_row(store: MemorySubjectKeyStore, record: SubjectKeyRecord) -> None:
    """The attacker writes a row (a backup's copy, or an edited one)."""
    store.by_id[record.key_id] = record
    store.by_lookup[record.lookup] = record


# -- records (pure) ---------------------------------------------------------------------


def record_doc(**changes: Any) -> str:
    record = wrap_subject_key(
        AESGCM(os.urandom(32)),
        "pii-v1-aaaaaaaa",
        os.urandom(32),
        new_subject_key_id(),
        "ab" * 32,
        PII,
        NOW,
    )
    doc = json.loads(record.to_json())
    doc.update(changes)
    return json.dumps(doc)


def test_a_well_formed_record_round_trips() -> None:
    text = record_doc()
    assert json.loads(SubjectKeyRecord.from_json(text, WHERE).to_json()) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        record_doc(created_at="2026-01-01T00:00:00"),  # no time zone
        record_doc(state="archived"),
        record_doc(wrapped=None),  # live without a DEK
        json.dumps({**json.loads(record_doc()), "state": "forgotten"}),  # a DEK kept
        record_doc(key_id="pii-v1-aaaaaaaa"),  # a version key's id
        record_doc(lookup="AB" * 32),
        record_doc(wrapped="not base64!"),
        record_doc(version="one"),
        json.dumps({"key_id": new_subject_key_id()}),
        "[1, 2]",
        "{",
    ],
)
def test_a_malformed_record_is_an_integrity_error(text: str) -> None:
    with pytest.raises(KeyStoreIntegrityError, match="test store holds a malformed subject-key"):
        SubjectKeyRecord.from_json(text, WHERE)


def test_a_record_shows_no_material_and_refuses_pickling() -> None:
    record = SubjectKeyRecord.from_json(record_doc(), WHERE)
    assert repr(record) == f"<SubjectKeyRecord {record.key_id} pii live>"
    with pytest.raises(TypeError, match="SubjectKeyRecord objects cannot be pickled"):
        pickle.dumps(record)


def test_unwrap_refuses_a_record_without_or_with_a_cut_dek() -> None:
    cipher = AESGCM(os.urandom(32))
    material = os.urandom(32)
    record = wrap_subject_key(
        cipher, "pii-v1-aaaaaaaa", material, new_subject_key_id(), "ab" * 32, PII, NOW
    )
    assert unwrap_subject_key(cipher, record) == material
    assert record.wrapped is not None
    assert (
        unwrap_subject_key(cipher, dataclasses.replace(record, wrapped=record.wrapped[:-1])) is None
    )
    assert unwrap_subject_key(cipher, record.forgotten()) is None


# -- the cache ------------------------------------------------------------------------------


async def test_the_cache_reuses_a_key_until_it_is_too_old(svc: Any) -> None:
    subjects = svc.key_manager.subjects
    await svc.key_manager.get_active_key(PII)  # what the service makes sure of first
    assert repr(subjects) == "<SubjectKeys cached=0+0>"
    first = await subjects.key_for(PII, "user:1")
    assert await subjects.key_for(PII, "user:1") is first  # no store read
    assert repr(subjects) == "<SubjectKeys cached=1+1>"
    for entry in [*subjects._by_subject.entries.values(), *subjects._by_id.entries.values()]:
        entry.until = 0.0  # dek_cache_seconds have passed
    assert subjects.cached(PII, "user:1") is None
    assert subjects.cached_ring(first.key_id) is None
    again = await subjects.key_for(PII, "user:1")  # read from the store again
    assert again is not first and again.key_id == first.key_id


async def test_the_wrap_cipher_cache_is_bounded(svc: Any) -> None:
    subjects = svc.key_manager.subjects
    versions = [
        DataKey(
            EncryptionKey(
                key_id=f"pii-v{n}-aaaaaaaa",
                key_type=PII,
                version=n,
                status=KeyStatus.DECRYPT_ONLY,
                created_at=NOW,
                expires_at=NOW + dt.timedelta(days=1),
            ),
            os.urandom(32),
        )
        for n in range(1, 67)
    ]
    ciphers = [subjects._cipher(dk) for dk in versions]  # one per wrapping key
    assert len(subjects._ciphers) <= 65
    again = subjects._cipher(versions[0])  # dropped with the rest, made again alike
    nonce = os.urandom(12)
    assert again.decrypt(nonce, ciphers[0].encrypt(nonce, b"dek", None), None) == b"dek"
    assert subjects._cipher(versions[0]) is again


# -- lookups and reads that fail ----------------------------------------------------------------


async def test_no_lookup_before_the_store_has_a_sealed_keyset() -> None:
    async with make_service(watch=False) as service:
        with pytest.raises(KeyStateError, match="no sealed keyset yet: create a key first"):
            service.key_manager.subjects.reference("user:1", PII)


async def test_a_token_naming_no_subject_key_of_this_store_says_so(svc: Any) -> None:
    subjects = svc.key_manager.subjects
    await svc.encrypt_field("x", PII, context="c", subject="user:1")  # a sealed keyset
    with pytest.raises(DecryptionError, match="token names no valid key id") as bad:
        await subjects.ring("S-short")
    assert bad.value.reason is DecryptionFailure.UNKNOWN_KEY
    stranger = new_subject_key_id()
    with pytest.raises(DecryptionError, match=f"subject key {stranger} is not in this key store"):
        await subjects.ring(stranger)


async def test_a_row_filed_under_another_key_id_is_not_that_key(svc: Any) -> None:
    manager = svc.key_manager
    token = await svc.encrypt_field("x", PII, context="c", subject="user:1")
    other = token_key_id(await svc.encrypt_field("y", PII, context="c", subject="user:2"))
    store = rows(manager)
    store.by_id[token_key_id(token)] = store.by_id[other]  # the attacker moves a row
    manager.subjects.clear()
    with pytest.raises(DecryptionError, match="is not in this key store") as info:
        await svc.decrypt_field(token, PII, context="c")
    assert info.value.reason is DecryptionFailure.UNKNOWN_KEY


async def test_an_edited_row_is_not_readable_and_is_audited(svc: Any) -> None:
    manager = svc.key_manager
    token = await svc.encrypt_field("x", PII, context="c", subject="user:1")
    record = rows(manager).by_id[token_key_id(token)]
    assert record.wrapped is not None
    put_row(rows(manager), dataclasses.replace(record, wrapped=os.urandom(len(record.wrapped))))
    manager.subjects.clear()
    with pytest.raises(DecryptionError, match="failed authentication") as info:
        await svc.decrypt_field(token, PII, context="c")
    assert info.value.reason is DecryptionFailure.KEY_NOT_READABLE
    assert "keystore_integrity_failure" in svc.sink.names()


async def test_a_row_relabelled_to_another_key_type_has_no_wrapping_key(svc: Any) -> None:
    manager = svc.key_manager
    token = await svc.encrypt_field("x", PII, context="c", subject="user:1")
    financial = await manager.get_active_key(KeyType.FINANCIAL_DATA)
    record = rows(manager).by_id[token_key_id(token)]
    put_row(rows(manager), dataclasses.replace(record, wrapping_key_id=financial.key_id))
    manager.subjects.clear()
    with pytest.raises(DecryptionError, match=r"its wrapping key .* is not readable") as info:
        await svc.decrypt_field(token, PII, context="c")
    assert info.value.reason is DecryptionFailure.KEY_NOT_READABLE
    with pytest.raises(KeyStateError, match=r"is not readable \(destroyed or disabled\)"):
        await svc.encrypt_field("y", PII, context="c", subject="user:1")


# -- races with other processes ----------------------------------------------------------------


class TombstoningSubjectStore(MemorySubjectKeyStore):
    """Another process forgets the subject with a tombstone while this one files its
    first key: the tombstone lands between this one's find and insert."""

    async def insert(self, record: SubjectKeyRecord) -> SubjectKeyRecord:
        stone = tombstone_record(record.key_type, record.lookup, "", NOW)
        self.by_lookup.setdefault(record.lookup, stone)
        return await super().insert(record)


async def test_a_tombstone_filed_during_the_first_key_wins() -> None:
    async with make_service(watch=False, subject_store=TombstoningSubjectStore()) as service:
        await service.key_manager.get_active_key(PII)
        with pytest.raises(KeyStateError, match="forgotten with a tombstone"):
            await service.encrypt_field("x", PII, context="c", subject="user:1")


async def test_processes_behind_a_forget_refuse_the_restored_row_and_make_a_new_key() -> None:
    """B forgets a subject whose key is wrapped by a version A and C have not seen yet,
    and the row comes back (a backup). They learn of the forget only while opening the
    row: C refuses it for reading, A gives the subject a new key for writing."""
    store, kek = MemoryKeyStore(), FakeKekProvider()
    a, c = (KeyManager(store, kek, watch=False, refresh_interval=3600) for _ in range(2))
    b = KeyManager(store, kek, watch=False)
    service_a, service_b, service_c = (
        EncryptionService(a),
        EncryptionService(b),
        EncryptionService(c),
    )
    async with service_a, service_b, service_c:
        await service_a.encrypt_field("old", PII, context="c")  # version 1, sealed
        await c.refresh(force=True)  # A and C know version 1 only
        await b.rotate_key(PII, force=True)
        token = await service_b.encrypt_field("x", PII, context="c", subject="user:1")
        key_id = token_key_id(token)
        backup = rows(b).by_id[key_id]
        assert (await b.subjects.forget("user:1")).subject_key_ids == (key_id,)
        put_row(rows(b), backup)
        assert a.keyring.get(backup.wrapping_key_id) is None
        assert c.keyring.get(backup.wrapping_key_id) is None

        with pytest.raises(DecryptionError, match="subject forgotten") as info:
            await service_c.decrypt_field(token, PII, context="c")
        assert info.value.reason is DecryptionFailure.SUBJECT_FORGOTTEN

        new = await service_a.encrypt_field("y", PII, context="c", subject="user:1")
        assert token_key_id(new) != key_id
        assert rows(b).by_id[key_id].state == "forgotten"  # the restored row is gone again
        assert await service_b.decrypt_field(new, PII, context="c") == "y"


async def test_rewrap_skips_forgotten_and_unauthentic_rows(
    svc: Any, caplog: pytest.LogCaptureFixture
) -> None:
    manager = svc.key_manager
    tokens = [await svc.encrypt_field("x", PII, context="c", subject=f"user:{n}") for n in range(3)]
    old = manager.keyring.active(PII).key_id
    good, forgotten, edited = (rows(manager).by_id[token_key_id(t)] for t in tokens)
    await manager.subjects.forget("user:1")
    put_row(rows(manager), forgotten)  # restored from a backup: still forgotten
    assert edited.wrapped is not None
    put_row(rows(manager), dataclasses.replace(edited, wrapped=os.urandom(len(edited.wrapped))))
    await manager.rotate_key(PII, force=True)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        await manager.rewrap_subjects(PII, batch_size=0)
    with caplog.at_level(logging.ERROR, logger="aiocrypt.subjects"):
        report = await manager.rewrap_subjects(PII)
    assert report.rewrapped == 1 and dict(report.remaining) == {old: 2}
    assert f"subject key {edited.key_id} does not unwrap: not rewrapped" in caplog.text
    assert rows(manager).by_id[good.key_id].wrapping_key_id == report.wrapping_key_id
    assert await svc.decrypt_field(tokens[0], PII, context="c") == "x"


# -- a store that keeps no subject keys ---------------------------------------------------------


class VersionKeysOnly(KeyStore):
    """A key store of someone's own that keeps version keys only (the default
    ``subject_store()``): here over a memory store."""

    name = "version-keys-only"

    def __init__(self) -> None:
        self._inner = MemoryKeyStore()

    async def read(self) -> KeySet:
        return await self._inner.read()

    async def write(
        self, keys: Sequence[EncryptionKey], *, expected_revision: int, seal: str | None = None
    ) -> int:
        return await self._inner.write(keys, expected_revision=expected_revision, seal=seal)

    def lock(
        self, name: str = "rotation", *, timeout: float = 30.0
    ) -> AbstractAsyncContextManager[None]:
        return self._inner.lock(name, timeout=timeout)

    async def add_usage(self, increments: Mapping[str, int]) -> dict[str, int]:
        return await self._inner.add_usage(increments)

    async def get_usage(self) -> dict[str, int]:
        return await self._inner.get_usage()


async def test_a_store_without_subject_keys_refuses_them_and_counts_none() -> None:
    store = VersionKeysOnly()
    assert store.subject_store() is None
    manager = KeyManager(store, FakeKekProvider(), watch=False)
    async with EncryptionService(manager) as service:
        key = await manager.get_active_key(PII)
        assert not manager.subjects.enabled
        assert await manager.subject_census() == {key.key_id: 0}
        with pytest.raises(KeyStateError, match="the version-keys-only key store keeps no subject"):
            await service.encrypt_field("x", PII, context="c", subject="user:1")
        assert (
            await service.decrypt_field(
                await service.encrypt_field("x", PII, context="c"), PII, context="c"
            )
            == "x"
        )
    assert repr(store) == "<VersionKeysOnly>"
