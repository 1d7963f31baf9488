"""Fixtures of the ARQ tests: real worker processes, Redis db 15, Postgres, a file key store.

Every test gets its own arq queue, key prefix (the prefix of every Redis key and
arq job id aiocrypt's jobs create), checkpoint table and data table; the
fixtures delete exactly those afterwards. The test and its workers share one
file key store under a master key made for the test.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq_helpers import SHORT_POLICY, ArqSetup

from aiocrypt import EncryptionConfig
from aiocrypt.integrations.arq.codec import codec_settings


@pytest.fixture
def prefix() -> str:
    return f"aiocrypt-test-{secrets.token_hex(5)}"


@pytest.fixture
async def arq_setup(
    tmp_path: Path,
    prefix: str,
    redis_url: str,
    postgres_dsn: str,
    master_key: bytes,
    key_path: Path,
) -> AsyncIterator[ArqSetup]:
    config_file = tmp_path / "encryption.json"
    config_file.write_text(json.dumps({"rotation_policies": [SHORT_POLICY]}))
    logs = tmp_path / "logs"
    logs.mkdir()
    checkpoint_table = f"ckpt_{prefix.rsplit('-', 1)[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCRYPTION_")}
    env.update(
        {
            "ENCRYPTION_MASTER_KEY": base64.b64encode(master_key).decode("ascii"),
            "ENCRYPTION_KEY_STORAGE_BACKEND": "file",
            "ENCRYPTION_KEY_STORAGE_PATH": str(key_path),
            "ENCRYPTION_CONFIG_FILE": str(config_file),
            "ENCRYPTION_POSTGRES_DSN": postgres_dsn,
            "ENCRYPTION_REDIS_URL": redis_url,
            "ENCRYPTION_ARQ_QUEUE": f"{prefix}:queue",
            "ENCRYPTION_ARQ_PREFIX": prefix,
            "ENCRYPTION_ARQ_CHECKPOINT_TABLE": checkpoint_table,
            "ENCRYPTION_ARQ_RETRY_DELAY": "0.5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    config = EncryptionConfig.from_env(env)
    setup = ArqSetup(
        env=env,
        prefix=prefix,
        queue=f"{prefix}:queue",
        dsn=postgres_dsn,
        redis_url=redis_url,
        key_path=key_path,
        master_key=master_key,
        checkpoint_table=checkpoint_table,
        config=config,
        logs=logs,
    )
    try:
        yield setup
    finally:
        for proc in setup.processes:
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {checkpoint_table}")
        finally:
            await conn.close()


@pytest.fixture
async def redis(redis_url: str, prefix: str) -> AsyncIterator[aioredis.Redis]:
    """Redis db 15; afterwards every key holding this test's prefix is deleted (status
    records, locks, the queue, and arq's job, result, retry and in-progress keys)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"*{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def arq_redis(redis_url: str, prefix: str, redis: aioredis.Redis) -> AsyncIterator[ArqRedis]:
    """A pool that enqueues JSON jobs, as aiocrypt's workers require."""
    pool = await create_pool(
        RedisSettings.from_dsn(redis_url), default_queue_name=f"{prefix}:queue", **codec_settings()
    )
    try:
        yield pool
    finally:
        await pool.aclose()


@pytest.fixture
def table_name(prefix: str) -> str:
    return f"users_{prefix.rsplit('-', 1)[1]}"


@pytest.fixture
async def pg(postgres_dsn: str, table_name: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database; drops the test's table afterwards."""
    conn = await asyncpg.connect(postgres_dsn)
    try:
        yield conn
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table_name}")
        await conn.close()
