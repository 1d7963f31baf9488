"""examples/sqlalchemy_models.py runs end to end on SQLite and on Postgres."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sqlalchemy_models.py"


def _run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCRYPTION_")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_example_runs(database: str, request: pytest.FixtureRequest) -> None:
    args = [] if database == "sqlite" else [str(request.getfixturevalue("postgres_dsn"))]
    out = _run(*args)
    assert "income=50000.0 ssn='123-45-6789'" in out
    assert "reading alice: decryption failed" in out and "primary key 1" in out
    assert "987-65-4321" not in out
    assert "ssn 123 45 6789 -> ['alice']" in out
    assert "(old index version still matches)" in out
    assert "2 rows re-encrypted" in out
    assert "alice still reads back: 50000.0 123-45-6789" in out
