"""Rotation with subject keys: rewrapped in batches, counted, never destroyed under them.

The must-show of issue 20: 100,000 subject keys in a real PostgreSQL store, a
rotation of their key type, every key rewrapped under the new version (each one
unwrapped and compared), sampled values of a few hundred subjects still
decrypting in a fresh process, and the old version's destruction refused until
the rewrap is done.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _services import PG_HOST, PG_PORT, REDIS_HOST, REDIS_PORT, require_service

from aiocrypt import EncryptionService, KeyManager, KeyStateError, KeyType
from aiocrypt._subjects import (
    lookup_hash,
    new_subject_key_id,
    unwrap_subject_key,
    wrap_subject_key,
)
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import KeyStore, MemoryKeyStore

PII = KeyType.PII
POSTGRES_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/14"


class Deployment:
    """One store and KEK; services over it stand for processes (started afresh)."""

    def __init__(self, make_store: Any) -> None:
        self.make_store = make_store
        self.kek = LocalKekProvider(os.urandom(32))
        self.services: list[EncryptionService] = []

    async def service(self) -> EncryptionService:
        svc = EncryptionService(KeyManager(self.make_store(), self.kek, watch=False))
        self.services.append(svc)
        await svc.start()
        return svc

    async def close(self) -> None:
        for svc in self.services:
            await svc.close()


@pytest.fixture
async def postgres() -> AsyncIterator[Deployment]:
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    from aiocrypt.keystore.postgres import PostgresKeyStore

    schema = f"subjects_{secrets.token_hex(4)}"
    deployment = Deployment(lambda: PostgresKeyStore(POSTGRES_DSN, schema=schema))
    try:
        yield deployment
    finally:
        await deployment.close()
        store = deployment.make_store()
        await store.drop()
        await store.close()


@pytest.fixture(params=["memory", "redis", "postgres"])
async def small(request: pytest.FixtureRequest) -> AsyncIterator[Deployment]:
    """Small runs on every store (the 100,000-key run above is Postgres only, untraced)."""
    stores: list[KeyStore] = []
    if request.param == "memory":
        shared = MemoryKeyStore()
        deployment = Deployment(lambda: shared)
    elif request.param == "postgres":
        require_service("PostgreSQL", PG_HOST, PG_PORT)
        from aiocrypt.keystore.postgres import PostgresKeyStore

        schema = f"subjects_{secrets.token_hex(4)}"
        deployment = Deployment(lambda: PostgresKeyStore(POSTGRES_DSN, schema=schema))
        stores.append(deployment.make_store())
    else:
        require_service("Redis", REDIS_HOST, REDIS_PORT)
        from aiocrypt.keystore.redis import RedisKeyStore

        prefix = f"aiocrypt-subjects-{secrets.token_hex(4)}:"
        deployment = Deployment(lambda: RedisKeyStore(REDIS_URL, prefix=prefix))
        stores.append(deployment.make_store())
    try:
        yield deployment
    finally:
        await deployment.close()
        for store in stores:
            await store.drop()  # type: ignore[attr-defined]
            await store.close()


async def bulk_subject_keys(svc: EncryptionService, n: int) -> dict[str, bytes]:
    """``n`` subject keys of PII, made as the service makes them, inserted in bulk."""
    subjects = svc.key_manager.subjects
    active = svc.keyring.active(PII)
    cipher = subjects._cipher(active)
    lookup_key = subjects._lookup()
    store = await subjects.store()
    created = svc.key_manager._clock()
    materials: dict[str, bytes] = {}
    for start in range(0, n, 10_000):
        batch = []
        for i in range(start, min(n, start + 10_000)):
            material = os.urandom(32)
            record = wrap_subject_key(
                cipher,
                active.key_id,
                material,
                new_subject_key_id(),
                lookup_hash(lookup_key, PII, f"user:{i}"),
                PII,
                created,
            )
            materials[record.key_id] = material
            batch.append(record)
        assert await store.insert_many(batch) == len(batch)
    return materials


@pytest.mark.scale
async def test_100k_subject_keys_survive_a_rotation(postgres: Deployment) -> None:
    svc = await postgres.service()
    await svc.encrypt_field("first", PII)  # version 1 exists
    old = svc.keyring.active(PII).key_id
    materials = await bulk_subject_keys(svc, 100_000)
    sample = random.Random(20).sample(range(100_000), 300)
    tokens = {
        i: await svc.encrypt_field(f"value {i}", PII, context="users.email", subject=f"user:{i}")
        for i in sample
    }
    assert len(materials) == 100_000 and not set(t.split(".")[1] for t in tokens.values()) - set(
        materials
    )  # the sampled values use the bulk-made keys

    await svc.key_manager.rotate_key(PII, force=True)
    new = svc.keyring.active(PII).key_id
    assert await svc.key_manager.subject_census(PII) == {old: 100_000, new: 0}
    with pytest.raises(KeyStateError, match="subject keys"):  # however confirmed
        await svc.key_manager.retire_key(old, confirm_unreferenced=[old])
    with pytest.raises(KeyStateError, match="subject keys"):
        await svc.key_manager.set_min_decryption_version(PII, 2, confirm_unreferenced=[old])

    report = await svc.rewrap_subjects(PII, batch_size=5_000)
    assert report.rewrapped == 100_000 and report.remaining == {old: 0}
    assert report.batches == 20
    assert await svc.key_manager.subject_census(PII) == {old: 0, new: 100_000}

    # every key unwraps under the new version to the DEK it was made with
    store = await svc.key_manager.subjects.store()
    cipher = svc.key_manager.subjects._cipher(svc.keyring.active(PII))
    seen, after = 0, ""
    while page := await store.wrapped_by(new, after=after, limit=10_000):
        for record in page:
            assert unwrap_subject_key(cipher, record) == materials[record.key_id]
        seen += len(page)
        after = page[-1].key_id
    assert seen == 100_000

    retired = await svc.key_manager.retire_key(old, confirm_unreferenced=[old])
    assert [k.key_id for k in retired.keys] == [old]
    fresh = await postgres.service()  # a process that never saw version 1's DEK
    assert fresh.keyring.get(old) is None
    for i, token in tokens.items():
        assert await fresh.decrypt_field(token, PII, context="users.email") == f"value {i}"
    again = await fresh.encrypt_field("new", PII, context="users.email", subject="user:7")
    assert again.split(".")[1] in materials  # the same subject key, rewrapped


async def test_rewrap_resumes_and_cleanup_keeps_what_wraps_subjects(small: Deployment) -> None:
    svc = await small.service()
    tokens = {i: await svc.encrypt_field(i, PII, subject=f"user:{i}") for i in range(40)}
    old = svc.keyring.active(PII).key_id
    await svc.key_manager.rotate_key(PII, force=True)
    fresh_subject = await svc.encrypt_field("x", PII, subject="user:new")  # under the new one
    new = svc.keyring.active(PII).key_id
    assert await svc.key_manager.subject_census(PII) == {old: 40, new: 1}
    cleanup = await svc.key_manager.cleanup(confirm_unreferenced=[old], force=True)
    assert not cleanup.destroyed  # not past grace anyway; and never while it wraps subjects
    outsider = KeyManager(small.make_store(), small.kek, watch=False)  # not yet opened
    with pytest.raises(KeyStateError, match="subject keys"):
        await outsider.retire_key(old, confirm_unreferenced=[old])
    await outsider.close()
    with pytest.raises(KeyStateError, match="subject keys"):  # the minimum version too
        await svc.key_manager.set_min_decryption_version(PII, 2, confirm_unreferenced=[old])

    # an interrupted run: some keys rewrapped by hand, the rest by the next run
    store = await svc.key_manager.subjects.store()
    first = await store.wrapped_by(old, limit=15)
    assert (
        await store.rewrap(
            await svc.key_manager.subjects._rewrapped(first, svc.keyring.active(PII)), old
        )
        == 15
    )
    assert (
        await store.rewrap(
            await svc.key_manager.subjects._rewrapped(first, svc.keyring.active(PII)), old
        )
        == 0
    )  # compare and set: done once
    report = await svc.rewrap_subjects(PII, batch_size=10)
    assert report.rewrapped == 25 and report.batches == 3
    assert await svc.key_manager.subject_census(PII) == {old: 0, new: 41}
    await svc.key_manager.retire_key(old, confirm_unreferenced=[old])
    fresh = await small.service()
    for i, token in tokens.items():
        assert await fresh.decrypt_field(token, PII) == i
    assert await fresh.decrypt_field(fresh_subject, PII) == "x"


async def test_bulk_inserts_file_each_subject_once(small: Deployment) -> None:
    svc = await small.service()
    await svc.encrypt_field(0, PII)
    materials = await bulk_subject_keys(svc, 500)
    store = await svc.key_manager.subjects.store()
    active = svc.keyring.active(PII)
    again = [
        wrap_subject_key(
            svc.key_manager.subjects._cipher(active),
            active.key_id,
            os.urandom(32),
            new_subject_key_id(),
            svc.key_manager.subjects.reference(f"user:{i}", PII),
            PII,
            svc.key_manager._clock(),
        )
        for i in range(10)
    ]
    assert await store.insert_many(again) == 0  # those subjects have their key already
    assert await svc.key_manager.subject_census(PII) == {active.key_id: 500}
    token = await svc.encrypt_field("v", PII, subject="user:3")
    assert token.split(".")[1] in materials
