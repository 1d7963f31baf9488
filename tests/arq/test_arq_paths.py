"""The ARQ integration's less travelled paths, in this process: every setting's check,
the JSON codec's conversions, how failures are classified and described, the status
records' edge cases, merging a time zone, and the ``aiocrypt jobs`` commands (real
Redis db 15; no worker process)."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import job_key_prefix
from click.testing import CliRunner
from rich.console import Console

from aiocrypt import ConfigurationError, KekProviderError
from aiocrypt.cli import main as cli_main
from aiocrypt.integrations.arq import cli as jobs_cli
from aiocrypt.integrations.arq.codec import (
    check_worker,
    codec_problem,
    job_deserializer,
    job_serializer,
)
from aiocrypt.integrations.arq.config import ArqWorkerConfig, Schedule
from aiocrypt.integrations.arq.failures import ShardIncompleteError, describe, is_transient
from aiocrypt.integrations.arq.status import (
    ReencryptionStatus,
    ShardStatus,
    StatusStore,
    reencryption_status,
)
from aiocrypt.integrations.arq.worker import merge_into

# -- settings -----------------------------------------------------------------------


def test_every_setting_check_names_its_variable() -> None:
    with pytest.raises(ValueError, match="weekdays must be 0 \\(Monday\\) to 6 \\(Sunday\\)"):
        Schedule(1, 0, frozenset({7}))
    with pytest.raises(ValueError, match="weekdays must be"):
        Schedule(1, 0, frozenset())
    with pytest.raises(ConfigurationError) as bad:
        ArqWorkerConfig(
            queue_name="",
            poll_delay=0,
            job_timeout=-1.0,
            sweep_delay=-0.5,
            rate_limit=0.0,
            checkpoint_table="ckpt; drop table x",
            timezone="Mars/Olympus_Mons",
        )
    assert str(bad.value).splitlines()[1:] == [
        "- ENCRYPTION_ARQ_QUEUE must not be empty",
        "- ENCRYPTION_ARQ_JOB_TIMEOUT must be a positive number of seconds",
        "- ENCRYPTION_ARQ_POLL_DELAY must be a positive number of seconds",
        "- ENCRYPTION_ARQ_SWEEP_DELAY cannot be negative",
        "- ENCRYPTION_ARQ_RATE_LIMIT must be a positive number of rows/s",
        "- ENCRYPTION_ARQ_CHECKPOINT_TABLE must be a plain SQL name",
        "- ENCRYPTION_ARQ_TIMEZONE: unknown time zone 'Mars/Olympus_Mons'",
    ]


def test_run_at_startup_words_and_time_zones() -> None:
    on = ArqWorkerConfig.from_env({"ENCRYPTION_ARQ_RUN_AT_STARTUP": "Yes"})
    off = ArqWorkerConfig.from_env({"ENCRYPTION_ARQ_RUN_AT_STARTUP": "none"})
    assert on.run_at_startup == frozenset({"rotation", "cleanup"})
    assert off.run_at_startup == frozenset()
    assert off.tzinfo() is None
    zoned = ArqWorkerConfig(timezone="Europe/Paris")
    assert zoned.tzinfo() == ZoneInfo("Europe/Paris")
    # merge_into gives an application's worker aiocrypt's time zone, unless it has one
    merged = merge_into({"functions": []}, zoned)
    assert merged["timezone"] == ZoneInfo("Europe/Paris")
    theirs = merge_into({"functions": [], "timezone": ZoneInfo("Asia/Tokyo")}, zoned)
    assert theirs["timezone"] == ZoneInfo("Asia/Tokyo")
    assert merge_into({"functions": []}, ArqWorkerConfig()).get("timezone") is None


# -- the JSON codec -----------------------------------------------------------------


class _Colour(enum.Enum):
    RED = "red"


def test_the_codec_sends_enums_and_dates_as_json_and_names_what_cannot_travel() -> None:
    sent = job_serializer(
        {
            "colour": _Colour.RED,
            "at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
            "day": dt.date(2026, 1, 2),
            "time": dt.time(3, 4),
        }
    )
    assert json.loads(sent) == {
        "colour": "red",
        "at": "2026-01-02T03:04:05+00:00",
        "day": "2026-01-02",
        "time": "03:04:00",
    }
    with pytest.raises(TypeError, match="a set cannot travel as JSON"):
        job_serializer({"ids": {1, 2}})
    assert job_deserializer(b'{"r": 1, "s": true}') == {"r": 1, "s": True}


def test_a_codec_problem_names_a_custom_serializer() -> None:
    def my_dumps(obj: Any) -> bytes:
        return b""

    problem = codec_problem(my_dumps, job_deserializer)
    assert problem is not None
    assert problem.startswith(
        "it encodes with test_a_codec_problem_names_a_custom_serializer.<locals>.my_dumps, "
        "which aiocrypt's JSON-only workers refuse to read."
    )
    assert "decodes" not in problem
    assert codec_problem(job_serializer, job_deserializer) is None


async def test_a_worker_whose_pool_would_unpickle_refuses_to_start(redis_url: str) -> None:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))  # arq's pickle default
    try:
        with pytest.raises(ConfigurationError) as refused:
            check_worker({"redis": pool})
        assert str(refused.value).startswith(
            "refusing to start: this arq worker's Redis pool (ctx['redis']) does not use "
            "aiocrypt's JSON job codec: it decodes with pickle.loads (arq's default)"
        )
    finally:
        await pool.aclose()


# -- failures -----------------------------------------------------------------------


def test_how_each_kind_of_failure_is_classified_and_described() -> None:
    assert is_transient(ShardIncompleteError("rows left"))
    assert is_transient(redis.exceptions.ConnectionError("down"))
    assert is_transient(redis.exceptions.BusyLoadingError("loading"))
    assert not is_transient(redis.exceptions.ResponseError("WRONGTYPE"))
    assert (
        describe(KekProviderError("throttled", backend="aws", retryable=True))
        == "the KEK provider failed (KekProviderError: throttled)"
    )
    assert (
        describe(asyncpg.exceptions.DeadlockDetectedError("deadlock detected"))
        == "the database failed (DeadlockDetectedError: deadlock detected)"
    )
    assert (
        describe(redis.exceptions.ConnectionError("down")) == "Redis failed (ConnectionError: down)"
    )
    assert (
        describe(ConnectionRefusedError(111, "Connection refused"))
        == "a connection failed (ConnectionRefusedError: [Errno 111] Connection refused)"
    )
    assert describe(ValueError()) == "ValueError"
    assert describe(ValueError("bad")) == "ValueError: bad"


# -- status records -----------------------------------------------------------------


def _shard(index: int, state: str, **extra: Any) -> ShardStatus:
    return ShardStatus(index, "users", None, None, rows_total=10, state=state, **extra)


def _status(*shards: ShardStatus, result: dict[str, Any] | None = None) -> ReencryptionStatus:
    return ReencryptionStatus(
        "reencrypt-k1", "pii", "k1", "k2", "2026-01-01T00:00:00", tuple(shards), result=result
    )


def test_job_state_times_and_workers_from_the_shards() -> None:
    assert _status(_shard(0, "queued"), _shard(1, "queued")).state == "queued"
    done = _status(
        _shard(0, "done", finished_at="2026-01-01T00:05:00", attempts=({"worker": "a"},)),
        _shard(1, "done", finished_at="2026-01-01T00:09:00", attempts=({"worker": "a"},)),
        result={"old_key_rows": 0, "finished_at": "2026-01-01T00:10:00"},
    )
    assert (done.state, done.finished_at) == ("done", "2026-01-01T00:09:00")
    assert done.workers == ["a"]  # one worker of two shards, named once
    console = Console(record=True, width=120)
    console.print(jobs_cli.render_job(done))
    assert "finished  2026-01-01T00:09:00" in console.export_text()
    unplanned = _status(result={"finished_at": "2026-01-01T00:10:00"})
    assert unplanned.finished_at == "2026-01-01T00:10:00"


async def test_status_store_edges(redis: aioredis.Redis, prefix: str) -> None:
    store = StatusStore(redis, prefix)
    assert repr(store) == f"<StatusStore prefix={prefix!r}>"
    plan = {"job_id": "j", "key_type": "pii", "old_key_id": "k1", "plan": []}
    first = await store.create("j", plan)
    # another run planned it first: its plan stays in force
    second = await store.create("j", {**plan, "old_key_id": "other"})
    assert first == second == plan
    assert await redis.zcard(store.index_key) == 1
    # a record whose meta is gone (a partial write) reads as no record
    await store.put_shard("half", _shard(0, "queued"))
    assert await store.read("half") is None
    # an index entry whose record expired is left out of the recent jobs
    await redis.zadd(store.index_key, {"expired": time.time() + 5})
    assert [s.job_id for s in await store.recent()] == ["j"]
    await store.delete("j")
    assert await store.read("j") is None and await store.resolve("j") is None
    await store.create("reencrypt-k9", {**plan, "job_id": "reencrypt-k9", "old_key_id": "k9"})
    found = await reencryption_status(redis, "k9", config=ArqWorkerConfig(key_prefix=prefix))
    assert found is not None and (found.job_id, found.old_key_id) == ("reencrypt-k9", "k9")
    assert (
        await reencryption_status(redis, "nope", config=ArqWorkerConfig(key_prefix=prefix)) is None
    )


# -- aiocrypt jobs ------------------------------------------------------------------


def _on_redis(redis_url: str, work: Callable[[aioredis.Redis], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await work(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


@pytest.fixture
def jobs_env(redis_url: str, prefix: str, clean_env: None) -> Iterator[dict[str, str]]:
    """The CLI's environment on this test's prefix and queue; its keys deleted after."""
    yield {
        "ENCRYPTION_REDIS_URL": redis_url,
        "ENCRYPTION_ARQ_PREFIX": prefix,
        "ENCRYPTION_ARQ_QUEUE": f"{prefix}:queue",
        "COLUMNS": "200",
    }

    async def drop(client: aioredis.Redis) -> None:
        keys = [k async for k in client.scan_iter(match=f"*{prefix}*")]
        if keys:
            await client.delete(*keys)

    _on_redis(redis_url, drop)


def _write_finished_job(redis_url: str, prefix: str) -> str:
    async def write(client: aioredis.Redis) -> str:
        store = StatusStore(client, prefix)
        job_id = "reencrypt-pii-v1-0a0b0c0d"
        await store.create(
            job_id,
            {
                "job_id": job_id,
                "key_type": "pii",
                "old_key_id": "pii-v1-0a0b0c0d",
                "target_key_id": "pii-v2-1a1b1c1d",
                "created_at": "2026-01-01T00:00:00",
                "plan": [
                    {"index": 0, "table": "users", "after": None, "until": 5, "rows_total": 5},
                    {"index": 1, "table": "users", "after": 5, "until": None, "rows_total": 5},
                ],
            },
        )
        await store.put_shard(
            job_id,
            ShardStatus(0, "users", None, 5, 5, state="done", finished_at="2026-01-01T00:01:00"),
        )
        await store.put_shard(
            job_id,
            ShardStatus(
                1, "users", 5, None, 5, state="failed", error="users.ssn: row 7 does not decrypt"
            ),
        )
        await store.put(job_id, "result", {"old_key_rows": 1})
        await store.put(job_id, "error", "gave up after 5 tries")
        return job_id

    return str(_on_redis(redis_url, write))


def test_jobs_status_json_without_a_job_id_lists_every_recent_job(
    jobs_env: dict[str, str], redis_url: str, prefix: str
) -> None:
    """docs/cli.md's ``jobs status --json``: ``[]`` with no jobs; then each job's record
    whole, with its shards, as ``jobs status JOB_ID --json`` gives it."""
    runner = CliRunner()
    empty = runner.invoke(cli_main, ["jobs", "status", "--json"], env=jobs_env)
    assert (empty.exit_code, empty.output) == (0, "[]\n")
    job_id = _write_finished_job(redis_url, prefix)
    listed = runner.invoke(cli_main, ["jobs", "status", "--json"], env=jobs_env)
    assert listed.exit_code == 0, listed.output
    jobs = json.loads(listed.output)
    assert [(j["job_id"], j["old_key_id"], j["target_key_id"]) for j in jobs] == [
        (job_id, "pii-v1-0a0b0c0d", "pii-v2-1a1b1c1d")
    ]
    assert [(s["table"], s["rows_total"]) for s in jobs[0]["shards"]] == [("users", 5)] * 2
    one = runner.invoke(cli_main, ["jobs", "status", job_id, "--json"], env=jobs_env)
    assert jobs[0] == json.loads(one.output)


def test_jobs_status_shows_errors_census_and_a_terminal_list(
    jobs_env: dict[str, str], redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    empty = runner.invoke(cli_main, ["jobs", "status"], env=jobs_env)
    assert (empty.exit_code, empty.output) == (0, "no re-encryption jobs recorded\n")
    job_id = _write_finished_job(redis_url, prefix)
    shown = runner.invoke(cli_main, ["jobs", "status", job_id], env=jobs_env)
    assert shown.exit_code == 0, shown.output
    for text in (
        "failed",
        "census    1 row(s) left on pii-v1-0a0b0c0d",
        "error     gave up after 5 tries",
        "users.ssn: row 7 does not decrypt",
    ):
        assert text in shown.output, (text, shown.output)
    # --watch on a job that has ended: one frame, no polling
    watched = runner.invoke(cli_main, ["jobs", "status", job_id, "--watch"], env=jobs_env)
    assert watched.exit_code == 0 and "gave up after 5 tries" in watched.output
    # on a terminal the list is a rich table (the state styled), not plain columns
    monkeypatch.setattr(jobs_cli, "console", Console(force_terminal=True, width=200))
    listed = runner.invoke(cli_main, ["jobs", "status"], env=jobs_env)
    assert listed.exit_code == 0
    assert listed.output.startswith("┏━") and job_id in listed.output
    assert "\x1b[1;31mfailed" in listed.output  # bold red


def test_jobs_enqueue_commands_print_the_job(
    jobs_env: dict[str, str], redis_url: str, prefix: str
) -> None:
    runner = CliRunner()
    rotate = runner.invoke(cli_main, ["jobs", "rotate", "pii", "--force"], env=jobs_env)
    assert rotate.exit_code == 0, rotate.output
    rotate_id = rotate.output.strip().rsplit(" as ", 1)[1]
    assert rotate.output.startswith("enqueued rotate_key_manual(pii, force) as ")
    reencrypt = runner.invoke(
        cli_main, ["jobs", "reencrypt", "pii", "pii-v1-0a0b0c0d", "--shards", "2"], env=jobs_env
    )
    assert reencrypt.output == (
        "enqueued reencrypt-pii-v1-0a0b0c0d; follow it with: "
        "aiocrypt jobs status reencrypt-pii-v1-0a0b0c0d --watch\n"
    )
    due = runner.invoke(cli_main, ["jobs", "rotate-due", "--json"], env=jobs_env)
    due_id = json.loads(due.output)["job_id"]
    assert json.loads(due.output)["enqueued"] == "rotate_keys_scheduled"
    cleanup = runner.invoke(cli_main, ["jobs", "cleanup"], env=jobs_env)
    assert cleanup.output.startswith("enqueued cleanup_expired_keys as ")
    cleanup_id = cleanup.output.strip().rsplit(" as ", 1)[1]

    async def check(client: aioredis.Redis) -> list[str]:
        queued = [
            (await client.zrange(f"{prefix}:queue", 0, -1)),
            [await client.exists(job_key_prefix + i) for i in (rotate_id, due_id, cleanup_id)],
        ]
        await client.delete(*(job_key_prefix + i for i in (rotate_id, due_id, cleanup_id)))
        return queued

    members, exists = _on_redis(redis_url, check)
    assert sorted(m.decode() for m in members) == sorted(
        [rotate_id, due_id, cleanup_id, f"{prefix}:reencrypt-pii-v1-0a0b0c0d"]
    )
    assert exists == [1, 1, 1]


def test_jobs_without_redis_installed_say_which_extra(
    jobs_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    monkeypatch.setitem(sys.modules, "redis.exceptions", None)
    rotate = runner.invoke(cli_main, ["jobs", "rotate", "pii"], env=jobs_env)
    assert rotate.exit_code != 0
    assert "pip install 'aiocrypt[arq]'" in str(rotate.exception) + rotate.output
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    status = runner.invoke(cli_main, ["jobs", "status"], env=jobs_env)
    assert "pip install 'aiocrypt[arq]'" in str(status.exception) + status.output
