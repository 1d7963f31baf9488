"""The ``keys``, ``audit`` and ``config`` commands' own output, run in-process with click's
``CliRunner`` (fast; the subprocess tests in test_cli_*.py run unmeasured).

As in test_cli_paths.py: each test has a fresh master key and a file key store under
``tmp_path``, handed to the command through ``invoke(env=...)``; the working directory
is ``tmp_path``. The assertions are on what an operator reads: the text, the JSON, the
exit code, and the key store afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import asyncpg
import pytest
from cli_helpers import Run, error_line, json_of, new_master_key
from click.testing import Result

from aiocrypt.audit import AuditEvent
from aiocrypt.audit.postgres import PostgresAuditSink

LEGACY = Path(__file__).parent.parent / "vectors" / "legacy_store"


def _ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def _statuses(run: Run, env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    return {k["key_id"]: k["status"] for k in json_of(run("keys", "list", "--json", env=env))}


def _generate(run: Run, key_type: str = "pii") -> str:
    key_id: str = json_of(run("keys", "generate", key_type, "--json"))["key_id"]
    return key_id


def _rotate(run: Run, key_type: str = "pii") -> str:
    key_id: str = json_of(run("keys", "rotate", key_type, "--force", "--json"))["active_key"][
        "key_id"
    ]
    return key_id


# -- keys: reading -----------------------------------------------------------------------


def test_list_and_show_print_tables_of_metadata(run: Run, tmp_path: Path) -> None:
    first = _generate(run)
    second = _rotate(run)
    listed = _ok(run("keys", "list"))
    assert "key id" in listed and "expires" in listed
    rows = [line for line in listed.splitlines() if first in line or second in line]
    assert len(rows) == 2
    assert "decrypt_only" in rows[0] and first in rows[0]
    assert "active" in rows[1] and second in rows[1]
    shown = _ok(run("keys", "show", second))
    lines = {line.split("  ")[0]: line.split()[-1] for line in shown.splitlines() if line}
    assert lines["key id"] == second and lines["version"] == "2"
    assert lines["status"] == "active"
    assert lines["retired at"] == "-"  # None is shown as a dash
    assert lines["has material"] == "True"
    as_json = json_of(run("keys", "show", first, "--json"))
    assert as_json["key_id"] == first and as_json["status"] == "decrypt_only"
    assert "wrapped_key" not in as_json and as_json["has_material"] is True
    # metadata only: no wrapped key in either output
    store = json.loads((tmp_path / "store" / "keys.json").read_text())
    for key in store["keys"]:
        assert key["wrapped_key"][:16] not in listed + shown


def test_stats_and_rotate_due_print_json(run: Run) -> None:
    key_id = _generate(run)
    stats = json_of(run("keys", "stats"))
    assert stats["total_keys"] == 1 and stats["active_keys"]["pii"]["key_id"] == key_id
    due = json_of(run("keys", "rotate-due"))
    assert due["rotated"] == [] and due["expired"] == []  # a new key is not due
    assert _statuses(run) == {key_id: "active"}


# -- keys: changing ----------------------------------------------------------------------


def test_rotate_says_whether_it_rotated(run: Run) -> None:
    first = _generate(run)
    not_due = _ok(run("keys", "rotate", "pii"))
    assert not_due.strip() == (
        f"pii: not due for rotation; {first} stays active (use --force to rotate anyway)"
    )
    rotated = _ok(run("keys", "rotate", "pii", "--force"))
    [second] = [k for k, s in _statuses(run).items() if s == "active"]
    assert rotated.strip() == f"pii: rotated {first} -> {second}"
    assert second != first


def test_revoke_as_json_and_compromise_as_text_name_the_next_step(run: Run) -> None:
    first = _generate(run)
    revoked = json_of(run("keys", "revoke", first, "--json"))
    assert revoked["key_id"] == first and revoked["status"] == "revoked"
    assert "wrapped_key" not in revoked
    second = _generate(run)
    compromised = run("keys", "compromise", second, "--reason", "leaked")
    assert _ok(compromised).splitlines() == [
        f"{second} is compromised; its data must be re-encrypted",
        f"next: aiocrypt reencrypt ... (or aiocrypt jobs reencrypt pii {second}, "
        "or pass --reencrypt)",
    ]
    assert _statuses(run)[second] == "compromised"


def test_compromise_reencrypt_as_json_prints_only_the_enqueued_job(
    run: Run, redis_url: str
) -> None:
    import redis

    queue = f"aiocrypt-paths-{secrets.token_hex(4)}"
    arq = {
        "ENCRYPTION_ARQ_REDIS_URL": redis_url,
        "ENCRYPTION_ARQ_QUEUE": queue,
        "ENCRYPTION_ARQ_PREFIX": queue,
    }
    key_id = _generate(run)
    client = redis.Redis.from_url(redis_url)
    try:
        args = ("keys", "compromise", key_id, "--reason", "leak", "--reencrypt", "--json")
        # --json: the enqueued job is the one JSON document (the key's own is not printed)
        assert json_of(run(*args, env=arq)) == {
            "enqueued": "reencrypt_data_with_new_key",
            "job_id": f"reencrypt-{key_id}",
        }
        assert client.zcard(queue) == 1
    finally:
        for name in client.scan_iter(f"*{queue}*"):
            client.delete(name)
        for name in client.scan_iter(f"arq:*{key_id}*"):
            client.delete(name)
        client.close()
    assert _statuses(run)[key_id] == "compromised"


def test_cleanup_says_what_it_kept_and_when_nothing_is_due(run: Run) -> None:
    nothing = run("keys", "cleanup")
    assert _ok(nothing).strip() == "no key is past its grace period"
    old = _generate(run, "financial_data")
    _rotate(run, "financial_data")
    kept = _ok(run("keys", "cleanup", "--confirm", old))
    assert kept.startswith(f"kept      {old}: not past max age + grace (until ")
    assert "no key is past its grace period" not in kept
    assert _statuses(run)[old] == "decrypt_only"


def test_retire_without_a_census_or_confirmation_is_a_usage_error(run: Run) -> None:
    old = _generate(run)
    _rotate(run)
    result = run("keys", "retire", old, "--yes")
    assert result.exit_code == 2
    assert "no census: name the data" in result.stderr
    assert "pass --confirm-unreferenced" in result.stderr
    assert _statuses(run)[old] == "decrypt_only"


def test_retire_shows_its_plan_before_asking_and_raises_the_minimum(run: Run) -> None:
    old = _generate(run)
    _rotate(run)
    declined = run("keys", "retire", old, "--confirm-unreferenced", input="n\n")
    assert declined.exit_code == 1
    # the plan (a dry run) is printed before the question
    assert declined.stdout.splitlines() == [
        f"would destroy {old} (version 1, decrypt_only): confirmed unreferenced",
        "pii: minimum decryption version 1 -> 2 (dry run: nothing changed)",
    ]
    assert f"Destroy {old} now?" in declined.stderr
    assert _statuses(run)[old] == "decrypt_only"
    accepted = run("keys", "retire", old, "--confirm-unreferenced", input="y\n")
    lines = _ok(accepted).splitlines()
    assert lines[-2:] == [
        f"destroyed {old} (version 1, decrypt_only): confirmed unreferenced",
        "pii: minimum decryption version 1 -> 2",
    ]
    assert _statuses(run)[old] == "destroyed"


def test_retire_type_destroys_every_key_of_a_mistaken_type(run: Run) -> None:
    typo = {"ENCRYPTION_KEY_TYPES": "payrol"}
    first = json_of(run("keys", "generate", "payrol", "--json", env=typo))["key_id"]
    second = json_of(run("keys", "rotate", "payrol", "--force", "--json", env=typo))["active_key"][
        "key_id"
    ]
    done = _ok(run("keys", "retire-type", "payrol", "--confirm-unreferenced", "--yes"))
    assert done.splitlines() == [
        f"destroyed {first} (version 1, decrypt_only): confirmed unreferenced",
        f"destroyed {second} (version 2, active): confirmed unreferenced",
        "payrol: minimum decryption version 1 -> 3",
        "payrol has no key left and none active; it is created again only if something "
        "encrypts with it",
    ]
    assert _statuses(run) == {first: "destroyed", second: "destroyed"}


def test_min_version_without_a_change_only_shows_it(run: Run) -> None:
    _generate(run)
    _rotate(run)
    assert _ok(run("keys", "min-version", "pii")).strip() == "pii: minimum decryption version 1"
    same = json_of(run("keys", "min-version", "pii", "1", "--json"))
    assert same == {"key_type": "pii", "min_decryption_version": 1, "changed": False}
    # the same version again asks nothing and changes nothing
    again = run("keys", "min-version", "pii", "1")
    assert _ok(again).strip() == "pii: minimum decryption version 1"


def test_rotate_master_key_without_the_new_key_and_then_as_text(run: Run) -> None:
    key_id = _generate(run)
    unset = run("keys", "rotate-master-key", "--new-key-env", "NO_SUCH_MASTER_KEY_VAR")
    assert unset.exit_code == 3
    assert error_line(unset) == "error: NO_SUCH_MASTER_KEY_VAR is not set"
    new_key = new_master_key()
    moved = _ok(run("keys", "rotate-master-key", "--new-key-env", "MK2", env={"MK2": new_key}))
    assert moved.startswith("rewrapped 1 keys under local")
    assert moved.rstrip().endswith("now set ENCRYPTION_MASTER_KEY to the value of MK2")
    assert new_key not in moved
    assert _statuses(run, {"ENCRYPTION_MASTER_KEY": new_key}) == {key_id: "active"}


def test_rewrap_moves_keys_off_a_previous_master_key(
    run: Run, cli_vars: dict[str, str | None]
) -> None:
    key_id = _generate(run, "session")
    old_key = cli_vars["ENCRYPTION_MASTER_KEY"]
    assert old_key is not None
    new = {"ENCRYPTION_MASTER_KEY": new_master_key(), "OLD_MASTER_KEY": old_key}
    refused = run("keys", "list", env=new)
    assert refused.exit_code == 1 and "KEK" in error_line(refused)
    moved = run("keys", "rewrap", "--previous-key-env", "OLD_MASTER_KEY", env=new)
    assert _ok(moved).startswith("rewrapped 1 keys under local:")
    assert old_key not in moved.output
    assert _statuses(run, new) == {key_id: "active"}
    assert run("keys", "list").exit_code == 1  # the old master key no longer opens it
    again = json_of(run("keys", "rewrap", "--only-foreign", "--json", env=new))
    assert again["rewrapped"] == 0 and again["kek_id"].startswith("local:")


def test_adopt_seals_a_legacy_store_once(run: Run, tmp_path: Path) -> None:
    meta = json.loads((LEGACY / "meta.json").read_text())
    path = tmp_path / "store" / "keys.json"
    shutil.copy(LEGACY / "keys.json", path)
    path.chmod(0o600)
    legacy_key = base64.b64encode(bytes.fromhex(meta["master_key_hex"])).decode("ascii")
    env = {"ENCRYPTION_MASTER_KEY": legacy_key}
    adopted = run("keys", "adopt", env=env, input="y\n")
    lines = _ok(adopted).splitlines()
    assert lines[0].startswith("Seal the key store as it is now")  # the question, answered
    assert lines[1].startswith("sealed the key store at revision ")
    assert lines[1].endswith("; keys as adopted:")
    assert sorted(lines[2:]) == sorted(f"  {k}  {s}" for k, s in meta["statuses"].items())
    assert _statuses(run, env) == meta["statuses"]
    again = _ok(run("keys", "adopt", "--yes", env=env))
    assert again.startswith("the key store is already sealed (revision ")
    assert again.rstrip().endswith("); verified")
    report = json_of(run("keys", "adopt", "--json", env=env))  # --json asks nothing
    assert report["already_sealed"] is True
    assert {k["key_id"]: k["status"] for k in report["keys"]} == meta["statuses"]


# -- audit ---------------------------------------------------------------------------------


@pytest.fixture
def audit_env(postgres_dsn: str) -> Iterator[tuple[str, dict[str, str | None]]]:
    """A fresh audit table name (dropped afterwards) and an HMAC key in ``AUDIT_HMAC_KEY``."""
    table = f"audit_paths_{secrets.token_hex(4)}"
    env: dict[str, str | None] = {
        "ENCRYPTION_AUDIT_DSN": postgres_dsn,
        "AUDIT_HMAC_KEY": base64.b64encode(os.urandom(32)).decode("ascii"),
    }
    try:
        yield table, env
    finally:

        async def drop() -> None:
            conn = await asyncpg.connect(postgres_dsn)
            try:
                await conn.execute(f"DROP TABLE IF EXISTS {table}, {table}_head")
            finally:
                await conn.close()

        asyncio.run(drop())


def _write_audit(dsn: str, table: str, key: bytes | None, events: int) -> None:
    async def write() -> None:
        sink = PostgresAuditSink(dsn, table=table, hmac_key=key)
        try:
            for n in range(events):
                await sink.emit(AuditEvent("policy_run", details={"n": n}))
        finally:
            await sink.close()

    asyncio.run(write())


def test_audit_verify_of_a_table_that_does_not_exist_fails(
    run: Run, audit_env: tuple[str, dict[str, str | None]]
) -> None:
    table, env = audit_env
    result = run("audit", "verify", "--table", table, env=env)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"- the audit table {table} (or {table}_head) does not exist" in result.stderr
    as_json = run("audit", "verify", "--table", table, "--json", env=env)
    assert as_json.exit_code == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and report["head"] is None and report["rows"] == 0


def test_audit_verify_and_upgrade_of_an_hmac_chain(
    run: Run, audit_env: tuple[str, dict[str, str | None]]
) -> None:
    table, env = audit_env
    assert env["AUDIT_HMAC_KEY"] is not None and env["ENCRYPTION_AUDIT_DSN"] is not None
    key = base64.b64decode(env["AUDIT_HMAC_KEY"])
    _write_audit(env["ENCRYPTION_AUDIT_DSN"], table, key, 3)
    keyed = ["--table", table, "--hmac-key-env", "AUDIT_HMAC_KEY"]
    verified = run("audit", "verify", *keyed, env=env)
    assert _ok(verified).startswith("audit chain OK (3 rows, hmac mode, head 3:")
    assert verified.stderr == ""
    report = json_of(run("audit", "verify", *keyed, "--json", env=env))
    assert report["ok"] is True and report["rows"] == 3 and report["head"].startswith("3:")
    assert report["problems"] == [] and report["warnings"] == []
    # an authenticated table is only verified by upgrade
    upgraded = json_of(run("audit", "upgrade", *keyed, "--json", env=env))
    assert upgraded["ok"] is True and upgraded["rows"] == 3
    assert env["AUDIT_HMAC_KEY"] not in verified.output


def test_audit_verify_warns_that_a_sha256_chain_is_not_keyed(
    run: Run, audit_env: tuple[str, dict[str, str | None]]
) -> None:
    table, env = audit_env
    assert env["ENCRYPTION_AUDIT_DSN"] is not None
    _write_audit(env["ENCRYPTION_AUDIT_DSN"], table, None, 2)
    upgraded = run("audit", "upgrade", "--table", table, env=env)
    assert _ok(upgraded).startswith("audit chain OK (2 rows, sha256 mode, head 2:")
    assert "warning: a SHA-256 chain is not keyed" in upgraded.stderr


def test_audit_hmac_key_variable_unset_or_not_base64(
    run: Run, audit_env: tuple[str, dict[str, str | None]]
) -> None:
    table, env = audit_env
    unset = run("audit", "verify", "--table", table, "--hmac-key-env", "NO_SUCH_AUDIT_KEY", env=env)
    assert unset.exit_code == 3
    assert error_line(unset) == (
        "error: --hmac-key-env: the environment variable NO_SUCH_AUDIT_KEY is not set"
    )
    bad = {**env, "AUDIT_HMAC_KEY": "not base64!"}
    garbled = run("audit", "upgrade", "--table", table, "--hmac-key-env", "AUDIT_HMAC_KEY", env=bad)
    assert garbled.exit_code == 3
    assert error_line(garbled) == "error: --hmac-key-env: AUDIT_HMAC_KEY is not valid base64"
    assert "not base64!" not in garbled.output


# -- config and new-master-key -----------------------------------------------------------


def test_config_show_marks_the_master_key_as_set(run: Run, cli_vars: dict[str, str | None]) -> None:
    shown = run("config", "show")
    settings = json_of(shown)
    assert settings["master_key"] == "<set>"
    assert settings["storage_path"] == cli_vars["ENCRYPTION_KEY_STORAGE_PATH"]
    assert str(cli_vars["ENCRYPTION_MASTER_KEY"]) not in shown.output


def test_config_validate_before_and_after_the_store_exists(run: Run, tmp_path: Path) -> None:
    assert _ok(run("config", "validate")).strip() == "configuration OK"  # no store yet
    _generate(run)
    assert json_of(run("config", "validate", "--json")) == {
        "ok": True,
        "problems": [],
        "warnings": [],
    }
    store = tmp_path / "store" / "keys.json"
    store.chmod(0o644)
    loose = run("config", "validate")
    assert _ok(loose).strip() == "configuration OK"
    assert f"warning: ENCRYPTION_KEY_STORAGE_PATH: {store} has mode 0644" in loose.stderr
    assert loose.stderr.count("0644") == 1


def test_config_validate_reports_a_master_key_that_does_not_open_the_store(
    run: Run, tmp_path: Path
) -> None:
    _generate(run)
    other = new_master_key()
    result = run("config", "validate", env={"ENCRYPTION_MASTER_KEY": other})
    assert result.exit_code == 3
    [problem] = [line for line in result.stderr.splitlines() if line.startswith("- ")]
    assert problem.startswith(f"- ENCRYPTION_KEY_STORAGE_PATH: key store {tmp_path / 'store'}")
    assert "wrong ENCRYPTION_MASTER_KEY" in problem
    assert other not in result.output
    assert "configuration OK" not in result.stdout


def test_config_validate_without_a_master_key_reports_it_as_json(run: Run) -> None:
    result = run("config", "validate", "--json", env={"ENCRYPTION_MASTER_KEY": None})
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert any("ENCRYPTION_MASTER_KEY" in p for p in report["problems"])


def test_config_validate_does_not_open_a_store_that_is_not_a_file(run: Run, redis_url: str) -> None:
    """A Redis store is not contacted by validate (doctor does that): nothing to open."""
    redis = {
        "ENCRYPTION_KEY_STORAGE_BACKEND": "redis",
        "ENCRYPTION_REDIS_URL": redis_url,
        "ENCRYPTION_REDIS_KEY_PREFIX": f"paths-{secrets.token_hex(4)}:",
    }
    assert _ok(run("config", "validate", env=redis)).strip() == "configuration OK"


def test_new_master_key_off_a_terminal_prints_only_the_key(run: Run) -> None:
    printed = run("new-master-key")
    assert printed.stderr == ""  # no terminal: no warning
    assert len(base64.b64decode(_ok(printed).strip(), validate=True)) == 32
    as_json = json_of(run("new-master-key", "--json"))
    assert len(base64.b64decode(as_json["master_key"], validate=True)) == 32
    assert as_json["master_key"] != printed.stdout.strip()
