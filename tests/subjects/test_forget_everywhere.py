"""Issue 20's must-show: forgetting one of 10,000 data subjects reaches every copy.

Real services throughout: two tables in Postgres written and read through the
encrypted column types on the async SQLAlchemy engine (asyncpg), the key store and
its subject keys in Postgres, the audit trail in a Postgres audit sink, sessions in
Redis through ``RedisSessionStore`` and the encrypted Redis cache.

* 10,000 subjects (``user:0`` .. ``user:9999``), each with an account row and an
  order row; the victim has two more orders (one written through the ORM's unit of
  work), two sessions and two cache entries. Sessions: the first ``SESSIONS`` users
  have one each (300: every session is loaded back, which keeps the test well under a
  minute; the store does the same work for each); cache entries: the same users.
* ``forget_subject("user:137")`` makes every value of the victim unreadable in the
  four places (``DecryptionError`` "subject forgotten" for the rows and their raw
  tokens, a fresh empty session, a cache miss), leaves everyone else's readable (all
  9,999 + 9,999 other rows checked in one query per table, every other session and
  cache entry), and writes exactly one audit event, read back from the sink.
* A restart (a new manager and service over the same stores, with the victim's
  Redis payloads put back from a dump as a backup would) still refuses.
* Store rollbacks are refused: the victim's deleted subject-key rows restored into
  the subject store; then the whole keyset rolled back to its pre-forget copy.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aiocrypt import (
    DecryptionError,
    DecryptionFailure,
    EncryptionConfig,
    EncryptionService,
    KeyManager,
    KeyStoreIntegrityError,
    KeyType,
)
from aiocrypt.audit import Auditor
from aiocrypt.audit.postgres import PostgresAuditSink
from aiocrypt.integrations.cache import EncryptedCache
from aiocrypt.integrations.sessions import CookieAction, RedisSessionStore, SessionSettings
from aiocrypt.integrations.sqlalchemy import EncryptedString, RowValue, set_encryption_service
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore.postgres import PostgresKeyStore

SUBJECTS = 10_000
SESSIONS = 300
VICTIM = 137
FORGOTTEN = DecryptionFailure.SUBJECT_FORGOTTEN
#: Writers and readers at once, as concurrent requests would be: each first use of a
#: subject costs the key store a few round trips, which overlap across them.
PARALLEL = 8
#: Users per statement: small enough that the subject keys one batch of every writer
#: touches stay in the service's subject-key cache between its two tables.
BATCH = 100


class World:
    """Names, stores and the pieces a process builds over them (closed at the end)."""

    def __init__(self, dsn: str, redis_url: str, tmp_path: Path) -> None:
        suffix = secrets.token_hex(5)
        self.dsn = dsn
        self.schema = f"gdpr_keys_{suffix}"
        self.audit_table = f"gdpr_audit_{suffix}"
        self.prefix = f"test:gdpr:{suffix}:"
        self.kek = LocalKekProvider(os.urandom(32))
        self.audit_key = os.urandom(32)
        self.config = EncryptionConfig(keyset_state_path=str(tmp_path / "keyset.json"))
        self.redis = aioredis.Redis.from_url(redis_url)
        self.engine: AsyncEngine = create_async_engine(
            dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
        )
        self.services: list[EncryptionService] = []
        self.sinks: list[PostgresAuditSink] = []
        self.pools: list[asyncpg.Pool] = []

        class Base(DeclarativeBase):
            pass

        class Account(Base):
            __tablename__ = f"gdpr_accounts_{suffix}"
            id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
            email: Mapped[str] = mapped_column(EncryptedString(KeyType.PII, subject_column="id"))

        class Order(Base):
            __tablename__ = f"gdpr_orders_{suffix}"
            id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
            user_id: Mapped[int] = mapped_column(index=True)
            address: Mapped[str] = mapped_column(
                EncryptedString(KeyType.PII, subject_column="user_id", subject_prefix="user")
            )

        self.Base, self.Account, self.Order = Base, Account, Order

    async def manager(self) -> tuple[KeyManager, PostgresAuditSink]:
        """A new process's key manager: its own pool (room for ``PARALLEL``) and sink."""
        pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=PARALLEL + 2)
        self.pools.append(pool)
        sink = PostgresAuditSink(self.dsn, table=self.audit_table, hmac_key=self.audit_key)
        self.sinks.append(sink)
        manager = KeyManager(
            PostgresKeyStore(pool, schema=self.schema),
            self.kek,
            self.config,
            watch=False,
            auditor=Auditor([sink]),
        )
        return manager, sink

    async def service(self) -> EncryptionService:
        """A new process's service, bound to the column types."""
        manager, _ = await self.manager()
        service = EncryptionService(manager)
        self.services.append(service)
        await service.start()
        set_encryption_service(service)
        return service

    def sessions(self, service: EncryptionService) -> RedisSessionStore:
        return RedisSessionStore(
            service, self.redis, SessionSettings(prefix=self.prefix + "s:", subject_field="user_id")
        )

    def cache(self, service: EncryptionService) -> EncryptedCache:
        return EncryptedCache(service, self.redis, prefix=self.prefix + "c:")

    async def dump(self, what: str) -> dict[bytes, bytes]:
        keys = [k async for k in self.redis.scan_iter(match=f"{self.prefix}{what}:*")]
        return dict(zip(keys, await self.redis.mget(keys), strict=True)) if keys else {}

    async def close(self) -> None:
        set_encryption_service(None)
        for service in self.services:
            await service.close()
        for sink in self.sinks:
            await sink.close()
        for pool in self.pools:
            await pool.close()
        keys = [k async for k in self.redis.scan_iter(match=self.prefix + "*")]
        if keys:
            await self.redis.delete(*keys)
        await self.redis.aclose()
        async with self.engine.begin() as conn:
            await conn.run_sync(self.Base.metadata.drop_all)
        await self.engine.dispose()
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            await conn.execute(f"DROP TABLE IF EXISTS {self.audit_table}, {self.audit_table}_head")
        finally:
            await conn.close()


@pytest.fixture
async def world(postgres_dsn: str, redis_url: str, tmp_path: Path) -> AsyncIterator[World]:
    w = World(postgres_dsn, redis_url, tmp_path)
    try:
        yield w
    finally:
        await w.close()


def email(i: int) -> str:
    return f"user{i}@example.com"


def address(order: int, user: int) -> str:
    return f"{order} Main St, flat {user}"


async def in_parallel(work: Any, items: list[Any]) -> None:
    """``await work(chunk)`` for ``PARALLEL`` chunks of ``items`` at once."""
    chunks = [items[i : i + BATCH] for i in range(0, len(items), BATCH)]
    queue = iter(chunks)

    async def worker() -> None:
        for chunk in queue:
            await work(chunk)

    await asyncio.gather(*(worker() for _ in range(PARALLEL)))


def key_id(token: str | bytes) -> str:
    text = token.decode() if isinstance(token, bytes) else token
    return text.split(".")[1]


async def schema_rows(dsn: str, schema: str) -> dict[str, list[str]]:
    """Every row of every table of the key store's schema, as JSON (a backup)."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
            )
        ]
        return {
            t: [
                r[0]
                for r in await conn.fetch(f'SELECT row_to_json(t)::text FROM "{schema}"."{t}" t')
            ]
            for t in tables
        }
    finally:
        await conn.close()


async def restore_rows(
    dsn: str,
    schema: str,
    backup: dict[str, list[str]],
    only: set[str] | None = None,
    matching: list[str] | None = None,
) -> int:
    """Put rows of ``backup`` back: whole tables, or only rows mentioning ``matching``."""
    conn = await asyncpg.connect(dsn)
    restored = 0
    try:
        async with conn.transaction():
            for table, rows in backup.items():
                if only is not None and table not in only:
                    continue
                target = f'"{schema}"."{table}"'
                if matching is None:
                    await conn.execute(f"DELETE FROM {target}")
                else:
                    rows = [r for r in rows if any(m in r for m in matching)]
                    for m in matching:
                        await conn.execute(
                            f"DELETE FROM {target} t WHERE strpos(row_to_json(t)::text, $1) > 0", m
                        )
                for row in rows:
                    await conn.execute(
                        f"INSERT INTO {target} SELECT * FROM "
                        f"json_populate_record(NULL::{target}, $1::json)",
                        row,
                    )
                    restored += 1
    finally:
        await conn.close()
    return restored


async def forgotten_events(world: World) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(world.dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(
            f"SELECT event, details::text AS details FROM {world.audit_table} "
            "WHERE event = 'subject_forgotten'"
        )
        return rows
    finally:
        await conn.close()


async def assert_unreadable(
    world: World, service: EncryptionService, tokens: dict[str, list[str]]
) -> None:
    """The victim's raw tokens (a backup of the tables) and ORM reads all refuse."""
    for context, values in tokens.items():
        for token in values:
            with pytest.raises(DecryptionError) as caught:
                await service.decrypt_field(token, KeyType.PII, context=context)
            assert caught.value.reason == FORGOTTEN
    Account, Order = world.Account, world.Order
    async with async_sessionmaker(world.engine)() as session:
        with pytest.raises(DecryptionError) as caught:
            await session.get(Account, VICTIM)
        assert caught.value.reason == FORGOTTEN
        assert caught.value.location is not None
        assert caught.value.location.primary_key == VICTIM
        with pytest.raises(DecryptionError) as caught:
            await session.execute(sa.select(Order).where(Order.user_id == VICTIM))
        assert caught.value.reason == FORGOTTEN


async def assert_sessions_and_cache_gone(
    world: World, service: EncryptionService, sids: list[str], cache_keys: list[str]
) -> None:
    store, cache = world.sessions(service), world.cache(service)
    for sid in sids:
        session = await store.load(sid)
        assert session.new and dict(session) == {}  # an empty session, no error
    for key in cache_keys:
        assert await cache.get(key, "miss") == "miss"


@pytest.mark.scale
async def test_forgetting_one_subject_reaches_every_copy(world: World) -> None:
    Account, Order = world.Account, world.Order
    async with world.engine.begin() as conn:
        await conn.run_sync(world.Base.metadata.create_all)
    service = await world.service()

    # -- 10,000 subjects in two tables, bulk-inserted through the column types -------
    async def insert(users: list[int]) -> None:
        async with world.engine.begin() as conn:  # one executemany per table and batch
            await conn.execute(
                sa.insert(Account),
                [{"id": i, "email": RowValue(email(i), subject=i)} for i in users],
            )
            await conn.execute(
                sa.insert(Order),
                [
                    {"id": i, "user_id": i, "address": RowValue(address(i, i), subject=i)}
                    for i in users
                ],
            )

    await in_parallel(insert, list(range(SUBJECTS)))
    async with async_sessionmaker(world.engine)() as session:  # and the unit of work
        session.add_all(
            [
                Order(id=n, user_id=VICTIM, address=address(n, VICTIM))
                for n in (SUBJECTS, SUBJECTS + 1)
            ]
        )
        await session.commit()
    victim_orders = [VICTIM, SUBJECTS, SUBJECTS + 1]

    # -- sessions and cache entries ------------------------------------------------
    store, cache = world.sessions(service), world.cache(service)
    sids: dict[str, int] = {}

    async def log_in(users: list[int]) -> None:
        for user in users:
            session = await store.load(None)
            session.update(user_id=user, cart=[user, "book"])
            result = await store.save(session)
            assert result.action is CookieAction.SET and result.session_id is not None
            sids[result.session_id] = user
            await cache.set(
                f"profile:{user}", {"user": user, "email": email(user)}, subject=f"user:{user}"
            )

    await in_parallel(log_in, [*range(SESSIONS), VICTIM])
    await cache.set(f"orders:{VICTIM}", victim_orders, subject=f"user:{VICTIM}")
    victim_sids = [sid for sid, user in sids.items() if user == VICTIM]
    victim_cache = [f"profile:{VICTIM}", f"orders:{VICTIM}"]
    assert len(victim_sids) == 2

    # -- backups taken before the forget -------------------------------------------
    async with world.engine.connect() as conn:
        raw_email = (
            await conn.execute(
                sa.text(f"SELECT email FROM {Account.__tablename__} WHERE id = {VICTIM}")
            )
        ).scalar_one()
        raw_addresses = list(
            (
                await conn.execute(
                    sa.text(f"SELECT address FROM {Order.__tablename__} WHERE user_id = {VICTIM}")
                )
            ).scalars()
        )
    victim_tokens = {
        f"{Account.__tablename__}.email": [raw_email],
        f"{Order.__tablename__}.address": raw_addresses,
    }
    sessions_before, cache_before = await world.dump("s"), await world.dump("c")
    keys_before = await schema_rows(world.dsn, world.schema)

    # -- forget ----------------------------------------------------------------------
    report = await service.forget_subject(f"user:{VICTIM}", actor="dpo@example.com")
    assert len(report.subject_key_ids) == 3  # pii, session, cache
    assert {key_id(raw_email), *map(key_id, raw_addresses)} <= set(report.subject_key_ids)

    await assert_unreadable(world, service, victim_tokens)
    await assert_sessions_and_cache_gone(world, service, victim_sids, victim_cache)
    gone_sessions = set(sessions_before) - set(await world.dump("s"))
    gone_cache = set(cache_before) - set(await world.dump("c"))
    assert len(gone_sessions) == 2 and len(gone_cache) == 2  # deleted as unreadable
    assert {key_id(sessions_before[k]) for k in gone_sessions} <= set(report.subject_key_ids)

    # everyone else: every other row of both tables, a query per table and batch
    read: list[int] = []

    async def check(users: list[int]) -> None:
        others = sorted(u for u in users if u != VICTIM)
        async with async_sessionmaker(world.engine)() as session:
            accounts = (
                await session.execute(
                    sa.select(Account.id, Account.email).where(Account.id.in_(others))
                )
            ).all()
            assert sorted(accounts) == [(i, email(i)) for i in others]
            orders = (
                await session.execute(
                    sa.select(Order.id, Order.user_id, Order.address).where(
                        Order.user_id.in_(others)
                    )
                )
            ).all()
            assert sorted(orders) == [(i, i, address(i, i)) for i in others]
        read.extend(others)

    await in_parallel(check, list(reversed(range(SUBJECTS))))  # newest first: still cached
    assert sorted(read) == [i for i in range(SUBJECTS) if i != VICTIM]
    for sid, user in sids.items():
        if user != VICTIM:
            assert dict(await store.load(sid)) == {"user_id": user, "cart": [user, "book"]}
            assert await cache.get(f"profile:{user}") == {"user": user, "email": email(user)}

    # exactly one audit event, naming no subject and no value
    [event] = await forgotten_events(world)
    assert f"user:{VICTIM}" not in event["details"] and email(VICTIM) not in event["details"]
    assert "dpo@example.com" in event["details"]

    # -- a restart, with the Redis payloads put back from the dump ------------------
    await service.close()
    await world.redis.mset(
        {k: sessions_before[k] for k in gone_sessions} | {k: cache_before[k] for k in gone_cache}
    )
    service = await world.service()
    await assert_unreadable(world, service, victim_tokens)
    await assert_sessions_and_cache_gone(world, service, victim_sids, victim_cache)
    async with async_sessionmaker(world.engine)() as session:
        sample = (
            await session.execute(
                sa.select(Account.id, Account.email).where(
                    Account.id.in_(range(100, 200)), Account.id != VICTIM
                )
            )
        ).all()
        assert sorted(sample) == [(i, email(i)) for i in range(100, 200) if i != VICTIM]
    assert len(await forgotten_events(world)) == 1

    # -- rollback 1: the victim's subject-key rows restored into the subject store ----
    restored = await restore_rows(
        world.dsn,
        world.schema,
        keys_before,
        only=set(keys_before) - {"keys", "revision", "usage"},
        matching=list(report.subject_key_ids),
    )
    assert restored >= 3
    service = await world.service()
    await assert_unreadable(world, service, victim_tokens)

    # -- rollback 2: and the keyset rolled back to its pre-forget copy -------------
    await restore_rows(world.dsn, world.schema, keys_before, only={"keys", "revision"})
    manager, _ = await world.manager()
    with pytest.raises(KeyStoreIntegrityError, match="went back from revision"):
        await manager.open()
    await manager.close()
    await service.key_manager.refresh(force=True)  # the running process keeps refusing
    assert service.key_manager.integrity_error is not None
    await assert_unreadable(world, service, victim_tokens)
    assert len(await forgotten_events(world)) == 1
