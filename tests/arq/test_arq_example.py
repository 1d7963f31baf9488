"""examples/arq_worker.py: the application's worker with aiocrypt's jobs merged in, run
with one command (``python -m examples.arq_worker``) against the real Redis."""

from __future__ import annotations

import asyncio
import sys

import pytest
from arq.connections import ArqRedis
from arq_helpers import ROOT, ArqSetup, job

pytestmark = pytest.mark.services


async def test_example_worker_runs_app_and_aiocrypt_jobs(
    arq_setup: ArqSetup, arq_redis: ArqRedis
) -> None:
    async with arq_setup.manager() as manager:
        old = (await manager.get_active_key("api_keys")).key_id
    statement = await arq_redis.enqueue_job("monthly_statement", 7, 123.45)
    rotation = await arq_redis.enqueue_job("rotate_key_manual", "api_keys", True)
    assert statement is not None and rotation is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "examples.arq_worker",
        "--burst",
        cwd=str(ROOT),
        env=arq_setup.worker_env("example"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    log = out.decode()
    assert "Starting worker for 8 functions: monthly_statement, rotate_keys_scheduled" in log
    assert arq_setup.env["ENCRYPTION_MASTER_KEY"] not in log

    stored = await job(arq_redis, statement.job_id).result(timeout=5)
    assert stored["user_id"] == 7 and stored["stored"] > 40
    rotated = await job(arq_redis, rotation.job_id).result(timeout=5)
    assert rotated["rotated"] is True and rotated["old_key_id"] == old
    # the example's models (examples/sqlalchemy_models.py) hold no api_keys column
    assert rotated["reencryption"]["skipped"].startswith(
        "no registered table has a column of key type api_keys"
    )
