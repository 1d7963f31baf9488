"""KeyManager paths over the stores that the lifecycle tests leave: entry points that
open the manager themselves, a writer that lost its Redis lock lease, two policy runs
at once, a change feed that swallows its cancellation, adoption of legacy records,
and the census-gated cleanup's refusals.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import pytest

from aiocrypt import (
    ConcurrentModificationError,
    EncryptionConfig,
    EncryptionService,
    KeyManager,
    KeyStateError,
    KeyStatus,
    KeyStoreIntegrityError,
    KeyType,
)
from aiocrypt._keys import utcnow
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import MemoryKeyStore

aioredis = pytest.importorskip("redis.asyncio")

from aiocrypt.keystore.redis import RedisKeyStore  # noqa: E402

PII = KeyType.PII


def days_later(days: int) -> Any:
    return lambda: utcnow() + dt.timedelta(days=days)


async def test_entry_points_open_the_manager_themselves() -> None:
    store, kek = MemoryKeyStore(), LocalKekProvider.generate()
    async with KeyManager(store, kek, watch=False) as first:
        key = await first.generate_key(PII)

    async def fresh() -> KeyManager:
        return KeyManager(store, kek, watch=False)

    checks: list[tuple[str, Any]] = []
    manager = await fresh()
    checks.append(("keyring", (await manager.current_keyring()).active(PII).key_id))
    await manager.close()
    manager = await fresh()
    checks.append(("get_key", (await manager.get_key(key.key_id)).key_id))
    await manager.close()
    manager = await fresh()
    checks.append(("rewrap", (await manager.rewrap_subjects(PII)).wrapping_key_id))
    await manager.close()
    manager = await fresh()
    checks.append(("census", list(await manager.subject_census())))
    await manager.close()
    manager = await fresh()
    checks.append(("policy", (await manager.run_rotation_policy()).rotated))
    await manager.close()
    manager = await fresh()
    checks.append(("cleanup", (await manager.cleanup()).destroyed))
    await manager.close()
    assert checks == [
        ("keyring", key.key_id),
        ("get_key", key.key_id),
        ("rewrap", key.key_id),
        ("census", [key.key_id]),
        ("policy", ()),
        ("cleanup", ()),
    ]


async def test_a_store_sealed_under_another_kek_is_refused_naming_it() -> None:
    store, sealer = MemoryKeyStore(), LocalKekProvider.generate()
    async with KeyManager(store, sealer, watch=False) as first:
        await first.generate_key(PII)
    other = KeyManager(store, LocalKekProvider.generate(), watch=False)
    try:
        with pytest.raises(
            KeyStoreIntegrityError, match=f"does not open under KEK {sealer.kek_id}"
        ):
            await other.open()
    finally:
        await other.close()


async def test_unknown_key_ids_are_remembered_in_a_bounded_map() -> None:
    async with KeyManager(MemoryKeyStore(), LocalKekProvider.generate(), watch=False) as manager:
        await manager.generate_key(PII)
        assert await manager.load_key("pii-v9-00000000") is None
        now = time.monotonic()  # 1024 more unknown ids asked for within the second
        manager._missing.update({f"pii-v9-{n:08x}": now for n in range(1, 1025)})
        assert await manager.load_key("pii-v9-ffffffff") is None
        assert list(manager._missing) == ["pii-v9-ffffffff"]  # cleared, not grown past 1024


# -- concurrency -------------------------------------------------------------------------


async def test_two_policy_runs_at_once_rotate_a_due_key_once() -> None:
    store, kek = MemoryKeyStore(), LocalKekProvider.generate()
    async with KeyManager(store, kek, watch=False) as first:
        due = await first.generate_key(PII)
    runners = [KeyManager(store, kek, watch=False, clock=days_later(181)) for _ in range(2)]
    async with runners[0], runners[1]:
        async with store.lock("rotation"):  # both read the key as due, then queue here
            tasks = [asyncio.ensure_future(r.run_rotation_policy()) for r in runners]
            await anyio.sleep(0.05)
        runs = [await t for t in tasks]
        keys = await runners[0].list_keys(PII)
    assert sorted(len(run.rotated) for run in runs) == [0, 1]
    assert [(k.version, k.status) for k in keys] == [
        (1, KeyStatus.DECRYPT_ONLY),
        (2, KeyStatus.ACTIVE),
    ]
    assert next(r for run in runs for r in run.rotated).old_key_id == due.key_id


class PausingKek(LocalKekProvider):
    """The local KEK, holding a wrap until the test lets it go (a slow KMS)."""

    def __init__(self, master_key: bytes, pauses: int) -> None:
        super().__init__(master_key)
        self.pauses = pauses
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        if self.pauses:
            self.pauses -= 1
            self.paused.set()
            await self.resume.wait()
            self.resume.clear()
        return await super().wrap(plaintext, context)


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    prefix = f"aiocrypt-mgr-{secrets.token_hex(6)}:"
    yield prefix
    cleaner = RedisKeyStore(redis_url, prefix=prefix)
    await cleaner.drop()
    await cleaner.close()


async def race_a_writer_that_lost_its_lease(
    redis_url: str, prefix: str, rounds: int
) -> tuple[Any, KeyManager]:
    """A's rotation waits on its KMS while holding the Redis lock; its lease is lost
    (the key expires in a partition) and B writes, ``rounds`` times. Returns A's
    outcome (its key or its error) and B."""
    master = os.urandom(32)
    slow = PausingKek(master, pauses=0)
    a = KeyManager(RedisKeyStore(redis_url, prefix=prefix, lock_lease=0.3), slow, watch=False)
    b = KeyManager(RedisKeyStore(redis_url, prefix=prefix), LocalKekProvider(master), watch=False)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await a.open()
        await b.open()
        await b.generate_key(PII)  # the keyset and its seal exist: one wrap per attempt
        slow.pauses = rounds
        rotation = asyncio.ensure_future(a.generate_key(PII))
        for _ in range(rounds):
            with anyio.fail_after(5):
                await slow.paused.wait()
            slow.paused.clear()
            await admin.delete(f"{prefix}lock:rotation")  # the lease ran out
            await b.generate_key(PII)
            slow.resume.set()
        try:
            outcome: Any = await rotation
        except ConcurrentModificationError as exc:
            outcome = exc
    finally:
        await admin.aclose()
        await a.close()
    return outcome, b


async def test_a_writer_that_lost_its_lease_retries_on_the_revision_check(
    redis_url: str, redis_prefix: str
) -> None:
    key, b = await race_a_writer_that_lost_its_lease(redis_url, redis_prefix, rounds=1)
    try:
        assert key.version == 3  # B's version 2 was not overwritten: A's came after it
        assert [(k.version, k.status) for k in await b.list_keys(PII)] == [
            (1, KeyStatus.DECRYPT_ONLY),
            (2, KeyStatus.DECRYPT_ONLY),
            (3, KeyStatus.ACTIVE),
        ]
    finally:
        await b.close()


async def test_a_writer_that_keeps_losing_the_race_gives_up(
    redis_url: str, redis_prefix: str
) -> None:
    error, b = await race_a_writer_that_lost_its_lease(redis_url, redis_prefix, rounds=5)
    try:
        assert isinstance(error, ConcurrentModificationError)
        assert "key store kept changing; gave up after 5 tries" in str(error)
        assert [k.version for k in await b.list_keys(PII)] == [1, 2, 3, 4, 5, 6]
    finally:
        await b.close()


class SwallowingFeed(MemoryKeyStore):
    """A store whose change feed ends once on its own, then swallows its cancellation
    (as redis-py 5.3 with hiredis did)."""

    def __init__(self) -> None:
        super().__init__()
        self.feeds = 0
        self.swallowed = False

    async def changes(self, poll_interval: float = 1.0) -> AsyncIterator[int]:
        self.feeds += 1
        if self.feeds == 1:
            yield await self.revision()
            return
        try:
            await anyio.sleep(3600)
        except asyncio.CancelledError:
            self.swallowed = True
            return
        yield 0  # pragma: no cover - the sleep above is cancelled


async def test_a_feed_that_ends_is_restarted_and_one_that_swallows_cancel_still_closes() -> None:
    store = SwallowingFeed()
    manager = KeyManager(store, LocalKekProvider.generate(), refresh_interval=0.2)
    await manager.open()
    with anyio.fail_after(5):
        while store.feeds < 2:
            await anyio.sleep(0.01)
    with anyio.fail_after(1):  # not the 5 s bound close() keeps for a hung feed
        await manager.close()
    assert store.swallowed and manager._watch_task is None


class EndingFeed(MemoryKeyStore):
    """A store whose change feed returns at once, without awaiting anything (after 50
    feeds it waits instead, so that a manager restarting it in a tight loop lets the
    test see the count rather than hang the event loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.feeds = 0

    async def changes(self, poll_interval: float = 1.0) -> AsyncIterator[int]:
        self.feeds += 1
        if self.feeds >= 50:
            await anyio.sleep(3600)
        return
        yield 0  # an async generator that ends before its first item


async def test_a_feed_that_always_ends_at_once_is_restarted_a_poll_later() -> None:
    """Without a pause between restarts the watch loop never yields: it would hang
    the event loop in a store whose feed never awaits."""
    store = EndingFeed()
    manager = KeyManager(store, LocalKekProvider.generate(), refresh_interval=0.2)
    await manager.open()
    try:
        with anyio.fail_after(2):
            await anyio.sleep(0.5)
        assert 1 <= store.feeds <= 4  # one at the start, then one per 0.2 s poll
    finally:
        await manager.close()


# -- adoption of records written before seals ----------------------------------------------


async def legacy_records(retire_first: bool) -> tuple[Any, LocalKekProvider]:
    store, kek = MemoryKeyStore(), LocalKekProvider.generate()
    async with KeyManager(store, kek, watch=False) as manager:
        first = await manager.generate_key(PII)
        await manager.rotate_key(PII, force=True)
        if retire_first:
            await manager.retire_key(first.key_id, confirm_unreferenced=[first.key_id])
    return (await store.read()).keys, kek


async def test_adopting_legacy_records_skips_the_unwrap_of_a_destroyed_key() -> None:
    records, kek = await legacy_records(retire_first=True)
    assert records[0].status is KeyStatus.DESTROYED and records[0].wrapped_key is None
    legacy = MemoryKeyStore()
    await legacy.write(records, expected_revision=0)  # as 0.1.0 wrote them: no seal
    manager = KeyManager(legacy, kek, watch=False)
    report = await manager.adopt_store()
    assert not report.already_sealed
    assert report.key_ids == tuple(k.key_id for k in records)
    async with manager:
        assert [k.status for k in await manager.list_keys(PII)] == [
            KeyStatus.DESTROYED,
            KeyStatus.ACTIVE,
        ]


async def test_adopting_two_active_keys_of_one_type_is_refused() -> None:
    records, kek = await legacy_records(retire_first=False)
    doubled = [records[0].replace(status=KeyStatus.ACTIVE), records[1]]
    legacy = MemoryKeyStore()
    await legacy.write(doubled, expected_revision=0)
    manager = KeyManager(legacy, kek, watch=False)
    with pytest.raises(KeyStoreIntegrityError, match="two active pii keys") as info:
        await manager.adopt_store()
    assert info.value.key_id == records[1].key_id
    assert (await legacy.read()).seal is None  # nothing sealed


# -- withdrawal and cleanup refusals --------------------------------------------------------


async def test_a_destroyed_key_cannot_be_withdrawn() -> None:
    async with KeyManager(MemoryKeyStore(), LocalKekProvider.generate(), watch=False) as manager:
        first = await manager.generate_key(PII)
        await manager.rotate_key(PII, force=True)
        await manager.retire_key(first.key_id, confirm_unreferenced=[first.key_id])
        with pytest.raises(KeyStateError, match=f"key {first.key_id} is destroyed"):
            await manager.revoke_key(first.key_id)
        report = await manager.cleanup(confirm_unreferenced=[first.key_id])
        assert [(e.key_id, e.reason) for e in report.kept] == [(first.key_id, "already destroyed")]


async def test_cleanup_keeps_a_key_past_grace_that_wraps_subject_keys_even_forced() -> None:
    store, kek = MemoryKeyStore(), LocalKekProvider.generate()
    async with EncryptionService(KeyManager(store, kek, watch=False)) as service:
        first = await service.key_manager.get_active_key(PII)
        await service.encrypt_field("x", PII, context="c", subject="user:1")
        await service.key_manager.rotate_key(PII, force=True)
    later = KeyManager(
        store, kek, watch=False, clock=days_later(730 + 30 + 1)
    )  # PII: max age + grace
    async with later:
        report = await later.cleanup(force=True)
        assert report.destroyed == ()
        assert [(e.key_id, e.forced) for e in report.kept] == [(first.key_id, False)]
        assert "still wraps 1 subject keys: rewrap them" in report.kept[0].reason
        assert (await later.get_key(first.key_id)).status is KeyStatus.EXPIRED


async def test_a_policy_run_skips_a_key_type_retired_while_it_waited_for_the_lock() -> None:
    """Found by issue 21: the run failed with KeyNotFoundError ("no active key of type")
    and left the other types unrotated."""
    store, kek = MemoryKeyStore(), LocalKekProvider.generate()
    declared = EncryptionConfig(key_types=frozenset({"paths_typo"}))
    async with KeyManager(store, kek, declared, watch=False) as first:
        typo = await first.generate_key("paths_typo")
        pii = await first.generate_key(PII)
    retirer = KeyManager(store, kek, watch=False)  # the type is not declared here
    runner = KeyManager(store, kek, declared, watch=False, clock=days_later(731))
    async with retirer, runner:
        async with store.lock("rotation"):  # the retirement queues first, the run second
            retiring = asyncio.ensure_future(
                retirer.retire_key_type("paths_typo", confirm_unreferenced=[typo.key_id])
            )
            await anyio.sleep(0.02)
            running = asyncio.ensure_future(runner.run_rotation_policy())
            await anyio.sleep(0.05)
        assert (await retiring).type_retired
        run = await running
        assert [(r.key_type, r.old_key_id) for r in run.rotated] == [("pii", pii.key_id)]
        assert (await runner.get_key(typo.key_id)).status is KeyStatus.DESTROYED
