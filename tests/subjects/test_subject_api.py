"""Subject keys through the service, on the memory store (docs/subjects.md).

Every write path that takes ``subject=`` seals under the subject's own key; the
token names that key (``ac2.S-...``) and opens without the subject; a forget
makes every copy unreadable with the reason ``subject_forgotten`` and leaves
other subjects readable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from aiocrypt import DecryptionError, DecryptionFailure, KeyStateError, KeyType
from aiocrypt._subjects import SUBJECT_TOKEN_PREFIX, is_subject_key_id
from aiocrypt.audit import Auditor, MemoryAuditSink
from aiocrypt.testing import make_service

PII = KeyType.PII


@pytest.fixture
async def svc() -> AsyncIterator[Any]:
    sink = MemoryAuditSink()
    service: Any = make_service(auditor=Auditor([sink]))
    service.sink = sink
    async with service:
        yield service


async def forgotten(awaitable: Awaitable[Any]) -> None:
    with pytest.raises(DecryptionError) as info:
        await awaitable
    assert info.value.reason is DecryptionFailure.SUBJECT_FORGOTTEN
    assert "subject forgotten" in str(info.value)


async def test_every_write_path_seals_under_the_subject_key(svc: Any) -> None:
    field = await svc.encrypt_field("Ada", PII, context="users.name", subject="user:42")
    assert field.startswith(SUBJECT_TOKEN_PREFIX)
    assert "user" not in field and "42" not in field.split(".")[1]
    assert await svc.decrypt_field(field, PII, context="users.name") == "Ada"
    plain = await svc.encrypt_field("Ada", PII, context="users.name")
    assert not plain.startswith(SUBJECT_TOKEN_PREFIX)
    many = await svc.encrypt_many(["a", {"b": 1}, 3], PII, subjects=["user:42", None, "user:7"])
    assert await svc.decrypt_many(many, PII) == ["a", {"b": 1}, 3]
    assert many[0].split(".")[1] == field.split(".")[1]  # one key per subject and key type
    same = await svc.encrypt_many(["x", "y"], PII, subject="user:42")
    assert await svc.decrypt_many(same, PII) == ["x", "y"]
    blob = await svc.encrypt_bulk_data(b"z" * 5000, PII, subject="user:42")
    assert is_subject_key_id(blob.key_id)
    assert await svc.decrypt_bulk_data(blob.to_bytes(), key_type=PII) == b"z" * 5000
    parts = [p async for p in svc.encrypt_stream([b"s" * 3000], PII, subject="user:42")]
    assert b"".join([p async for p in svc.decrypt_stream(parts, key_type=PII)]) == b"s" * 3000
    session = await svc.encrypt_session_data({"uid": 42}, context="sid-1", subject="user:42")
    assert await svc.decrypt_session_data(session, context="sid-1") == {"uid": 42}
    key, value = await svc.encrypt_cache_data("profile", {"n": 1}, subject="user:42")
    assert await svc.decrypt_cache_data(key, value) == ("profile", {"n": 1})
    # the subject key binds its key type and the context like any key
    with pytest.raises(DecryptionError) as info:
        await svc.decrypt_field(field, KeyType.FINANCIAL_DATA, context="users.name")
    assert info.value.reason is DecryptionFailure.WRONG_KEY_TYPE
    with pytest.raises(DecryptionError) as info:
        await svc.decrypt_field(field, PII, context="users.other")
    assert info.value.reason is DecryptionFailure.AUTHENTICATION_FAILED

    report = await svc.forget_subject("user:42", actor="dpo@example.com")
    assert report.forgotten and len(report.subject_key_ids) == 3  # pii, session, cache
    await forgotten(svc.decrypt_field(field, PII, context="users.name"))
    await forgotten(svc.decrypt_many(many, PII))
    await forgotten(svc.decrypt_many(same, PII))
    await forgotten(svc.decrypt_bulk_data(blob.to_bytes(), key_type=PII))
    with pytest.raises(DecryptionError) as info:
        async for _ in svc.decrypt_stream(parts, key_type=PII):
            pass
    assert info.value.reason is DecryptionFailure.SUBJECT_FORGOTTEN
    await forgotten(svc.decrypt_session_data(session, context="sid-1"))
    await forgotten(svc.decrypt_cache_data(key, value))
    # everyone else still reads
    assert await svc.decrypt_field(plain, PII, context="users.name") == "Ada"
    assert await svc.decrypt_many(many[1:], PII) == [{"b": 1}, 3]
    events = [e for e in svc.sink.events if e.event == "subject_forgotten"]
    assert len(events) == 1
    detail = events[0].details
    assert detail["actor"] == "dpo@example.com"
    assert sorted(detail["subject_key_ids"]) == sorted(report.subject_key_ids)
    assert "user:42" not in events[0].to_json()
    assert await svc.subject_reference("user:42", PII) in detail["lookups"]


async def test_a_forgotten_subject_gets_a_new_key_unless_tombstoned(svc: Any) -> None:
    old = await svc.encrypt_field(1, PII, subject="user:1")
    assert await svc.subject_key_exists("user:1", PII)
    await svc.forget_subject("user:1", key_type=PII)
    assert not await svc.subject_key_exists("user:1", PII)
    new = await svc.encrypt_field(2, PII, subject="user:1")
    assert new.split(".")[1] != old.split(".")[1]
    assert await svc.decrypt_field(new, PII) == 2
    await forgotten(svc.decrypt_field(old, PII))

    await svc.forget_subject("user:2", key_type=PII, tombstone=True)
    with pytest.raises(KeyStateError):
        await svc.encrypt_field(3, PII, subject="user:2")


async def test_forgetting_a_subject_without_keys_writes_nothing(svc: Any) -> None:
    await svc.encrypt_field(1, PII)
    revision = svc.key_manager.keyring.revision
    report = await svc.forget_subject("nobody", key_type=PII)
    assert not report.forgotten and report.revision == revision
    assert [e.event for e in svc.sink.events].count("subject_forgotten") == 1


async def test_subject_ids_are_checked(svc: Any) -> None:
    with pytest.raises(ValueError):
        await svc.encrypt_field(1, PII, subject="")
    with pytest.raises(TypeError):
        await svc.encrypt_field(1, PII, subject=42)


async def test_forgetting_on_a_store_with_no_keys_yet() -> None:
    service = make_service()
    async with service:
        assert not (await service.forget_subject("user:1")).forgotten
        report = await service.forget_subject("user:1", key_type=PII, tombstone=True)
        assert not report.forgotten and report.tombstone
        with pytest.raises(KeyStateError):
            await service.encrypt_field(1, PII, subject="user:1")


async def test_a_subject_keeps_its_key_across_a_master_key_rotation() -> None:
    """The lookup key comes from the keyset seal key, which a master-key rotation rewraps
    but never replaces: a forget after it still finds the keys made before it."""
    from aiocrypt import EncryptionService, KeyManager
    from aiocrypt.testing import FakeKekProvider, MemoryKeyStore

    store, old, new = MemoryKeyStore(), FakeKekProvider(), FakeKekProvider()
    before = EncryptionService(KeyManager(store, old, watch=False))
    async with before:
        token = await before.encrypt_field("x", PII, subject="user:1")
        await before.key_manager.rotate_master_key(new)
    after = EncryptionService(KeyManager(store, new, watch=False))
    async with after:
        again = await after.encrypt_field("y", PII, subject="user:1")
        assert again.split(".")[1] == token.split(".")[1]
        assert (await after.forget_subject("user:1")).forgotten
        await forgotten(after.decrypt_field(token, PII))


async def test_a_store_outage_after_the_keyset_write_leaves_the_subject_forgotten(
    svc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiocrypt import KeyStoreError

    token = await svc.encrypt_field("x", PII, subject="user:5")
    store = await svc.key_manager.subjects.store()
    real_forget = store.forget

    async def down(*args: Any) -> None:
        raise KeyStoreError("the subject-key store is down")

    monkeypatch.setattr(store, "forget", down)
    with pytest.raises(KeyStoreError):
        await svc.forget_subject("user:5", key_type=PII)
    await forgotten(svc.decrypt_field(token, PII))  # the keyset write was the erasure
    assert [e.event for e in svc.sink.events].count("subject_forgotten") == 1
    monkeypatch.setattr(store, "forget", real_forget)
    assert len(store.by_id) == 1 and store.by_id[token.split(".")[1]].state == "live"
    new = await svc.encrypt_field("y", PII, subject="user:5")  # the row is cleared on use
    assert new.split(".")[1] != token.split(".")[1]
    assert store.by_id[token.split(".")[1]].state == "forgotten"
