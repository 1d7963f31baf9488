"""``aiocrypt audit verify`` / ``upgrade`` on a real Postgres audit table, HMAC-keyed.

The key reaches the command only through the variable named by ``--hmac-key-env``
and never appears in its output.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
from cli_helpers import Cli, one_error_line

from aiocrypt.audit import AuditEvent
from aiocrypt.audit.postgres import PostgresAuditSink


@pytest.fixture
def hmac_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
async def audit_table(postgres_dsn: str, hmac_key: bytes) -> AsyncIterator[str]:
    """An HMAC-chained audit table with five authentic rows."""
    table = f"audit_cli_{secrets.token_hex(4)}"
    sink = PostgresAuditSink(postgres_dsn, table=table, hmac_key=hmac_key)
    try:
        for n in range(5):
            await sink.emit(AuditEvent("policy_run", details={"n": n}))
        yield table
    finally:
        await sink.close()
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {table}, {table}_head")
        finally:
            await conn.close()


def verify(cli: Cli, dsn: str, table: str, key: bytes | None, *extra: str) -> tuple[int, str]:
    env = {"ENCRYPTION_AUDIT_DSN": dsn}
    args = ["audit", "verify", "--table", table, *extra]
    if key is not None:
        env["AUDIT_HMAC_KEY"] = base64.b64encode(key).decode()
        args += ["--hmac-key-env", "AUDIT_HMAC_KEY"]
    result = cli(*args, env=env)
    out = result.stdout + result.stderr
    assert base64.b64encode(key or b"-").decode() not in out and "Traceback" not in out
    return result.returncode, out


async def test_verify_reads_the_hmac_key_from_the_named_variable(
    cli: Cli, postgres_dsn: str, audit_table: str, hmac_key: bytes
) -> None:
    code, out = verify(cli, postgres_dsn, audit_table, hmac_key)
    assert code == 0, out
    assert out.startswith("audit chain OK (5 rows, hmac mode, head 5:")
    code, out = verify(cli, postgres_dsn, audit_table, hmac_key, "--json")
    report = json.loads(out)
    assert report["ok"] is True and report["rows"] == 5 and report["mode"] == "hmac"
    assert report["head"].startswith("5:")
    # the printed head, given back as --anchor, holds while nothing was removed
    code, out = verify(cli, postgres_dsn, audit_table, hmac_key, "--anchor", report["head"])
    assert code == 0, out


async def test_verify_without_the_key_or_with_another_says_so(
    cli: Cli, postgres_dsn: str, audit_table: str
) -> None:
    code, out = verify(cli, postgres_dsn, audit_table, None)
    assert code == 1
    assert "the table is an HMAC chain: verify it with its key" in out
    assert "was modified" not in out
    code, out = verify(cli, postgres_dsn, audit_table, os.urandom(32))
    assert code == 1
    assert "head record is not authentic" in out and "no row verifies in hmac mode" in out


async def test_verify_reports_a_cut_tail_and_an_edited_row(
    cli: Cli, postgres_dsn: str, audit_table: str, hmac_key: bytes
) -> None:
    anchor = json.loads(verify(cli, postgres_dsn, audit_table, hmac_key, "--json")[1])["head"]
    t = audit_table
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"DELETE FROM {t} WHERE seq > 3")
        await conn.execute(
            f"UPDATE {t}_head SET seq = 3, hash = (SELECT hash FROM {t} WHERE seq = 3)"
        )
        await conn.execute(f"UPDATE {t} SET details = '{{\"n\": 7}}' WHERE seq = 2")
    finally:
        await conn.close()
    code, out = verify(cli, postgres_dsn, t, hmac_key, "--anchor", anchor)
    assert code == 1
    assert "- row 2 was modified (hash mismatch)" in out
    assert "head record is not authentic" in out
    assert "the anchored row 5 is not in the chain as recorded" in out


async def test_a_downgraded_table_is_reported(
    cli: Cli, postgres_dsn: str, audit_table: str, hmac_key: bytes
) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"UPDATE {audit_table}_head SET mode = 'sha256', mac = NULL")
    finally:
        await conn.close()
    code, out = verify(cli, postgres_dsn, audit_table, hmac_key)
    assert code == 1 and "its mode record was changed (a downgrade)" in out


def test_a_missing_or_bad_key_variable_is_a_configuration_error(
    cli: Cli, postgres_dsn: str
) -> None:
    env = {"ENCRYPTION_AUDIT_DSN": postgres_dsn, "AUDIT_HMAC_KEY": "not base64!"}
    missing = cli("audit", "verify", "--hmac-key-env", "NO_SUCH_VARIABLE_X", env=env)
    assert missing.returncode == 3
    assert "NO_SUCH_VARIABLE_X is not set" in one_error_line(missing)
    bad = cli("audit", "verify", "--hmac-key-env", "AUDIT_HMAC_KEY", env=env)
    assert bad.returncode == 3 and "not base64!" not in bad.stdout + bad.stderr
    assert "AUDIT_HMAC_KEY is not valid base64" in one_error_line(bad)


async def test_upgrade_authenticates_an_old_table(
    cli: Cli, postgres_dsn: str, audit_table: str, hmac_key: bytes
) -> None:
    # the layout of before: no mode, no MAC
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f"ALTER TABLE {audit_table}_head DROP COLUMN mode, DROP COLUMN mac")
    finally:
        await conn.close()
    code, out = verify(cli, postgres_dsn, audit_table, hmac_key)
    assert code == 1 and "run 'aiocrypt audit upgrade' once" in out
    env = {
        "ENCRYPTION_AUDIT_DSN": postgres_dsn,
        "AUDIT_HMAC_KEY": base64.b64encode(hmac_key).decode(),
    }
    result = cli(
        "audit", "upgrade", "--table", audit_table, "--hmac-key-env", "AUDIT_HMAC_KEY", env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("audit chain OK (6 rows, hmac mode")
    code, out = verify(cli, postgres_dsn, audit_table, hmac_key)
    assert code == 0, out
