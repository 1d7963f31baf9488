"""Nonce safety across processes: no key encrypts more than its policy's limit.

Random 96-bit GCM nonces allow about 2**32 encryptions per key, so a policy's
``max_encryptions`` is counted fleet-wide through the key store
(``KeyManager.reserve_usage``). Here several processes share one key store
(file, Redis or PostgreSQL), each encrypting in a loop under a policy with
``max_encryptions = LIMIT``. Counting the tokens per key id (the key id is in
every token) shows that no key id ever has more than LIMIT tokens, that the key
rotated as the limit was reached, and that every token decrypts.

Run: .venv/bin/python -m pytest tests/security/test_nonce_usage.py -q -s
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from aiocrypt import EncryptionConfig, EncryptionService, KeyType, build_key_manager

LIMIT = 40
WORKERS = 3
PER_WORKER = 120
WORKER = Path(__file__).with_name("nonce_worker.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["file", "redis", "postgres"])
async def store_env(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[dict[str, str]]:
    backend: str = request.param
    tag = secrets.token_hex(5)
    config_file = tmp_path / "encryption.json"
    config_file.write_text(
        json.dumps({"rotation_policies": [{"key_type": "pii", "max_encryptions": LIMIT}]})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCRYPTION_")}
    env.update(
        {
            "ENCRYPTION_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
            "ENCRYPTION_KEY_STORAGE_BACKEND": backend,
            "ENCRYPTION_CONFIG_FILE": str(config_file),
            "PYTHONPATH": str(ROOT),
        }
    )
    if backend == "file":
        (tmp_path / "keys").mkdir(mode=0o700)
        env["ENCRYPTION_KEY_STORAGE_PATH"] = str(tmp_path / "keys" / "keys.json")
        yield env
    elif backend == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = f"aiocrypt-nonce-{tag}:"
        env.update(ENCRYPTION_REDIS_URL=url, ENCRYPTION_REDIS_KEY_PREFIX=prefix)
        yield env
        client = aioredis.Redis.from_url(url)
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        schema = f"aiocrypt_nonce_{tag}"
        env.update(ENCRYPTION_POSTGRES_DSN=dsn, ENCRYPTION_POSTGRES_SCHEMA=schema)
        yield env
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def _run_workers(env: dict[str, str], go_file: Path) -> list[list[str]]:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            f"w{i}",
            str(PER_WORKER),
            str(go_file),
            env=env,
            cwd=str(go_file.parent),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for i in range(WORKERS)
    ]
    try:
        for proc in procs:  # every worker has its keys loaded before any encrypts
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line == b"ready\n", (line, await proc.stderr.read() if proc.stderr else b"")
        go_file.touch()
        outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 120)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return [out.decode().split() for out, _ in outputs]


async def test_no_key_exceeds_its_usage_limit_across_processes(
    store_env: dict[str, str], tmp_path: Path
) -> None:
    outputs = await _run_workers(store_env, tmp_path / "go")
    tokens = [t for out in outputs for t in out]
    assert len(tokens) == WORKERS * PER_WORKER
    per_key = Counter(token.split(".")[1] for token in tokens)
    backend = store_env["ENCRYPTION_KEY_STORAGE_BACKEND"]
    print(
        f"\nFIGURES test_nonce_usage[{backend}]: {len(tokens)} tokens, "
        f"{len(per_key)} key ids, max per key {max(per_key.values())} (limit {LIMIT}), "
        f"per key {sorted(per_key.values(), reverse=True)}"
    )
    assert max(per_key.values()) <= LIMIT, per_key
    assert len(per_key) >= -(-len(tokens) // LIMIT)  # it rotated as often as it had to
    assert all(kid.startswith("pii-v") for kid in per_key)
    versions = sorted(int(kid.split("-")[1][1:]) for kid in per_key)
    assert len(set(versions)) == len(versions)  # one key per version: one rotator each time

    # every token decrypts, to the value its worker encrypted
    config = EncryptionConfig.from_env(store_env)
    service = EncryptionService(build_key_manager(config, watch=False), config)
    async with service:
        for w, out in enumerate(outputs):
            values = await service.decrypt_many(out, KeyType.PII, context=f"w{w}")
            assert values == [f"w{w}:{i}" for i in range(PER_WORKER)]
        stored = await service.key_manager.store.get_usage()
    # the shared counters never granted more than the limit to the fleet
    assert all(stored.get(kid, 0) >= n for kid, n in per_key.items()), (stored, per_key)
