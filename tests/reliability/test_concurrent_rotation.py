"""Key rotation while 8 tasks in 2 processes write and read encrypted rows.

Two worker processes (``_rotation_worker.py``, 4 asyncio tasks each) share a key
store (the real Redis, or the real PostgreSQL; a random prefix / schema) and a
table in the real PostgreSQL. They encrypt values, insert them and read back
recent rows of both processes, for ``AIOCRYPT_ROTATION_SECONDS`` (default 6).
Meanwhile this process force-rotates the key every 0.4 s.

What must hold: no worker sees an error or a wrong plaintext; no write is lost
(rows present == inserts acknowledged by the workers); every row decrypts
afterwards with a fresh process's keys; rows were written under several key
versions (the rotations really happened during the writes) and the store holds
every version.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aiocrypt import EncryptionService, KeyManager, KeyType
from aiocrypt.kek import LocalKekProvider

asyncpg = pytest.importorskip("asyncpg")
pytest.importorskip("redis.asyncio")

WORKER = Path(__file__).with_name("_rotation_worker.py")
SECONDS = float(os.environ.get("AIOCRYPT_ROTATION_SECONDS", "6"))


def _store(settings: dict[str, Any]) -> Any:
    if settings["store"] == "redis":
        from aiocrypt.keystore.redis import RedisKeyStore

        return RedisKeyStore(settings["redis_url"], prefix=settings["prefix"])
    from aiocrypt.keystore.postgres import PostgresKeyStore

    return PostgresKeyStore(settings["dsn"], schema=settings["schema"])


@pytest.mark.parametrize("store_kind", ["redis", "postgres"])
async def test_rotation_under_concurrent_writers(
    store_kind: str,
    redis_url: str,
    postgres_dsn: str,
    master_key: bytes,
    summary: Callable[..., None],
) -> None:
    """2 processes x 4 tasks write/read while keys rotate: no error, no lost write, all rows
    decrypt."""
    tag = secrets.token_hex(4)
    table = f"rel_rot_{tag}"
    settings = {
        "store": store_kind,
        "redis_url": redis_url,
        "prefix": f"rel:rot:{tag}:",
        "dsn": postgres_dsn,
        "schema": f"rel_rot_{tag}",
        "table": table,
        "seconds": SECONDS,
    }
    conn = await asyncpg.connect(postgres_dsn)
    await conn.execute(
        f"CREATE TABLE {table} (n bigserial PRIMARY KEY, id text UNIQUE NOT NULL,"
        " secret text NOT NULL, plain text NOT NULL)"
    )
    kek = LocalKekProvider(master_key)
    store = _store(settings)
    manager = KeyManager(store, kek)
    env = {**os.environ, "AIOCRYPT_REL_MASTER_KEY": base64.b64encode(master_key).decode()}
    rotations = 0
    try:
        async with EncryptionService(manager):
            await manager.get_active_key(KeyType.PII)  # v1 exists before the workers start
            procs = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(WORKER),
                    json.dumps({**settings, "worker": i}),
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                for i in range(2)
            ]
            waits = [asyncio.create_task(p.communicate()) for p in procs]
            started = time.monotonic()
            while not all(w.done() for w in waits):
                assert time.monotonic() - started < SECONDS + 120, "workers did not finish"
                await asyncio.sleep(0.4)
                if await conn.fetchval(f"SELECT count(*) FROM {table}") > 0 and not any(
                    w.done() for w in waits
                ):
                    await manager.rotate_key(KeyType.PII, force=True)
                    rotations += 1
            results = []
            for proc, wait in zip(procs, waits, strict=True):
                out, err = wait.result()
                assert proc.returncode == 0, err.decode()[-2000:]
                results.append(json.loads(out.decode().strip().splitlines()[-1]))

            acknowledged = sum(r.get("acknowledged", 0) for r in results)
            reads = sum(r.get("reads", 0) for r in results)
            assert all(r["errors"] == {} for r in results), results
            assert all(r.get("mismatches", 0) == 0 for r in results), results
            rows = await conn.fetch(f"SELECT secret, plain FROM {table}")
            assert len(rows) == acknowledged > 0  # no write lost, none invented

        # a fresh process decrypts every row
        checker = EncryptionService(KeyManager(_store(settings), kek, watch=False))
        async with checker:
            plain = await checker.decrypt_many(
                [r["secret"] for r in rows], KeyType.PII, context=f"{table}.secret"
            )
            assert plain == [r["plain"] for r in rows]
            versions = sorted(k.version for k in await checker.key_manager.list_keys(KeyType.PII))
        assert versions == list(range(1, rotations + 2))
        used = {r["secret"].split(".")[1] for r in rows}
        assert rotations >= 3 and len(used) >= 3, (rotations, len(used))
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()
        cleanup = _store(settings)
        await cleanup.drop()
        await cleanup.close()
    summary(
        store=store_kind,
        processes=2,
        tasks=8,
        seconds=SECONDS,
        rotations=rotations,
        writes_acknowledged=acknowledged,
        rows_present=len(rows),
        reads_decrypted=reads,
        key_versions_in_rows=len(used),
        rows_checked=len(rows),
        errors=0,
        writes_per_second=round(acknowledged / SECONDS),
    )
