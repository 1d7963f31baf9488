"""Workers never unpickle (issue 14): against real Redis, Postgres and real ``arq`` worker
processes.

* The attack: whoever can write to the worker's Redis stores ``arq:job:<id>`` as a
  pickle whose loading creates a file, and adds ``<id>`` to the queue. The worker
  takes the job, refuses the payload unread, and runs nothing: no file, no job.
* A worker that would decode with pickle (the codec removed, set to pickle, or a
  JSON pool under a pickle-decoding worker) refuses to start, saying why, before
  it loads a key or takes a job.
* Every enqueue path (``aiocrypt jobs ...``, ``aiocrypt keys compromise
  --reencrypt``, the Python API) writes JSON, which a worker runs end to end.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import DeserializationError
from arq_helpers import ROOT, ArqSetup, check_users, job, make_users, users_spec

from aiocrypt import ConfigurationError, KeyType
from aiocrypt.integrations.arq import (
    ArqWorkerConfig,
    aiocrypt_worker_settings,
    create_job_pool,
    enqueue_cleanup,
    enqueue_reencryption,
    enqueue_rotation,
    job_deserializer,
    job_serializer,
    merge_into,
)

pytestmark = pytest.mark.services

FIN, PII = KeyType.FINANCIAL_DATA, KeyType.PII


class TouchOnUnpickle:
    """Unpickling this creates ``path``: the attacker's code, without a shell."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


async def plant_pickled_job(redis: aioredis.Redis, queue: str, job_id: str, marker: Path) -> None:
    """The two Redis writes of the attack: a pickled job naming one of the worker's
    functions (which would then run too), and its id in the queue."""
    now_ms = int(time.time() * 1000)
    payload = pickle.dumps(
        {
            "t": 1,
            "f": "cleanup_expired_keys",
            "a": (),
            "k": {},
            "et": now_ms,
            "x": TouchOnUnpickle(marker),
        }
    )
    assert b"cleanup_expired_keys" in payload and str(marker).encode() in payload
    await redis.set(job_key_prefix + job_id, payload)
    await redis.zadd(queue, {job_id: now_ms})


async def test_a_pickled_job_runs_nothing(
    arq_setup: ArqSetup, redis: aioredis.Redis, arq_redis: ArqRedis, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    job_id = f"{arq_setup.prefix}:planted"
    await plant_pickled_job(redis, arq_setup.queue, job_id, marker)

    await arq_setup.run_burst("w")  # takes the job, the queue empties, it exits

    assert not marker.exists(), "the pickled payload ran code in the worker"
    info = await job(arq_redis, job_id).result_info()
    assert info is not None, arq_setup.log_text()
    # failed before arq even read the function name: nothing of the job ran
    assert (info.success, info.function) == (False, "<unknown>")
    assert isinstance(info.result, DeserializationError)
    assert await redis.zcard(arq_setup.queue) == 0
    assert not await redis.exists(job_key_prefix + job_id)
    log = arq_setup.log_text()
    assert f"deserializing job {job_id} failed" in log
    assert "not a JSON payload: aiocrypt's job queue carries JSON only" in log
    assert f"{job_id}:cleanup_expired_keys" not in log  # arq logs each job it starts
    # the payload itself is not logged (it names the marker's path)
    assert str(marker) not in log


@pytest.mark.parametrize("mode", ["default", "pickle", "pool"])
async def test_a_worker_that_would_unpickle_refuses_to_start(
    arq_setup: ArqSetup, redis: aioredis.Redis, tmp_path: Path, mode: str
) -> None:
    marker = tmp_path / "pwned"
    job_id = f"{arq_setup.prefix}:planted"
    await plant_pickled_job(redis, arq_setup.queue, job_id, marker)
    log_path = arq_setup.logs / f"{mode}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "tests" / "arq" / "pickle_worker.py"),
            mode,
            env=arq_setup.worker_env(mode),
            cwd=str(ROOT),
            stdout=log,
            stderr=log,
        )
        arq_setup.processes.append(proc)
    code = await arq_setup.wait(proc, timeout=60)
    out = log_path.read_text(errors="replace")

    assert code != 0, out
    assert "ConfigurationError: refusing to start: this arq worker" in out, out
    decoder = "pickle.loads" if mode == "pickle" else "pickle.loads (arq's default)"
    assert f"it decodes with {decoder}, so whoever can write to its Redis" in out
    assert "could run code in a process that holds the master key" in out
    assert "job_deserializer=aiocrypt.integrations.arq.job_deserializer" in out
    # refused before loading a key or taking a job
    assert "aiocrypt worker" not in out and "ready" not in out
    assert not marker.exists()
    assert await redis.zscore(arq_setup.queue, job_id) is not None  # still queued, untouched
    assert arq_setup.env["ENCRYPTION_MASTER_KEY"] not in out


async def test_settings_pools_and_enqueueing_refuse_pickle(
    arq_setup: ArqSetup, redis: aioredis.Redis
) -> None:
    config = ArqWorkerConfig.from_env(arq_setup.env)
    settings = aiocrypt_worker_settings(config)
    assert (settings["job_serializer"], settings["job_deserializer"]) == (
        job_serializer,
        job_deserializer,
    )
    for override in (
        {"job_deserializer": pickle.loads},
        {"job_deserializer": None},
        {"job_serializer": pickle.dumps},
    ):
        with pytest.raises(ConfigurationError, match="must be aiocrypt's JSON codec"):
            aiocrypt_worker_settings(config, **override)

    class AppSettings:
        functions: Any = ()
        job_deserializer: Any = pickle.loads

    with pytest.raises(
        ConfigurationError, match="merge_into: the settings name their own job_deserializer"
    ):
        merge_into(AppSettings, config)
    merged = merge_into({"functions": []}, config)
    assert merged["job_deserializer"] is job_deserializer
    assert merged["job_serializer"] is job_serializer

    # arq's own pool pickles: aiocrypt's enqueue functions refuse it
    pickling = await create_pool(
        RedisSettings.from_dsn(arq_setup.redis_url), default_queue_name=arq_setup.queue
    )
    try:
        enqueue: Callable[[], Awaitable[object]]
        for enqueue in (
            lambda: enqueue_rotation(pickling, FIN, force=True),
            lambda: enqueue_cleanup(pickling),
            lambda: enqueue_reencryption(pickling, FIN, "financial_data-v1-00", config=config),
        ):
            with pytest.raises(
                ConfigurationError,
                match="cannot enqueue aiocrypt's jobs: this "
                "arq pool does not use aiocrypt's "
                "JSON job codec",
            ):
                await enqueue()
        assert await redis.zcard(arq_setup.queue) == 0
    finally:
        await pickling.aclose()


def test_the_codec_round_trips_plain_data_and_refuses_the_rest() -> None:
    from aiocrypt.integrations.arq import JobFailedError

    job_payload = {"t": 1, "f": "rotate_key_manual", "a": ("pii", True), "k": {}, "et": 5}
    assert job_deserializer(job_serializer(job_payload)) == {**job_payload, "a": ["pii", True]}
    failed = job_deserializer(job_serializer({"s": False, "r": JobFailedError("no table")}))
    assert isinstance(failed["r"], JobFailedError) and str(failed["r"]) == "no table"
    other = job_deserializer(job_serializer({"s": False, "r": KeyError("x")}))
    assert type(other["r"]).__name__ == "JobExecutionFailed" and "KeyError" in str(other["r"])
    # a success whose result looks like an error stays data
    data = {"__aiocrypt_error__": "builtins.KeyError", "message": "x"}
    assert job_deserializer(job_serializer({"s": True, "r": data}))["r"] == data
    with pytest.raises(TypeError, match="bytes do not travel"):
        job_serializer({"a": [b"\x00" * 32]})
    for payload in (pickle.dumps({"f": "x"}), b"[1, 2]", b"\xff\xfe", b"{" * 100_000):
        with pytest.raises(ValueError, match="not a JSON payload") as refused:
            job_deserializer(payload)
        assert refused.value.__cause__ is None and refused.value.__context__ is None


# -- every enqueue path writes JSON, which a worker runs end to end ---------------------


async def cli(setup: ArqSetup, *args: str) -> dict[str, Any]:
    """``aiocrypt ARGS --json`` in its own process, with the test's environment."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiocrypt.cli",
        *args,
        "--json",
        env=setup.env,
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (args, out.decode(), err.decode())
    found: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return found


async def json_job(redis: aioredis.Redis, arq_id: str, function: str) -> dict[str, Any]:
    """The queued job as stored: plain JSON (``json.loads``, no aiocrypt code)."""
    raw = await redis.get(job_key_prefix + arq_id)
    assert raw is not None, arq_id
    stored: dict[str, Any] = json.loads(raw)
    assert stored["f"] == function
    return stored


@pytest.mark.slow
async def test_every_enqueue_path_writes_json_that_workers_run(
    arq_setup: ArqSetup,
    redis: aioredis.Redis,
    arq_redis: ArqRedis,
    pg: asyncpg.Connection,
    table_name: str,
) -> None:
    rows = 300
    setup = arq_setup
    setup.env.update(
        ENCRYPTION_ARQ_TABLES=json.dumps([users_spec(table_name).to_dict()]),
        ENCRYPTION_ARQ_SHARDS="2",
        ENCRYPTION_ARQ_POLL_DELAY="0.1",
    )
    config = ArqWorkerConfig.from_env(setup.env)
    async with setup.manager() as manager:
        await make_users(pg, manager, table_name, rows)
        fin_v1 = manager.keyring.active(FIN).key_id
        pii_v1 = manager.keyring.active(PII).key_id
    arq_ids: list[str] = []
    try:
        # 1. `aiocrypt jobs rotate` and `aiocrypt keys compromise --reencrypt`
        rotate = await cli(setup, "jobs", "rotate", "financial_data", "--force")
        assert rotate["enqueued"] == "rotate_key_manual"
        assert (await json_job(redis, rotate["job_id"], "rotate_key_manual"))["a"] == [
            "financial_data",
            True,
        ]
        compromise = await cli(
            setup, "keys", "compromise", pii_v1, "--reason", "laptop stolen", "--reencrypt"
        )
        assert compromise == {
            "enqueued": "reencrypt_data_with_new_key",
            "job_id": f"reencrypt-{pii_v1}",
        }
        pii_job = config.job_id(compromise["job_id"])
        assert (await json_job(redis, pii_job, "reencrypt_data_with_new_key"))["a"][:2] == [
            "pii",
            pii_v1,
        ]
        arq_ids += [rotate["job_id"], pii_job]

        await setup.run_burst("w1")
        for arq_id in arq_ids:
            info = await job(arq_redis, arq_id).result_info()
            assert info is not None and info.success, (arq_id, info, setup.log_text())
        rotated = (await job(arq_redis, rotate["job_id"]).result_info()).result  # type: ignore[union-attr]
        assert rotated["rotated"] is True and rotated["old_key_id"] == fin_v1
        for old in (fin_v1, pii_v1):  # both re-encryptions ran, shards enqueued by the worker
            assert (await setup.status(redis, f"reencrypt-{old}")).state == "done"
        async with setup.manager() as manager:
            fin_v2 = manager.keyring.active(FIN).key_id
            pii_v2 = manager.keyring.active(PII).key_id
            assert (fin_v2, pii_v2) != (fin_v1, pii_v1)
            await check_users(pg, manager, table_name, rows, fin_v2, pii_v2)

        # 2. `aiocrypt jobs reencrypt / rotate-due / cleanup`, and the Python API
        again = await cli(setup, "jobs", "reencrypt", "financial_data", fin_v1)
        await json_job(redis, config.job_id(again["job_id"]), "reencrypt_data_with_new_key")
        due = await cli(setup, "jobs", "rotate-due")
        await json_job(redis, due["job_id"], "rotate_keys_scheduled")
        cleanup = await cli(setup, "jobs", "cleanup")
        await json_job(redis, cleanup["job_id"], "cleanup_expired_keys")
        pool = await create_job_pool(config)
        try:
            api_rotation = await enqueue_rotation(pool, PII)
            assert api_rotation is not None
            await json_job(redis, api_rotation, "rotate_key_manual")
            api_cleanup = await enqueue_cleanup(pool)
            assert api_cleanup is not None
            await json_job(redis, api_cleanup, "cleanup_expired_keys")
        finally:
            await pool.aclose()
        second = [
            config.job_id(again["job_id"]),
            due["job_id"],
            cleanup["job_id"],
            api_rotation,
            api_cleanup,
        ]
        arq_ids += second

        await setup.run_burst("w2")
        for arq_id in second:
            info = await job(arq_redis, arq_id).result_info()
            assert info is not None and info.success, (arq_id, info, setup.log_text())
        async with setup.manager() as manager:
            await check_users(pg, manager, table_name, rows, fin_v2, pii_v2)
        assert "deserializing job" not in setup.log_text()
    finally:
        ids = [i for i in arq_ids if not i.startswith(setup.prefix)]  # the rest is cleaned up
        if ids:
            await redis.delete(*(p + i for i in ids for p in (job_key_prefix, result_key_prefix)))
