"""``aiocrypt doctor``: one line per check, and the documented exit code; a master key file
inside a git work tree or readable by others is a warning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import Cli, closed_port, json_out


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


def test_doctor_passes_on_a_good_config_with_reachable_services(
    cli: Cli, redis_url: str, postgres_dsn: str
) -> None:
    assert cli("keys", "generate", "pii").returncode == 0
    env = {"ENCRYPTION_REDIS_URL": redis_url, "ENCRYPTION_AUDIT_DSN": postgres_dsn}
    result = cli("doctor", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result.stdout)
    assert [line.split()[0] for line in lines] == ["ok"] * 5
    assert any("key store: file" in line and "1 keys" in line for line in lines)
    assert any(line.startswith("ok    Redis redis://127.0.0.1") for line in lines)
    assert any("PostgreSQL postgresql://" in line and "connected" in line for line in lines)
    checks = json_out(cli("doctor", "--json", env=env))
    assert checks["ok"] is True and checks["exit_code"] == 0 and len(checks["checks"]) == 5


def test_doctor_fails_with_exit_3_on_a_missing_master_key(cli: Cli) -> None:
    result = cli("doctor", env={"ENCRYPTION_MASTER_KEY": ""})
    assert result.returncode == 3
    lines = _lines(result.stdout)
    assert lines[0].startswith("FAIL  configuration: ENCRYPTION_MASTER_KEY is missing")
    assert "aiocrypt init" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["skip", "skip"]
    assert "Traceback" not in result.stderr
    as_json = json.loads(cli("doctor", "--json", env={"ENCRYPTION_MASTER_KEY": ""}).stdout)
    assert as_json["exit_code"] == 3 and as_json["checks"][0]["ok"] is False


def test_doctor_fails_with_exit_4_when_redis_or_postgres_is_unreachable(cli: Cli) -> None:
    port = closed_port()
    redis = cli("doctor", env={"ENCRYPTION_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    assert redis.returncode == 4, redis.stdout
    failed = [line for line in _lines(redis.stdout) if line.startswith("FAIL")]
    assert len(failed) == 1 and f"Redis redis://127.0.0.1:{port}/0" in failed[0]
    assert "onnect" in failed[0]  # the reason, in one line
    assert failed[0].endswith("(check ENCRYPTION_REDIS_URL)")

    dsn = f"postgresql://app:s3cret-pw@127.0.0.1:{port}/test"
    pg = cli("doctor", "--timeout", "3", env={"ENCRYPTION_POSTGRES_DSN": dsn})
    assert pg.returncode == 4, pg.stdout
    failed = [line for line in _lines(pg.stdout) if line.startswith("FAIL")]
    assert len(failed) == 1 and "PostgreSQL postgresql://app:***@127.0.0.1" in failed[0]
    assert failed[0].endswith("(check ENCRYPTION_POSTGRES_DSN)")
    assert "s3cret-pw" not in pg.stdout + pg.stderr


def test_doctor_reports_an_unreadable_key_store(cli: Cli) -> None:
    assert cli("keys", "generate", "pii").returncode == 0
    import base64
    import os

    other = base64.b64encode(os.urandom(32)).decode("ascii")
    result = cli("doctor", env={"ENCRYPTION_MASTER_KEY": other})
    assert result.returncode == 1
    failed = [line for line in _lines(result.stdout) if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL  key store:")
    assert other not in result.stdout + result.stderr


def test_doctor_warns_for_a_master_key_file_in_a_git_work_tree_or_readable_by_others(
    cli: Cli, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = {"HOME": str(tmp_path / "home")}
    (tmp_path / ".git").mkdir()  # the command's cwd is now a git work tree
    assert cli("init", "--key-in-project", env=home).returncode == 0
    in_tree = tmp_path / ".aiocrypt" / "master.key"
    outside = tmp_path_factory.mktemp("elsewhere") / "master.key"  # not in the work tree
    outside.write_text("not read by doctor\n")
    outside.chmod(0o644)

    result = cli("doctor", "--key-file", str(outside), env=home)
    assert result.returncode == 0, result.stdout + result.stderr  # warnings, not failures
    warned = [line for line in _lines(result.stdout) if line.startswith("WARN")]
    assert warned == [
        f"WARN  master key file {in_tree}: inside the git work tree {tmp_path}: move it out "
        f"of the project (aiocrypt init puts it in {_default_dir(tmp_path)})",
        f"WARN  master key file {outside}: readable by group/others (mode 0644): run chmod "
        "600 on it",
    ]
    assert "not read by doctor" not in result.stdout + result.stderr
    checks = json_out(cli("doctor", "--json", "--key-file", str(outside), env=home))["checks"]
    assert sum(c["warning"] for c in checks) == 2 and all(c["ok"] for c in checks)

    outside.chmod(0o600)
    (tmp_path / ".git").rmdir()
    quiet = cli("doctor", "--key-file", str(outside), env=home)
    assert "WARN" not in quiet.stdout and quiet.returncode == 0


def _default_dir(project: Path) -> Path:
    """init's default key directory for ``project`` with HOME at ``project/home``."""
    import hashlib

    digest = hashlib.sha256(os.fsencode(project.resolve())).hexdigest()[:8]
    return project / "home" / ".config" / "aiocrypt" / f"{project.name}-{digest}"
