"""``aiocrypt keys ...`` against a real file key store, read back with the library."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

from cli_helpers import Cli, json_out, one_error_line, service_for


def _wrapped(env: dict[str, str]) -> dict[str, str]:
    doc = json.loads(Path(env["ENCRYPTION_KEY_STORAGE_PATH"]).read_text())
    return {k["key_id"]: k["wrapped_key"] for k in doc["keys"]}


def test_generate_rotate_list_show_as_json(cli: Cli, cli_env: dict[str, str]) -> None:
    generated = cli("keys", "generate", "pii", "--json")
    assert generated.returncode == 0, generated.stderr
    first = json.loads(generated.stdout)
    assert first["key_type"] == "pii" and first["version"] == 1 and first["status"] == "active"
    assert "wrapped_key" not in first and first["has_material"] is True

    not_due = json_out(cli("keys", "rotate", "pii", "--json"))
    assert not_due["rotated"] is False and not_due["active_key"]["key_id"] == first["key_id"]
    rotated = json_out(cli("keys", "rotate", "pii", "--force", "--json"))
    assert rotated["rotated"] is True and rotated["old_key_id"] == first["key_id"]
    second = rotated["active_key"]
    assert second["version"] == 2

    listed = json_out(cli("keys", "list", "--json"))
    assert [(k["key_id"], k["version"], k["status"]) for k in listed] == [
        (first["key_id"], 1, "decrypt_only"),
        (second["key_id"], 2, "active"),
    ]
    assert all("wrapped_key" not in k for k in listed)
    only_active = json_out(cli("keys", "list", "--status", "active", "--json"))
    assert [k["key_id"] for k in only_active] == [second["key_id"]]

    shown = cli("keys", "show", first["key_id"], "--json")
    assert json.loads(shown.stdout)["status_reason"] == "rotated (forced)"
    human = cli("keys", "show", first["key_id"])
    assert human.returncode == 0 and "decrypt_only" in human.stdout
    # no material, wrapped or not, in any output
    wrapped = _wrapped(cli_env)
    for output in (
        generated.stdout,
        shown.stdout,
        human.stdout,
        cli("keys", "list").stdout,
        cli("keys", "stats").stdout,
    ):
        assert not any(w and w[:16] in output for w in wrapped.values())
        assert cli_env["ENCRYPTION_MASTER_KEY"] not in output

    revoked = json_out(cli("keys", "revoke", first["key_id"], "--json"))
    assert revoked["status"] == "revoked"
    stats = json_out(cli("keys", "stats", "--json"))
    assert stats["total_keys"] == 2 and stats["by_status"]["revoked"] == 1


def test_rewrap_rewraps_every_dek_and_data_still_decrypts(
    cli: Cli, cli_env: dict[str, str]
) -> None:
    async def encrypt() -> tuple[str, str]:
        async with service_for(cli_env) as svc:
            return (
                await svc.encrypt_field("123-45-6789", "pii"),
                await svc.encrypt_field(42, "financial_data"),
            )

    tokens = asyncio.run(encrypt())
    before = _wrapped(cli_env)
    result = cli("keys", "rewrap", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rewrapped"] == 2
    after = _wrapped(cli_env)
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
    assert json_out(cli("keys", "rewrap", "--only-foreign", "--json"))["rewrapped"] == 0

    async def decrypt() -> list[Any]:
        async with service_for(cli_env) as svc:
            return [
                await svc.decrypt_field(tokens[0], "pii"),
                await svc.decrypt_field(tokens[1], "financial_data"),
            ]

    assert asyncio.run(decrypt()) == ["123-45-6789", 42]


def test_rewrap_moves_keys_off_a_previous_master_key(
    cli: Cli, cli_env: dict[str, str], tmp_path: Path
) -> None:
    # A Redis/Postgres-style situation on the file store: DEKs wrapped by an older
    # master key, the new one configured; --previous-key-env opens them.
    old_key = cli_env["ENCRYPTION_MASTER_KEY"]
    assert cli("keys", "generate", "session").returncode == 0
    new_key = base64.b64encode(os.urandom(32)).decode("ascii")
    env = {"ENCRYPTION_MASTER_KEY": new_key, "OLD_MASTER_KEY": old_key}
    refused = cli("keys", "list", env=env)
    assert refused.returncode == 1 and "KEK" in one_error_line(refused)
    moved = cli("keys", "rewrap", "--previous-key-env", "OLD_MASTER_KEY", "--json", env=env)
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["rewrapped"] == 1
    assert old_key not in moved.stdout + moved.stderr
    assert cli("keys", "list", "--json", env=env).returncode == 0
    assert cli("keys", "list").returncode == 1  # the old master key no longer opens the store


def test_errors_are_one_line_with_documented_exit_codes(cli: Cli, tmp_path: Path) -> None:
    missing = cli("keys", "list", env={"ENCRYPTION_MASTER_KEY": ""})
    assert missing.returncode == 3
    assert "ENCRYPTION_MASTER_KEY is missing" in one_error_line(missing)
    assert "aiocrypt init" in missing.stderr

    bad = cli("keys", "list", env={"ENCRYPTION_MASTER_KEY": "not-base64!"})
    assert bad.returncode == 3 and "not valid base64" in one_error_line(bad)
    assert "not-base64!" not in bad.stderr

    unknown = cli("keys", "show", "pii-v9-00000000")
    assert unknown.returncode == 1
    assert one_error_line(unknown) == "error: no key with id 'pii-v9-00000000'"
    debug = cli("--debug", "keys", "show", "pii-v9-00000000")
    assert (
        debug.returncode == 1 and "Traceback" in debug.stderr and "KeyNotFoundError" in debug.stderr
    )

    usage = cli("keys", "generate", "Not A Type")
    assert usage.returncode == 2 and "Usage:" in usage.stderr

    no_new_key = cli("keys", "rotate-master-key")
    assert no_new_key.returncode == 3
    assert one_error_line(no_new_key) == "error: ENCRYPTION_NEW_MASTER_KEY is not set"
