"""``aiocrypt reencrypt`` and ``aiocrypt census`` on a real Postgres table.

The table (random name, ``test`` database) is filled with tokens under an old
key version through the library; the command moves them to the new version,
stopping and resuming on the way, and every row must still decrypt to what was
written.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cli_helpers import COMMAND, Cli, json_out, one_error_line, service_for

ROWS = 1050  # ssn on every row; amount on every third (NULL elsewhere)


@pytest.fixture
def table(postgres_dsn: str) -> Iterator[str]:
    """A fresh table name; its checkpoints go to ``<name>_ckpt`` (both dropped after)."""
    name = f"cli_{secrets.token_hex(5)}"
    yield name

    async def drop() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {name}; DROP TABLE IF EXISTS {name}_ckpt")
        finally:
            await conn.close()

    asyncio.run(drop())


def _fill(env: dict[str, str], dsn: str, table: str, rows: int) -> dict[int, tuple[Any, Any]]:
    """Tokens for ``rows`` rows (context ``table.column``); returns the plaintexts."""

    async def fill() -> dict[int, tuple[Any, Any]]:
        plain = {
            i: (f"{i:03d}-55-{i:04d}", i * 100 if i % 3 == 0 else None) for i in range(1, rows + 1)
        }
        async with service_for(env) as svc:
            values = []
            for i, (ssn, amount) in plain.items():
                values.append(
                    (
                        i,
                        await svc.encrypt_field(ssn, "pii", context=f"{table}.ssn"),
                        None
                        if amount is None
                        else await svc.encrypt_field(
                            amount, "financial_data", context=f"{table}.amount"
                        ),
                    )
                )
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                f"CREATE TABLE {table} (id integer PRIMARY KEY, ssn text, amount text)"
            )
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3)", values)
        finally:
            await conn.close()
        return plain

    return asyncio.run(fill())


def _rows(dsn: str, table: str) -> list[Any]:
    async def read() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(f"SELECT id, ssn, amount FROM {table} ORDER BY id"))
        finally:
            await conn.close()

    return asyncio.run(read())


def _decrypt_all(env: dict[str, str], table: str, rows: list[Any]) -> dict[int, tuple[Any, Any]]:
    async def decrypt() -> dict[int, tuple[Any, Any]]:
        async with service_for(env) as svc:
            return {
                r["id"]: (
                    await svc.decrypt_field(r["ssn"], "pii", context=f"{table}.ssn"),
                    None
                    if r["amount"] is None
                    else await svc.decrypt_field(
                        r["amount"], "financial_data", context=f"{table}.amount"
                    ),
                )
                for r in rows
            }

    return asyncio.run(decrypt())


def _census(census: dict[str, Any], column: str) -> dict[str | None, int]:
    [entry] = census["tables"]
    return {e["key_id"]: e["rows"] for e in entry["columns"][column]}


def test_reencrypt_stops_resumes_and_every_row_moves_and_still_decrypts(
    cli: Cli, cli_env: dict[str, str], postgres_dsn: str, table: str
) -> None:
    plain = _fill(cli_env, postgres_dsn, table, ROWS)
    env = {"ENCRYPTION_POSTGRES_DSN": postgres_dsn}
    spec = ["--table", table, "--column", "ssn:pii", "--column", "amount:financial_data"]
    ckpt = ["--checkpoint-table", f"{table}_ckpt"]
    old_pii = json_out(cli("keys", "list", "--type", "pii", "--json"))[0]["key_id"]
    rotated = json_out(cli("keys", "rotate", "pii", "--force", "--json"))
    new_pii = rotated["active_key"]["key_id"]
    fin = json_out(cli("keys", "list", "--type", "financial_data", "--json"))[0]

    before = json_out(cli("census", *spec, "--json", env=env))
    assert _census(before, "ssn") == {old_pii: ROWS}
    assert _census(before, "amount") == {fin["key_id"]: ROWS // 3}
    assert before["keys"]["pii"] == {"decrypt_only": 1, "active": 1}
    human = cli("census", *spec, env=env)
    assert human.returncode == 0 and f"{ROWS:,}" in human.stdout and old_pii in human.stdout

    dry = json_out(cli("reencrypt", *spec, *ckpt, "--dry-run", "--json", env=env))
    assert dry[0]["pending_rows"] == ROWS and dry[0]["rows"] == ROWS
    assert dry[0]["targets"] == {"ssn": new_pii, "amount": fin["key_id"]}
    assert _rows(postgres_dsn, table)[0]["ssn"].startswith(f"ac2.{old_pii}.")

    first = cli(
        "reencrypt", *spec, *ckpt, "--batch-size", "100", "--max-batches", "3", "--json", env=env
    )
    assert first.returncode == 0, first.stderr
    [r1] = json.loads(first.stdout)
    assert r1["complete"] is False and r1["stopped"] == "max-batches"
    assert r1["run"]["batches"] == 3 and r1["run"]["rows_updated"] == 300
    assert r1["checkpoint"]["rows_updated"] == 300
    # progress, as plain lines on stderr when it is not a terminal
    assert f"{table}: {ROWS:,} rows to re-encrypt" in first.stderr
    assert f"{table}: batch 1, 100/{ROWS:,} rows" in first.stderr
    moved = [r["id"] for r in _rows(postgres_dsn, table) if r["ssn"].startswith(f"ac2.{new_pii}.")]
    assert moved == list(range(1, 301))

    second = cli("reencrypt", *spec, *ckpt, "--batch-size", "100", "--json", env=env)
    assert second.returncode == 0, second.stderr
    [r2] = json.loads(second.stdout)
    assert r2["complete"] is True and r2["resumed_from"] == 300
    assert r2["run"]["rows_updated"] == ROWS - 300 and r2["run"]["rows_failed"] == 0
    assert r2["job_id"] == r1["job_id"]

    rows = _rows(postgres_dsn, table)
    assert all(r["ssn"].startswith(f"ac2.{new_pii}.") for r in rows)
    assert _decrypt_all(cli_env, table, rows) == plain
    after = json_out(cli("census", *spec, "--json", env=env))
    assert _census(after, "ssn") == {new_pii: ROWS}
    assert _census(after, "amount") == {fin["key_id"]: ROWS // 3}
    again = cli("reencrypt", *spec, *ckpt, env=env)
    assert again.returncode == 0 and "0 rows re-encrypted" in again.stdout


def test_reencrypt_resumes_after_ctrl_c(
    cli: Cli, cli_env: dict[str, str], postgres_dsn: str, table: str, tmp_path: Path
) -> None:
    plain = _fill(cli_env, postgres_dsn, table, 400)
    env = {**cli_env, "ENCRYPTION_POSTGRES_DSN": postgres_dsn}
    assert cli("keys", "rotate", "pii", "--force").returncode == 0
    spec = ["--table", table, "--column", "ssn:pii", "--column", "amount:financial_data"]
    ckpt = ["--checkpoint-table", f"{table}_ckpt"]
    # --rate keeps it busy long enough to be interrupted after its first checkpoint
    proc = subprocess.Popen(
        [*COMMAND, "reencrypt", *spec, *ckpt, "--batch-size", "20", "--rate", "100"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "batch 1," in line:
            break
    proc.send_signal(signal.SIGINT)
    try:
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest and "run the command again" in rest
    assert "Traceback" not in rest

    resumed = cli(
        "reencrypt", *spec, *ckpt, "--json", env={"ENCRYPTION_POSTGRES_DSN": postgres_dsn}
    )
    [result] = json_out(resumed)
    assert result["complete"] is True and result["resumed_from"] is not None
    assert result["checkpoint"]["rows_updated"] == 400
    assert _decrypt_all(cli_env, table, _rows(postgres_dsn, table)) == plain


def test_reencrypt_takes_tables_from_sqlalchemy_models(
    cli: Cli, cli_env: dict[str, str], postgres_dsn: str, table: str, tmp_path: Path
) -> None:
    plain = _fill(cli_env, postgres_dsn, table, 120)
    (tmp_path / "shop_models.py").write_text(
        "import sqlalchemy as sa\n"
        "from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column\n"
        "from aiocrypt.integrations.sqlalchemy import EncryptedInteger, EncryptedString\n\n"
        "class Base(DeclarativeBase):\n    pass\n\n"
        f"class Customer(Base):\n    __tablename__ = {table!r}\n"
        "    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)\n"
        "    ssn: Mapped[str] = mapped_column(EncryptedString('pii'))\n"
        "    amount: Mapped[int | None] = mapped_column(EncryptedInteger('financial_data'))\n"
    )
    env = {"ENCRYPTION_POSTGRES_DSN": postgres_dsn}
    new_fin = json_out(cli("keys", "rotate", "financial_data", "--force", "--json"))
    result = cli(
        "reencrypt",
        "--models",
        "shop_models",
        "--checkpoint-table",
        f"{table}_ckpt",
        "--json",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    [r] = json.loads(result.stdout)
    assert r["table"] == table and r["complete"] is True
    assert r["run"]["rows_updated"] == 40  # the rows with an amount
    census = json_out(cli("census", "--models", "shop_models:Base", "--json", env=env))
    assert _census(census, "amount") == {new_fin["active_key"]["key_id"]: 40}
    assert _decrypt_all(cli_env, table, _rows(postgres_dsn, table)) == plain


def test_reencrypt_option_and_service_errors(cli: Cli, table: str) -> None:
    no_dsn = cli("reencrypt", "--table", table, "--column", "ssn:pii")
    assert no_dsn.returncode == 3 and "ENCRYPTION_POSTGRES_DSN" in one_error_line(no_dsn)
    no_columns = cli("reencrypt", "--table", table)
    assert no_columns.returncode == 2 and "--column" in no_columns.stderr
    bad_column = cli("reencrypt", "--table", table, "--column", "ssn")
    assert bad_column.returncode == 2 and "NAME:KEY_TYPE" in bad_column.stderr
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = cli(
        "reencrypt",
        "--table",
        table,
        "--column",
        "ssn:pii",
        "--dsn",
        f"postgresql://postgres@127.0.0.1:{port}/test",
    )
    assert down.returncode == 4, down.stderr
    one_error_line(down)
    missing_models = cli("census", "--models", "no_such_models_module")
    assert missing_models.returncode == 3 and "no_such_models_module" in missing_models.stderr


def test_reencrypt_draws_a_progress_bar_on_a_terminal(
    cli: Cli, cli_env: dict[str, str], postgres_dsn: str, table: str, tmp_path: Path
) -> None:
    import pty

    _fill(cli_env, postgres_dsn, table, 300)
    assert cli("keys", "rotate", "pii", "--force").returncode == 0
    primary, replica = pty.openpty()
    env = {**cli_env, "ENCRYPTION_POSTGRES_DSN": postgres_dsn, "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen(
        [
            *COMMAND,
            "reencrypt",
            "--table",
            table,
            "--column",
            "ssn:pii",
            "--checkpoint-table",
            f"{table}_ckpt",
            "--batch-size",
            "50",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=replica,
        text=True,
    )
    os.close(replica)
    drawn = b""
    try:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the replica side closed: the command ended
                break
            if not chunk:
                break
            drawn += chunk
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
        os.close(primary)
    assert proc.returncode == 0, drawn.decode(errors="replace")
    screen = drawn.decode("utf-8", errors="replace")
    assert table in screen and "━" in screen and "300/300" in screen and "rows/s" in screen
    assert "batch 1," not in screen  # the bar, not the plain lines
    assert "300 rows re-encrypted" in out


def test_reencrypt_with_jobs_shares_a_table_between_processes(
    cli: Cli, cli_env: dict[str, str], postgres_dsn: str, table: str
) -> None:
    """--jobs 2: two processes over 8 ranges, each taking the next free range; --max-batches
    is each process's budget over its ranges; a rerun resumes the ranges' checkpoints and
    finishes the rest, and a rerun with another count finds nothing left to move."""
    plain = _fill(cli_env, postgres_dsn, table, ROWS)
    env = {"ENCRYPTION_POSTGRES_DSN": postgres_dsn}
    spec = ["--table", table, "--column", "ssn:pii", "--column", "amount:financial_data"]
    ckpt = ["--checkpoint-table", f"{table}_ckpt"]
    new_pii = json_out(cli("keys", "rotate", "pii", "--force", "--json"))["active_key"]["key_id"]

    first = cli(
        "reencrypt",
        *spec,
        *ckpt,
        "--jobs",
        "2",
        "--batch-size",
        "100",
        "--max-batches",
        "3",
        "--json",
        env=env,
    )
    assert first.returncode == 0, first.stderr
    [r1] = json.loads(first.stdout)
    assert r1["complete"] is False and r1["stopped"] == "max-batches"
    assert r1["checkpoint"]["done"] is False
    # 8 ranges of about 131 rows: each process spends its 3 batches on one whole range
    # (2 batches) and the first batch of the next, so 4 ranges ran, 2 of them to the end
    assert r1["run"]["batches"] == 6 and len(r1["shards"]) == 4
    assert sorted(s["complete"] for s in r1["shards"]) == [False, False, True, True]
    assert len(set(r1["job_id"])) == 4
    updated = r1["run"]["rows_updated"]
    assert updated == sum(s["run"]["rows_updated"] for s in r1["shards"])
    assert 2 * (ROWS // 8) + 200 <= updated <= 2 * (ROWS // 8 + 1) + 200
    moved = [r["id"] for r in _rows(postgres_dsn, table) if r["ssn"].startswith(f"ac2.{new_pii}.")]
    assert len(moved) == updated
    assert moved[: ROWS // 8] == list(range(1, ROWS // 8 + 1))  # the first range: the start

    second = cli("reencrypt", *spec, *ckpt, "--jobs", "2", "--batch-size", "100", "--json", env=env)
    assert second.returncode == 0, second.stderr
    [r2] = json.loads(second.stdout)
    assert r2["complete"] is True and r2["run"]["rows_updated"] == ROWS - updated
    assert len(r2["job_id"]) == 8 and set(r1["job_id"]) < set(r2["job_id"])  # same ranges
    assert r2["resumed_from"] is not None  # the two cut short resumed their checkpoints
    assert r2["run"]["rows_failed"] == 0 and r2["failures"] == []
    rows = _rows(postgres_dsn, table)
    assert all(r["ssn"].startswith(f"ac2.{new_pii}.") for r in rows)
    assert _decrypt_all(cli_env, table, rows) == plain

    third = cli("reencrypt", *spec, *ckpt, "--jobs", "3", env=env)
    assert third.returncode == 0, third.stderr
    assert f"{table}: 0 rows re-encrypted" in third.stdout


def test_reencrypt_models_migrates_a_legacy_column_with_its_reader(
    cli: Cli, cli_env: dict[str, str], postgres_dsn: str, table: str, tmp_path: Path
) -> None:
    """--models takes the legacy reader the column declares (its key from the
    application's module, read from the environment there); --jobs processes import
    the module again. sqlalchemy-utils AesGcmEngine tokens become aiocrypt tokens."""
    from sqlalchemy_utils.types.encrypted.encrypted_type import AesGcmEngine

    old_key = secrets.token_hex(16)
    engine = AesGcmEngine()
    engine._update_key(old_key)
    plain = {i: f"{i:03d}-11-{i:04d}" for i in range(1, 301)}

    async def fill() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, ssn text)")
            await conn.executemany(
                f"INSERT INTO {table} VALUES ($1, $2)",
                [(i, engine.encrypt(v)) for i, v in plain.items()],
            )
        finally:
            await conn.close()

    asyncio.run(fill())
    (tmp_path / "legacy_models.py").write_text(
        "import os\n"
        "import sqlalchemy as sa\n"
        "from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column\n"
        "from aiocrypt.integrations.sqlalchemy import EncryptedString, SqlalchemyUtilsReader\n\n"
        "OLD = SqlalchemyUtilsReader(os.environ['SHOP_OLD_KEY'], 'aes_gcm')\n\n"
        "class Base(DeclarativeBase):\n    pass\n\n"
        f"class Customer(Base):\n    __tablename__ = {table!r}\n"
        "    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)\n"
        "    ssn: Mapped[str] = mapped_column(EncryptedString('pii', legacy=OLD))\n"
    )
    env = {"ENCRYPTION_POSTGRES_DSN": postgres_dsn, "SHOP_OLD_KEY": old_key}
    result = cli(
        "reencrypt",
        "--models",
        "legacy_models",
        "--checkpoint-table",
        f"{table}_ckpt",
        "--jobs",
        "2",
        "--batch-size",
        "50",
        "--json",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert old_key not in result.stdout + result.stderr
    [r] = json.loads(result.stdout)
    assert r["complete"] is True and r["run"]["rows_updated"] == 300
    rows = _rows_of(postgres_dsn, table)
    assert all(v.startswith("ac2.pii-") for v in rows.values())

    async def decrypt() -> dict[int, Any]:
        async with service_for(cli_env) as svc:
            return {
                i: await svc.decrypt_field(v, "pii", context=f"{table}.ssn")
                for i, v in rows.items()
            }

    assert asyncio.run(decrypt()) == plain
    # without the key in the module's environment the reader cannot be built: one line
    missing = cli(
        "reencrypt",
        "--models",
        "legacy_models",
        "--checkpoint-table",
        f"{table}_ckpt",
        env={"ENCRYPTION_POSTGRES_DSN": postgres_dsn},
    )
    assert missing.returncode != 0 and "Traceback" not in missing.stderr


def _rows_of(dsn: str, table: str) -> dict[int, str]:
    async def read() -> dict[int, str]:
        conn = await asyncpg.connect(dsn)
        try:
            return {r["id"]: r["ssn"] for r in await conn.fetch(f"SELECT id, ssn FROM {table}")}
        finally:
            await conn.close()

    return asyncio.run(read())


def test_reencrypt_with_jobs_stops_at_a_damaged_value_and_names_its_range(
    cli: Cli, cli_env: dict[str, str], postgres_dsn: str, table: str
) -> None:
    """--jobs 2 without --skip-errors: a value that does not decrypt in the first range
    stops the command with one line naming that range, no range is started after it
    fails, and a rerun with --skip-errors moves every other row and lists that one."""
    _fill(cli_env, postgres_dsn, table, ROWS)
    env = {"ENCRYPTION_POSTGRES_DSN": postgres_dsn}
    spec = ["--table", table, "--column", "ssn:pii", "--column", "amount:financial_data"]
    ckpt = ["--checkpoint-table", f"{table}_ckpt"]

    async def damage() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:  # the last character of row 5's token changed: its tag no longer holds
            await conn.execute(
                f"UPDATE {table} SET ssn = left(ssn, -1) || "
                "CASE WHEN right(ssn, 1) = 'A' THEN 'B' ELSE 'A' END WHERE id = 5"
            )
        finally:
            await conn.close()

    asyncio.run(damage())
    new_pii = json_out(cli("keys", "rotate", "pii", "--force", "--json"))["active_key"]["key_id"]
    failed = cli("reencrypt", *spec, *ckpt, "--jobs", "2", "--batch-size", "100", env=env)
    assert failed.returncode != 0
    assert f"{table}: the range after primary key None stopped" in failed.stderr
    assert "Traceback" not in failed.stderr
    moved = [r["id"] for r in _rows(postgres_dsn, table) if r["ssn"].startswith(f"ac2.{new_pii}.")]
    assert len(moved) < ROWS - 1  # stopped, not finished around it

    rerun = cli(
        "reencrypt", *spec, *ckpt, "--jobs", "2", "--batch-size", "100", "--skip-errors",
        "--json", env=env,
    )  # fmt: skip
    assert rerun.returncode == 1, rerun.stderr  # a value was left behind: said, not hidden
    assert "primary key 5" in rerun.stderr
    [result] = json.loads(rerun.stdout)
    assert result["failed_primary_keys"] == [5] and result["complete"] is False
    assert result["run"]["rows_updated"] == ROWS - 1 - len(moved)
    rows = _rows(postgres_dsn, table)
    assert [r["id"] for r in rows if not r["ssn"].startswith(f"ac2.{new_pii}.")] == [5]
