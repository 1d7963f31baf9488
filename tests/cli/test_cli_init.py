"""``aiocrypt init``: a master key in a 0600 file outside the project (or inside it with a
.gitignore, when asked) and a config file; the key is never printed unasked."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from cli_helpers import clean_environ, one_error_line, run_cli

from aiocrypt import EncryptionConfig
from aiocrypt._config import decode_master_key


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _home_env(tmp_path: Path) -> dict[str, str]:
    """The command's environment with HOME (and so ~/.config) under ``tmp_path``."""
    env = clean_environ()
    env.pop("XDG_CONFIG_HOME", None)
    env["HOME"] = str(tmp_path / "home")
    return env


def _key_files(home: Path) -> list[Path]:
    return sorted((home / ".config" / "aiocrypt").glob("*/master.key"))


def test_init_writes_the_key_outside_the_project_and_prints_no_key(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)  # a git work tree: the key must not land in it
    env = _home_env(tmp_path)
    result = run_cli(env, project, "init")
    assert result.returncode == 0, result.stderr
    [key_file] = _key_files(tmp_path / "home")
    assert key_file.parent.name.startswith("project-")
    assert not (project / ".aiocrypt" / "master.key").exists()
    assert not list(project.rglob("master.key"))
    config_file = project / "config" / "encryption.json"
    assert _mode(key_file) == 0o600 and _mode(key_file.parent) == 0o700
    key = key_file.read_text().strip()
    assert len(decode_master_key(key)) == 32
    assert key not in result.stdout + result.stderr
    assert f"export ENCRYPTION_MASTER_KEY_FILE={key_file}" in result.stdout
    settings = json.loads(config_file.read_text())
    assert settings["algorithm"] == "AES_256_GCM"
    loaded = EncryptionConfig.from_env(
        {
            "ENCRYPTION_MASTER_KEY": key,
            "ENCRYPTION_KEY_STORAGE_PATH": str(project / ".aiocrypt" / "keys.json"),
        },
        config_file=config_file,
    )
    assert loaded.validate() == []
    assert loaded.rotation_policies == EncryptionConfig().rotation_policies

    # what it wrote is a working setup, with the next step it printed: the default key
    # store's directory is there and the key file is read where it lies
    ready = {**env, "ENCRYPTION_MASTER_KEY_FILE": str(key_file)}
    doctor = run_cli(ready, project, "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert (
        f"ok    master key file {key_file}: mode 0600, outside any git work tree" in doctor.stdout
    )
    generated = run_cli(ready, project, "keys", "generate", "pii", "--json")
    assert json.loads(generated.stdout)["key_type"] == "pii"
    assert _mode(project / ".aiocrypt" / "keys.json") == 0o600


def test_init_honours_xdg_config_home(tmp_path: Path) -> None:
    env = {**_home_env(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    out = json.loads(run_cli(env, tmp_path, "init", "--json").stdout)
    key_file = Path(out["key_file"])
    assert key_file.parent.parent == tmp_path / "xdg" / "aiocrypt"
    assert _mode(key_file) == 0o600 and out["gitignore"] is None


def test_init_key_in_project_writes_a_gitignore_and_says_so(tmp_path: Path) -> None:
    env = _home_env(tmp_path)
    result = run_cli(env, tmp_path, "init", "--key-in-project")
    assert result.returncode == 0, result.stderr
    key_file = tmp_path / ".aiocrypt" / "master.key"
    assert _mode(key_file) == 0o600 and _mode(key_file.parent) == 0o700
    assert "/master.key" in (tmp_path / ".aiocrypt" / ".gitignore").read_text().splitlines()
    assert "wrote .aiocrypt/.gitignore: git ignores master.key" in result.stdout
    assert "export ENCRYPTION_MASTER_KEY_FILE=.aiocrypt/master.key" in result.stdout
    assert not (tmp_path / "home").exists()
    both = run_cli(env, tmp_path, "init", "--key-in-project", "--key-file", "k", "--force")
    assert both.returncode == 2 and "exclusive" in both.stderr


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    env = _home_env(tmp_path)
    assert run_cli(env, tmp_path, "init").returncode == 0
    [key_file] = _key_files(tmp_path / "home")
    first = key_file.read_text()
    again = run_cli(env, tmp_path, "init")
    assert again.returncode == 1
    assert "already exist" in one_error_line(again) and "--force" in again.stderr
    assert key_file.read_text() == first
    forced = run_cli(env, tmp_path, "init", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    out = json.loads(forced.stdout)
    assert "master_key" not in out and out["key_file"] == str(key_file)
    assert key_file.read_text() != first and _mode(key_file) == 0o600


def test_init_prints_the_key_only_when_asked_and_warns(tmp_path: Path) -> None:
    env = _home_env(tmp_path)
    shown = run_cli(
        env,
        tmp_path,
        "init",
        "--show-key",
        "--print-export",
        "--key-file",
        "secrets/mk",
        "--config-file",
        "cfg.json",
    )
    assert shown.returncode == 0, shown.stderr
    key = (tmp_path / "secrets" / "mk").read_text().strip()
    # a --key-file inside the project gets its .gitignore too
    assert "/mk" in (tmp_path / "secrets" / ".gitignore").read_text().splitlines()
    assert shown.stdout.splitlines().count(key) == 1
    assert f"export ENCRYPTION_MASTER_KEY={key}" in shown.stdout
    assert "warning" in shown.stderr and key not in shown.stderr
    assert (tmp_path / "cfg.json").is_file()

    lost = run_cli(env, tmp_path, "init", "--no-key-file", "--force")
    assert lost.returncode == 2 and "--show-key" in lost.stderr
