"""``aiocrypt keys retire``, ``retire-type``, ``min-version`` and ``cleanup --confirm``, run
as an operator runs them: the real command over a file key store, and once over a real
Postgres table whose census (the one ``aiocrypt census`` counts) decides."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from cli_helpers import (
    COMMAND,
    Cli,
    CliResult,
    closed_port,
    json_out,
    one_error_line,
    service_for,
)

from aiocrypt import DecryptionError

ROWS = 240


def _answering(env: dict[str, str], cwd: Path, answer: str, *args: str) -> CliResult:
    """The command run with ``answer`` typed at its prompt."""
    return subprocess.run(
        [*COMMAND, *args],
        env=env,
        cwd=cwd,
        input=answer,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _key_ids(cli: Cli, *args: str) -> list[str]:
    return [k["key_id"] for k in json_out(cli("keys", "list", *args, "--json"))]


def _status(cli: Cli, key_id: str) -> str:
    return str(json_out(cli("keys", "show", key_id, "--json"))["status"])


@pytest.fixture
def table(postgres_dsn: str) -> Iterator[str]:
    name = f"cli_retire_{secrets.token_hex(5)}"
    yield name

    async def drop() -> None:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {name}; DROP TABLE IF EXISTS {name}_ckpt")
        finally:
            await conn.close()

    asyncio.run(drop())


def _fill(env: dict[str, str], dsn: str, table: str) -> str:
    """``ROWS`` pii tokens in ``table``; returns one more token kept outside it."""

    async def fill() -> str:
        async with service_for(env) as svc:
            rows = [
                (i, await svc.encrypt_field(f"{i:03d}-55-0000", "pii", context=f"{table}.ssn"))
                for i in range(1, ROWS + 1)
            ]
            outside = await svc.encrypt_field("outside", "pii", context=f"{table}.ssn")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, ssn text)")
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", rows)
        finally:
            await conn.close()
        return outside

    return asyncio.run(fill())


def _decrypts(env: dict[str, str], token: str, context: str) -> bool:
    async def read() -> bool:
        async with service_for(env) as svc:
            try:
                await svc.decrypt_field(token, "pii", context=context)
            except DecryptionError:
                return False
            return True

    return asyncio.run(read())


def test_retire_destroys_v1_after_a_full_reencryption_and_refuses_while_a_row_uses_it(
    cli: Cli, cli_env: dict[str, str], postgres_dsn: str, table: str
) -> None:
    outside = _fill(cli_env, postgres_dsn, table)
    env = {"ENCRYPTION_POSTGRES_DSN": postgres_dsn}
    spec = ["--table", table, "--column", "ssn:pii"]
    [v1] = _key_ids(cli, "--type", "pii")
    v2 = json_out(cli("keys", "rotate", "pii", "--force", "--json"))["active_key"]["key_id"]

    refused = cli("keys", "retire", v1, *spec, "--yes", env=env)
    assert refused.returncode == 1
    assert f"key {v1}: the census counts {ROWS} rows on it" in one_error_line(refused)
    # half moved: still refused, naming what is left, even with --confirm-unreferenced
    partly = cli(
        "reencrypt",
        *spec,
        "--checkpoint-table",
        f"{table}_ckpt",
        "--batch-size",
        "100",
        "--max-batches",
        "1",
        env=env,
    )
    assert partly.returncode == 0, partly.stderr
    refused = cli("keys", "retire", v1, *spec, "--confirm-unreferenced", "--yes", env=env)
    assert refused.returncode == 1
    assert f"census counts {ROWS - 100} rows" in one_error_line(refused)
    assert _status(cli, v1) == "decrypt_only"

    done = cli("reencrypt", *spec, "--checkpoint-table", f"{table}_ckpt", env=env)
    assert done.returncode == 0, done.stderr
    dry = json_out(cli("keys", "retire", v1, *spec, "--dry-run", "--json", env=env))
    assert dry["dry_run"] is True and [k["key_id"] for k in dry["keys"]] == [v1]
    assert dry["keys"][0]["reason"] == "retired: census shows no rows"
    assert (dry["min_decryption_version_before"], dry["min_decryption_version"]) == (1, 2)
    assert _status(cli, v1) == "decrypt_only"  # the dry run changed nothing
    assert _decrypts(cli_env, outside, f"{table}.ssn")

    retired = cli("keys", "retire", v1, *spec, "--yes", env=env)
    assert retired.returncode == 0, retired.stderr
    assert (
        f"destroyed {v1} (version 1, decrypt_only): retired: census shows no rows" in retired.stdout
    )
    assert "pii: minimum decryption version 1 -> 2" in retired.stdout
    shown = json_out(cli("keys", "show", v1, "--json"))
    assert shown["status"] == "destroyed" and shown["has_material"] is False
    assert json_out(cli("keys", "min-version", "pii", "--json"))["min_decryption_version"] == 2
    assert not _decrypts(cli_env, outside, f"{table}.ssn")  # data the census did not see
    census = json_out(cli("census", *spec, "--json", env=env))
    assert [e["key_id"] for e in census["tables"][0]["columns"]["ssn"]] == [v2]


def test_retire_dry_run_prompt_and_the_active_key(
    cli: Cli, cli_env: dict[str, str], tmp_path: Path
) -> None:
    assert cli("keys", "generate", "pii").returncode == 0
    [v1] = _key_ids(cli, "--type", "pii")
    v2 = json_out(cli("keys", "rotate", "pii", "--force", "--json"))["active_key"]["key_id"]

    no_census = cli("keys", "retire", v1, "--yes")
    assert no_census.returncode == 2 and "pass --confirm-unreferenced" in no_census.stderr
    active = cli("keys", "retire", v2, "--confirm-unreferenced", "--yes")
    assert active.returncode == 1
    assert f"key {v2} is the active pii key: rotate first" in one_error_line(active)
    dry = cli("keys", "retire", v1, "--confirm-unreferenced", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would destroy {v1} (version 1, decrypt_only): confirmed unreferenced" in dry.stdout
    assert _status(cli, v1) == "decrypt_only"

    declined = _answering(cli_env, tmp_path, "n\n", "keys", "retire", v1, "--confirm-unreferenced")
    assert declined.returncode == 1 and f"Destroy {v1} now?" in declined.stderr
    assert _status(cli, v1) == "decrypt_only"
    accepted = _answering(cli_env, tmp_path, "y\n", "keys", "retire", v1, "--confirm-unreferenced")
    assert accepted.returncode == 0, accepted.stderr
    assert f"destroyed {v1}" in accepted.stdout and _status(cli, v1) == "destroyed"


def test_a_typo_key_type_is_retired_with_no_new_version(cli: Cli) -> None:
    typo_declared = {"ENCRYPTION_KEY_TYPES": "financal_data"}
    assert cli("keys", "generate", "pii").returncode == 0
    assert cli("keys", "generate", "financal_data", env=typo_declared).returncode == 0
    assert cli("keys", "rotate", "financal_data", "--force", env=typo_declared).returncode == 0
    typo_keys = _key_ids(cli, "--type", "financal_data")
    before = _key_ids(cli)
    assert len(typo_keys) == 2

    declared = cli("keys", "retire-type", "pii", "--confirm-unreferenced", "--yes")
    assert "pii is a declared key type" in one_error_line(declared)
    still_declared = cli(
        "keys", "retire-type", "financal_data", "--confirm-unreferenced", "--yes", env=typo_declared
    )
    assert "financal_data is a declared key type" in one_error_line(still_declared)
    assert _key_ids(cli) == before
    refused = cli("keys", "retire-type", "financal_data", "--yes")
    assert refused.returncode == 2 and "--confirm-unreferenced" in refused.stderr
    dry = json_out(
        cli("keys", "retire-type", "financal_data", "--confirm-unreferenced", "--dry-run", "--json")
    )
    assert dry["type_retired"] and sorted(k["key_id"] for k in dry["keys"]) == typo_keys
    assert [_status(cli, k) for k in typo_keys] == ["decrypt_only", "active"]

    retired = json_out(
        cli("keys", "retire-type", "financal_data", "--confirm-unreferenced", "--yes", "--json")
    )
    assert sorted(k["key_id"] for k in retired["keys"]) == typo_keys
    assert {k["reason"] for k in retired["keys"]} == {"confirmed unreferenced"}
    assert _key_ids(cli) == before  # no new version was made
    assert [_status(cli, k) for k in typo_keys] == ["destroyed", "destroyed"]
    assert _key_ids(cli, "--type", "financal_data", "--status", "active") == []
    assert _key_ids(cli, "--type", "pii", "--status", "active") != []
    again = cli("keys", "retire-type", "financal_data", "--confirm-unreferenced", "--yes")
    assert "every financal_data key is already destroyed" in one_error_line(again)


def test_min_version_shows_and_raises_only_when_unreferenced(cli: Cli) -> None:
    assert cli("keys", "generate", "pii").returncode == 0
    [v1] = _key_ids(cli, "--type", "pii")
    assert cli("keys", "rotate", "pii", "--force").returncode == 0
    shown = cli("keys", "min-version", "pii")
    assert shown.returncode == 0 and shown.stdout.strip() == "pii: minimum decryption version 1"

    no_census = cli("keys", "min-version", "pii", "2", "--yes")
    assert no_census.returncode == 2 and "--confirm-unreferenced" in no_census.stderr
    above = cli("keys", "min-version", "pii", "3", "--confirm-unreferenced", "--yes")
    assert above.returncode == 1 and "above the active version 2" in one_error_line(above)
    raised = cli("keys", "min-version", "pii", "2", "--confirm-unreferenced", "--yes")
    assert raised.returncode == 0, raised.stderr
    assert raised.stdout.strip() == "pii: minimum decryption version 1 -> 2"
    assert json_out(cli("keys", "show", v1, "--json"))["decrypt_disabled"] is True
    assert json_out(cli("keys", "min-version", "pii", "--json")) == {
        "key_type": "pii",
        "min_decryption_version": 2,
        "changed": False,
    }


def test_cleanup_confirm_of_an_unexpired_key_says_why_it_stays(cli: Cli) -> None:
    assert cli("keys", "generate", "financial_data").returncode == 0
    [v1] = _key_ids(cli, "--type", "financial_data")
    assert cli("keys", "rotate", "financial_data", "--force").returncode == 0
    [v2] = _key_ids(cli, "--type", "financial_data", "--status", "active")
    out = cli("keys", "cleanup", "--confirm", v1, "--confirm", v2)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    [line1] = [line for line in lines if v1 in line.split(":")[0]]
    assert line1.startswith(f"kept      {v1}: not past max age + grace (until ")
    assert f"to retire it now, 'aiocrypt keys retire {v1}'" in line1
    assert any(
        line.startswith(f"kept      {v2}: the active financial_data key is never destroyed")
        for line in lines
    )
    assert "no key is past its grace period" not in out.stdout
    assert _status(cli, v1) == "decrypt_only"


def test_retire_with_the_census_database_down_is_one_line_and_changes_nothing(cli: Cli) -> None:
    assert cli("keys", "generate", "pii").returncode == 0
    [v1] = _key_ids(cli, "--type", "pii")
    assert cli("keys", "rotate", "pii", "--force").returncode == 0
    dsn = f"postgresql://root:sekrit@127.0.0.1:{closed_port()}/test"
    down = cli(
        "keys",
        "retire",
        v1,
        "--table",
        "t",
        "--column",
        "ssn:pii",
        "--yes",
        env={"ENCRYPTION_POSTGRES_DSN": dsn},
    )
    assert down.returncode == 4
    line = one_error_line(down)
    assert "cannot reach the PostgreSQL database" in line and "ENCRYPTION_POSTGRES_DSN" in line
    assert "sekrit" not in down.stderr + down.stdout
    assert _status(cli, v1) == "decrypt_only"
