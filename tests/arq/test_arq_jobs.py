"""aiocrypt's ARQ jobs in this process (real Redis db 15 and a file key store): settings,
merging into an application's worker, single-flight rotation, bounded retries, the status
record and ``aiocrypt jobs status``."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from arq import Retry
from arq.connections import ArqRedis
from arq_helpers import TWO_DAYS_AGO, ArqSetup
from click.testing import CliRunner

from aiocrypt import (
    ConfigurationError,
    EncryptionService,
    KekProviderError,
    KeyManager,
    KeyStoreError,
    KeyStoreIntegrityError,
    KeyType,
    LockTimeoutError,
    ReencryptionError,
)
from aiocrypt.cli import main as cli_main
from aiocrypt.integrations import arq as aiocrypt_arq
from aiocrypt.integrations.arq import (
    STATE_KEY,
    ArqWorkerConfig,
    JobFailedError,
    Schedule,
    aiocrypt_worker_settings,
    merge_into,
    rotate_key_manual,
    rotate_keys_scheduled,
)
from aiocrypt.integrations.arq.failures import describe, is_transient
from aiocrypt.integrations.arq.state import shutdown, startup
from aiocrypt.integrations.arq.status import ShardStatus, StatusStore, redis_lock
from aiocrypt.kek import LocalKekProvider

FIN = KeyType.FINANCIAL_DATA


# -- settings -----------------------------------------------------------------------


def test_defaults_and_schedules() -> None:
    cfg = ArqWorkerConfig.from_env({})
    assert (cfg.queue_name, cfg.key_prefix, cfg.shards, cfg.max_jobs) == (
        "encryption",
        "aiocrypt",
        4,
        1,
    )
    assert str(cfg.rotation_schedule) == "02:00" and str(cfg.cleanup_schedule) == "sun 03:00"
    assert Schedule.parse("02:00") == Schedule(2, 0)
    assert Schedule.parse("sun 03:00") == Schedule(3, 0, frozenset({6}))
    assert Schedule.parse("Mon,Thu 4:30") == Schedule(4, 30, frozenset({0, 3}))
    assert Schedule.parse("off") is None
    assert Schedule(3, 0, frozenset({6})).cron_kwargs() == {
        "hour": 3,
        "minute": 0,
        "second": 0,
        "weekday": {6},
    }
    for bad in ("25:00", "3pm", "sunday 03:00", "02:7"):
        with pytest.raises(ValueError):
            Schedule.parse(bad)


def test_settings_from_env_report_every_problem_and_hide_the_redis_password() -> None:
    env = {
        "ENCRYPTION_REDIS_URL": "redis://:s3cret-pw@10.0.0.5:6380/3",
        "ENCRYPTION_ARQ_QUEUE": "crypto",
        "ENCRYPTION_ARQ_ROTATION_AT": "04:15",
        "ENCRYPTION_ARQ_CLEANUP_AT": "off",
        "ENCRYPTION_ARQ_RUN_AT_STARTUP": "rotation",
        "ENCRYPTION_ARQ_SHARDS": "8",
        "ENCRYPTION_ARQ_RATE_LIMIT": "5000",
        "ENCRYPTION_ARQ_TIMEZONE": "Europe/Paris",
    }
    cfg = ArqWorkerConfig.from_env(env)
    assert (cfg.queue_name, str(cfg.rotation_schedule), cfg.cleanup_schedule) == (
        "crypto",
        "04:15",
        None,
    )
    assert (cfg.run_at_startup, cfg.shards, cfg.rate_limit) == (frozenset({"rotation"}), 8, 5000.0)
    assert "s3cret-pw" not in repr(cfg) and "s3cret-pw" not in str(cfg)
    redis_settings = cfg.redis_settings()
    assert (redis_settings.host, redis_settings.port, redis_settings.database) == (
        "10.0.0.5",
        6380,
        3,
    )
    settings = aiocrypt_worker_settings(cfg)
    assert settings["queue_name"] == "crypto" and str(settings["timezone"]) == "Europe/Paris"
    assert [c.name for c in settings["cron_jobs"]] == ["cron:aiocrypt:rotate_keys_scheduled"]
    assert (settings["cron_jobs"][0].hour, settings["cron_jobs"][0].minute) == (4, 15)
    assert settings["cron_jobs"][0].run_at_startup

    with pytest.raises(ConfigurationError) as caught:
        ArqWorkerConfig.from_env(
            {"ENCRYPTION_ARQ_SHARDS": "many", "ENCRYPTION_ARQ_ROTATION_AT": "noon"}
        )
    message = str(caught.value)
    assert "ENCRYPTION_ARQ_SHARDS" in message and "ENCRYPTION_ARQ_ROTATION_AT" in message
    with pytest.raises(ConfigurationError) as caught:
        ArqWorkerConfig(
            shards=0,
            key_prefix="bad prefix!",
            run_at_startup=frozenset({"x"}),
            metadata="no_colon",
            tables="[]",
        )
    assert str(caught.value).count("\n- ") == 5


def test_ready_worker_settings(monkeypatch: pytest.MonkeyPatch, clean_env: None) -> None:
    monkeypatch.setenv("ENCRYPTION_REDIS_URL", "redis://127.0.0.1:6379/15")
    monkeypatch.setattr(aiocrypt_arq, "_worker_settings", None)
    from aiocrypt.integrations.arq import WorkerSettings

    assert WorkerSettings is aiocrypt_arq.WorkerSettings  # built once
    assert WorkerSettings.queue_name == "encryption"
    assert [f.name for f in WorkerSettings.functions] == [
        "rotate_keys_scheduled",
        "rotate_key_manual",
        "reencrypt_data_with_new_key",
        "reencrypt_shard",
        "cleanup_expired_keys",
    ]
    rotation, cleanup = WorkerSettings.cron_jobs
    assert (rotation.hour, rotation.minute, rotation.weekday, rotation.unique) == (2, 0, None, True)
    assert (cleanup.hour, cleanup.minute, cleanup.weekday) == (3, 0, {6})
    assert all(f.max_tries == 5 for f in WorkerSettings.functions)
    assert all(hasattr(aiocrypt_arq, name) for name in aiocrypt_arq.__all__)
    with pytest.raises(AttributeError):
        _ = aiocrypt_arq.NoSuchThing


async def test_merge_into_an_application_worker(
    arq_setup: ArqSetup, monkeypatch: pytest.MonkeyPatch, arq_redis: ArqRedis
) -> None:
    for name, value in arq_setup.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ENCRYPTION_POSTGRES_DSN")
    events: list[str] = []

    async def send_invoice(ctx: dict[str, Any], invoice_id: int) -> None:
        pass

    async def app_startup(ctx: dict[str, Any]) -> None:
        events.append(f"app startup sees {type(ctx[STATE_KEY]).__name__}")

    async def app_shutdown(ctx: dict[str, Any]) -> None:
        events.append(f"app shutdown sees {STATE_KEY in ctx}")

    class WorkerSettings:
        functions: Any = [send_invoice]  # noqa: RUF012 (how arq settings are written)
        cron_jobs: Any = None
        on_startup: Any = app_startup
        on_shutdown: Any = app_shutdown
        queue_name = "app-queue"

    assert merge_into(WorkerSettings) is WorkerSettings
    names = [getattr(f, "name", getattr(f, "__name__", "")) for f in WorkerSettings.functions]
    assert names[0] == "send_invoice" and "reencrypt_shard" in names and len(names) == 6
    assert len(WorkerSettings.cron_jobs) == 2 and WorkerSettings.queue_name == "app-queue"
    merge_into(WorkerSettings)  # idempotent for functions and cron jobs
    assert len(WorkerSettings.functions) == 6 and len(WorkerSettings.cron_jobs) == 2

    ctx: dict[str, Any] = {"redis": arq_redis}
    await WorkerSettings.on_startup(ctx)
    await WorkerSettings.on_shutdown(ctx)
    assert events == ["app startup sees WorkerState", "app shutdown sees True"]
    assert STATE_KEY not in ctx

    as_dict: dict[str, Any] = merge_into({"functions": [send_invoice], "redis_settings": None})
    assert len(as_dict["functions"]) == 6 and as_dict["on_shutdown"] is not None


# -- failures -----------------------------------------------------------------------


def test_failures_that_may_pass_are_retried_others_are_not() -> None:
    transient = [
        KeyStoreError("cannot read key store"),
        LockTimeoutError("held"),
        ConnectionRefusedError(),
        TimeoutError(),
        asyncpg.exceptions.ConnectionDoesNotExistError("closed"),
        asyncpg.exceptions.AdminShutdownError("shutdown"),
        asyncpg.exceptions.DeadlockDetectedError("deadlock"),
        asyncpg.exceptions.InterfaceError("connection is closed"),
        KekProviderError("throttled", backend="aws", retryable=True),
    ]
    permanent = [
        KeyStoreIntegrityError("tampered"),
        ValueError("bad"),
        JobFailedError("no"),
        asyncpg.exceptions.UndefinedTableError('relation "t" does not exist'),
        KekProviderError("access denied", backend="aws"),
        ReencryptionError("users", "ssn", 42),
        FileNotFoundError(),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
    assert describe(ReencryptionError("users", "ssn", 42)).startswith(
        "users.ssn: the value of the row with primary key 42 does not decrypt"
    )
    assert (
        describe(asyncpg.exceptions.UndefinedTableError('relation "t" does not exist'))
        == 'a table or column is missing in the database (UndefinedTableError: relation "t" '
        "does not exist)"
    )


async def _started(
    setup: ArqSetup, monkeypatch: pytest.MonkeyPatch, redis: ArqRedis, **config: Any
) -> dict[str, Any]:
    for name, value in setup.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ENCRYPTION_POSTGRES_DSN")
    ctx: dict[str, Any] = {"redis": redis, "job_try": 1}
    await startup(ctx, ArqWorkerConfig.from_env(setup.env).replace(**config))
    return ctx


async def test_key_store_down_retries_with_backoff_then_fails_clearly(
    arq_setup: ArqSetup, monkeypatch: pytest.MonkeyPatch, arq_redis: ArqRedis
) -> None:
    ctx = await _started(arq_setup, monkeypatch, arq_redis, max_tries=3, retry_delay=0.5)
    try:
        with pytest.raises(JobFailedError, match="cannot proceed: unknown key type"):
            await rotate_key_manual(ctx, "no such type!", force=True)  # not retried
        store = ctx[STATE_KEY].key_manager.store

        async def down(*args: Any, **kwargs: Any) -> Any:
            raise KeyStoreError(f"cannot read key store {store.path}: Connection refused")

        monkeypatch.setattr(store, "revision", down)
        monkeypatch.setattr(store, "read", down)
        defers = []
        for job_try in (1, 2):
            ctx["job_try"] = job_try
            with pytest.raises(Retry) as retry:
                await rotate_key_manual(ctx, "financial_data", force=True)
            defers.append(retry.value.defer_score)
        assert defers == [500, 1000]  # ms: exponential backoff
        ctx["job_try"] = 3
        with pytest.raises(JobFailedError) as failed:
            await rotate_key_manual(ctx, "financial_data", force=True)
        assert str(failed.value).startswith(
            "rotate_key_manual(financial_data): gave up after 3 tries: the key store failed "
            "(KeyStoreError: cannot read key store"
        )
    finally:
        await shutdown(ctx)


async def test_rotation_check_is_single_flight(
    arq_setup: ArqSetup, monkeypatch: pytest.MonkeyPatch, arq_redis: ArqRedis
) -> None:
    async with arq_setup.manager(clock=TWO_DAYS_AGO) as seeding:
        v1 = (await seeding.get_active_key(FIN)).key_id  # due: made "two days ago"
    first = await _started(arq_setup, monkeypatch, arq_redis)
    second = await _started(arq_setup, monkeypatch, arq_redis)
    lock_key = f"{arq_setup.prefix}:job-lock:rotation"
    try:
        # Another worker holds the check: this one skips, saying who.
        async with redis_lock(arq_redis, lock_key, ttl=30, owner="other-host:123") as held:
            assert held.acquired
            skipped = await rotate_keys_scheduled(first)
        assert skipped == {"skipped": "another worker (other-host:123) is running the check"}

        reports = await asyncio.gather(rotate_keys_scheduled(first), rotate_keys_scheduled(second))
        rotations = [r for report in reports for r in report.get("rotated", ())]
        assert len(rotations) == 1 and rotations[0]["old_key_id"] == v1
        assert not await arq_redis.exists(lock_key)
        (done,) = [r for r in reports if r.get("rotated")]
        # no table to re-encrypt in this worker: said, not silently dropped
        assert done["reencryption"] == [
            {
                "old_key_id": v1,
                "skipped": "no registered table has a column of key type "
                "financial_data (ENCRYPTION_ARQ_METADATA / ENCRYPTION_ARQ_TABLES)",
                "subject_keys_rewrapped": 0,
            }
        ]
        async with arq_setup.manager() as manager:
            assert [k.version for k in await manager.list_keys(FIN)] == [1, 2]
    finally:
        await shutdown(first)
        await shutdown(second)


async def test_a_rotation_job_rewraps_the_data_subjects_keys(
    arq_setup: ArqSetup, monkeypatch: pytest.MonkeyPatch, arq_redis: ArqRedis
) -> None:
    """Subject keys move with a rotation (their data does not): the job rewraps them
    under the new version key, so the census lets the old version be retired later."""
    async with arq_setup.manager() as seeding:
        service = EncryptionService(seeding)
        tokens = {
            f"user:{i}": await service.encrypt_field(f"v{i}", FIN, context="c", subject=f"user:{i}")
            for i in range(3)
        }
        v1 = (await seeding.get_active_key(FIN)).key_id
        assert await seeding.subject_census(FIN) == {v1: 3}
    ctx = await _started(arq_setup, monkeypatch, arq_redis)
    try:
        result = await rotate_key_manual(ctx, "financial_data", force=True)
        assert result["rotated"] and result["old_key_id"] == v1
        assert result["reencryption"]["subject_keys_rewrapped"] == 3
        manager = ctx[STATE_KEY].key_manager
        census = await manager.subject_census(FIN)
        assert census.get(result["new_key_id"]) == 3 and not census.get(v1)
        for subject, token in tokens.items():  # the same tokens still open
            assert (
                await EncryptionService(manager).decrypt_field(token, FIN, context="c")
                == f"v{subject.split(':')[1]}"
            )
    finally:
        await shutdown(ctx)


async def test_rotation_check_beside_a_redis_key_store_under_the_same_prefix(
    arq_setup: ArqSetup, monkeypatch: pytest.MonkeyPatch, arq_redis: ArqRedis
) -> None:
    # The defaults put both in one Redis under one name: key store prefix "aiocrypt:",
    # job prefix "aiocrypt". The check's own lock must not be the store's rotation lock
    # (it was: the check then waited for itself until the store's lock timeout).
    from aiocrypt.keystore.redis import RedisKeyStore

    arq_setup.env.update(
        ENCRYPTION_KEY_STORAGE_BACKEND="redis", ENCRYPTION_REDIS_KEY_PREFIX=f"{arq_setup.prefix}:"
    )
    kek = LocalKekProvider(arq_setup.master_key)
    store = RedisKeyStore(arq_setup.redis_url, prefix=f"{arq_setup.prefix}:")
    async with KeyManager(store, kek, arq_setup.config, clock=TWO_DAYS_AGO, watch=False) as seeding:
        v1 = (await seeding.get_active_key(FIN)).key_id  # due: made "two days ago"
    ctx = await _started(arq_setup, monkeypatch, arq_redis, max_tries=1)
    try:
        assert ctx[STATE_KEY].key_manager.store.name == "redis"
        report = await asyncio.wait_for(rotate_keys_scheduled(ctx), 20)
        assert [r["old_key_id"] for r in report["rotated"]] == [v1]
    finally:
        await shutdown(ctx)


# -- status and the CLI ---------------------------------------------------------------


async def _write_status(redis: aioredis.Redis, prefix: str) -> str:
    store = StatusStore(redis, prefix)
    job_id = "reencrypt-financial_data-v1-0a0b0c0d"
    plan = [
        {"index": 0, "table": "users", "after": None, "until": 5000, "rows_total": 5000},
        {"index": 1, "table": "users", "after": 5000, "until": None, "rows_total": 5000},
    ]
    await store.create(
        job_id,
        {
            "kind": "reencrypt",
            "job_id": job_id,
            "key_type": "financial_data",
            "old_key_id": "financial_data-v1-0a0b0c0d",
            "target_key_id": "financial_data-v2-1a1b1c1d",
            "created_at": "2026-01-01T02:00:00+00:00",
            "plan": plan,
        },
    )
    done = await store.shard(job_id, 0)
    running = await store.shard(job_id, 1)
    assert done is not None and running is not None
    await store.put_shard(
        job_id,
        ShardStatus.from_dict(
            {
                **done.to_dict(),
                "state": "done",
                "worker": "host-a:1",
                "tries": 1,
                "rows_done": 5000,
                "rows_updated": 5000,
                "started_at": "2026-01-01T02:00:01+00:00",
                "finished_at": "2026-01-01T02:00:03+00:00",
                "attempts": ({"try": 1, "worker": "host-a:1", "outcome": "done"},),
            }
        ),
    )
    await store.put_shard(
        job_id,
        ShardStatus.from_dict(
            {
                **running.to_dict(),
                "state": "running",
                "worker": "host-b:2",
                "tries": 2,
                "rows_done": 2500,
                "rows_updated": 2500,
                "rate": 1250.0,
                "updated_ts": time.time(),
                "started_at": "2026-01-01T02:00:01+00:00",
                "attempts": (
                    {"try": 1, "worker": "host-b:2", "outcome": "retry in 5.0 s: ..."},
                    {"try": 2, "worker": "host-b:2", "outcome": "running"},
                ),
            }
        ),
    )
    return job_id


async def test_status_record_aggregates_the_shards(redis: aioredis.Redis, prefix: str) -> None:
    job_id = await _write_status(redis, prefix)
    status = await StatusStore(redis, prefix).read(job_id)
    assert status is not None
    assert (status.state, status.rows_total, status.rows_done, status.rows_left) == (
        "running",
        10_000,
        7500,
        2500,
    )
    assert status.rate == 1250.0 and status.workers == ["host-a:1", "host-b:2"]
    assert await StatusStore(redis, prefix).resolve("financial_data-v1-0a0b0c0d") == job_id
    assert json.loads(json.dumps(status.to_dict()))["shards"][1]["tries"] == 2


def test_jobs_status_cli(
    redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> None:
    async def setup() -> str:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await _write_status(client, prefix)
        finally:
            await client.aclose()

    async def cleanup() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            keys = [k async for k in client.scan_iter(match=f"*{prefix}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    job_id = asyncio.run(setup())
    try:
        env = {"ENCRYPTION_REDIS_URL": redis_url, "ENCRYPTION_ARQ_PREFIX": prefix, "COLUMNS": "160"}
        runner = CliRunner()
        shown = runner.invoke(cli_main, ["jobs", "status", job_id], env=env)
        assert shown.exit_code == 0, shown.output
        out = shown.output
        for text in (
            job_id,
            "financial_data-v1-0a0b0c0d -> financial_data-v2-1a1b1c1d",
            "running",
            "7,500 done, 2,500 left of 10,000",
            "1,250 rows/s",
            "75%",
            "host-a:1",
            "host-b:2",
            "5,000/5,000",
            "2,500/5,000",
            "(-inf, 5000]",
            "(5000, +inf]",
            "━",
        ):
            assert text in out, (text, out)
        by_key = runner.invoke(
            cli_main, ["jobs", "status", "financial_data-v1-0a0b0c0d", "--json"], env=env
        )
        assert json.loads(by_key.output)["rows_done"] == 7500
        listed = runner.invoke(cli_main, ["jobs", "status"], env=env)
        assert job_id in listed.output and "75%" in listed.output and "1/2" in listed.output
        missing = runner.invoke(cli_main, ["jobs", "status", "nope"], env=env)
        assert missing.exit_code == 1 and "no re-encryption job 'nope'" in missing.output
        no_redis = runner.invoke(cli_main, ["jobs", "status"], env={"ENCRYPTION_REDIS_URL": ""})
        assert no_redis.exit_code == 3 and "ENCRYPTION_REDIS_URL" in no_redis.output
    finally:
        asyncio.run(cleanup())
