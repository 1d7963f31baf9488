"""``aiocrypt jobs`` paths only the unmeasured CLI processes ran, in this process:
the queue's Redis down (tests/cli/test_cli_operator_errors.py) and ``jobs status
--json`` without a job id (docs/cli.md). Real Redis db 15, a prefix per test."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from aiocrypt.cli import main as cli_main
from aiocrypt.integrations.arq.status import StatusStore

PASSWORD = "s3cret-pw-" + secrets.token_hex(4)


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("variable", ["ENCRYPTION_REDIS_URL", "ENCRYPTION_ARQ_REDIS_URL"])
def test_jobs_status_with_the_queue_redis_down_names_the_variable_it_came_from(
    variable: str, clean_env: None
) -> None:
    """Exit 4 (unreachable), one line: the URL with its password hidden and the variable
    to check, the one the URL was read from (the ARQ one when both are set)."""
    port = _closed_port()
    url = f"redis://app:{PASSWORD}@127.0.0.1:{port}/0"
    env = {variable: url}
    if variable == "ENCRYPTION_ARQ_REDIS_URL":  # it wins over the general one
        env["ENCRYPTION_REDIS_URL"] = "redis://127.0.0.1:6379/15"
    result = CliRunner().invoke(cli_main, ["jobs", "status"], env=env)
    assert result.exit_code == 4, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(
        f"error: cannot reach the job queue's Redis at redis://app:***@127.0.0.1:{port}/0 "
        f"(check {variable}): "
    )
    assert "onnect" in lines[0]  # the reason is kept: "Error 111 connecting to ..."
    assert PASSWORD not in result.output


@pytest.fixture
def jobs_env(redis_url: str, clean_env: None) -> Iterator[dict[str, str]]:
    """The CLI's environment on a prefix of this test's; its keys deleted after."""
    prefix = f"aiocrypt-test-{secrets.token_hex(5)}"
    yield {"ENCRYPTION_REDIS_URL": redis_url, "ENCRYPTION_ARQ_PREFIX": prefix}

    async def drop() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            keys = [k async for k in client.scan_iter(match=f"*{prefix}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()

    asyncio.run(drop())


def test_jobs_status_json_without_a_job_id_lists_every_recent_job(
    jobs_env: dict[str, str], redis_url: str
) -> None:
    """docs/cli.md's ``jobs status --json``: ``[]`` with no jobs; then each job's record
    whole, with its shards, as ``jobs status JOB_ID --json`` gives it."""
    runner = CliRunner()
    empty = runner.invoke(cli_main, ["jobs", "status", "--json"], env=jobs_env)
    assert (empty.exit_code, empty.output) == (0, "[]\n")

    job_id = "reencrypt-pii-v1-0a0b0c0d"

    async def write() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            await StatusStore(client, jobs_env["ENCRYPTION_ARQ_PREFIX"]).create(
                job_id,
                {
                    "job_id": job_id,
                    "key_type": "pii",
                    "old_key_id": "pii-v1-0a0b0c0d",
                    "target_key_id": "pii-v2-1a1b1c1d",
                    "created_at": "2026-01-01T00:00:00",
                    "plan": [
                        {"index": 0, "table": "users", "after": None, "until": 5, "rows_total": 5}
                    ],
                },
            )
        finally:
            await client.aclose()

    asyncio.run(write())
    listed = runner.invoke(cli_main, ["jobs", "status", "--json"], env=jobs_env)
    assert listed.exit_code == 0, listed.output
    jobs = json.loads(listed.output)
    assert [(j["job_id"], j["old_key_id"], j["target_key_id"]) for j in jobs] == [
        (job_id, "pii-v1-0a0b0c0d", "pii-v2-1a1b1c1d")
    ]
    assert [(s["table"], s["rows_total"]) for s in jobs[0]["shards"]] == [("users", 5)]
    one = runner.invoke(cli_main, ["jobs", "status", job_id, "--json"], env=jobs_env)
    assert jobs[0] == json.loads(one.output)
