"""The CLI's less travelled paths, run in-process with click's ``CliRunner`` (fast).

Each test has a fresh master key and a file key store under ``tmp_path``, handed to
the command through ``invoke(env=...)`` as the subprocess tests hand them through the
environment; the working directory is ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import errno
import io
import json
import os
import pty
import secrets
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import click
import pytest
from cli_helpers import Run, error_line, json_of, new_master_key, service_for

from aiocrypt import EncryptionConfig, KeyManager
from aiocrypt._cli_base import CliError, exit_code_for
from aiocrypt._keys import utcnow
from aiocrypt.cli import _LazyGroup, main
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


# -- exit codes ------------------------------------------------------------------------


def test_exit_code_of_an_unreachable_host_errno_and_of_a_click_error() -> None:
    # EHOSTUNREACH has no OSError subclass of its own: only its errno says "unreachable"
    no_route = OSError(errno.EHOSTUNREACH, "No route to host")
    assert type(no_route) is OSError
    assert exit_code_for(no_route) == 4
    assert exit_code_for(OSError(errno.EACCES, "Permission denied")) == 1
    assert exit_code_for(CliError("bad setting", 3)) == 3
    assert exit_code_for(click.UsageError("bad option")) == 2


def test_a_key_type_argument_when_the_settings_do_not_load(run: Run, tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_text(new_master_key() + "\n")
    both = {"ENCRYPTION_MASTER_KEY_FILE": str(key_file)}  # and ENCRYPTION_MASTER_KEY: refused
    generated = run("keys", "generate", "pii", env=both)
    assert generated.exit_code == 3, generated.output
    assert "keep one" in error_line(generated)
    bad_name = run("keys", "generate", "Not A Type!", env=both)
    assert bad_name.exit_code == 2, bad_name.output
    assert "invalid key type name" in bad_name.stderr
    assert not (tmp_path / "store" / "keys.json").exists()


# -- keys ------------------------------------------------------------------------------


def test_revoke_and_compromise_report_the_new_status(run: Run) -> None:
    first = json_of(run("keys", "generate", "pii", "--json"))["key_id"]
    revoked = run("keys", "revoke", first)
    assert revoked.exit_code == 0, revoked.output
    assert revoked.stdout.strip() == f"{first} is revoked"
    second = json_of(run("keys", "generate", "pii", "--json"))["key_id"]
    compromised = json_of(run("keys", "compromise", second, "--reason", "leaked", "--json"))
    assert compromised["key_id"] == second and compromised["status"] == "compromised"
    assert "wrapped_key" not in compromised


def test_cleanup_force_asks_first_and_reports_as_json(run: Run) -> None:
    run("keys", "generate", "pii")
    declined = run("keys", "cleanup", "--force", input="n\n")
    assert declined.exit_code == 1
    assert "without checking references" in declined.stderr
    assert "Aborted" in declined.stderr
    report = json_of(run("keys", "cleanup", "--json"))
    assert report["destroyed"] == [] and report["kept"] == []


def test_retire_dry_run_says_the_minimum_version_stays(run: Run) -> None:
    run("keys", "generate", "pii")
    middle = json_of(run("keys", "rotate", "pii", "--force", "--json"))["active_key"]["key_id"]
    json_of(run("keys", "rotate", "pii", "--force", "--json"))
    # version 2 is not the oldest: retiring it leaves the minimum at 1
    dry = run("keys", "retire", middle, "--confirm-unreferenced", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"would destroy {middle} (version 2" in dry.stdout
    assert "pii: minimum decryption version stays 1 (dry run: nothing changed)" in dry.stdout
    statuses = {k["key_id"]: k["status"] for k in json_of(run("keys", "list", "--json"))}
    assert statuses[middle] == "decrypt_only"
    # done: the minimum did not move, so there is no line about it
    done = run("keys", "retire", middle, "--confirm-unreferenced", "--yes")
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines() == [
        f"destroyed {middle} (version 2, decrypt_only): confirmed unreferenced"
    ]
    statuses = {k["key_id"]: k["status"] for k in json_of(run("keys", "list", "--json"))}
    assert statuses[middle] == "destroyed"


def test_retire_json_without_yes_asks_and_shows_no_plan_text(run: Run) -> None:
    run("keys", "generate", "pii")
    json_of(run("keys", "rotate", "pii", "--force", "--json"))
    [old] = [k for k in json_of(run("keys", "list", "--json")) if k["version"] == 1]
    declined = run("keys", "retire", old["key_id"], "--confirm-unreferenced", "--json", input="n\n")
    assert declined.exit_code == 1
    assert declined.stdout == ""  # --json: no plan in text before the question
    assert "Destroy" in declined.stderr and "Aborted" in declined.stderr
    kept = {k["key_id"]: k["status"] for k in json_of(run("keys", "list", "--json"))}
    assert kept[old["key_id"]] != "destroyed"


def test_retire_type_refuses_a_malformed_type_name(run: Run) -> None:
    result = run("keys", "retire-type", "Bad Type!", "--confirm-unreferenced", "--yes")
    assert result.exit_code == 2
    assert "KEY_TYPE" in result.stderr


def test_min_version_lowered_asks_first_then_reports_as_json(run: Run) -> None:
    run("keys", "generate", "pii")
    for _ in range(2):
        json_of(run("keys", "rotate", "pii", "--force", "--json"))
    raised = run("keys", "min-version", "pii", "3", "--confirm-unreferenced", "--yes")
    assert raised.exit_code == 0, raised.output
    declined = run("keys", "min-version", "pii", "2", input="n\n")
    assert declined.exit_code == 1
    assert "from 3 to 2 (versions from it up decrypt again)?" in declined.stderr
    lowered = json_of(run("keys", "min-version", "pii", "2", "--json", input="y\n"))
    assert lowered == {
        "key_type": "pii",
        "min_decryption_version": 2,
        "previous": 3,
        "changed": True,
    }


def test_rotate_master_key_refuses_a_malformed_key_and_reports_as_json(run: Run) -> None:
    run("keys", "generate", "pii")
    malformed = run("keys", "rotate-master-key", env={"ENCRYPTION_NEW_MASTER_KEY": "c2hvcnQ="})
    assert malformed.exit_code == 3
    line = error_line(malformed)
    assert "ENCRYPTION_NEW_MASTER_KEY" in line and "c2hvcnQ=" not in line
    new_key = new_master_key()
    moved = json_of(
        run("keys", "rotate-master-key", "--new-key-env", "MK2", "--json", env={"MK2": new_key})
    )
    assert moved["rewrapped"] == 1 and moved["kek_id"].startswith("local")
    listed = run("keys", "list", "--json", env={"ENCRYPTION_MASTER_KEY": new_key})
    assert len(json_of(listed)) == 1


def test_adopt_asks_before_sealing(run: Run) -> None:
    declined = run("keys", "adopt", input="n\n")
    assert declined.exit_code == 1
    assert "Seal the key store as it is now" in declined.output
    assert "Aborted" in declined.stderr


# -- audit, new-master-key, demo, jobs ---------------------------------------------------


def test_audit_refuses_a_short_hmac_key_and_a_malformed_anchor(run: Run) -> None:
    short = base64.b64encode(b"0123456789").decode("ascii")
    env: dict[str, str | None] = {
        "ENCRYPTION_AUDIT_DSN": "postgresql://postgres@127.0.0.1:1/none",
        "AUDIT_KEY": short,
    }
    result = run("audit", "verify", "--hmac-key-env", "AUDIT_KEY", env=env)
    assert result.exit_code == 3
    assert "AUDIT_KEY holds 10 bytes; an HMAC key has at least 16" in error_line(result)
    assert short not in result.output
    anchor = run("audit", "verify", "--anchor", "not-an-anchor", env=env)
    assert anchor.exit_code == 2
    assert "--anchor" in anchor.stderr


def test_jobs_help_lists_the_arq_commands(run: Run) -> None:
    result = run("jobs", "--help")
    assert result.exit_code == 0, result.output
    assert "reencrypt" in result.stdout and "cleanup" in result.stdout


def test_a_lazy_group_whose_module_is_missing_names_the_extra() -> None:
    group = _LazyGroup("nope", "aiocrypt.no_such_module:group", "nope-extra")
    with click.Context(main) as ctx, pytest.raises(CliError) as caught:
        group.list_commands(ctx)
    assert caught.value.exit_code == 3
    assert "pip install 'aiocrypt[nope-extra]'" in caught.value.format_message()


def test_new_master_key_on_a_terminal_warns_that_it_prints_a_secret() -> None:
    controller, terminal = pty.openpty()
    errors = io.StringIO()
    try:
        with (
            os.fdopen(terminal, "w", closefd=False) as tty,
            contextlib.redirect_stdout(tty),
            contextlib.redirect_stderr(errors),
            pytest.raises(SystemExit) as exited,
        ):
            main(["new-master-key"], prog_name="aiocrypt")
        printed = os.read(controller, 4096).decode("ascii").strip()
    finally:
        os.close(terminal)
        os.close(controller)
    assert exited.value.code == 0
    assert "warning: this prints a secret" in errors.getvalue()
    assert len(base64.b64decode(printed, validate=True)) == 32


# -- init and doctor ---------------------------------------------------------------------


def test_init_again_in_the_project_keeps_one_gitignore_entry(run: Run, tmp_path: Path) -> None:
    first = json_of(run("init", "--key-in-project", "--json"))
    assert first["gitignore"] == ".aiocrypt/.gitignore"
    again = json_of(run("init", "--key-in-project", "--force", "--json"))
    assert again["gitignore"] == first["gitignore"]
    lines = (tmp_path / ".aiocrypt" / ".gitignore").read_text().splitlines()
    assert lines.count("/master.key") == 1


def test_init_without_a_key_file_prints_the_key_as_asked(run: Run, tmp_path: Path) -> None:
    shown = json_of(run("init", "--no-key-file", "--show-key", "--json"))
    assert shown["key_file"] is None and shown["gitignore"] is None
    assert shown["next"] == ["aiocrypt doctor"]
    assert len(base64.b64decode(shown["master_key"], validate=True)) == 32
    assert not (tmp_path / "xdg").exists()
    exported = run(
        "init", "--no-key-file", "--print-export", "--config-file", "other.json", "--force"
    )
    assert exported.exit_code == 0, exported.output
    assert "warning: the master key is printed on stdout" in exported.stderr
    lines = exported.stdout.splitlines()
    assert lines[0] == "created other.json"
    assert lines[1].startswith("export ENCRYPTION_MASTER_KEY=")
    assert len(lines) == 2  # no key file line, no "next:" steps
    assert json.loads((tmp_path / "other.json").read_text())["performance_mode"] == "balanced"


def test_init_key_file_outside_the_project_and_any_git_tree_gets_no_gitignore(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    key_file = tmp_path / "keys" / "master.key"
    out = json_of(run("init", "--key-file", str(key_file), "--json"))
    assert out["key_file"] == str(key_file) and out["gitignore"] is None
    assert not (key_file.parent / ".gitignore").exists()
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"


def test_doctor_reports_settings_that_do_not_load(run: Run, tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_text(new_master_key() + "\n")
    key_file.chmod(0o600)
    result = run("doctor", "--json", env={"ENCRYPTION_MASTER_KEY_FILE": str(key_file)})
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    assert report["exit_code"] == 3
    [config] = [c for c in report["checks"] if c["name"] == "configuration"]
    assert config["ok"] is False and "keep one" in config["detail"]
    assert not any(c["name"] in ("KEK provider", "key store") for c in report["checks"])


def test_doctor_skips_the_key_store_when_the_kek_provider_fails(run: Run) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    vault = {
        "ENCRYPTION_KEY_STORAGE_BACKEND": "vault",
        "ENCRYPTION_VAULT_URL": f"http://127.0.0.1:{port}",
        "ENCRYPTION_VAULT_TOKEN": "test-token-not-secret",
    }
    result = run("doctor", "--json", "--timeout", "0.2", env=vault)
    assert result.exit_code == 4, result.output
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["KEK provider"]["ok"] is False
    assert checks["key store"] == {
        "name": "key store",
        "ok": None,
        "warning": False,
        "detail": "skipped: the KEK provider failed",
    }
    assert "test-token-not-secret" not in result.output


def test_doctor_gives_up_on_a_service_that_never_answers(run: Run, silent_port: int) -> None:
    url = f"redis://127.0.0.1:{silent_port}/0"
    result = run("doctor", "--json", "--timeout", "0.1", env={"ENCRYPTION_ARQ_REDIS_URL": url})
    assert result.exit_code == 4, result.output
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks[f"Redis {url}"]["detail"] == (
        "no answer within 0.1 s (check ENCRYPTION_ARQ_REDIS_URL)"
    )


# -- subjects ----------------------------------------------------------------------------


def test_subjects_forget_names_the_destroyed_key(run: Run, cli_vars: dict[str, str | None]) -> None:
    env = {k: v for k, v in cli_vars.items() if v is not None}

    async def write() -> None:
        async with service_for(env) as svc:
            await svc.encrypt_field("ada@example.com", "pii", subject="user:42")

    asyncio.run(write())
    [stat] = json_of(run("subjects", "stats", "--key-type", "pii", "--json"))
    assert stat["subject_keys"] == 1
    forgotten = run("subjects", "forget", "user:42", "--tombstone", "--yes")
    assert forgotten.exit_code == 0, forgotten.output
    assert forgotten.stdout.startswith("forgotten: ")
    assert forgotten.stdout.rstrip().endswith("with a tombstone")
    assert "user:42" not in forgotten.output
    [after] = json_of(run("subjects", "stats", "--key-type", "pii", "--json"))
    assert after["subject_keys"] == 0
    again = run("subjects", "forget", "user:42", "--tombstone", "--yes")
    assert again.stdout.strip() == "this subject has no key (tombstone kept)"


# -- reencrypt and census ------------------------------------------------------------------


def test_reencrypt_refuses_options_that_name_no_table_or_a_wrong_one(run: Run) -> None:
    cases = {
        (): "name the data",
        ("--table", "t", "--column", "ssn:Not A Type"): "invalid key type name",
        ("--models", "shop", "--column", "ssn:pii"): "give --models or --column, not both",
        ("--column", "ssn:pii"): "--column needs exactly one --table",
        ("--table", "t", "--column", "ssn:pii", "--column", "ssn:pii"): "duplicate column",
    }
    for args, message in cases.items():
        result = run("reencrypt", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)


def test_models_without_an_encrypted_column_are_a_configuration_error(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    module = f"plain_models_{secrets.token_hex(4)}"
    (tmp_path / f"{module}.py").write_text(
        "import sqlalchemy as sa\n"
        "metadata = sa.MetaData()\n"
        "notes = sa.Table('notes', metadata, sa.Column('id', sa.Integer, primary_key=True),\n"
        "                 sa.Column('body', sa.Text))\n"
    )
    result = run("census", "--models", module)
    sys.modules.pop(module, None)
    assert result.exit_code == 3, result.output
    assert error_line(result) == f"error: --models {module}: no table with encrypted columns found"
    assert sys.path[0] == str(tmp_path)  # the working directory, importable as an app's is


def test_a_database_that_refuses_the_login_is_a_configuration_error(
    run: Run, postgres_dsn: str
) -> None:
    missing = postgres_dsn.rsplit("/", 1)[0] + "/no_such_database_for_aiocrypt"
    result = run("census", "--table", "t", "--column", "ssn:pii", "--dsn", missing)
    assert result.exit_code == 3, result.output
    line = error_line(result)
    assert "refused the connection (check the --dsn option)" in line
    assert "no_such_database_for_aiocrypt" in line


def test_census_without_tables_counts_keys_per_status(run: Run) -> None:
    run("keys", "generate", "pii")
    json_of(run("keys", "rotate", "pii", "--force", "--json"))
    assert json_of(run("census", "--json")) == {
        "keys": {"pii": {"active": 1, "decrypt_only": 1}},
        "tables": [],
    }
    text = run("census")
    assert text.exit_code == 0, text.output
    assert "keys per status" in text.stdout and "rows per key version" not in text.stdout


@pytest.fixture
def filled_table(
    cli_vars: dict[str, str | None], postgres_dsn: str
) -> Iterator[tuple[str, dict[str, str]]]:
    """A table of 4 rows: ``ssn`` (pii) on every row, ``amount`` (financial_data) on two."""
    env = {k: v for k, v in cli_vars.items() if v is not None}
    name = f"paths_{secrets.token_hex(5)}"

    async def fill() -> None:
        async with service_for(env) as svc:
            rows = [
                (
                    i,
                    await svc.encrypt_field(f"{i:03d}-55-0000", "pii", context=f"{name}.ssn"),
                    await svc.encrypt_field(i * 10, "financial_data", context=f"{name}.amount")
                    if i % 2
                    else None,
                )
                for i in range(1, 5)
            ]
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(
                f"CREATE TABLE {name} (id integer PRIMARY KEY, ssn text, amount text)"
            )
            await conn.executemany(f"INSERT INTO {name} VALUES ($1, $2, $3)", rows)
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {name}; DROP TABLE IF EXISTS {name}_ckpt")
        finally:
            await conn.close()

    asyncio.run(fill())
    try:
        yield name, {"ENCRYPTION_POSTGRES_DSN": postgres_dsn}
    finally:
        asyncio.run(drop())


def _execute(dsn: str, sql: str) -> None:
    async def execute() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute())


def test_reencrypt_dry_run_of_one_key_type(
    run: Run, filled_table: tuple[str, dict[str, str]]
) -> None:
    table, env = filled_table
    json_of(run("keys", "rotate", "pii", "--force", "--json"))
    json_of(run("keys", "rotate", "financial_data", "--force", "--json"))
    spec = ["--table", table, "--column", "ssn:pii", "--column", "amount:financial_data"]
    ckpt = ["--checkpoint-table", f"{table}_ckpt"]
    [planned] = json_of(
        run("reencrypt", *spec, *ckpt, "--key-type", "pii", "--dry-run", "--json", env=env)
    )
    assert list(planned["targets"]) == ["ssn"]  # amount is not a pii column
    assert planned["rows"] == 4 and planned["pending_rows"] == 4
    text = run("reencrypt", *spec, *ckpt, "--key-type", "financial_data", "--dry-run", env=env)
    assert text.exit_code == 0, text.output
    assert text.stdout.strip() == (
        f"{table}: 2 of 4 rows would be re-encrypted (dry run: nothing changed)"
    )


def test_reencrypt_names_a_value_that_does_not_decrypt(
    run: Run, filled_table: tuple[str, dict[str, str]], postgres_dsn: str
) -> None:
    table, env = filled_table
    json_of(run("keys", "rotate", "pii", "--force", "--json"))
    _execute(postgres_dsn, f"UPDATE {table} SET ssn = left(ssn, -2) || 'AA' WHERE id = 3")
    spec = ["--table", table, "--column", "ssn:pii", "--checkpoint-table", f"{table}_ckpt"]
    stopped = run("reencrypt", *spec, env=env)
    assert stopped.exit_code == 1, stopped.output
    assert "[primary key 3]" in error_line(stopped)
    skipped = run("reencrypt", *spec, "--skip-errors", env=env)
    assert skipped.exit_code == 1, skipped.output  # a row left behind: not complete
    assert skipped.stdout.startswith(f"{table}: 3 rows re-encrypted in ")
    assert skipped.stdout.rstrip().endswith("; INCOMPLETE")
    assert "  1 rows did not decrypt and were left: primary keys [3]" in skipped.stderr
    assert f"    {table}.ssn primary key 3: authentication_failed (key pii-v1-" in skipped.stderr


def test_reencrypt_to_an_undeclared_key_type_is_a_usage_error(
    run: Run, filled_table: tuple[str, dict[str, str]]
) -> None:
    table, env = filled_table
    spec = ["--table", table, "--column", "ssn:payroll", "--checkpoint-table", f"{table}_ckpt"]
    result = run("reencrypt", *spec, env=env)
    assert result.exit_code == 2, result.output
    assert "unknown key type 'payroll'" in error_line(result)


def test_cleanup_names_each_key_it_destroyed(run: Run, cli_vars: dict[str, str | None]) -> None:
    env = {k: v for k, v in cli_vars.items() if v is not None}
    config = EncryptionConfig(
        master_key=env["ENCRYPTION_MASTER_KEY"], storage_path=env["ENCRYPTION_KEY_STORAGE_PATH"]
    )

    async def two_years_of_keys() -> str:
        kek = LocalKekProvider(config.master_key_bytes())
        offset = [dt.timedelta(days=-800)]

        def clock() -> dt.datetime:
            return utcnow() + offset[0]

        store = FileKeyStore(config.key_store_file(), kek)
        async with KeyManager(store, kek, config, clock=clock, watch=False) as manager:
            first = await manager.generate_key("pii")
            offset[0] = dt.timedelta(days=-1)
            await manager.rotate_key("pii", force=True)
        return first.key_id

    old = asyncio.run(two_years_of_keys())
    result = run("keys", "cleanup", "--force", "--yes")
    assert result.exit_code == 0, result.output
    assert f"destroyed {old}: " in result.stdout
    statuses = {k["key_id"]: k["status"] for k in json_of(run("keys", "list", "--json"))}
    assert statuses[old] == "destroyed"


def test_retire_type_with_a_census_plans_to_destroy_a_type_no_row_uses(
    run: Run, filled_table: tuple[str, dict[str, str]]
) -> None:
    table, env = filled_table
    mistaken = json_of(
        run("keys", "generate", "payroll", "--json", env={"ENCRYPTION_KEY_TYPES": "payroll"})
    )
    # the census counts the rows of a column declared with the type: none is on its key
    spec = ["--table", table, "--column", "ssn:payroll"]
    plan = json_of(run("keys", "retire-type", "payroll", *spec, "--dry-run", "--json", env=env))
    assert plan["dry_run"] is True and plan["key_type"] == "payroll"
    assert [k["key_id"] for k in plan["keys"]] == [mistaken["key_id"]]
    statuses = {k["key_id"]: k["status"] for k in json_of(run("keys", "list", "--json"))}
    assert statuses[mistaken["key_id"]] == "active"


def test_subjects_rewrap_fails_while_a_subject_key_is_left_on_an_older_key(
    run: Run, cli_vars: dict[str, str | None], tmp_path: Path
) -> None:
    env = {k: v for k, v in cli_vars.items() if v is not None}

    async def write() -> None:
        async with service_for(env) as svc:
            await svc.encrypt_field("ada@example.com", "pii", subject="user:42")

    asyncio.run(write())
    new = json_of(run("keys", "rotate", "pii", "--force", "--json"))["active_key"]["key_id"]
    # the subject key's wrapped bytes damaged: it no longer unwraps, so it cannot move
    subjects_file = tmp_path / "store" / ".keys.json.subjects.json"
    data = json.loads(subjects_file.read_text())
    [raw] = data["records"]
    record = json.loads(raw)
    wrapped = base64.b64decode(record["wrapped"])
    record["wrapped"] = base64.b64encode(wrapped[:-1] + bytes([wrapped[-1] ^ 1])).decode()
    data["records"] = [json.dumps(record, separators=(",", ":"), sort_keys=True)]
    subjects_file.write_text(json.dumps(data))
    result = run("subjects", "rewrap", "--key-type", "pii")
    assert result.exit_code == 1, result.output
    assert result.stdout.strip() == (
        f"pii: 0 subject keys rewrapped under {new} in 1 batches; 1 left on older keys"
    )
    assert error_line(result) == (
        "error: some subject keys were not rewrapped (see the log): run it again"
    )


def test_the_demo_command_runs_the_demo(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    """``aiocrypt demo``: the whole story in a temporary directory (over a second: the
    demo encrypts, rotates and re-encrypts for real)."""
    result = run("demo")
    assert result.exit_code == 0, result.output
    printed = result.output + capsys.readouterr().out
    assert "demo finished" in printed


def test_reencrypt_with_a_key_type_no_column_has_is_a_usage_error(run: Run) -> None:
    """--key-type that matches none of the named columns: said at once (exit 2), before
    any database is asked for (it used to open the database, do nothing and exit 0)."""
    result = run("reencrypt", "--table", "t", "--column", "ssn:pii", "--key-type", "financial_data")
    assert result.exit_code == 2
    assert "no column named has key type 'financial_data'" in result.output
