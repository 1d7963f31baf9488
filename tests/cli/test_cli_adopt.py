"""`aiocrypt keys adopt`: the one explicit step that seals a store written by 0.1.0.

The store is tests/vectors/legacy_store/keys.json, written by aiocrypt 0.1.0
(commit e543e0e, see generate.py there), opened by the real command.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

from cli_helpers import Cli, one_error_line

LEGACY = Path(__file__).parent.parent / "vectors" / "legacy_store"


def test_keys_adopt_seals_a_legacy_store_once(cli: Cli, cli_env: dict[str, str]) -> None:
    meta = json.loads((LEGACY / "meta.json").read_text())
    path = Path(cli_env["ENCRYPTION_KEY_STORAGE_PATH"])
    shutil.copy(LEGACY / "keys.json", path)
    os.chmod(path, 0o600)
    env = {
        "ENCRYPTION_MASTER_KEY": base64.b64encode(bytes.fromhex(meta["master_key_hex"])).decode(
            "ascii"
        )
    }

    refused = cli("keys", "list", env=env)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    # the error line, after the log line and the audit event of the refusal
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "keys adopt" in errors[0]
    assert '"event":"keystore_integrity_failure"' in refused.stderr

    adopted = cli("keys", "adopt", "--yes", env=env)
    assert adopted.returncode == 0, adopted.stderr
    assert "sealed the key store" in adopted.stdout
    for key_id, status in meta["statuses"].items():
        assert f"{key_id}  {status}" in adopted.stdout

    listed = cli("keys", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert {k["key_id"]: k["status"] for k in json.loads(listed.stdout)} == meta["statuses"]

    again = cli("keys", "adopt", "--yes", "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["already_sealed"] is True


def test_keys_adopt_refuses_a_store_the_master_key_does_not_open(
    cli: Cli, cli_env: dict[str, str]
) -> None:
    path = Path(cli_env["ENCRYPTION_KEY_STORAGE_PATH"])
    shutil.copy(LEGACY / "keys.json", path)
    os.chmod(path, 0o600)
    result = cli("keys", "adopt", "--yes")  # the fixture's fresh master key: not this store's
    assert result.returncode != 0
    line = one_error_line(result)
    assert "master key" in line or "KEK" in line
