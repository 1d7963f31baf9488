"""Key-store paths the contract tests leave: what a store refuses to read or write,
the guards on its arguments, its change feed across a lost connection, and a Redis
lock whose lease is lost or whose scripts fail.

Real Redis and PostgreSQL (conftest.py); every test has its own prefix / schema and
drops it afterwards. The file stores run in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import pickle
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

from aiocrypt import (
    ConcurrentModificationError,
    ConfigurationError,
    EncryptionConfig,
    KeyStoreError,
    KeyStoreIntegrityError,
    KeyType,
)
from aiocrypt._subjects import (
    SubjectKeyRecord,
    SubjectState,
    new_subject_key_id,
    tombstone_record,
)
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore, KeyStore, MemoryKeyStore
from aiocrypt.keystore._subjects_file import FileSubjectKeyStore
from aiocrypt.keystore._subjects_memory import MemorySubjectKeyStore
from aiocrypt.keystore.file import _MAC_CONTEXT, _canonical

from .conftest import record

aioredis = pytest.importorskip("redis.asyncio")
asyncpg = pytest.importorskip("asyncpg")

from aiocrypt.keystore import postgres as pg_module  # noqa: E402
from aiocrypt.keystore import redis as redis_module  # noqa: E402
from aiocrypt.keystore.postgres import PostgresKeyStore  # noqa: E402
from aiocrypt.keystore.redis import RedisKeyStore  # noqa: E402

PII = KeyType.PII
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def live_record(lookup: str | None = None, wrapping_key_id: str = "pii-v1-aaaaaaaa") -> Any:
    """A live subject-key record as a store holds it (random bytes for the wrapped DEK)."""
    return SubjectKeyRecord(
        new_subject_key_id(),
        PII,
        lookup or secrets.token_hex(32),
        wrapping_key_id,
        os.urandom(60),
        NOW,
    )


def feed_of(store: KeyStore, poll_interval: float) -> AsyncGenerator[int, None]:
    """``store.changes()`` as the async generator it is (closed with ``aclose``)."""
    return cast("AsyncGenerator[int, None]", store.changes(poll_interval=poll_interval))


async def next_of(feed: AsyncIterator[int]) -> int:
    with anyio.fail_after(5):
        return await anext(feed)


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    with anyio.fail_after(5):
        while not await check():
            await anyio.sleep(0.01)


# -- the file key store ------------------------------------------------------------


async def test_file_store_that_is_a_directory_is_unreadable(key_path: Path) -> None:
    key_path.mkdir()
    store = FileKeyStore(key_path, LocalKekProvider.generate())
    with pytest.raises(KeyStoreError, match=r"cannot read key store .*: Is a directory"):
        await store.read()


async def test_file_store_mac_key_that_does_not_unwrap_is_refused(key_path: Path) -> None:
    kek = LocalKekProvider.generate()
    await FileKeyStore(key_path, kek).write([record("pii-v1-aaaaaaaa")], expected_revision=0)
    doc = json.loads(key_path.read_bytes())
    doc["mac_key"] = base64.b64encode(b"\x01" + os.urandom(60)).decode()
    key_path.write_text(json.dumps(doc))
    with pytest.raises(KeyStoreIntegrityError, match="the configured master key cannot open it"):
        await FileKeyStore(key_path, kek).read()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("revision", "seven", "has an invalid revision"),
        ("keys", {"pii-v1-aaaaaaaa": {}}, "has no list of keys"),
        ("seal", 7, "has an invalid seal"),
    ],
)
async def test_file_store_authentic_but_malformed_document_is_refused(
    key_path: Path, field: str, value: Any, message: str
) -> None:
    """A document MACed with the right key (written by whoever holds the master key,
    e.g. another tool) that is still not a key store is refused, not half-read."""
    kek = LocalKekProvider.generate()
    await FileKeyStore(key_path, kek).write([record("pii-v1-aaaaaaaa")], expected_revision=0)
    doc = json.loads(key_path.read_bytes())
    mac_key = await kek.unwrap(base64.b64decode(doc["mac_key"]), _MAC_CONTEXT)
    doc[field] = value
    del doc["mac"]
    doc["mac"] = hmac.new(mac_key, _canonical(doc), hashlib.sha256).hexdigest()
    key_path.write_text(json.dumps(doc))
    with pytest.raises(KeyStoreIntegrityError, match=message):
        await FileKeyStore(key_path, kek).read()


async def test_file_store_rekey_before_any_write_seals_the_first_write_under_the_new_kek(
    key_path: Path,
) -> None:
    old, new = LocalKekProvider.generate(), LocalKekProvider.generate()
    store = FileKeyStore(key_path, old)
    assert await store.rekey(new, seal="unused", expected_revision=0) == 0
    assert not key_path.exists()  # nothing to reseal yet
    assert await store.write([record("pii-v1-aaaaaaaa")], expected_revision=0) == 1
    assert json.loads(key_path.read_bytes())["kek_id"] == new.kek_id
    assert [k.key_id for k in (await FileKeyStore(key_path, new).read()).keys] == [
        "pii-v1-aaaaaaaa"
    ]
    with pytest.raises(KeyStoreIntegrityError, match=f"sealed under KEK {new.kek_id}"):
        await FileKeyStore(key_path, old).read()


async def test_file_store_rekey_after_another_write_is_a_conflict(key_path: Path) -> None:
    old, new = LocalKekProvider.generate(), LocalKekProvider.generate()
    store = FileKeyStore(key_path, old)
    await store.write([record("pii-v1-aaaaaaaa")], expected_revision=0)
    before = key_path.read_bytes()
    with pytest.raises(ConcurrentModificationError, match=r"changed \(revision 1, expected 0\)"):
        await store.rekey(new, seal="unused", expected_revision=0)
    assert key_path.read_bytes() == before  # still sealed under the old KEK
    assert (await FileKeyStore(key_path, old).read()).revision == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"{not json", "are unreadable"), (b"[1, 2]", "are malformed")],
)
async def test_file_store_bad_usage_counters_are_an_error(
    key_path: Path, content: bytes, message: str
) -> None:
    store = FileKeyStore(key_path, LocalKekProvider.generate())
    (key_path.parent / f".{key_path.name}.usage.json").write_bytes(content)
    with pytest.raises(KeyStoreError, match=f"usage counters .* {message}"):
        await store.get_usage()
    with pytest.raises(KeyStoreError, match=message):
        await store.add_usage({"pii-v1-aaaaaaaa": 1})


async def test_file_store_lock_in_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "missing" / "keys.json", LocalKekProvider.generate())
    with pytest.raises(KeyStoreError, match=r"cannot open lock file .*\.keys\.json\.write\.lock"):
        await store.write([record("pii-v1-aaaaaaaa")], expected_revision=0)


async def test_stores_refuse_pickling_and_keep_paths_out_of_generic_reprs(
    key_path: Path,
) -> None:
    store = FileKeyStore(key_path, LocalKekProvider.generate())
    subjects = store.subject_store()
    assert repr(subjects) == f"<FileSubjectKeyStore {str(subjects.path)!r}>"
    assert subjects.path.name == ".keys.json.subjects.json"
    assert repr(MemorySubjectKeyStore()) == "<MemorySubjectKeyStore>"
    for obj in (store, subjects, MemoryKeyStore(), MemorySubjectKeyStore()):
        with pytest.raises(TypeError, match=f"{type(obj).__name__} objects cannot be pickled"):
            pickle.dumps(obj)


# -- the file subject-key store ------------------------------------------------------


async def test_file_subject_store_lock_in_a_missing_directory_is_an_error(
    tmp_path: Path,
) -> None:
    subjects = FileSubjectKeyStore(tmp_path / "missing" / "s.json")
    with pytest.raises(KeyStoreError, match=r"cannot open lock file .*\.s\.json\.lock"):
        await subjects.insert(live_record())


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": "something-else", "records": []}',
        b'{"format": "aiocrypt.subject-keys"}',
        b"[]",
    ],
)
async def test_file_subject_store_malformed_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(content)
    with pytest.raises(KeyStoreIntegrityError, match="is unreadable or malformed"):
        await FileSubjectKeyStore(path).find("0" * 64)


async def test_file_subject_store_insert_many_and_a_tombstone_survive_a_reread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.json"
    first, second = live_record(), live_record()
    rival = live_record(lookup=first.lookup)  # the same subject: its lookup is taken
    assert await FileSubjectKeyStore(path).insert_many([first, second, rival]) == 2
    stone = tombstone_record(PII, first.lookup, first.key_id, NOW)
    await FileSubjectKeyStore(path).forget(first.lookup, first, stone)
    reread = FileSubjectKeyStore(path)  # parsed from the file, not a cache
    found = await reread.find(first.lookup)
    assert found is not None and found.state == SubjectState.TOMBSTONE
    marker = await reread.get(first.key_id)
    assert marker is not None and marker.state == SubjectState.FORGOTTEN
    kept = await reread.find(second.lookup)
    assert kept is not None and kept.key_id == second.key_id
    assert await reread.get(rival.key_id) is None


async def test_file_subject_store_write_failure_is_a_store_error(tmp_path: Path) -> None:
    """A name the lock file fits beside but the temporary file does not (255 bytes):
    the replace fails with the OS's error and nothing is written."""
    path = tmp_path / ("s" * (255 - len(".lock") - 1))
    subjects = FileSubjectKeyStore(path)
    with pytest.raises(KeyStoreError, match=r"cannot write .*: File name too long"):
        await subjects.insert(live_record())
    assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".{path.name}.lock"]


# -- Redis ----------------------------------------------------------------------------


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    prefix = f"aiocrypt-paths-{secrets.token_hex(6)}:"
    yield prefix
    cleaner = RedisKeyStore(redis_url, prefix=prefix)
    await cleaner.drop()
    await cleaner.close()


@pytest.fixture
async def redis_admin(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_redis_store_constructor_guards(redis_url: str) -> None:
    with pytest.raises(ValueError, match="prefix cannot be empty"):
        RedisKeyStore(redis_url, prefix="")
    with pytest.raises(ValueError, match=r"lock_lease must be at least 0\.3 s"):
        RedisKeyStore(redis_url, lock_lease=0.29)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("revision", b"seven", "holds an invalid revision"), ("seal", b"\xff\xfe", "invalid seal")],
)
async def test_redis_store_malformed_revision_or_seal_is_refused(
    redis_url: str, redis_prefix: str, redis_admin: Any, name: str, value: bytes, message: str
) -> None:
    store = RedisKeyStore(redis_url, prefix=redis_prefix)
    try:
        await store.write([record("pii-v1-aaaaaaaa")], expected_revision=0, seal="s")
        await redis_admin.set(f"{redis_prefix}{name}", value)
        with pytest.raises(KeyStoreIntegrityError, match=message):
            await store.read()
    finally:
        await store.close()


async def test_redis_change_feed_skips_foreign_messages(
    redis_url: str, redis_prefix: str, redis_admin: Any
) -> None:
    watcher = RedisKeyStore(redis_url, prefix=redis_prefix)
    writer = RedisKeyStore(redis_url, prefix=redis_prefix)
    feed = feed_of(watcher, 30)  # the messages, not the polling, deliver
    waiter = asyncio.ensure_future(next_of(feed))
    try:

        async def subscribed() -> bool:
            counts = dict(await redis_admin.pubsub_numsub(watcher.channel))
            return bool(counts.get(watcher.channel.encode()))

        await until(subscribed)
        await redis_admin.publish(watcher.channel, "not-a-revision")
        revision = await writer.write([record("pii-v1-aaaaaaaa")], expected_revision=0)
        assert await waiter == revision
    finally:
        waiter.cancel()
        await feed.aclose()
        await watcher.close()
        await writer.close()


async def test_redis_change_feed_catches_up_after_its_connection_is_killed(
    redis_url: str, redis_prefix: str, redis_admin: Any
) -> None:
    name = f"aiocrypt-feed-{secrets.token_hex(4)}"
    client = aioredis.Redis.from_url(redis_url, client_name=name)
    watcher = RedisKeyStore(client, prefix=redis_prefix)
    writer = RedisKeyStore(redis_url, prefix=redis_prefix)
    feed = feed_of(watcher, 0.05)
    try:
        first = asyncio.ensure_future(next_of(feed))
        await until(
            lambda: _has_subscriber(redis_admin, name),
        )
        rev1 = await writer.write([record("pii-v1-aaaaaaaa")], expected_revision=0)
        assert await first == rev1
        # the feed waits at its yield: its pub/sub connection dies, a change is made
        killed = 0
        for client_info in await redis_admin.client_list():
            if client_info.get("name") == name and client_info.get("sub") != "0":
                killed += await redis_admin.client_kill_filter(_id=client_info["id"])
        assert killed == 1
        rev2 = await writer.write([record("pii-v2-bbbbbbbb", 2)], expected_revision=rev1)
        assert await next_of(feed) == rev2
    finally:
        await feed.aclose()
        await writer.close()
        await client.aclose()


async def _has_subscriber(admin: Any, name: str) -> bool:
    return any(c.get("name") == name and c.get("sub") != "0" for c in await admin.client_list())


async def test_redis_lock_whose_lease_is_lost_leaves_the_new_holder_alone(
    redis_url: str, redis_prefix: str, redis_admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisKeyStore(redis_url, prefix=redis_prefix, lock_lease=0.3)
    key = f"{redis_prefix}lock:rotation"
    try:
        with caplog.at_level(logging.WARNING, logger="aiocrypt.keystore.redis"):
            async with store.lock("rotation", timeout=1):
                # the lease ran out (a partition longer than it) and another process took it
                await redis_admin.set(key, "another-holder")
                await anyio.sleep(0.2)  # a renewal every 0.1 s
        assert "lock 'rotation' was lost (lease expired)" in caplog.text
        assert await redis_admin.get(key) == b"another-holder"  # release: compare-and-delete
    finally:
        await store.close()


async def test_redis_lock_renewal_and_release_failures_are_retried_at_the_next_lock(
    redis_url: str, redis_prefix: str, redis_admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refuses the lock scripts (the lock key was clobbered with a hash: WRONGTYPE):
    the holder keeps going, and the release it could not make is made before the next
    lock is taken; while that still fails, the next lock fails too."""
    store = RedisKeyStore(redis_url, prefix=redis_prefix, lock_lease=0.3)
    key = f"{redis_prefix}lock:rotation"
    try:
        with caplog.at_level(logging.WARNING, logger="aiocrypt.keystore.redis"):
            async with store.lock("rotation", timeout=1):
                await redis_admin.delete(key)
                await redis_admin.hset(key, "clobbered", "1")
                await anyio.sleep(0.15)
        assert "could not renew lock 'rotation' (ResponseError)" in caplog.text
        assert "could not release lock 'rotation' (ResponseError)" in caplog.text
        with pytest.raises(KeyStoreError, match="release stale lock 'rotation' failed"):
            async with store.lock("rotation", timeout=0.2):
                pass
        await redis_admin.delete(key)
        async with store.lock("rotation", timeout=1):
            assert await redis_admin.exists(key) == 1
        assert await redis_admin.exists(key) == 0
    finally:
        await store.close()


async def test_redis_subject_store_repr_and_rewrap_guards(
    redis_url: str, redis_prefix: str
) -> None:
    store = RedisKeyStore(redis_url, prefix=redis_prefix)
    subjects = store.subject_store()
    try:
        assert repr(subjects) == f"<RedisSubjectKeyStore prefix={redis_prefix!r}>"
        assert await subjects.rewrap([], "pii-v1-aaaaaaaa") == 0
        mixed = [live_record(wrapping_key_id="pii-v2-bbbbbbbb"), live_record()]
        with pytest.raises(ValueError, match="a rewrap batch goes to one wrapping key"):
            await subjects.rewrap(mixed, "pii-v1-aaaaaaaa")
    finally:
        await store.close()


# -- PostgreSQL -------------------------------------------------------------------------


@pytest.fixture
async def pg_schema(postgres_dsn: str) -> AsyncIterator[str]:
    schema = f"aiocrypt_paths_{secrets.token_hex(6)}"
    yield schema
    cleaner = PostgresKeyStore(postgres_dsn, schema=schema)
    await cleaner.drop()
    await cleaner.close()


async def listening_pid(admin: Any, store: PostgresKeyStore) -> int | None:
    """The backend of ``store``'s change feed, once it listens (else None)."""
    pid: int | None = await admin.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE query = $1 AND pid <> pg_backend_pid()",
        f'LISTEN "{store.channel}"',
    )
    return pid


async def test_postgres_store_with_an_empty_revision_table_is_refused(
    postgres_dsn: str, pg_schema: str
) -> None:
    store = PostgresKeyStore(postgres_dsn, schema=pg_schema)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await store.open()
        await conn.execute(f'DELETE FROM "{pg_schema}".revision')
        with pytest.raises(KeyStoreIntegrityError, match=r"revision is empty \(run migrate\(\)\)"):
            await store.read()
        await store.migrate()  # puts the row back
        assert (await store.read()).revision == 0
    finally:
        await conn.close()
        await store.close()


async def test_postgres_change_feed_catches_up_after_its_connection_is_killed(
    postgres_dsn: str, pg_schema: str
) -> None:
    watcher = PostgresKeyStore(postgres_dsn, schema=pg_schema)
    writer = PostgresKeyStore(postgres_dsn, schema=pg_schema)
    admin = await asyncpg.connect(postgres_dsn)
    feed = feed_of(watcher, 0.05)
    try:
        await writer.open()
        first = asyncio.ensure_future(next_of(feed))

        async def listener() -> bool:
            return await listening_pid(admin, watcher) is not None

        await until(listener)
        rev1 = await writer.write([record("pii-v1-aaaaaaaa")], expected_revision=0)
        assert await first == rev1
        # the feed waits at its yield: its LISTEN connection dies, a change is made
        pid = await listening_pid(admin, watcher)
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)

        async def gone() -> bool:
            return await listening_pid(admin, watcher) is None

        await until(gone)
        await anyio.sleep(0.02)  # the client reads the end of its connection
        rev2 = await writer.write([record("pii-v2-bbbbbbbb", 2)], expected_revision=rev1)
        assert await next_of(feed) == rev2
    finally:
        await feed.aclose()
        await admin.close()
        await writer.close()
        await watcher.close()


async def test_postgres_change_feed_ignores_stale_notices_and_polls_for_silent_changes(
    postgres_dsn: str, pg_schema: str
) -> None:
    """A notice naming a revision already seen (or not a revision at all) yields nothing;
    a change that came with no notice is found by the poll."""
    watcher = PostgresKeyStore(postgres_dsn, schema=pg_schema)
    admin = await asyncpg.connect(postgres_dsn)
    feed = feed_of(watcher, 0.05)
    try:
        await watcher.open()
        first = asyncio.ensure_future(next_of(feed))

        async def listener() -> bool:
            return await listening_pid(admin, watcher) is not None

        await until(listener)
        await admin.execute("SELECT pg_notify($1, '0')", watcher.channel)  # seen already
        await admin.execute("SELECT pg_notify($1, 'not a revision')", watcher.channel)
        await anyio.sleep(0.2)  # several polls: nothing changed, nothing yielded
        assert not first.done()
        await admin.execute(f'UPDATE "{pg_schema}".revision SET revision = 7')  # no notice
        assert await first == 7
    finally:
        await feed.aclose()
        await admin.close()
        await watcher.close()


async def test_postgres_subject_store_tombstone_without_a_key_and_rewrap_guards(
    postgres_dsn: str, pg_schema: str
) -> None:
    store = PostgresKeyStore(postgres_dsn, schema=pg_schema)
    subjects = store.subject_store()
    try:
        assert repr(subjects) == f"<PostgresSubjectKeyStore schema={pg_schema!r}>"
        await subjects.migrate()
        await subjects.migrate()  # idempotent
        lookup = secrets.token_hex(32)
        await subjects.forget(lookup, None, tombstone_record(PII, lookup, "", NOW))
        found = await subjects.find(lookup)
        assert found is not None and found.state == SubjectState.TOMBSTONE
        assert (await subjects.insert(live_record(lookup=lookup))).state == SubjectState.TOMBSTONE
        assert await subjects.rewrap([], "pii-v1-aaaaaaaa") == 0
    finally:
        await store.close()


# -- both, and the configuration ----------------------------------------------------------


async def check_usage_counters(store: Any) -> None:
    try:
        assert await store.add_usage({}) == {}
        assert await store.add_usage({"pii-v1-aaaaaaaa": 2}) == {"pii-v1-aaaaaaaa": 2}
        assert await store.add_usage({}) == {}
        assert await store.get_usage() == {"pii-v1-aaaaaaaa": 2}
    finally:
        await store.close()


async def test_redis_no_usage_to_add_touches_nothing(redis_url: str, redis_prefix: str) -> None:
    await check_usage_counters(RedisKeyStore(redis_url, prefix=redis_prefix))


async def test_postgres_no_usage_to_add_touches_nothing(postgres_dsn: str, pg_schema: str) -> None:
    await check_usage_counters(PostgresKeyStore(postgres_dsn, schema=pg_schema))


def test_from_config_errors_name_the_setting_and_never_the_password() -> None:
    with pytest.raises(ConfigurationError, match="needs ENCRYPTION_REDIS_URL"):
        redis_module.from_config(EncryptionConfig())
    with pytest.raises(ConfigurationError, match="needs ENCRYPTION_POSTGRES_DSN"):
        pg_module.from_config(EncryptionConfig())
    for url in ("http://127.0.0.1:6379/0", "redis://:hunter2@127.0.0.1:port/0"):
        with pytest.raises(ConfigurationError, match=r"^redis key store: ") as info:
            redis_module.from_config(EncryptionConfig(redis_url=url))
        assert "hunter2" not in str(info.value)
    config = EncryptionConfig(
        postgres_dsn="postgresql://u:hunter2@127.0.0.1/db", postgres_schema="Not-A-Schema"
    )
    with pytest.raises(ConfigurationError, match="postgres key store: invalid schema name") as err:
        pg_module.from_config(config)
    assert "hunter2" not in str(err.value)
