"""Operator commands of the key lifecycle, run as an SRE would: compromise, master-key
rotation, cleanup, the audit chain and the ARQ jobs group."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from cli_helpers import closed_port, one_error_line


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiocrypt.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


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
        assert ok.returncode == 0 and "audit chain OK (3 rows, sha256 mode" in ok.stdout
        as_json = cli(env, "audit", "verify", "--table", table, "--json")
        report = json.loads(as_json.stdout)
        assert (report["ok"], report["rows"], report["problems"]) == (True, 3, [])
        asyncio.run(tamper_and_drop(False))
        bad = cli(env, "audit", "verify", "--table", table)
        assert bad.returncode == 1 and "row 2 was modified" in bad.stderr
        bad_json = cli(env, "audit", "verify", "--table", table, "--json")
        assert bad_json.returncode == 1 and json.loads(bad_json.stdout)["ok"] is False
    finally:
        asyncio.run(tamper_and_drop(True))


def test_compromise_can_enqueue_reencryption_at_once(tmp_path: Path, redis_url: str) -> None:
    import secrets

    import redis

    queue = f"aiocrypt-test-cli-{secrets.token_hex(4)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCRYPTION_")}
    env.update(
        ENCRYPTION_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
        ENCRYPTION_KEY_STORAGE_PATH=str(tmp_path / "k.json"),
        ENCRYPTION_ARQ_REDIS_URL=redis_url,
        ENCRYPTION_ARQ_QUEUE=queue,
        ENCRYPTION_ARQ_PREFIX=queue,
    )
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


def test_audit_verify_on_an_unreachable_database_exits_4() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCRYPTION_")}
    env["ENCRYPTION_AUDIT_DSN"] = f"postgresql://postgres@127.0.0.1:{closed_port()}/test"
    down = cli(env, "audit", "verify")
    assert down.returncode == 4
    one_error_line(down)
    missing = cli({k: v for k, v in env.items() if k != "ENCRYPTION_AUDIT_DSN"}, "audit", "verify")
    assert missing.returncode == 2 and "--dsn" in missing.stderr


def test_jobs_group_json_and_errors(redis_url: str) -> None:
    import secrets

    import redis

    prefix = f"aiocrypt-test-cli-{secrets.token_hex(4)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCRYPTION_")}
    no_redis = cli(env, "jobs", "status", "--json")
    assert no_redis.returncode == 3 and "ENCRYPTION_REDIS_URL" in one_error_line(no_redis)
    down = cli(
        {**env, "ENCRYPTION_REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0"}, "jobs", "status"
    )
    assert down.returncode == 4, down.stderr
    one_error_line(down)

    env.update(
        ENCRYPTION_ARQ_REDIS_URL=redis_url,
        ENCRYPTION_ARQ_QUEUE=prefix,
        ENCRYPTION_ARQ_PREFIX=prefix,
    )
    client = redis.Redis.from_url(redis_url)
    job_id = None
    try:
        empty = cli(env, "jobs", "status", "--json")
        assert empty.returncode == 0 and json.loads(empty.stdout) == []
        missing = cli(env, "jobs", "status", "nope")
        assert missing.returncode == 1
        assert "no re-encryption job 'nope'" in one_error_line(missing)
        queued = cli(env, "jobs", "cleanup", "--json")
        assert queued.returncode == 0, queued.stderr
        out = json.loads(queued.stdout)
        job_id = out["job_id"]
        assert out["enqueued"] == "cleanup_expired_keys" and job_id
        assert client.zcard(prefix) == 1
    finally:
        for name in client.scan_iter(f"*{prefix}*"):
            client.delete(name)
        if job_id:
            client.delete(f"arq:job:{job_id}")
        client.close()
