"""``aiocrypt reencrypt`` and ``census`` run in-process with click's ``CliRunner`` (fast).

The subprocess tests (test_cli_reencrypt.py) run the same scenarios unmeasured; these
run the lines only they reached: ``--jobs`` (the command's own share runs here, the
other process is spawned), ``--models``, the census of tables, the progress bar on a
terminal and the option and database errors. Each test has a fresh master key and
file key store in this process's environment (which a spawned ``--jobs`` process
inherits), a fresh table in the ``test`` database, dropped after.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import multiprocessing
import os
import pty
import re
import secrets
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cli_helpers import closed_port, error_line, json_of, service_for
from click.testing import CliRunner, Result

from aiocrypt.cli import main


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh master key and key store in this process's environment (no outer
    ENCRYPTION_* / AIOCRYPT_* setting); the working directory is ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("ENCRYPTION_", "AIOCRYPT_")):
            monkeypatch.delenv(name)
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    settings = {
        "ENCRYPTION_MASTER_KEY": base64.b64encode(os.urandom(32)).decode("ascii"),
        "ENCRYPTION_KEY_STORAGE_PATH": str(store / "keys.json"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return settings


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    """``aiocrypt ARGS...`` in this process (``env=`` adds to the environment)."""
    return CliRunner().invoke(main, list(args), env=env, prog_name="aiocrypt")


def _sql(dsn: str, sql: str, *args: Any) -> list[Any]:
    """The rows of ``sql`` (several statements run together when there is no argument)."""

    async def execute() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            if not args:
                await conn.execute(sql)
                return []
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(execute())


@dataclass(frozen=True)
class Table:
    name: str
    dsn: str
    plain: dict[int, str]

    @property
    def args(self) -> list[str]:
        """The table and its checkpoint table as ``reencrypt`` options."""
        return [
            *("--table", self.name, "--column", "ssn:pii"),
            *("--checkpoint-table", f"{self.name}_ckpt"),
        ]

    @property
    def db(self) -> dict[str, str]:
        return {"ENCRYPTION_POSTGRES_DSN": self.dsn}

    def values(self) -> dict[int, str]:
        rows = _sql(self.dsn, f"SELECT id, ssn FROM {self.name} WHERE id > $1 ORDER BY id", 0)
        return {r["id"]: r["ssn"] for r in rows}

    def on_key(self, key_id: str) -> list[int]:
        return [i for i, v in self.values().items() if v.startswith(f"ac2.{key_id}.")]

    def decrypted(self, env: dict[str, str]) -> dict[int, str]:
        values = self.values()

        async def decrypt() -> dict[int, str]:
            async with service_for(env) as svc:
                return {
                    i: await svc.decrypt_field(v, "pii", context=f"{self.name}.ssn")
                    for i, v in values.items()
                }

        return asyncio.run(decrypt())


def _make_table(env: dict[str, str], dsn: str, rows: int) -> Table:
    name = f"paths_re_{secrets.token_hex(5)}"
    plain = {i: f"{i:03d}-77-{i:04d}" for i in range(1, rows + 1)}

    async def fill() -> None:
        async with service_for(env) as svc:
            values = [
                (i, await svc.encrypt_field(v, "pii", context=f"{name}.ssn"))
                for i, v in plain.items()
            ]
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"CREATE TABLE {name} (id integer PRIMARY KEY, ssn text)")
            await conn.executemany(f"INSERT INTO {name} VALUES ($1, $2)", values)
        finally:
            await conn.close()

    asyncio.run(fill())
    return Table(name, dsn, plain)


MakeTable = Callable[[int], Table]


@pytest.fixture
def tables(env: dict[str, str], postgres_dsn: str) -> Iterator[MakeTable]:
    """``tables(rows)``: a fresh table of ``rows`` pii values under the key of the
    moment (its checkpoints in ``<name>_ckpt``); every one made is dropped after."""
    made: list[str] = []

    def make(rows: int) -> Table:
        table = _make_table(env, postgres_dsn, rows)
        made.append(table.name)
        return table

    yield make
    for name in made:
        _sql(postgres_dsn, f"DROP TABLE IF EXISTS {name}; DROP TABLE IF EXISTS {name}_ckpt")


def _rotate() -> str:
    rotated = json_of(run("keys", "rotate", "pii", "--force", "--json"))
    return str(rotated["active_key"]["key_id"])


# -- option and database errors --------------------------------------------------------


def test_reencrypt_refuses_a_column_without_a_key_type_and_a_table_without_columns(
    env: dict[str, str],
) -> None:
    no_type = run("reencrypt", "--table", "t", "--column", "ssn")
    assert no_type.exit_code == 2, no_type.output
    assert "'ssn': use NAME:KEY_TYPE[:CONTEXT]" in no_type.stderr
    no_column = run("reencrypt", "--table", "t")
    assert no_column.exit_code == 2, no_column.output
    assert "--table needs at least one --column NAME:KEY_TYPE (or use --models)" in (
        no_column.stderr
    )


def test_reencrypt_without_a_database_names_the_setting(env: dict[str, str]) -> None:
    result = run("reencrypt", "--table", "t", "--column", "ssn:pii")
    assert result.exit_code == 3, result.output
    assert error_line(result) == "error: no database: pass --dsn or set ENCRYPTION_POSTGRES_DSN"


def test_a_database_nothing_listens_for_is_unreachable(env: dict[str, str]) -> None:
    port = closed_port()
    dsn = f"postgresql://postgres:pw-{secrets.token_hex(4)}@127.0.0.1:{port}/test"
    result = run(
        "census", "--table", "t", "--column", "ssn:pii", env={"ENCRYPTION_POSTGRES_DSN": dsn}
    )
    assert result.exit_code == 4, result.output
    line = error_line(result)
    assert line.startswith("error: cannot reach the PostgreSQL database at postgresql://postgres")
    assert f"127.0.0.1:{port}/test (check ENCRYPTION_POSTGRES_DSN, or pass --dsn): " in line
    assert "pw-" not in line  # the password redacted


def test_models_that_do_not_import_are_a_configuration_error(env: dict[str, str]) -> None:
    module = f"no_such_models_{secrets.token_hex(4)}"
    result = run("census", "--models", module)
    assert result.exit_code == 3, result.output
    assert error_line(result).startswith(f"error: --models {module}: cannot import {module} (")


# -- --models and census -----------------------------------------------------------------


def test_models_with_a_legacy_reader_move_its_column_and_census_counts_it(
    env: dict[str, str],
    postgres_dsn: str,
    tmp_path: Path,
    tables: MakeTable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--models takes the tables and the legacy readers the columns declare: rows of
    aiocrypt tokens and of sqlalchemy-utils tokens all move to the active key; a second
    --models run finds the working directory already importable; the census of the
    table (text) lists its rows per key version."""
    from sqlalchemy_utils.types.encrypted.encrypted_type import AesGcmEngine

    table = tables(6)
    old_key = secrets.token_hex(16)
    legacy = AesGcmEngine()
    legacy._update_key(old_key)
    for i in (7, 8):
        _sql(postgres_dsn, f"INSERT INTO {table.name} VALUES ($1, $2)", i, legacy.encrypt(f"L{i}"))
    module = f"legacy_models_{secrets.token_hex(4)}"
    (tmp_path / f"{module}.py").write_text(
        "import sqlalchemy as sa\n"
        "from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column\n"
        "from aiocrypt.integrations.sqlalchemy import EncryptedString, SqlalchemyUtilsReader\n\n"
        f"OLD = SqlalchemyUtilsReader({old_key!r}, 'aes_gcm')\n\n"
        "class Base(DeclarativeBase):\n    pass\n\n"
        f"class Customer(Base):\n    __tablename__ = {table.name!r}\n"
        "    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)\n"
        "    ssn: Mapped[str] = mapped_column(EncryptedString('pii', legacy=OLD))\n"
    )
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    monkeypatch.delitem(sys.modules, module, raising=False)
    new = _rotate()
    ckpt = ["--checkpoint-table", f"{table.name}_ckpt"]
    [moved] = json_of(run("reencrypt", "--models", module, *ckpt, "--json", env=table.db))
    assert moved["table"] == table.name and moved["complete"] is True
    assert moved["run"]["rows_updated"] == 8 and moved["run"]["rows_failed"] == 0
    assert table.on_key(new) == list(range(1, 9))
    assert table.decrypted(env) == {**table.plain, 7: "L7", 8: "L8"}
    assert sys.path.count(str(tmp_path)) == 1

    census = run("census", "--models", f"{module}:Base", env=table.db)
    sys.modules.pop(module, None)
    assert census.exit_code == 0, census.output
    assert sys.path.count(str(tmp_path)) == 1  # not inserted again
    assert "rows per key version" in census.stdout
    [row] = [line for line in census.stdout.splitlines() if table.name in line]
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells == [table.name, "ssn", "2", "active", "8", new]


def test_census_of_a_table_counts_rows_per_key_and_names_what_is_no_token(
    env: dict[str, str], postgres_dsn: str, tables: MakeTable
) -> None:
    table = tables(3)
    old = json_of(run("keys", "list", "--json"))[0]["key_id"]
    new = _rotate()
    _sql(postgres_dsn, f"INSERT INTO {table.name} VALUES (4, 'plain text')")
    _sql(
        postgres_dsn,
        f"INSERT INTO {table.name} VALUES (5, $1)",
        table.values()[1].replace(old, "pii-v9-0000", 1),
    )
    census = json_of(
        run("census", "--table", table.name, "--column", "ssn:pii", "--json", env=table.db)
    )
    assert census["keys"] == {"pii": {"active": 1, "decrypt_only": 1}}
    [counted] = census["tables"]
    assert counted["table"] == table.name
    by_key = {
        e["key_id"]: (e["version"], e["status"], e["rows"]) for e in counted["columns"]["ssn"]
    }
    assert by_key[old] == (1, "decrypt_only", 3)
    assert new not in by_key
    assert by_key[None] == (None, "not a token", 1)
    assert by_key["pii-v9-0000"] == (None, "unknown key", 1)


# -- the progress bar ----------------------------------------------------------------------


def test_reencrypt_draws_a_progress_bar_on_a_terminal(
    env: dict[str, str],
    tables: MakeTable,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stderr a terminal (a pty): a rich bar, not plain lines. The command runs through
    ``main`` (CliRunner's stderr is never a terminal); a thread drains the pty."""
    table = tables(60)
    _rotate()
    monkeypatch.setenv("ENCRYPTION_POSTGRES_DSN", table.dsn)
    controller, terminal = pty.openpty()
    drawn: list[bytes] = []

    def drain() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(controller, 65536):
                drawn.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        with (
            os.fdopen(terminal, "w", closefd=False) as tty,
            contextlib.redirect_stderr(tty),
            pytest.raises(SystemExit) as exited,
        ):
            main(["reencrypt", *table.args, "--batch-size", "20"], prog_name="aiocrypt")
    finally:
        os.close(terminal)
        reader.join(timeout=5)
        os.close(controller)
    screen = b"".join(drawn).decode("utf-8", errors="replace")
    assert exited.value.code == 0, screen
    assert table.name in screen and "━" in screen and "60/60" in screen and "rows/s" in screen
    assert "batch 1," not in screen  # the bar, not the plain lines
    assert f"{table.name}: 60 rows re-encrypted in " in capsys.readouterr().out


# -- --jobs ------------------------------------------------------------------------------


def test_reencrypt_with_jobs_spends_max_batches_then_a_rerun_finishes(
    env: dict[str, str], tables: MakeTable
) -> None:
    """--jobs 2 --max-batches 1: each process spends its one batch on the first range it
    takes, so 2 of the 8 ranges ran (cut short); the merged result says stopped, not
    done. A rerun resumes those ranges and moves the rest (text, progress lines)."""
    table = tables(200)
    new = _rotate()
    jobs = ["--jobs", "2", "--batch-size", "20"]
    [first] = json_of(
        run("reencrypt", *table.args, *jobs, "--max-batches", "1", "--json", env=table.db)
    )
    assert first["complete"] is False and first["stopped"] == "max-batches"
    assert first["checkpoint"]["done"] is False
    assert first["run"]["batches"] == 2 and first["run"]["rows_updated"] == 40
    assert len(first["shards"]) == 2 and len(set(first["job_id"])) == 2
    assert first["checkpoint"]["rows_updated"] == 40 and first["checkpoint"]["pass"] == 1
    assert first["targets"] == {"ssn": new}
    assert len(table.on_key(new)) == 40

    second = run("reencrypt", *table.args, *jobs, env=table.db)
    assert second.exit_code == 0, second.output
    assert second.stdout.startswith(f"{table.name}: 160 rows re-encrypted in ")
    assert "(resumed after primary key " in second.stdout
    assert second.stdout.rstrip().endswith("; complete")
    assert f"{table.name}: 160 rows to re-encrypt" in second.stderr
    # progress lines at most once a second, read from the ranges' checkpoints
    assert re.search(rf"^{table.name}: \d+/160 rows \([\d,]+ rows/s\)$", second.stderr, re.M)
    assert table.on_key(new) == list(range(1, 201))
    assert table.decrypted(env) == table.plain
    assert multiprocessing.active_children() == []


def test_reencrypt_with_jobs_stops_at_a_damaged_value_naming_its_range(
    env: dict[str, str], postgres_dsn: str, tables: MakeTable
) -> None:
    """A value in the first range that does not decrypt: that range fails (in this
    process, which takes the first range while the other one starts), and the command
    ends with one line naming the range and the row (exit 1)."""
    table = tables(200)
    _sql(
        postgres_dsn,
        f"UPDATE {table.name} SET ssn = left(ssn, -1) || "
        "CASE WHEN right(ssn, 1) = 'A' THEN 'B' ELSE 'A' END WHERE id = 2",
    )
    new = _rotate()
    result = run("reencrypt", *table.args, "--jobs", "2", "--batch-size", "20", env=table.db)
    assert result.exit_code == 1, result.output
    assert error_line(result).startswith(
        f"error: {table.name}: the range after primary key None stopped: "
    )
    assert "[primary key 2]" in result.stderr
    assert len(table.on_key(new)) < 199  # stopped, not finished around it
