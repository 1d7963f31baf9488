"""No password given in a URL reaches the output of any command.

The real ``aiocrypt`` command, with passwords in the userinfo and in the query
string (``?password=``, ``?sslpassword=``, ``?token=``), against an unreachable
port and against the real services (a Redis of the test's own that requires the
password; the shared PostgreSQL, whose trust authentication ignores it).
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest
from _private_services import PrivateRedis
from cli_helpers import Cli, CliResult, closed_port

#: distinct secrets, so a leak says which form leaked
USER_PW = "userinfo-pw-" + secrets.token_hex(6)
QUERY_PW = "query-pw-" + secrets.token_hex(6)
SSL_PW = "ssl-pw-" + secrets.token_hex(6)
TOKEN = "query-token-" + secrets.token_hex(6)
SECRETS = (USER_PW, QUERY_PW, SSL_PW, TOKEN)


def assert_clean(result: CliResult) -> str:
    out = result.stdout + result.stderr
    for value in SECRETS:
        assert value not in out, f"{value.rsplit('-', 1)[0]} leaked:\n{out}"
    assert "Traceback" not in out
    return out


def redis_urls(port: int) -> dict[str, str]:
    return {
        "ENCRYPTION_REDIS_URL": f"redis://:{USER_PW}@127.0.0.1:{port}/0",
        "ENCRYPTION_ARQ_REDIS_URL": f"redis://127.0.0.1:{port}/1?password={USER_PW}",
    }


def postgres_dsns(port: int) -> dict[str, str]:
    return {
        "ENCRYPTION_POSTGRES_DSN": f"postgresql://postgres:{USER_PW}@127.0.0.1:{port}/test?sslpassword={SSL_PW}",
        "ENCRYPTION_AUDIT_DSN": f"postgresql://postgres@127.0.0.1:{port}/test?password={QUERY_PW}",
    }


@pytest.fixture
def redis_with_password(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    subprocess.run(
        ["redis-cli", "-p", str(server.port), "CONFIG", "SET", "requirepass", USER_PW],
        check=True,
        capture_output=True,
    )
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.parametrize("json", [False, True])
def test_doctor_on_unreachable_services(cli: Cli, json: bool) -> None:
    port = closed_port()
    env = {**redis_urls(port), **postgres_dsns(port)}
    result = cli("doctor", "--timeout", "3", *(["--json"] if json else []), env=env)
    assert result.returncode == 4, result.stdout + result.stderr
    out = assert_clean(result)
    assert f"postgresql://postgres@127.0.0.1:{port}/test" in out  # ?password= removed
    assert f"redis://:***@127.0.0.1:{port}/0" in out


def test_doctor_on_the_real_services(cli: Cli, redis_with_password: PrivateRedis) -> None:
    env = {**redis_urls(redis_with_password.port), **postgres_dsns(5432)}
    result = cli("doctor", env=env)
    out = assert_clean(result)
    assert result.returncode == 0, out
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == ["ok"] * 7, out  # 3 + 2 Redis + 2 Postgres


@pytest.mark.parametrize("backend", ["redis", "postgres"])
def test_keys_list_on_an_unreachable_store(cli: Cli, backend: str) -> None:
    port = closed_port()
    env = {"ENCRYPTION_KEY_STORAGE_BACKEND": backend, **redis_urls(port), **postgres_dsns(port)}
    result = cli("keys", "list", "--json", env=env)
    assert result.returncode == 4, result.stdout + result.stderr
    assert_clean(result)


def test_keys_list_on_the_real_stores(cli: Cli, redis_with_password: PrivateRedis) -> None:
    for backend, port in (("redis", redis_with_password.port), ("postgres", 5432)):
        env = {
            "ENCRYPTION_KEY_STORAGE_BACKEND": backend,
            "ENCRYPTION_POSTGRES_SCHEMA": f"redact_{secrets.token_hex(4)}",
            **redis_urls(port),
            **postgres_dsns(port),
        }
        generated = cli("keys", "generate", "pii", "--json", env=env)
        assert generated.returncode == 0, assert_clean(generated)
        assert_clean(generated)
        listed = cli("keys", "list", "--json", env=env)
        assert listed.returncode == 0 and '"pii"' in listed.stdout, assert_clean(listed)
        assert_clean(listed)


def test_config_show_and_validate(cli: Cli) -> None:
    port = closed_port()
    env = {
        **redis_urls(port),
        **postgres_dsns(port),
        "ENCRYPTION_VAULT_URL": f"http://ops:{USER_PW}@127.0.0.1:{port}/?token={TOKEN}",
        "ENCRYPTION_AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}/?X-Amz-Security-Token={TOKEN}",
        "ENCRYPTION_GCP_ENDPOINT": f"http://127.0.0.1:{port}?access_key={TOKEN}",
    }
    for args in (
        ("config", "show"),
        ("config", "show", "--json"),
        ("config", "validate"),
        ("config", "validate", "--json"),
    ):
        result = cli(*args, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert_clean(result)
    shown = cli("config", "show", "--json", env=env).stdout
    assert f"http://ops:***@127.0.0.1:{port}/" in shown


def test_audit_verify_reencrypt_and_jobs_on_unreachable_services(cli: Cli) -> None:
    port = closed_port()
    env = {**redis_urls(port), **postgres_dsns(port)}
    dsn = f"postgresql://app:{USER_PW}@127.0.0.1:{port}/db?password={QUERY_PW}"
    for args in (
        ("audit", "verify"),
        ("audit", "verify", "--dsn", dsn),
        ("reencrypt", "--dsn", dsn, "--table", "t", "--column", "c:pii"),
        ("census", "--dsn", dsn, "--table", "t", "--column", "c:pii"),
        ("jobs", "status", "--json"),
    ):
        result = cli(*args, env=env)
        assert result.returncode == 4, (args, result.stdout + result.stderr)
        assert_clean(result)


def test_audit_verify_on_the_real_postgres(cli: Cli) -> None:
    env = postgres_dsns(5432)
    result = cli("audit", "verify", "--table", f"missing_{secrets.token_hex(4)}", env=env)
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert_clean(result)
