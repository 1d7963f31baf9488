"""``aiocrypt subjects forget | rewrap | stats``, run as an operator runs them, over the
file key store the application (a library service here) writes subject keys to."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cli_helpers import COMMAND, Cli, json_out, one_error_line, service_for

from aiocrypt import DecryptionError, DecryptionFailure, KeyType

PII = KeyType.PII


async def test_forget_rewrap_and_stats(cli: Cli, cli_env: dict[str, str], tmp_path: Path) -> None:
    async with service_for(cli_env) as svc:
        mine = await svc.encrypt_field("ada@example.com", PII, subject="user:42")
        other = await svc.encrypt_field("bob@example.com", PII, subject="user:7")
    old = json_out(cli("keys", "list", "--type", "pii", "--json"))[0]["key_id"]
    stats = json_out(cli("subjects", "stats", "--key-type", "pii", "--json"))
    assert stats == [
        {
            "wrapping_key_id": old,
            "key_type": "pii",
            "version": 1,
            "status": "active",
            "subject_keys": 2,
        }
    ]

    # without --yes it asks; "n" changes nothing
    refused = subprocess.run(
        [*COMMAND, "subjects", "forget", "user:42"],
        env=cli_env,
        cwd=tmp_path,
        input="n\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "not confirmed" in refused.stderr
    out = json_out(
        cli(
            "subjects",
            "forget",
            "user:42",
            "--key-type",
            "pii",
            "--yes",
            "--actor",
            "dpo",
            "--json",
        )
    )
    assert out["forgotten"] and len(out["subject_key_ids"]) == 1
    assert "user:42" not in str(out)
    async with service_for(cli_env) as svc:
        try:
            await svc.decrypt_field(mine, PII)
            raise AssertionError("a forgotten subject's value decrypted")
        except DecryptionError as exc:
            assert exc.reason is DecryptionFailure.SUBJECT_FORGOTTEN
        assert await svc.decrypt_field(other, PII) == "bob@example.com"

    cli("keys", "rotate", "pii", "--force")
    retire = cli("keys", "retire", old, "--confirm-unreferenced", "--yes")
    assert "subject keys" in one_error_line(retire)
    done = json_out(cli("subjects", "rewrap", "--key-type", "pii", "--json"))
    assert done[0]["rewrapped"] == 1 and done[0]["remaining"] == {old: 0}
    assert cli("keys", "retire", old, "--confirm-unreferenced", "--yes").returncode == 0
    async with service_for(cli_env) as svc:
        assert await svc.decrypt_field(other, PII) == "bob@example.com"
