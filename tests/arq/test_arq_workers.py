"""Real ``arq`` worker processes (``python -m arq aiocrypt.integrations.arq.WorkerSettings
--burst``) against the real Redis and Postgres: manual rotation and re-encryption of
100,000 rows then cleanup, two workers sharing one re-encryption, a shard whose database
connection drops and whose worker is then killed, two cron runs at once, a missing table.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import signal
import time
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.constants import result_key_prefix
from arq.jobs import deserialize_result
from arq_helpers import TWO_DAYS_AGO, ArqSetup, check_users, job, make_users, users_spec

from aiocrypt import AsyncpgDatabase, KeyStatus, KeyType, ReencryptionEngine
from aiocrypt.integrations.arq import (
    ArqWorkerConfig,
    JobFailedError,
    ReencryptionStatus,
    enqueue_cleanup,
    enqueue_reencryption,
    enqueue_rotation,
    job_deserializer,
)
from aiocrypt.integrations.arq.status import StatusStore

pytestmark = [pytest.mark.services, pytest.mark.slow]

FIN = KeyType.FINANCIAL_DATA


def span(status: ReencryptionStatus) -> float:
    """Seconds from the first shard's start to the last shard's end."""
    started = min(dt.datetime.fromisoformat(s.started_at or "") for s in status.shards)
    finished = max(dt.datetime.fromisoformat(s.finished_at or "") for s in status.shards)
    return (finished - started).total_seconds()


async def usage(setup: ArqSetup, manager: Any, table: str) -> dict[str, int]:
    """The census: values per key id (keys with none left out)."""
    db = AsyncpgDatabase(setup.dsn, checkpoint_table=setup.checkpoint_table)
    try:
        counts = await ReencryptionEngine(manager, db, tables=[users_spec(table)]).key_usage()
        return {key_id: n for key_id, n in counts.items() if n}
    finally:
        await db.close()


@pytest.mark.scale
async def test_manual_rotation_100k_rows_cleanup_and_two_workers_sharing(
    arq_setup: ArqSetup,
    redis: aioredis.Redis,
    arq_redis: ArqRedis,
    pg: asyncpg.Connection,
    table_name: str,
) -> None:
    rows = 100_000
    setup = arq_setup
    setup.env.update(
        ENCRYPTION_ARQ_TABLES=json.dumps([users_spec(table_name).to_dict()]),
        ENCRYPTION_ARQ_SHARDS="4",
        ENCRYPTION_ARQ_POLL_DELAY="0.1",
    )
    async with setup.manager(clock=TWO_DAYS_AGO) as seeding:
        await make_users(pg, seeding, table_name, rows)
        v1 = seeding.keyring.active(FIN).key_id
        pii = seeding.keyring.active(KeyType.PII).key_id

    # One worker: the manual rotation, then the re-encryption it enqueues (4 shards).
    started = time.monotonic()
    assert await enqueue_rotation(arq_redis, FIN, force=True) is not None
    await setup.run_burst("solo")
    solo_wall = time.monotonic() - started

    async with setup.manager() as manager:
        v2 = manager.keyring.active(FIN).key_id
        assert v2 != v1
        solo = await setup.status(redis, f"reencrypt-{v1}")
        assert (solo.state, solo.target_key_id, solo.key_type) == ("done", v2, "financial_data")
        assert (solo.rows_total, solo.rows_done, solo.rows_left) == (rows, rows, 0)
        assert len(solo.shards) == 4 and {s.worker for s in solo.shards} == {"solo"}
        assert sum(s.rows_updated for s in solo.shards) == rows  # every row moved once
        assert solo.result is not None and solo.result["old_key_rows"] == 0
        assert await usage(setup, manager, table_name) == {v2: 2 * rows, pii: rows}
        await check_users(pg, manager, table_name, rows, v2, pii)

        # Cleanup: the old key is past max age + grace and the census finds no row on it.
        cleanup = await enqueue_cleanup(arq_redis)
        await setup.run_burst("cleaner")
        report = await job(arq_redis, str(cleanup)).result(timeout=5)
        assert report["destroyed"] == [{"key_id": v1, "reason": "census: no rows left"}]
        assert report["census"] is True
        keys = {k.key_id: k for k in await manager.list_keys()}
        assert keys[v1].status is KeyStatus.DESTROYED and keys[v1].wrapped_key is None
        assert keys[v2].status is KeyStatus.ACTIVE and keys[pii].status is KeyStatus.ACTIVE

        # Two workers share the next re-encryption of the same rows.
        started = time.monotonic()
        await enqueue_rotation(arq_redis, FIN, force=True)
        await setup.run_burst("w1", "w2")
        duo_wall = time.monotonic() - started
        await manager.refresh(force=True)
        v3 = manager.keyring.active(FIN).key_id
        duo = await setup.status(redis, f"reencrypt-{v2}")
        assert duo.state == "done", (duo.to_dict(), setup.log_text())
        assert duo.target_key_id == v3 and duo.rows_total == rows
        by_worker = {
            name: [s.index for s in duo.shards if s.worker == name] for name in ("w1", "w2")
        }
        assert by_worker["w1"] and by_worker["w2"], by_worker
        assert sorted(by_worker["w1"] + by_worker["w2"]) == [0, 1, 2, 3]
        assert all(s.tries == 1 and len(s.attempts) == 1 for s in duo.shards)
        assert sum(s.rows_updated for s in duo.shards) == rows
        assert await usage(setup, manager, table_name) == {v3: 2 * rows, pii: rows}
        await check_users(pg, manager, table_name, rows, v3, pii)

    assert setup.env["ENCRYPTION_MASTER_KEY"] not in setup.log_text()
    # Reported, never asserted (tests do not assert timings).
    print(
        f"\nre-encryption of {rows:,} rows x 2 columns, 4 shards: one worker "
        f"{span(solo):.2f} s (wall {solo_wall:.2f} s), two workers {span(duo):.2f} s "
        f"(wall {duo_wall:.2f} s); shards by worker {by_worker}"
    )


async def _wait_for(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


async def test_shard_retries_after_db_failure_and_resumes_after_sigkill(
    arq_setup: ArqSetup,
    redis: aioredis.Redis,
    arq_redis: ArqRedis,
    pg: asyncpg.Connection,
    table_name: str,
) -> None:
    rows = 16_000
    setup = arq_setup
    # 2 shards of 8,000 rows at 3,000 rows/s: each try runs for seconds (under the job
    # timeout's 4 s budget). A killed job is retried by arq once its in-progress mark
    # expires: job timeout + 10 s, most of this test's time.
    setup.env.update(
        ENCRYPTION_ARQ_TABLES=json.dumps([users_spec(table_name).to_dict()]),
        ENCRYPTION_ARQ_SHARDS="2",
        ENCRYPTION_ARQ_BATCH_SIZE="500",
        ENCRYPTION_ARQ_RATE_LIMIT="3000",
        ENCRYPTION_ARQ_JOB_TIMEOUT="5",
        ENCRYPTION_ARQ_POLL_DELAY="0.1",
    )
    async with setup.manager() as manager:
        await make_users(pg, manager, table_name, rows)
        pii = manager.keyring.active(KeyType.PII).key_id
        v1 = manager.keyring.active(FIN).key_id
        v2 = (await manager.rotate_key(FIN, force=True)).key_id
    job_id = await enqueue_reencryption(
        arq_redis, FIN, v1, config=ArqWorkerConfig.from_env(setup.env)
    )
    store = StatusStore(redis, setup.prefix)
    w1 = await setup.start_worker(
        "w1", ENCRYPTION_POSTGRES_DSN=(f"{setup.dsn}?application_name={setup.prefix}-w1")
    )

    async def running_shard(min_rows: int, tries: int) -> Any:
        status = await store.read(job_id)
        for shard in status.shards if status else ():
            if shard.state == "running" and shard.tries == tries and shard.rows_done >= min_rows:
                return shard
        return None

    # 1. The database drops the worker's connections mid-shard: the shard retries with
    #    backoff (arq Retry) and resumes from its checkpoint.
    first = await _wait_for("a running shard", lambda: running_shard(2000, 1))
    killed = await pg.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        f"{setup.prefix}-w1",
    )
    assert killed >= 1
    second = await _wait_for("the retry", lambda: running_shard(0, 2), timeout=30)
    assert second.index == first.index

    # 2. The worker is killed (SIGKILL) in the middle of the retry.
    await _wait_for(
        "progress after resuming",
        lambda: running_shard(second.attempts[-1]["resumed_from"] + 1500, 2),
    )
    w1.send_signal(signal.SIGKILL)
    assert await setup.wait(w1) == -signal.SIGKILL
    await _wait_for(
        "the dead worker's sessions to go",
        lambda: pg.fetchval(
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = $1",
            f"{setup.prefix}-w1",
        ),
    )

    # 3. Another worker finishes the other shard, then retries the killed one.
    await setup.run_burst("w2", timeout=90)
    status = await setup.status(redis, job_id)
    assert status.state == "done", status.to_dict()
    shard = status.shards[first.index]
    assert shard.tries == 3 and [a["worker"] for a in shard.attempts] == ["w1", "w1", "w2"]
    outcomes = [a["outcome"] for a in shard.attempts]
    assert re.match(r"retry in 0\.5 s: (the database|a connection) failed", outcomes[0]), outcomes
    assert outcomes[1:] == ["interrupted (worker lost)", "done"]
    resumed = [a["resumed_from"] for a in shard.attempts]
    assert resumed[0] is None and resumed[1] >= 2000 and resumed[2] > resumed[1]
    other = status.shards[1 - first.index]  # run by w1 while the retry waited, or by w2
    assert other.state == "done" and other.tries == 1
    # Data and checkpoints commit together: no row was moved twice or lost.
    assert sum(s.rows_updated for s in status.shards) == rows
    async with setup.manager() as manager:
        assert await usage(setup, manager, table_name) == {v2: 2 * rows, pii: rows}
        await check_users(pg, manager, table_name, rows, v2, pii)


async def test_two_cron_runs_at_once_rotate_once(
    arq_setup: ArqSetup,
    redis: aioredis.Redis,
    arq_redis: ArqRedis,
    pg: asyncpg.Connection,
    table_name: str,
) -> None:
    rows = 2000
    setup = arq_setup
    setup.env.update(
        ENCRYPTION_ARQ_TABLES=json.dumps([users_spec(table_name).to_dict()]),
        ENCRYPTION_ARQ_RUN_AT_STARTUP="rotation",
        ENCRYPTION_ARQ_POLL_DELAY="0.1",
    )
    async with setup.manager(clock=TWO_DAYS_AGO) as seeding:
        await make_users(pg, seeding, table_name, rows)  # keys made "two days ago": due
        v1 = seeding.keyring.active(FIN).key_id
        pii = seeding.keyring.active(KeyType.PII).key_id

    await setup.run_burst("cron1", "cron2")  # each enqueues the rotation check at start

    # this test's results only (arq's all_job_results reads every result in the db)
    cron_name = f"cron:{setup.prefix}:rotate_keys_scheduled"
    results = [
        deserialize_result(await redis.get(key), deserializer=job_deserializer)
        async for key in redis.scan_iter(match=f"{result_key_prefix}{cron_name}:*")
    ]
    assert 1 <= len(results) <= 2 and all(r.success for r in results), setup.log_text()
    rotations = [item for r in results for item in r.result.get("rotated", ())]
    assert len(rotations) == 1 and rotations[0]["old_key_id"] == v1
    async with setup.manager() as manager:
        keys = await manager.list_keys(FIN)
        assert [k.version for k in keys] == [1, 2]
        v2 = rotations[0]["new_key_id"]
        assert keys[1].key_id == v2 and keys[1].status is KeyStatus.ACTIVE
        assert keys[0].status in (KeyStatus.DECRYPT_ONLY, KeyStatus.EXPIRED)
        assert [k.version for k in await manager.list_keys(KeyType.PII)] == [1]  # not due
        store = StatusStore(redis, setup.prefix)
        assert await store.job_ids() == [f"reencrypt-{v1}"]
        assert (await setup.status(redis, f"reencrypt-{v1}")).state == "done"
        await check_users(pg, manager, table_name, rows, v2, pii)
    runs = [(r.job_id, r.result.get("skipped"), len(r.result.get("rotated", ()))) for r in results]
    print(f"\ncron runs (job id, skipped, rotations): {runs}")


async def test_missing_table_fails_once_with_a_clear_message(
    arq_setup: ArqSetup, redis: aioredis.Redis, arq_redis: ArqRedis, table_name: str
) -> None:
    setup = arq_setup
    setup.env["ENCRYPTION_ARQ_TABLES"] = json.dumps([users_spec(table_name).to_dict()])
    async with setup.manager() as manager:
        v1 = (await manager.get_active_key(FIN)).key_id
        await manager.rotate_key(FIN, force=True)
    config = ArqWorkerConfig.from_env(setup.env)
    job_id = await enqueue_reencryption(arq_redis, FIN, v1, config=config)
    await setup.run_burst("w")
    status = await setup.status(redis, job_id)
    assert status.state == "failed" and status.error is not None
    assert "cannot proceed: a table or column is missing" in status.error
    assert f'relation "{table_name}" does not exist' in status.error
    info = await job(arq_redis, config.job_id(job_id)).result_info()
    assert info is not None and not info.success and info.job_try == 1  # not retried
    assert isinstance(info.result, JobFailedError) and "cannot proceed" in str(info.result)


async def test_shard_stopped_at_its_timeout_says_so_and_resumes_when_enqueued_again(
    arq_setup: ArqSetup,
    redis: aioredis.Redis,
    arq_redis: ArqRedis,
    pg: asyncpg.Connection,
    table_name: str,
) -> None:
    rows = 3000
    setup = arq_setup
    setup.env.update(
        ENCRYPTION_ARQ_TABLES=json.dumps([users_spec(table_name).to_dict()]),
        ENCRYPTION_ARQ_SHARDS="1",
        ENCRYPTION_ARQ_BATCH_SIZE="100",
        ENCRYPTION_ARQ_POLL_DELAY="0.1",
    )
    async with setup.manager() as manager:
        await make_users(pg, manager, table_name, rows)
        v1 = manager.keyring.active(FIN).key_id
        pii = manager.keyring.active(KeyType.PII).key_id
        v2 = (await manager.rotate_key(FIN, force=True)).key_id
    config = ArqWorkerConfig.from_env(setup.env)
    job_id = await enqueue_reencryption(arq_redis, FIN, v1, config=config)
    # 3,000 rows at 600 rows/s cannot finish within the 2 s job timeout
    await setup.run_burst("slow", ENCRYPTION_ARQ_RATE_LIMIT="600", ENCRYPTION_ARQ_JOB_TIMEOUT="2")
    stopped = (await setup.status(redis, job_id)).shards[0]
    assert stopped.state == "failed" and stopped.error is not None
    assert "stopped by arq at the job timeout (2 s, ENCRYPTION_ARQ_JOB_TIMEOUT)" in stopped.error
    assert stopped.attempts[-1]["outcome"] == "stopped at the job timeout"
    assert 0 < stopped.rows_done < rows

    assert await enqueue_reencryption(arq_redis, FIN, v1, config=config) == job_id
    await setup.run_burst("again")
    status = await setup.status(redis, job_id)
    assert status.state == "done"
    shard = status.shards[0]
    assert [a["outcome"] for a in shard.attempts] == ["stopped at the job timeout", "done"]
    assert shard.attempts[1]["resumed_from"] >= stopped.rows_done  # after the checkpoint
    assert shard.rows_updated == rows
    async with setup.manager() as manager:
        await check_users(pg, manager, table_name, rows, v2, pii)
