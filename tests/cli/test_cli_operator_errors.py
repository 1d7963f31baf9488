"""Operator errors name what to check, in one line: the queue's Redis and the data's
PostgreSQL when they are down (exit 4, URL redacted), plus the two output fixes of
issue 17 (labelled usage in ``keys stats``, whole job ids in piped ``jobs status``)."""

from __future__ import annotations

import secrets

import pytest
from cli_helpers import Cli, closed_port, json_out, one_error_line, service_for

from aiocrypt import KeyType

PASSWORD = "s3cret-pw-" + "x" * 8


@pytest.mark.parametrize("variable", ["ENCRYPTION_REDIS_URL", "ENCRYPTION_ARQ_REDIS_URL"])
def test_jobs_with_the_queue_redis_down_is_one_line_naming_the_variable(
    cli: Cli, variable: str
) -> None:
    port = closed_port()
    url = f"redis://app:{PASSWORD}@127.0.0.1:{port}/0"
    for args in (("jobs", "rotate", "pii"), ("jobs", "status")):
        result = cli(*args, env={variable: url}, timeout=30)
        assert result.returncode == 4, result.stderr
        line = one_error_line(result)  # no retry lines, no traceback
        assert f"redis://app:***@127.0.0.1:{port}/0" in line
        assert f"check {variable}" in line
        assert PASSWORD not in result.stdout + result.stderr


def test_census_and_reencrypt_with_postgres_down_name_the_dsn_and_where_it_came_from(
    cli: Cli,
) -> None:
    port = closed_port()
    dsn = f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/data"
    shown = f"postgresql://app:***@127.0.0.1:{port}/data"
    table = ("--table", "accounts", "--column", "iban:financial_data")
    from_env = cli("census", *table, env={"ENCRYPTION_POSTGRES_DSN": dsn}, timeout=30)
    assert from_env.returncode == 4, from_env.stderr
    line = one_error_line(from_env)
    assert shown in line and "check ENCRYPTION_POSTGRES_DSN, or pass --dsn" in line
    assert "ConnectionRefusedError" not in line

    from_option = cli("census", "--dsn", dsn, *table, timeout=30)
    assert from_option.returncode == 4, from_option.stderr
    assert shown in one_error_line(from_option) and "check the --dsn option" in from_option.stderr

    moving = cli("reencrypt", *table, env={"ENCRYPTION_POSTGRES_DSN": dsn}, timeout=30)
    assert moving.returncode == 4, moving.stderr
    assert shown in one_error_line(moving) and "ENCRYPTION_POSTGRES_DSN" in moving.stderr
    for result in (from_env, from_option, moving):
        assert PASSWORD not in result.stdout + result.stderr


async def test_keys_stats_labels_reserved_usage(cli: Cli, cli_env: dict[str, str]) -> None:
    assert cli("keys", "generate", "pii").returncode == 0
    async with service_for(cli_env) as service:
        await service.encrypt_field("one value", KeyType.PII)
    pii = json_out(cli("keys", "stats", "--json"))["active_keys"]["pii"]
    # one encryption reserved a whole block: the number says so by its name
    assert pii["usage_reserved"] == pii["usage_block"] == 65536
    assert pii["usage"] == pii["usage_reserved"]


async def test_jobs_status_piped_prints_whole_job_ids(cli: Cli, redis_url: str) -> None:
    from redis.asyncio import Redis

    from aiocrypt.integrations.arq.status import StatusStore

    prefix = f"aiocrypt-test-{secrets.token_hex(4)}"
    job_id = "reencrypt-financial_data-v1-" + secrets.token_hex(24)
    redis = Redis.from_url(redis_url)
    store = StatusStore(redis, prefix)
    try:
        await store.create(
            job_id,
            {
                "key_type": "financial_data",
                "old_key_id": job_id.removeprefix("reencrypt-"),
                "created_at": "2026-12-02T18:00:00.000+00:00",
                "plan": [
                    {
                        "index": 0,
                        "table": "public.accounts_with_a_long_name",
                        "after": None,
                        "until": None,
                        "rows_total": 10,
                    }
                ],
            },
        )
        env = {"ENCRYPTION_REDIS_URL": redis_url, "ENCRYPTION_ARQ_PREFIX": prefix}
        listed = cli("jobs", "status", env=env)
        assert listed.returncode == 0, listed.stderr
        rows = [line.split() for line in listed.stdout.splitlines()]
        assert rows[0][0] == "job" and rows[1][0] == job_id
        assert "public.accounts_with_a_long_name" in cli("jobs", "status", job_id, env=env).stdout
    finally:
        await redis.delete(store.key(job_id), store.index_key)
        await redis.aclose()
