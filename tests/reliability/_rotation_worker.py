"""A worker process of test_concurrent_rotation: 4 tasks writing and reading encrypted rows.

Run as ``python _rotation_worker.py <json settings>``; the master key comes in
``AIOCRYPT_REL_MASTER_KEY`` (base64), never on the command line. Each task
encrypts a value, inserts it (an insert that returned is *acknowledged*),
then reads back a few recent rows (its own and the other process's) and
decrypts them. At the end one JSON line goes to stdout: counts only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import sys
import time
from collections import Counter
from typing import Any

import asyncpg

from aiocrypt import EncryptionService, KeyManager, KeyType
from aiocrypt.kek import LocalKekProvider

TASKS = 4


def build_store(settings: dict[str, Any]) -> Any:
    if settings["store"] == "redis":
        from aiocrypt.keystore.redis import RedisKeyStore

        return RedisKeyStore(settings["redis_url"], prefix=settings["prefix"])
    from aiocrypt.keystore.postgres import PostgresKeyStore

    return PostgresKeyStore(settings["dsn"], schema=settings["schema"])


async def main(settings: dict[str, Any]) -> dict[str, Any]:
    master_key = base64.b64decode(os.environ["AIOCRYPT_REL_MASTER_KEY"])
    kek = LocalKekProvider(master_key)
    manager = KeyManager(build_store(settings), kek, refresh_interval=0.5)
    service = EncryptionService(manager)
    table = settings["table"]
    context = f"{table}.secret"
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    last_n = 0
    pool = await asyncpg.create_pool(settings["dsn"], min_size=TASKS, max_size=TASKS)
    deadline = time.monotonic() + settings["seconds"]

    async def task(index: int) -> None:
        nonlocal last_n
        n = 0
        while time.monotonic() < deadline:
            n += 1
            plain = f"w{settings['worker']}-t{index}-{n}"
            try:
                token = await service.encrypt_field(plain, KeyType.PII, context=context)
                row_n = await pool.fetchval(
                    f"INSERT INTO {table} (id, secret, plain) VALUES ($1, $2, $3) RETURNING n",
                    plain,
                    token,
                    plain,
                )
                counts["acknowledged"] += 1
                last_n = max(last_n, row_n)
                start = random.randint(max(1, last_n - 200), last_n)
                rows = await pool.fetch(
                    f"SELECT secret, plain FROM {table} WHERE n >= $1 ORDER BY n LIMIT 3", start
                )
                for row in rows:
                    value = await service.decrypt_field(row["secret"], KeyType.PII, context=context)
                    counts["reads"] += 1
                    if value != row["plain"]:
                        counts["mismatches"] += 1
            except Exception as exc:
                errors[type(exc).__name__] += 1
                await asyncio.sleep(0.05)

    async with service:
        try:
            await asyncio.gather(*(task(i) for i in range(TASKS)))
        finally:
            await pool.close()
        key_ids = sorted({dk.key_id for dk in service.keyring if dk.key.key_type == KeyType.PII})
    return {
        "worker": settings["worker"],
        **counts,
        "errors": dict(errors),
        "keys_seen": len(key_ids),
    }


if __name__ == "__main__":
    result = asyncio.run(main(json.loads(sys.argv[1])))
    print(json.dumps(result), flush=True)
