"""``init``, ``doctor``, ``subjects`` and the command's error handling, run in-process with
click's ``CliRunner`` (fast; the subprocess tests beside this file run unmeasured).

Each test has a fresh master key and a file key store under ``tmp_path``, handed to the
command through ``invoke(env=...)``; the working directory is ``tmp_path`` (the project).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import Run, closed_port, error_line, json_of, new_master_key, service_for
from click.testing import Result
from redis.asyncio import Redis

from aiocrypt._cli_setup import default_key_file

STORE_VAR = "ENCRYPTION_KEY_STORAGE_PATH"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _lines(result: Result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.strip()]


# -- init ------------------------------------------------------------------------------


def test_init_refuses_options_that_would_lose_the_key_or_contradict(
    run: Run, tmp_path: Path
) -> None:
    lost = run("init", "--no-key-file")
    assert lost.exit_code == 2
    assert "--no-key-file needs --show-key or --print-export" in lost.stderr
    both = run("init", "--key-in-project", "--key-file", "k")
    assert both.exit_code == 2
    assert "--key-in-project and --key-file are exclusive" in both.stderr
    assert not (tmp_path / "config").exists() and not (tmp_path / "xdg").exists()


def test_init_makes_the_default_key_directory_private_and_keeps_what_exists(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default key directory is the user's own: made 0700 even when it already
    existed with a looser mode; a second init without --force changes nothing."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    key_file = default_key_file()
    key_file.parent.mkdir(parents=True, mode=0o755)
    key_file.parent.chmod(0o755)
    result = run("init")
    assert result.exit_code == 0, result.output
    assert _mode(key_file) == 0o600 and _mode(key_file.parent) == 0o700
    key = key_file.read_text()
    assert key.strip() not in result.output
    assert result.stdout.splitlines() == [
        f"created {key_file} (the master key, mode 0600: keep it secret, back it up)",
        "created config/encryption.json",
        "next:",
        f"  export ENCRYPTION_MASTER_KEY_FILE={key_file}",
        "  aiocrypt doctor",
    ]
    again = run("init")
    assert again.exit_code == 1
    assert error_line(again) == (
        f"error: config/encryption.json, {key_file} already exist(s); use --force to overwrite"
    )
    assert key_file.read_text() == key


def test_init_key_file_in_another_git_tree_is_ignored_there_and_doctor_warns(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --key-file outside the project but inside a git work tree still gets its
    .gitignore (appended to the one there); doctor warns about the file all the same,
    and about its mode once loosened."""
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "secrets").mkdir()
    (repo / "secrets" / ".gitignore").write_text("*.log")  # no final newline
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    key_file = repo / "secrets" / "mk"
    shown = run("init", "--key-file", str(key_file), "--show-key")
    assert shown.exit_code == 0, shown.output
    key = key_file.read_text().strip()
    gitignore = repo / "secrets" / ".gitignore"
    assert gitignore.read_text() == "*.log\n# the aiocrypt master key: never commit it\n/mk\n"
    assert shown.stdout.splitlines() == [
        f"created {key_file} (the master key, mode 0600: keep it secret, back it up)",
        f"wrote {gitignore}: git ignores mk (the key is inside the project: keep it out "
        "of images and backups of the project too)",
        "created config/encryption.json",
        key,
    ]
    assert "warning: the master key is printed on stdout" in shown.stderr
    assert key not in shown.stderr

    key_file.chmod(0o644)
    doctor = run("doctor", "--key-file", str(key_file))
    assert doctor.exit_code == 0, doctor.output  # warnings, not failures
    lines = _lines(doctor)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    [warned] = [line for line in lines if line.startswith("WARN")]
    assert warned == (
        f"WARN  master key file {key_file}: readable by group/others (mode 0644): run "
        f"chmod 600 on it; inside the git work tree {repo}: move it out of the project "
        f"(aiocrypt init puts it in {default_key_file().parent})"
    )
    # the config file init wrote in the project is found without ENCRYPTION_CONFIG_FILE
    assert lines[0] == "ok    configuration: backend file, settings from config/encryption.json"
    assert key not in doctor.output


# -- doctor ----------------------------------------------------------------------------


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of its own in Redis db 15, its keys deleted afterwards."""
    prefix = f"aiocrypt-test-{secrets.token_hex(6)}:"
    yield prefix

    async def delete() -> None:
        client = Redis.from_url(redis_url)
        try:
            async for name in client.scan_iter(match=f"{prefix}*"):
                await client.delete(name)
        finally:
            await client.aclose()

    asyncio.run(delete())


def test_doctor_passes_over_a_redis_store_with_postgres_reachable(
    run: Run, redis_url: str, redis_prefix: str, postgres_dsn: str
) -> None:
    env = {
        "ENCRYPTION_KEY_STORAGE_BACKEND": "redis",
        "ENCRYPTION_REDIS_URL": redis_url,
        "ENCRYPTION_REDIS_KEY_PREFIX": redis_prefix,
        "ENCRYPTION_AUDIT_DSN": postgres_dsn,
    }
    result = run("doctor", env=env)
    assert result.exit_code == 0, result.output
    lines = _lines(result)
    assert [line.split()[0] for line in lines] == ["ok"] * 5, lines
    assert lines[0] == "ok    configuration: backend redis, settings from defaults (no config file)"
    assert lines[1].startswith("ok    KEK provider: local KEK local")
    # a Redis store has no file whose mode could be loose: no warning appended
    assert lines[2].startswith("ok    key store: redis: 0 keys readable and authentic")
    assert lines[3].startswith("ok    Redis redis://127.0.0.1") and "PING ok (Redis " in lines[3]
    assert lines[4].startswith("ok    PostgreSQL postgresql://postgres@127.0.0.1")
    assert "connected (PostgreSQL " in lines[4]


def test_doctor_warns_on_a_loose_key_store_and_fails_on_a_wrong_master_key(
    run: Run, tmp_path: Path
) -> None:
    store = tmp_path / "store" / "keys.json"
    assert run("keys", "generate", "pii").exit_code == 0
    assert _mode(store) == 0o600
    quiet = run("doctor")
    assert quiet.exit_code == 0, quiet.output
    assert f"ok    key store: file {store}: 1 keys readable and authentic" in quiet.stdout
    assert "WARN" not in quiet.stdout

    store.chmod(0o644)
    loose = run("doctor")
    assert loose.exit_code == 0, loose.output
    [warned] = [line for line in _lines(loose) if line.startswith("WARN")]
    assert warned.startswith(f"WARN  key store: file {store}: 1 keys readable and authentic")
    assert warned.endswith(f"; {STORE_VAR}: {store} has mode 0644: run chmod 600 on it")

    other = new_master_key()
    wrong = run("doctor", env={"ENCRYPTION_MASTER_KEY": other})
    assert wrong.exit_code == 1, wrong.output
    [failed] = [line for line in _lines(wrong) if line.startswith("FAIL")]
    assert failed.startswith("FAIL  key store: ")
    assert other not in wrong.output


def test_doctor_skips_the_services_behind_settings_that_do_not_validate(
    run: Run, tmp_path: Path
) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    result = run("doctor", env={STORE_VAR: f"{a_file}/"})
    assert result.exit_code == 3, result.output
    assert _lines(result) == [
        f"FAIL  configuration: {STORE_VAR}: {a_file} is not a directory",
        "skip  KEK provider: skipped: the configuration is invalid",
        "skip  key store: skipped: the configuration is invalid",
    ]
    as_json = json.loads(run("doctor", "--json", env={STORE_VAR: f"{a_file}/"}).stdout)
    assert as_json["ok"] is False and as_json["exit_code"] == 3


def test_doctor_reports_a_key_store_directory_it_cannot_write(run: Run, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        locked.chmod(0o500)
    else:  # root writes anywhere but on a read-only mount, which /proc/sys often is
        locked = Path("/proc/sys")
        if os.access(locked, os.W_OK | os.X_OK):
            pytest.skip("no directory here that root cannot write")
    result = run("doctor", env={STORE_VAR: str(locked / "keys.json")})
    assert result.exit_code == 3, result.output
    assert _lines(result)[0] == (
        f"FAIL  configuration: {STORE_VAR}: directory {locked} is not writable by this "
        "process (the key store writes keys.json and its lock files there)"
    )


def test_doctor_names_the_variable_of_each_service_that_does_not_answer(run: Run) -> None:
    port = closed_port()
    env = {
        "ENCRYPTION_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "ENCRYPTION_POSTGRES_DSN": f"postgresql://app:s3cret-pw@127.0.0.1:{port}/test",
    }
    result = run("doctor", "--timeout", "3", env=env)
    assert result.exit_code == 4, result.output
    failed = [line for line in _lines(result) if line.startswith("FAIL")]
    assert len(failed) == 2, result.stdout
    redis_line, pg_line = failed
    assert redis_line.startswith(f"FAIL  Redis redis://127.0.0.1:{port}/0: ConnectionError: ")
    assert redis_line.endswith("(check ENCRYPTION_REDIS_URL)")
    assert pg_line.startswith(f"FAIL  PostgreSQL postgresql://app:***@127.0.0.1:{port}/test: ")
    assert pg_line.endswith("(check ENCRYPTION_POSTGRES_DSN)")
    assert "s3cret-pw" not in result.output


# -- errors of any command -------------------------------------------------------------


@pytest.fixture
def models_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], str]]:
    """Writes a ``--models`` module in the working directory whose import runs the given
    statement (a ``raise``), and returns its name."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    names: list[str] = []

    def write(raise_statement: str) -> str:
        name = f"failing_models_{secrets.token_hex(4)}"
        (tmp_path / f"{name}.py").write_text(f"{raise_statement}\n")
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_an_unexpected_error_is_one_line_with_its_type_and_a_traceback_under_debug(
    run: Run, models_module: Callable[[str], str]
) -> None:
    module = models_module("raise RuntimeError('the models are broken')")
    plain = run("census", "--models", module)
    assert plain.exit_code == 1, plain.output
    assert plain.stderr.strip() == "error: RuntimeError: the models are broken"
    debug = run("--debug", "census", "--models", module)
    assert debug.exit_code == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == "error: RuntimeError: the models are broken"


def test_an_interrupted_command_exits_130_and_says_it_can_resume(
    run: Run, models_module: Callable[[str], str]
) -> None:
    """Ctrl-C while the command works (here: while it imports the models)."""
    result = run("census", "--models", models_module("raise KeyboardInterrupt"))
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == (
        "error: interrupted (anything checkpointed is kept: run the command again to resume)"
    )


# -- subjects --------------------------------------------------------------------------


def test_subjects_stats_forget_and_rewrap_in_text_and_json(
    run: Run, cli_vars: dict[str, str | None]
) -> None:
    env = {k: v for k, v in cli_vars.items() if v is not None}

    async def write() -> None:
        async with service_for(env) as svc:
            await svc.encrypt_field("ada@example.com", "pii", subject="user:42")
            await svc.encrypt_field("bob@example.com", "pii", subject="user:7")

    asyncio.run(write())
    [old] = [k["key_id"] for k in json_of(run("keys", "list", "--json"))]
    table = run("subjects", "stats")
    assert table.exit_code == 0, table.output
    assert "wrapping key" in table.stdout and "subject keys" in table.stdout
    [row] = [line for line in table.stdout.splitlines() if old in line]
    assert [cell.strip() for cell in row.split("│")[1:-1]] == [old, "pii", "1", "active", "2"]

    declined = run("subjects", "forget", "user:42", input="n\n")
    assert declined.exit_code == 1
    assert "Destroy every key of this subject?" in declined.stderr
    assert error_line(declined) == "error: not confirmed: nothing was changed"
    [still] = json_of(run("subjects", "stats", "--json"))
    assert still["subject_keys"] == 2

    forgotten = json_of(run("subjects", "forget", "user:42", "--yes", "--json"))
    assert forgotten["forgotten"] is True and forgotten["key_types"] == ["pii"]
    assert len(forgotten["subject_key_ids"]) == 1 and forgotten["tombstone"] is False
    assert "user:42" not in json.dumps(forgotten)

    new = json_of(run("keys", "rotate", "pii", "--force", "--json"))["active_key"]["key_id"]
    moved = run("subjects", "rewrap")
    assert moved.exit_code == 0, moved.output
    assert moved.stdout.strip() == (
        f"pii: 1 subject keys rewrapped under {new} in 1 batches; 0 left on older keys"
    )
    assert json_of(run("subjects", "rewrap", "--key-type", "pii", "--json")) == [
        {
            "key_type": "pii",
            "wrapping_key_id": new,
            "rewrapped": 0,
            "batches": 0,
            "remaining": {old: 0},
        }
    ]
