"""``aiocrypt keys generate/rotate`` accept declared key types only (the real command)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

from cli_helpers import Cli, json_out

from aiocrypt import EncryptionConfig, EncryptionService, KeyManager
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore


def _stored_key_types(env: dict[str, str]) -> list[str]:
    """Key types of the records in the key store file (none when there is no file)."""
    path = Path(env["ENCRYPTION_KEY_STORAGE_PATH"])
    if not path.exists():
        return []
    return sorted(k["key_type"] for k in json.loads(path.read_text())["keys"])


def test_a_misspelt_key_type_exits_2_with_a_suggestion_and_creates_nothing(
    cli: Cli, cli_env: dict[str, str]
) -> None:
    for args in (
        ("keys", "generate", "financal_data"),
        ("keys", "rotate", "financal_data", "--force"),
        ("keys", "generate", "financal_data", "--json"),
        ("jobs", "rotate", "financal_data"),
        ("jobs", "reencrypt", "financal_data", "financial_data-v1-0"),
    ):
        result = cli(*args)
        assert result.returncode == 2, result.stderr
        assert "did you mean financial_data?" in result.stderr
        assert "ENCRYPTION_KEY_TYPES" in result.stderr
        assert result.stdout == "" and "Traceback" not in result.stderr
    assert _stored_key_types(cli_env) == []
    assert json_out(cli("keys", "generate", "financial_data", "--json"))["version"] == 1
    assert cli("keys", "generate", "financal_data").returncode == 2
    assert _stored_key_types(cli_env) == ["financial_data"]


def test_a_capitalised_key_type_suggests_the_lower_case_one(
    cli: Cli, cli_env: dict[str, str]
) -> None:
    result = cli("keys", "generate", "FINANCIAL_DATA")
    assert result.returncode == 2, result.stderr
    assert "invalid key type name 'FINANCIAL_DATA': did you mean financial_data?" in result.stderr
    assert _stored_key_types(cli_env) == []


def test_a_key_type_declared_in_the_environment(cli: Cli, cli_env: dict[str, str]) -> None:
    refused = cli("keys", "generate", "tax_ids")
    assert refused.returncode == 2 and "unknown key type 'tax_ids'" in refused.stderr
    declared = {"ENCRYPTION_KEY_TYPES": "tax_ids, case_notes"}
    key = json_out(cli("keys", "generate", "tax_ids", "--json", env=declared))
    assert key["key_type"] == "tax_ids" and key["version"] == 1
    rotated = json_out(cli("keys", "rotate", "tax_ids", "--force", "--json", env=declared))
    assert rotated["rotated"] is True and rotated["active_key"]["version"] == 2
    shown = json_out(cli("config", "show", "--json", env=declared))
    assert shown["key_types"] == ["case_notes", "tax_ids"]
    assert _stored_key_types(cli_env) == ["tax_ids", "tax_ids"]

    async def use() -> None:  # the application, declaring the same, uses the key made
        kek = LocalKekProvider(base64.b64decode(cli_env["ENCRYPTION_MASTER_KEY"]))
        config = EncryptionConfig.from_env({**cli_env, **declared})
        store = FileKeyStore(config.storage_path, kek)
        async with EncryptionService(KeyManager(store, kek, config, watch=False)) as service:
            token = await service.encrypt_field("AB123", "tax_ids", context="t.c")
            assert token.startswith(f"ac2.{rotated['active_key']['key_id']}.")
            assert await service.decrypt_field(token, "tax_ids", context="t.c") == "AB123"

    asyncio.run(use())


def test_a_key_type_declared_in_the_config_file(
    cli: Cli, cli_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "encryption.json").write_text(json.dumps({"key_types": ["case_notes"]}))
    key = json_out(cli("keys", "generate", "case_notes", "--json"))
    assert key["key_type"] == "case_notes"
    typo = cli("keys", "generate", "case_note")
    assert typo.returncode == 2 and "did you mean case_notes?" in typo.stderr
    assert '"key_types" in config/encryption.json' in typo.stderr
    assert _stored_key_types(cli_env) == ["case_notes"]
