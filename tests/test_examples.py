"""The demo and the examples run end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _examples_run_unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The processes started here run without coverage (``COVERAGE_PROCESS_CONFIG`` out
    of their environment): in-process tests measure what they run (docs/testing.md)."""
    monkeypatch.delenv("COVERAGE_PROCESS_CONFIG", raising=False)


def run(args: list[str], tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCRYPTION_")}
    result = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_demo_tells_the_whole_story(tmp_path: Path) -> None:
    out = run(["-m", "aiocrypt.demo", "--dir", str(tmp_path / "state")], tmp_path)
    assert "income 75000.0, savings Decimal('125000.50'), ssn '123-45-6789'" in out
    assert "finds ['alice']" in out
    assert "DecryptionError('decryption failed: token did not authenticate" in out
    assert "mode 0o600" in out
    assert "alice's income (written under v1) reads 75000.0" in out
    assert "2 rows re-encrypted" in out
    assert out.count("census: no rows left") == 2
    assert "the census does not cover it" in out
    assert "alice's data reads as ever: income 75000.0, ssn '123-45-6789'" in out
    assert "the old master key no longer opens the key store" in out
    assert out.rstrip().endswith("demo finished")
    raw = (tmp_path / "state" / "demo.sqlite3").read_bytes()
    assert b"123-45-6789" not in raw and b"75000" not in raw and b"125000.50" not in raw


def test_quickstart_example(tmp_path: Path) -> None:
    out = run([str(ROOT / "examples" / "quickstart.py")], tmp_path)
    assert "read:   123-45-6789" in out
    assert "cache:  ('report:42', {'total': 9})" in out


def test_cli_round_trip(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCRYPTION_")}
    key = subprocess.run(
        [sys.executable, "-m", "aiocrypt.cli", "new-master-key"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env.update(ENCRYPTION_MASTER_KEY=key, ENCRYPTION_KEY_STORAGE_PATH=str(tmp_path / "k.json"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aiocrypt.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert cli("config", "validate").stdout.strip() == "configuration OK"
    generated = cli("keys", "generate", "pii")
    assert generated.returncode == 0 and "is now the active pii key" in generated.stdout
    assert "not due" in cli("keys", "rotate", "pii").stdout
    assert "rotated" in cli("keys", "rotate", "pii", "--force").stdout
    listed = cli("keys", "list", "--json")
    assert listed.stdout.count('"key_type": "pii"') == 2
    assert "wrapped_key" not in listed.stdout and key not in listed.stdout
    shown = cli("config", "show").stdout
    assert key not in shown and '"master_key": "<set>"' in shown
    bad = cli("keys", "generate", "Bad Type")
    assert bad.returncode != 0 and "invalid key type" in bad.stderr
    env["ENCRYPTION_MASTER_KEY"] = "c2hvcnQ="
    invalid = cli("config", "validate")
    assert invalid.returncode == 3 and "32 bytes" in invalid.stderr


def test_gdpr_forget_example(tmp_path: Path, redis_url: str) -> None:
    out = run([str(ROOT / "examples" / "gdpr_forget.py")], tmp_path)
    assert "forgot user:1: 3 subject keys destroyed" in out
    assert "bob's email: bob@example.com" in out
    assert "alice's row: subject_forgotten at customers.email, primary key 1" in out
    assert "alice's orders: subject_forgotten" in out
    assert "alice's session: {}\nbob's session: {'user_id': 2}" in out
    assert "alice's cached profile: miss" in out
    assert "alice@example.com" not in out and "Rivoli" not in out
