"""``aiocrypt jobs`` with the queue's Redis down, in this process (the unmeasured CLI
processes of tests/cli/test_cli_operator_errors.py ran it): the variable it came from
is named, the password hidden. ``jobs status --json`` without a job id is in
test_arq_paths.py, beside the other ``jobs status`` tests."""

from __future__ import annotations

import secrets
import socket

import pytest
from click.testing import CliRunner

from aiocrypt.cli import main as cli_main

PASSWORD = "s3cret-pw-" + secrets.token_hex(4)


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("variable", ["ENCRYPTION_REDIS_URL", "ENCRYPTION_ARQ_REDIS_URL"])
def test_jobs_status_with_the_queue_redis_down_names_the_variable_it_came_from(
    variable: str, clean_env: None
) -> None:
    """Exit 4 (unreachable), one line: the URL with its password hidden and the variable
    to check, the one the URL was read from (the ARQ one when both are set)."""
    port = _closed_port()
    url = f"redis://app:{PASSWORD}@127.0.0.1:{port}/0"
    env = {variable: url}
    if variable == "ENCRYPTION_ARQ_REDIS_URL":  # it wins over the general one
        env["ENCRYPTION_REDIS_URL"] = "redis://127.0.0.1:6379/15"
    result = CliRunner().invoke(cli_main, ["jobs", "status"], env=env)
    assert result.exit_code == 4, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(
        f"error: cannot reach the job queue's Redis at redis://app:***@127.0.0.1:{port}/0 "
        f"(check {variable}): "
    )
    assert "onnect" in lines[0]  # the reason is kept: "Error 111 connecting to ..."
    assert PASSWORD not in result.output
