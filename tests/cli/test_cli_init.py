"""``aiocrypt init``: a master key in a 0600 file and a config file, never printed unasked."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from cli_helpers import clean_environ, one_error_line, run_cli

from aiocrypt import EncryptionConfig
from aiocrypt._config import decode_master_key


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_private_key_file_and_a_config_and_prints_no_key(tmp_path: Path) -> None:
    env = clean_environ()
    result = run_cli(env, tmp_path, "init")
    assert result.returncode == 0, result.stderr
    key_file = tmp_path / ".aiocrypt" / "master.key"
    config_file = tmp_path / "config" / "encryption.json"
    assert _mode(key_file) == 0o600 and _mode(key_file.parent) == 0o700
    key = key_file.read_text().strip()
    assert len(decode_master_key(key)) == 32
    assert key not in result.stdout + result.stderr
    assert 'export ENCRYPTION_MASTER_KEY="$(cat .aiocrypt/master.key)"' in result.stdout
    settings = json.loads(config_file.read_text())
    assert settings["algorithm"] == "AES_256_GCM"
    loaded = EncryptionConfig.from_env(
        {"ENCRYPTION_MASTER_KEY": key,
         "ENCRYPTION_KEY_STORAGE_PATH": str(tmp_path / ".aiocrypt" / "keys.json")},
        config_file=config_file)
    assert loaded.validate() == []
    assert loaded.rotation_policies == EncryptionConfig().rotation_policies

    # what it wrote is a working setup: the default store path lives beside the key
    ready = {**env, "ENCRYPTION_MASTER_KEY": key}
    doctor = run_cli(ready, tmp_path, "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    generated = run_cli(ready, tmp_path, "keys", "generate", "pii", "--json")
    assert json.loads(generated.stdout)["key_type"] == "pii"
    assert _mode(tmp_path / ".aiocrypt" / "keys.json") == 0o600


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    env = clean_environ()
    assert run_cli(env, tmp_path, "init").returncode == 0
    key_file = tmp_path / ".aiocrypt" / "master.key"
    first = key_file.read_text()
    again = run_cli(env, tmp_path, "init")
    assert again.returncode == 1
    assert "already exist" in one_error_line(again) and "--force" in again.stderr
    assert key_file.read_text() == first
    forced = run_cli(env, tmp_path, "init", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    out = json.loads(forced.stdout)
    assert "master_key" not in out and out["key_file"] == ".aiocrypt/master.key"
    assert key_file.read_text() != first and _mode(key_file) == 0o600


def test_init_prints_the_key_only_when_asked_and_warns(tmp_path: Path) -> None:
    env = clean_environ()
    shown = run_cli(env, tmp_path, "init", "--show-key", "--print-export",
                    "--key-file", "secrets/mk", "--config-file", "cfg.json")
    assert shown.returncode == 0, shown.stderr
    key = (tmp_path / "secrets" / "mk").read_text().strip()
    assert shown.stdout.splitlines().count(key) == 1
    assert f"export ENCRYPTION_MASTER_KEY={key}" in shown.stdout
    assert "warning" in shown.stderr and key not in shown.stderr
    assert (tmp_path / "cfg.json").is_file()

    lost = run_cli(env, tmp_path, "init", "--no-key-file", "--force")
    assert lost.returncode == 2 and "--show-key" in lost.stderr
