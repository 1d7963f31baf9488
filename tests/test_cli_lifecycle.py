"""Operator commands of the key lifecycle, run as an SRE would."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiocrypt.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_master_key_rotation_compromise_and_cleanup_from_the_cli(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCRYPTION_")}
    old_key = base64.b64encode(os.urandom(32)).decode()
    new_key = base64.b64encode(os.urandom(32)).decode()
    env.update(ENCRYPTION_MASTER_KEY=old_key, ENCRYPTION_KEY_STORAGE_PATH=str(tmp_path / "k.json"))
    assert cli(env, "keys", "generate", "pii").returncode == 0
    listed = cli(env, "keys", "list", "--json").stdout
    key_id = listed.split('"key_id": "')[1].split('"')[0]

    compromised = cli(env, "keys", "compromise", key_id, "--reason", "laptop stolen")
    assert compromised.returncode == 0 and "must be re-encrypted" in compromised.stdout
    due = cli(env, "keys", "rotate-due")
    assert key_id in due.stdout and '"reencrypt"' in due.stdout
    cleanup = cli(env, "keys", "cleanup")
    assert cleanup.stdout.strip() == "no key is past its grace period"

    missing = cli(env, "keys", "rotate-master-key")
    assert missing.returncode != 0 and "ENCRYPTION_NEW_MASTER_KEY is not set" in missing.stderr
    rotated = cli({**env, "ENCRYPTION_NEW_MASTER_KEY": new_key}, "keys", "rotate-master-key")
    assert rotated.returncode == 0 and "rewrapped 2 keys" in rotated.stdout
    assert new_key not in rotated.stdout + rotated.stderr
    old = cli(env, "keys", "list")
    assert old.returncode != 0 and "sealed under KEK" in old.stderr
    new = cli({**env, "ENCRYPTION_MASTER_KEY": new_key}, "keys", "list", "--json")
    assert new.returncode == 0 and key_id in new.stdout


def test_audit_verify_command(postgres_dsn: str, tmp_path: Path) -> None:
    import asyncio
    import secrets

    import asyncpg

    from aiocrypt.audit import AuditEvent
    from aiocrypt.audit.postgres import PostgresAuditSink

    table = f"audit_{secrets.token_hex(4)}"

    async def setup() -> None:
        sink = PostgresAuditSink(postgres_dsn, table=table)
        for i in range(3):
            await sink.emit(AuditEvent("policy_run", details={"n": i}))
        await sink.close()

    async def tamper_and_drop(drop: bool) -> None:
        conn = await asyncpg.connect(postgres_dsn)
        if drop:
            await conn.execute(f"DROP TABLE {table}; DROP TABLE {table}_head")
        else:
            await conn.execute(f"UPDATE {table} SET event = 'nothing' WHERE seq = 2")
        await conn.close()

    asyncio.run(setup())
    env = {**os.environ, "ENCRYPTION_AUDIT_DSN": postgres_dsn}
    try:
        ok = cli(env, "audit", "verify", "--table", table)
        assert ok.returncode == 0 and "audit chain OK (3 rows)" in ok.stdout
        asyncio.run(tamper_and_drop(False))
        bad = cli(env, "audit", "verify", "--table", table)
        assert bad.returncode == 1 and "row 2 was modified" in bad.stderr
    finally:
        asyncio.run(tamper_and_drop(True))


def test_compromise_can_enqueue_reencryption_at_once(tmp_path: Path, redis_url: str) -> None:
    import secrets

    import redis

    queue = f"aiocrypt-test-cli-{secrets.token_hex(4)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCRYPTION_")}
    env.update(ENCRYPTION_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
               ENCRYPTION_KEY_STORAGE_PATH=str(tmp_path / "k.json"),
               ENCRYPTION_ARQ_REDIS_URL=redis_url, ENCRYPTION_ARQ_QUEUE=queue,
               ENCRYPTION_ARQ_PREFIX=queue)
    assert cli(env, "keys", "generate", "pii").returncode == 0
    key_id = cli(env, "keys", "list", "--json").stdout.split('"key_id": "')[1].split('"')[0]
    client = redis.Redis.from_url(redis_url)
    try:
        out = cli(env, "keys", "compromise", key_id, "--reason", "leak", "--reencrypt")
        assert out.returncode == 0, out.stderr
        assert f"enqueued reencrypt-pii-{key_id.split('pii-')[1]}" in out.stdout
        assert client.zcard(queue) == 1
    finally:
        for name in client.scan_iter(f"*{queue}*"):
            client.delete(name)
        client.delete(queue)
        for name in client.scan_iter(f"arq:*{key_id}*"):
            client.delete(name)
        client.close()
