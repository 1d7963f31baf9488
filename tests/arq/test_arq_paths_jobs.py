"""aiocrypt's ARQ jobs called in this process, as a worker would run them, against the
real Redis db 15 and Postgres (no worker process): a worker without a database, the
table settings' errors, the census with blind indexes, re-planning, sweeping rows
written behind a shard, and a shard's retries, cancellation and mid-run rotation."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from arq import Retry
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq_helpers import TWO_DAYS_AGO, ArqSetup, check_users, make_users, users_spec
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aiocrypt import ConfigurationError, KeyType
from aiocrypt.adapters import text_prefix
from aiocrypt.integrations.arq import (
    STATE_KEY,
    ArqWorkerConfig,
    JobFailedError,
    cleanup_expired_keys,
    enqueue_reencryption,
)
from aiocrypt.integrations.arq.reencryption import (
    ReencryptionPlan,
    reencrypt_data_with_new_key,
    reencrypt_shard,
    shard_job_id,
)
from aiocrypt.integrations.arq.state import (
    WorkerState,
    load_table_specs,
    shutdown,
    startup,
    worker_state,
)
from aiocrypt.integrations.sqlalchemy import (
    BLIND_INDEX_KEY_TYPE,
    BlindIndex,
    EncryptedString,
    set_encryption_service,
)

FIN = KeyType.FINANCIAL_DATA
_SUFFIX = secrets.token_hex(4)


class Base(DeclarativeBase):
    """Models named by ENCRYPTION_ARQ_METADATA=test_arq_paths_jobs:Base."""


class Person(Base):
    __tablename__ = f"arqp_people_{_SUFFIX}"
    id: Mapped[int] = mapped_column(primary_key=True)
    ssn: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))
    ssn_index: Mapped[str | None] = mapped_column(BlindIndex("ssn"))


async def _worker(
    setup: ArqSetup,
    monkeypatch: pytest.MonkeyPatch,
    redis: ArqRedis,
    *,
    database: bool = True,
    **config: Any,
) -> dict[str, Any]:
    """``ctx`` after aiocrypt's on_startup, with the settings a worker of ``setup`` reads."""
    for name, value in setup.env.items():
        monkeypatch.setenv(name, value)
    if not database:
        monkeypatch.delenv("ENCRYPTION_POSTGRES_DSN")
    ctx: dict[str, Any] = {"redis": redis, "job_try": 1}
    await startup(ctx, ArqWorkerConfig.from_env(setup.env).replace(**config))
    return ctx


def _tables(table: str) -> str:
    return json.dumps([users_spec(table).to_dict()])


async def _seed(state: WorkerState, pg: asyncpg.Connection, table: str, rows: int) -> None:
    """``rows`` users on the active keys, and the checkpoint table (which planning creates
    before any shard runs: these tests run shards without planning)."""
    await make_users(pg, state.key_manager, table, rows)
    db = state.database()
    try:
        await db.prepare(users_spec(table))
    finally:
        await db.close()


# -- a worker's state ---------------------------------------------------------------


async def test_a_worker_without_a_database(
    arq_setup: ArqSetup, monkeypatch: pytest.MonkeyPatch, arq_redis: ArqRedis, table_name: str
) -> None:
    with pytest.raises(JobFailedError, match="aiocrypt's on_startup has not run in this worker"):
        worker_state({"redis": arq_redis})
    with pytest.raises(ConfigurationError, match="ENCRYPTION_POSTGRES_DSN is not set"):
        await _worker(arq_setup, monkeypatch, arq_redis, database=False, tables=_tables("t"))
    ctx = await _worker(arq_setup, monkeypatch, arq_redis, database=False, worker_name="w-1")
    try:
        state: WorkerState = ctx[STATE_KEY]
        assert repr(state) == f"<WorkerState worker='w-1' queue='{arq_setup.queue}' tables=[]>"
        with_tables = dataclasses.replace(state, tables={table_name: users_spec(table_name)})
        assert with_tables.reencryption_gap(FIN) == "ENCRYPTION_POSTGRES_DSN is not set"
        with pytest.raises(JobFailedError, match="cannot reach the data to re-encrypt or count"):
            with_tables.database()

        # cleanup: single flight, and without a census when there is no database
        lock = f"{arq_setup.prefix}:job-lock:cleanup"
        await arq_redis.set(lock, "w-2|0123456789abcdef")
        assert await cleanup_expired_keys(ctx) == {
            "skipped": "another worker (w-2) is running the cleanup"
        }
        await arq_redis.delete(lock)
        report = await cleanup_expired_keys(ctx)
        assert (report["census"], report["worker"], report["destroyed"]) == (False, "w-1", [])
    finally:
        await shutdown(ctx)


def test_table_settings_errors_name_the_variable(tmp_path: Path) -> None:
    def specs(**config: Any) -> Any:
        return load_table_specs(ArqWorkerConfig(**config))

    with pytest.raises(ConfigurationError, match=r"ENCRYPTION_ARQ_TABLES: cannot read .*missing"):
        specs(tables=f"@{tmp_path / 'missing.json'}")
    with pytest.raises(ConfigurationError, match="ENCRYPTION_ARQ_TABLES must be a JSON list"):
        specs(tables="[{")
    with pytest.raises(ConfigurationError, match="ENCRYPTION_ARQ_TABLES must be a JSON list"):
        specs(tables='[{"name": "users"}]')
    path = tmp_path / "tables.json"
    path.write_text(json.dumps({"tables": [users_spec("users").to_dict()]}))
    assert specs(tables=f"@{path}") == ([users_spec("users")], None)
    with pytest.raises(ConfigurationError, match="cannot import 'no_such_module_1b2c'"):
        specs(metadata="no_such_module_1b2c:Base")
    with pytest.raises(ConfigurationError, match=r"'test_arq_paths_jobs:Base\.nope' has no attr"):
        specs(metadata="test_arq_paths_jobs:Base.nope")
    found, metadata = specs(metadata="test_arq_paths_jobs:Base")
    assert metadata is Base.metadata and [s.name for s in found] == [Person.__tablename__]


async def test_the_census_counts_blind_indexes_and_keeps_keys_it_cannot_see(
    arq_setup: ArqSetup,
    monkeypatch: pytest.MonkeyPatch,
    arq_redis: ArqRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = await _worker(arq_setup, monkeypatch, arq_redis, metadata="test_arq_paths_jobs:Base")
    state: WorkerState = ctx[STATE_KEY]
    engine = create_async_engine(arq_setup.dsn.replace("postgresql://", "postgresql+asyncpg://"))
    set_encryption_service(state.service)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(
                sa.insert(Person),
                [{"id": i, "ssn": f"{i:09d}", "ssn_index": f"{i:09d}"} for i in (1, 2, 3)],
            )
        keyring = await state.key_manager.ensure_active([FIN])
        fin = keyring.active(FIN).key_id
        pii = keyring.active(KeyType.PII).key_id
        index = keyring.active(BLIND_INDEX_KEY_TYPE).key_id
        with caplog.at_level(logging.INFO, logger="aiocrypt.arq"):
            usage = await state.census()
        assert (usage[pii], usage[index], usage[fin]) == (3, 3, 1)
        assert "census: key types financial_data are not stored in registered tables" in (
            caplog.text
        )
        # metadata without blind indexes: the census cannot count the index key, so keeps it
        blind = dataclasses.replace(state, metadata=sa.MetaData())
        with caplog.at_level(logging.INFO, logger="aiocrypt.arq"):
            usage = await blind.census()
        assert (usage[pii], usage[index], usage[fin]) == (3, 1, 1)
        assert "census: key types blind_index, financial_data are not stored" in caplog.text
    finally:
        set_encryption_service(None)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
        await engine.dispose()
        await shutdown(ctx)


# -- planning -----------------------------------------------------------------------


async def test_planning_failures_are_recorded_then_replanned(
    arq_setup: ArqSetup, monkeypatch: pytest.MonkeyPatch, arq_redis: ArqRedis
) -> None:
    ctx = await _worker(arq_setup, monkeypatch, arq_redis, database=False)
    state: WorkerState = ctx[STATE_KEY]
    try:
        v1 = (await state.key_manager.ensure_active([FIN])).active(FIN).key_id
        job_id = f"reencrypt-{v1}"
        with pytest.raises(JobFailedError, match=f"key {v1} is still the active financial_data"):
            await reencrypt_data_with_new_key(ctx, "financial_data", v1)
        failed = await state.status.read(job_id)
        assert failed is not None and failed.state == "failed"
        assert failed.meta["unplanned"] is True and failed.target_key_id is None
        assert failed.error is not None and "rotate it first" in failed.error

        v2 = (await state.key_manager.rotate_key(FIN, force=True)).key_id
        # the record of the failure is replaced by the plan; no table: nothing to move
        assert await reencrypt_data_with_new_key(ctx, "financial_data", v1) == {
            "job_id": job_id,
            "target_key_id": v2,
            "shards": 0,
            "enqueued": [],
            "rows_total": 0,
        }
        done = await state.status.read(job_id)
        assert done is not None and (done.state, done.error, done.target_key_id) == (
            "done",
            None,
            v2,
        )
        assert done.result is not None and done.result["old_key_rows"] == 0

        with pytest.raises(JobFailedError, match=f"key {v1} is a financial_data key, not pii"):
            await reencrypt_data_with_new_key(ctx, "pii", v1)
        after = await state.status.read(job_id)
        assert after is not None and after.target_key_id == v2  # the plan stays
        assert after.error is not None and after.error.endswith("not pii")
    finally:
        await shutdown(ctx)


async def test_a_reencryption_in_process_replans_smaller_sweeps_and_finishes(
    arq_setup: ArqSetup,
    monkeypatch: pytest.MonkeyPatch,
    arq_redis: ArqRedis,
    redis: aioredis.Redis,
    pg: asyncpg.Connection,
    table_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # made "two days ago": v1 is past its max age (and no grace) once its rows moved
    async with arq_setup.manager(clock=TWO_DAYS_AGO) as seeding:
        await make_users(pg, seeding, table_name, 6)
        v1 = seeding.keyring.active(FIN).key_id
        pii = seeding.keyring.active(KeyType.PII).key_id
    ctx = await _worker(
        arq_setup,
        monkeypatch,
        arq_redis,
        tables=_tables(table_name),
        shards=1,
        max_shard_rows=4,
        sweep_delay=0.0,
        worker_name="w-1",
    )
    state: WorkerState = ctx[STATE_KEY]
    cfg = state.config
    try:
        manager = state.key_manager
        v2 = (await manager.rotate_key(FIN, force=True)).key_id
        job_id = f"reencrypt-{v1}"
        # enqueueing again while the job is queued joins it
        assert await enqueue_reencryption(arq_redis, FIN, v1, config=cfg) == job_id
        assert await enqueue_reencryption(arq_redis, FIN, v1, config=cfg) == job_id
        assert await arq_redis.zcard(cfg.queue_name) == 1

        planned = await reencrypt_data_with_new_key(ctx, "financial_data", v1, 2, 1)
        # one shard asked for, 6 rows over max_shard_rows=4: planned again as two
        assert (planned["shards"], planned["rows_total"]) == (2, 6)
        shard_ids = [shard_job_id(cfg, job_id, i) for i in (0, 1)]
        assert planned["enqueued"] == shard_ids
        again = await reencrypt_data_with_new_key(ctx, "financial_data", v1, 2, 1)
        assert again["enqueued"] == []  # both shards are queued already
        await redis.delete(*(job_key_prefix + i for i in shard_ids))  # as a worker takes them

        meta = await state.status.meta(job_id)
        assert meta is not None
        plan = ReencryptionPlan.from_dict(meta)
        old_token = await pg.fetchval(f"SELECT income FROM {table_name} WHERE id = 1")
        await reencrypt_shard(ctx, *plan.shard_job(plan.shards[0], 2).to_args())
        # a process that has not seen the rotation writes on v1 behind shard 0
        await pg.execute(f"UPDATE {table_name} SET income = $1 WHERE id = 1", old_token)
        await reencrypt_shard(ctx, *plan.shard_job(plan.shards[1], 2).to_args())
        swept = await state.status.read(job_id)
        assert swept is not None and swept.result is not None
        assert (swept.result["old_key_rows"], swept.result["sweeps"]) == (1, 1)
        assert [s.state for s in swept.shards] == ["queued", "queued"]
        assert [await redis.exists(job_key_prefix + i) for i in shard_ids] == [1, 1]

        for shard in plan.shards:
            await reencrypt_shard(ctx, *plan.shard_job(shard, 2).to_args())
        finished = await state.status.read(job_id)
        assert finished is not None and finished.state == "done"
        assert finished.result is not None
        assert (finished.result["old_key_rows"], finished.result["sweeps"]) == (0, 1)
        assert finished.result["finished_by"] == "w-1"
        await check_users(pg, manager, table_name, 6, v2, pii)
        # once the workers took the sweep's jobs, enqueueing again runs no done shard
        await redis.delete(*(job_key_prefix + i for i in shard_ids))
        rerun = await reencrypt_data_with_new_key(ctx, "financial_data", v1, 2, 1)
        assert (rerun["shards"], rerun["enqueued"]) == (2, [])

        # the cleanup's census (registered tables, no metadata) finds no row on v1
        with caplog.at_level(logging.WARNING, logger="aiocrypt.arq"):
            report = await cleanup_expired_keys(ctx)
        assert report["destroyed"] == [{"key_id": v1, "reason": "census: no rows left"}]
        assert report["census"] is True
        assert f"key {v1} destroyed: census: no rows left" in caplog.text
    finally:
        await shutdown(ctx)


# -- one shard ----------------------------------------------------------------------


async def test_a_shard_that_cannot_start_is_recorded(
    arq_setup: ArqSetup,
    monkeypatch: pytest.MonkeyPatch,
    arq_redis: ArqRedis,
    table_name: str,
) -> None:
    ctx = await _worker(arq_setup, monkeypatch, arq_redis, tables=_tables(table_name))
    state: WorkerState = ctx[STATE_KEY]
    try:
        with pytest.raises(JobFailedError, match="table 'elsewhere' is not registered"):
            await reencrypt_shard(ctx, "reencrypt-x", "financial_data", "elsewhere", 0, None, None)
        failed = await state.status.shard("reencrypt-x", 0)
        assert failed is not None and failed.state == "failed"
        assert failed.error is not None and "is not registered in this worker" in failed.error
        assert [a["outcome"] for a in failed.attempts] == ["failed"]

        # a plan whose target this worker's key store does not have (yet): retried
        target = "financial_data-v9-0a0b0c0d"
        await state.status.create(
            "reencrypt-y",
            ReencryptionPlan(
                "reencrypt-y", "financial_data", "financial_data-v1-00000000", target, "now"
            ).to_dict(),
        )
        with pytest.raises(Retry):
            await reencrypt_shard(ctx, "reencrypt-y", "financial_data", table_name, 0, None, None)
        retrying = await state.status.shard("reencrypt-y", 0)
        assert retrying is not None and retrying.state == "retrying"
        assert retrying.error == (
            f"ShardIncompleteError: this worker does not see the target key {target} as active yet"
        )
        assert retrying.attempts[-1]["outcome"].startswith("retry in 0.5 s: ShardIncomplete")
    finally:
        await shutdown(ctx)


async def test_rows_written_back_behind_every_pass_leave_the_shard_incomplete(
    arq_setup: ArqSetup,
    monkeypatch: pytest.MonkeyPatch,
    arq_redis: ArqRedis,
    pg: asyncpg.Connection,
    table_name: str,
) -> None:
    ctx = await _worker(arq_setup, monkeypatch, arq_redis, tables=_tables(table_name))
    state: WorkerState = ctx[STATE_KEY]
    keep_old = f"{table_name}_keep_old"
    try:
        manager = state.key_manager
        await _seed(state, pg, table_name, 4)
        # A writer that has not seen the rotation puts row 1's old income back after
        # every update (a trigger: the same on every pass, no timing involved).
        await pg.execute(
            f"CREATE FUNCTION {keep_old}() RETURNS trigger AS $$ BEGIN "
            "IF NEW.id = 1 THEN NEW.income := OLD.income; END IF; RETURN NEW; "
            "END $$ LANGUAGE plpgsql"
        )
        await pg.execute(
            f"CREATE TRIGGER {keep_old} BEFORE UPDATE ON {table_name} "
            f"FOR EACH ROW EXECUTE FUNCTION {keep_old}()"
        )
        v2 = (await manager.rotate_key(FIN, force=True)).key_id
        args = ("reencrypt-z", "financial_data", table_name, 0, None, None, 2)  # no plan
        with pytest.raises(Retry):
            await reencrypt_shard(ctx, *args)
        shard = await state.status.shard("reencrypt-z", 0)
        assert shard is not None and shard.state == "retrying"
        assert shard.error == (
            "ShardIncompleteError: rows were still left after 3 passes "
            "(concurrent writes keep adding old tokens)"
        )

        await pg.execute(f"DROP TRIGGER {keep_old} ON {table_name}")
        ctx["job_try"] = 2
        result = await reencrypt_shard(ctx, *args)
        assert (result["rows_updated"], result["shard"]) == (1, 0)
        assert await state.status.read("reencrypt-z") is None  # no plan: nothing to finish
        shard = await state.status.shard("reencrypt-z", 0)
        assert shard is not None and shard.state == "done"
        assert [(a["try"], a["outcome"][:8]) for a in shard.attempts] == [
            (1, "retry in"),
            (2, "done"),
        ]
        stored = await pg.fetch(f"SELECT income, savings FROM {table_name}")
        assert all(v.startswith(text_prefix(v2)) for r in stored for v in r.values())
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {table_name}")
        await pg.execute(f"DROP FUNCTION IF EXISTS {keep_old}")
        await shutdown(ctx)


async def _held(dsn: str, table: str, row_id: int) -> asyncpg.Connection:
    """A connection holding a row lock on ``row_id`` (in an open transaction): the shard's
    write of that row waits for it, at a point the test chooses, without timing."""
    conn = await asyncpg.connect(dsn)
    await conn.execute("BEGIN")
    await conn.execute(f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE", row_id)
    return conn


async def _waiting(pg: asyncpg.Connection, table: str) -> None:
    """Until another session waits for a lock in a query on ``table``."""
    for _ in range(400):
        if await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%' || $1 || '%'",
            table,
        ):
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the shard never waited for the locked row")


async def test_a_shard_stopped_by_the_worker_goes_back_to_queued(
    arq_setup: ArqSetup,
    monkeypatch: pytest.MonkeyPatch,
    arq_redis: ArqRedis,
    pg: asyncpg.Connection,
    table_name: str,
) -> None:
    ctx = await _worker(arq_setup, monkeypatch, arq_redis, tables=_tables(table_name))
    state: WorkerState = ctx[STATE_KEY]
    try:
        await _seed(state, pg, table_name, 4)
        await state.key_manager.rotate_key(FIN, force=True)
        locker = await _held(arq_setup.dsn, table_name, 2)
        try:
            task = asyncio.ensure_future(
                reencrypt_shard(ctx, "reencrypt-c", "financial_data", table_name, 0, None, None, 1)
            )
            await _waiting(pg, table_name)
            task.cancel()  # arq stopping the worker
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await locker.close()
        shard = await state.status.shard("reencrypt-c", 0)
        assert shard is not None and shard.state == "queued"
        assert shard.attempts[-1]["outcome"] == "interrupted (worker stopped)"
    finally:
        await shutdown(ctx)


async def test_a_rotation_during_a_shard_moves_its_rows_onto_the_newest_key(
    arq_setup: ArqSetup,
    monkeypatch: pytest.MonkeyPatch,
    arq_redis: ArqRedis,
    pg: asyncpg.Connection,
    table_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = await _worker(arq_setup, monkeypatch, arq_redis, tables=_tables(table_name))
    state: WorkerState = ctx[STATE_KEY]
    try:
        manager = state.key_manager
        await _seed(state, pg, table_name, 6)
        pii = manager.keyring.active(KeyType.PII).key_id
        await manager.rotate_key(FIN, force=True)
        locker = await _held(arq_setup.dsn, table_name, 2)
        try:
            with caplog.at_level(logging.INFO, logger="aiocrypt.arq"):
                task = asyncio.ensure_future(
                    reencrypt_shard(
                        ctx, "reencrypt-r", "financial_data", table_name, 0, None, None, 1
                    )
                )
                await _waiting(pg, table_name)  # the run is past row 1, onto v2
                v3 = (await manager.rotate_key(FIN, force=True)).key_id
                await locker.execute("ROLLBACK")
                result = await task
        finally:
            await locker.close()
        assert "the financial_data key rotated during the run; continuing" in caplog.text
        assert result["rows_updated"] == 6  # the run after the rotation moves every row
        await check_users(pg, manager, table_name, 6, v3, pii)
    finally:
        await shutdown(ctx)
