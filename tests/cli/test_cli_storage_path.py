"""ENCRYPTION_KEY_STORAGE_PATH as a directory (the seed's form) and what ``config validate``
checks: the path the store will really open, each problem naming the variable."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cli_helpers import COMMAND, CliResult, clean_environ, json_out, run_cli

from aiocrypt import EncryptionConfig, EncryptionService, KeyType
from aiocrypt._factory import build_key_manager

VAR = "ENCRYPTION_KEY_STORAGE_PATH"


def _env(storage_path: str) -> dict[str, str]:
    env = clean_environ()
    env.update(
        ENCRYPTION_MASTER_KEY=base64.b64encode(os.urandom(32)).decode("ascii"),
        ENCRYPTION_KEY_STORAGE_PATH=storage_path,
    )
    return env


def _validate(env: dict[str, str], cwd: Path, *prefix: str) -> CliResult:
    """``aiocrypt config validate --json``, run under ``prefix`` (a wrapper command)."""
    return subprocess.run(
        [*prefix, *COMMAND, "config", "validate", "--json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _problems(env: dict[str, str], cwd: Path, *prefix: str) -> list[str]:
    result = _validate(env, cwd, *prefix)
    assert result.returncode == 3, result.stdout + result.stderr
    problems: list[str] = json.loads(result.stdout)["problems"]
    return problems


async def test_a_directory_holds_keys_json_end_to_end(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir(mode=0o700)
    env = _env(str(keys_dir))

    validated = run_cli(env, tmp_path, "config", "validate")
    assert validated.returncode == 0 and "configuration OK" in validated.stdout, validated.stderr
    generated = json_out(run_cli(env, tmp_path, "keys", "generate", "pii", "--json"))
    store_file = keys_dir / "keys.json"
    assert stat.S_IMODE(store_file.stat().st_mode) == 0o600

    # the library, configured from the same environment, uses the same file
    config = EncryptionConfig.from_env(env)
    assert config.key_store_file() == store_file
    async with EncryptionService(build_key_manager(config, watch=False)) as service:
        token = await service.encrypt_field("4111 1111", KeyType.PII, context="cards.number")
        assert token.startswith(f"ac2.{generated['key_id']}")
        assert (
            await service.decrypt_field(token, KeyType.PII, context="cards.number") == "4111 1111"
        )

    listed = json_out(run_cli(env, tmp_path, "keys", "list", "--json"))
    assert [k["key_id"] for k in listed] == [generated["key_id"]]
    assert run_cli(env, tmp_path, "config", "validate").returncode == 0

    # a value ending in "/" names a directory even before it exists: validate says so
    missing = _problems(_env(str(tmp_path / "new") + "/"), tmp_path)
    assert missing == [
        f"{VAR}: directory {tmp_path / 'new'} does not exist: create it (mode "
        f"0700), or point {VAR} at an existing directory (keys.json is created "
        "inside it)"
    ]


def test_validate_reports_a_path_the_store_could_not_use(tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    assert _problems(_env(f"{a_file}/"), tmp_path) == [f"{VAR}: {a_file} is not a directory"]

    parent = tmp_path / "nowhere"
    problems = _problems(_env(str(parent / "keys.json")), tmp_path)
    assert len(problems) == 1 and problems[0].startswith(f"{VAR}: directory {parent} does not")

    blocked = tmp_path / "blocked"
    (blocked / "keys.json").mkdir(parents=True)
    assert _problems(_env(f"{blocked}/"), tmp_path) == [
        f"{VAR}: {blocked / 'keys.json'} is not a regular file"
    ]


def test_validate_reports_a_directory_the_process_cannot_write(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    env = _env(str(locked))
    if os.geteuid() != 0:
        locked.chmod(0o500)
        problems = _problems(env, tmp_path)
    else:  # root writes anywhere but on a read-only mount: make one in a mount namespace
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare(1) to make a read-only directory as root")
        script = (
            'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && shift && exec "$@"'
        )
        wrapper = ("unshare", "-m", "sh", "-c", script, str(locked), "-")
        probe = subprocess.run([*wrapper, "true"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            pytest.skip(f"no read-only bind mount here: {probe.stderr.strip()}")
        problems = _problems(env, tmp_path, *wrapper)
    assert problems == [
        f"{VAR}: directory {locked} is not writable by this process (the key "
        "store writes keys.json and its lock files there)"
    ]


def test_validate_opens_the_store_with_the_master_key_and_warns_on_its_mode(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    env = _env(str(keys_dir))
    assert run_cli(env, tmp_path, "keys", "generate", "pii").returncode == 0
    other = {**env, "ENCRYPTION_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
    problems = _problems(other, tmp_path)
    assert len(problems) == 1 and problems[0].startswith(f"{VAR}: key store {keys_dir}")
    assert "wrong ENCRYPTION_MASTER_KEY" in problems[0]
    assert other["ENCRYPTION_MASTER_KEY"] not in problems[0]

    (keys_dir / "keys.json").chmod(0o644)
    loose = run_cli(env, tmp_path, "config", "validate")
    assert loose.returncode == 0, loose.stderr
    assert f"warning: {VAR}: {keys_dir / 'keys.json'} has mode 0644: run chmod 600" in loose.stderr
    assert loose.stderr.count("0644") == 1, loose.stderr  # said once, not once per reader
    doctor = run_cli(env, tmp_path, "doctor")  # the store opens: a warning, as validate says
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert (
        f"WARN  key store: file {keys_dir / 'keys.json'}: 1 keys readable and authentic"
        in doctor.stdout
    )
    assert "has mode 0644: run chmod 600 on it" in doctor.stdout
    assert doctor.stderr.count("0644") <= 1, doctor.stderr
