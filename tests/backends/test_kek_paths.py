"""KEK provider paths the contract does not reach: validation, error translation, observers.

Each test drives a provider into one branch (a bad argument, a refusal the
service gives, a malformed answer, an observer that fails) and checks what the
caller sees there: the error type, its message and whether it is retryable.
AWS runs on moto, Vault on the loopback Transit server (tests/kms_servers);
a server-side fault is injected the way test_kek_providers.py does it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import pytest

from aiocrypt import ConfigurationError, EncryptionConfig, KekProviderError
from aiocrypt.kek import LocalKekProvider
from aiocrypt.kek._base import observe_kek_calls, unobserve_kek_calls
from aiocrypt.kek._retry import RetryPolicy

from .conftest import FAST_RETRY, build_case

CONTEXT = {"aiocrypt_key_id": "pii-v1-0a0b0c0d", "aiocrypt_key_type": "pii"}
DEK = bytes(range(32))
ONE_TRY = RetryPolicy(attempts=1, call_timeout=5.0, total_timeout=5.0)


# -- observers, retry policy, local KEK ------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def kek_call_finished(self, backend: str, operation: str, outcome: str, seconds: float) -> None:
        self.seen.append((backend, operation, outcome))


class _Broken:
    def kek_call_finished(self, backend: str, operation: str, outcome: str, seconds: float) -> None:
        raise RuntimeError("observer is down")


async def test_a_failing_observer_is_logged_and_never_breaks_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = LocalKekProvider.generate()
    broken, recorder = _Broken(), _Recorder()
    observe_kek_calls(broken)
    observe_kek_calls(recorder)
    try:
        with caplog.at_level(logging.ERROR, logger="aiocrypt.kek"):
            wrapped = await provider.wrap(DEK, CONTEXT)
            assert await provider.unwrap(wrapped, CONTEXT) == DEK
    finally:
        unobserve_kek_calls(broken)
        unobserve_kek_calls(recorder)
    failures = [r for r in caplog.records if "KEK call observer" in r.getMessage()]
    assert len(failures) == 2  # the wrap and the unwrap
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in failures)
    assert recorder.seen == [("local", "wrap", "ok"), ("local", "unwrap", "ok")]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"initial_delay": -0.1}, "delays cannot be negative"),
        ({"max_delay": -1.0}, "delays cannot be negative"),
        ({"call_timeout": 0.0}, "timeouts must be positive"),
        ({"total_timeout": -5.0}, "timeouts must be positive"),
    ],
)
def test_retry_policy_refuses_negative_delays_and_timeouts(
    kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("master_key", [b"\x00" * 31, b"\x00" * 33, "0" * 32])
def test_local_kek_needs_a_32_byte_master_key(master_key: Any) -> None:
    with pytest.raises(ValueError, match="the master key must be 32 bytes"):
        LocalKekProvider(master_key)


# -- AWS KMS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aws_arn(_moto: Any) -> str:
    """One KMS key for this module's AWS tests (a client costs ~0.3 s to build)."""
    import boto3  # type: ignore[import-untyped]

    kms = boto3.client("kms", **_moto.client_kwargs)
    try:
        return str(kms.create_key(Description="aiocrypt paths KEK")["KeyMetadata"]["Arn"])
    finally:
        kms.close()


@pytest.mark.parametrize(
    "key_id, kwargs, message",
    [
        ("", {}, "an AWS KMS key id, key ARN or alias is required"),
        ("alias/k", {"access_key_id": "AKIA"}, "go together"),
        ("alias/k", {"secret_access_key": "s"}, "go together"),
    ],
)
def test_aws_refuses_incomplete_settings(key_id: str, kwargs: dict[str, Any], message: str) -> None:
    from aiocrypt.kek.aws import AwsKmsKekProvider

    with pytest.raises(ValueError, match=message):
        AwsKmsKekProvider(key_id, **kwargs)


def test_aws_from_config_reports_half_credentials_as_configuration() -> None:
    from aiocrypt._factory import build_kek_provider

    config = EncryptionConfig(
        storage_backend="aws_kms", aws_kms_key_id="alias/k", aws_access_key_id="AKIA"
    )
    with pytest.raises(ConfigurationError, match=r"aws_kms backend: .*go together"):
        build_kek_provider(config)


async def test_aws_without_a_region_says_so_and_is_not_retried() -> None:
    from aiocrypt.kek.aws import AwsKmsKekProvider

    provider = AwsKmsKekProvider("alias/no-region", retry=FAST_RETRY)
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    assert "no region (set ENCRYPTION_AWS_REGION or use a key ARN)" in str(info.value)
    assert "aws-kms://alias/no-region" in str(info.value)
    assert not info.value.retryable
    assert provider._client is None  # nothing was built


def _no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """An environment where botocore's default credential chain finds nothing."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def test_aws_without_credentials_names_the_settings(
    moto_server: Any, aws_arn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from aiocrypt.kek.aws import AwsKmsKekProvider

    _no_aws_credentials(monkeypatch, tmp_path)
    provider = AwsKmsKekProvider(aws_arn, endpoint_url=moto_server.url, retry=FAST_RETRY)
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    assert "no usable AWS credentials (NoCredentialsError)" in str(info.value)
    assert "ENCRYPTION_AWS_ACCESS_KEY_ID" in str(info.value)
    assert not info.value.retryable
    assert moto_server.calls.total() == 0  # refused before any request left


async def test_aws_malformed_region_is_reported_with_botocore_words() -> None:
    from aiocrypt.kek.aws import AwsKmsKekProvider

    provider = AwsKmsKekProvider(
        "alias/k",
        region="us east 1",
        access_key_id="testing",
        secret_access_key="testing",
        retry=FAST_RETRY,
    )
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    message = str(info.value)
    assert message.startswith("AWS KMS key aws-kms://alias/k: kms:Encrypt failed: ")
    assert "InvalidRegionError: Provided region_name 'us east 1'" in message
    assert not info.value.retryable


class _BrokenKmsClient:
    """A caller's KMS client that fails with an error botocore would never raise."""

    def __init__(self) -> None:
        self.calls = 0

    async def encrypt(self, **params: Any) -> Any:
        self.calls += 1
        raise RuntimeError("s3cr3t detail")


async def test_aws_unexpected_client_error_is_not_retried_nor_echoed() -> None:
    from aiocrypt.kek.aws import AwsKmsKekProvider

    client = _BrokenKmsClient()
    provider = AwsKmsKekProvider("alias/k", client=client, retry=FAST_RETRY)
    with pytest.raises(KekProviderError) as info:
        await provider.wrap(DEK, CONTEXT)
    assert str(info.value) == (
        "AWS KMS key aws-kms://alias/k: kms:Encrypt failed unexpectedly (RuntimeError)"
    )
    assert not info.value.retryable
    assert client.calls == 1


async def test_aws_concurrent_first_calls_build_one_client(
    moto_server: Any, aws_arn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiobotocore.session import get_session as real_get_session

    import aiocrypt.kek.aws as aws

    sessions: list[Any] = []

    def counting_get_session() -> Any:
        sessions.append(real_get_session())
        return sessions[-1]

    monkeypatch.setattr(aws, "get_session", counting_get_session)
    provider = aws.AwsKmsKekProvider(
        aws_arn,
        access_key_id="testing",
        secret_access_key="testing",
        endpoint_url=moto_server.url,
        retry=FAST_RETRY,
    )
    try:
        # the first task yields once it holds the lock, so the others queue on it
        wrapped = await asyncio.gather(*(provider.wrap(DEK, CONTEXT) for _ in range(3)))
        assert await provider.unwrap(wrapped[2], CONTEXT) == DEK
    finally:
        await provider.close()
    assert len(sessions) == 1  # one client, built by the first task, taken by the others
    assert moto_server.calls["encrypt"] == 3


# -- Vault Transit -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key_name, kwargs, message",
    [
        ("", {"url": "http://v"}, "invalid transit key name"),
        ("a/b", {"url": "http://v"}, "invalid transit key name 'a/b'"),
        ("k", {"url": "http://v", "mount_point": "//"}, "the transit mount point cannot be empty"),
        ("k", {}, "a Vault client or a Vault URL is required"),
    ],
)
def test_vault_refuses_bad_settings(key_name: str, kwargs: dict[str, Any], message: str) -> None:
    from aiocrypt.kek.vault import VaultTransitKekProvider

    with pytest.raises(ValueError, match=message):
        VaultTransitKekProvider(key_name, **kwargs)


def test_vault_from_config_reports_a_bad_key_name_as_configuration() -> None:
    from aiocrypt._factory import build_kek_provider

    config = EncryptionConfig(
        storage_backend="vault",
        vault_url="http://127.0.0.1:8200",
        vault_token="t",
        vault_transit_key="team/kek",
    )
    with pytest.raises(ConfigurationError, match="vault backend: invalid transit key name"):
        build_kek_provider(config)


async def test_vault_with_a_caller_client_round_trips_and_leaves_it_open(
    vault_server: Any,
) -> None:
    import hvac

    from aiocrypt.kek.vault import VaultTransitKekProvider

    client = hvac.Client(url=vault_server.url, token=vault_server.token)
    provider = VaultTransitKekProvider(
        f"kek-{os.urandom(4).hex()}", client=client, retry=FAST_RETRY
    )
    try:
        assert provider.url == vault_server.url
        await provider.ensure_key()
        wrapped = await provider.wrap(DEK, CONTEXT)
        assert await provider.unwrap(wrapped, CONTEXT) == DEK
        pools = client.adapter.session.get_adapter(vault_server.url).poolmanager.pools
        assert len(pools) == 1
        await provider.close()
        assert len(pools) == 1  # the caller's connection pool was not closed
    finally:
        client.adapter.close()


async def test_vault_unknown_mount_points_at_the_mount(vault_server: Any) -> None:
    from aiocrypt.kek.vault import VaultTransitKekProvider

    provider = VaultTransitKekProvider(
        "kek", url=vault_server.url, token=vault_server.token, mount_point="nope", retry=FAST_RETRY
    )
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    message = str(info.value)
    assert "vault://nope/kek" in message and ": encrypt: not found (" in message
    assert "no handler for route" in message and "ENCRYPTION_VAULT_MOUNT_POINT" in message
    assert not info.value.retryable


async def test_vault_url_without_scheme_fails_unexpectedly_without_detail() -> None:
    from aiocrypt.kek.vault import VaultTransitKekProvider

    provider = VaultTransitKekProvider(
        "kek", url="vault.internal:8200", token="s3cr3t-token", retry=FAST_RETRY
    )
    try:
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(DEK, CONTEXT)
    finally:
        await provider.close()
    message = str(info.value)
    assert message.endswith("encrypt failed unexpectedly (InvalidSchema)"), message
    assert "s3cr3t" not in message
    assert not info.value.retryable


def _inject(vault_server: Any, monkeypatch: pytest.MonkeyPatch, operation: str, fault: Any) -> None:
    """Answer ``operation`` (encrypt / decrypt) with ``fault(real answer)`` (or its exception)."""
    real = vault_server._transit

    def transit(method: str, mount: str, rest: list[str], body: dict[str, Any]) -> Any:
        if rest and rest[0] == operation:  # the real server counts the call
            return fault(real(method, mount, rest, body))
        return real(method, mount, rest, body)

    monkeypatch.setattr(vault_server, "_transit", transit)


def _vault_error(vault_server: Any, status: int, *errors: str) -> Exception:
    VaultError = sys.modules[type(vault_server).__module__].VaultError
    error: Exception = VaultError(status, *errors)
    return error


async def test_vault_gateway_error_without_text_is_retried(
    vault_server: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    case = await build_case("vault", request)

    def bad_gateway(answer: Any) -> Any:
        raise _vault_error(vault_server, 502)  # a gateway in front of Vault, no error list

    _inject(vault_server, monkeypatch, "encrypt", bad_gateway)
    try:
        with pytest.raises(KekProviderError) as info:
            await case.provider.wrap(DEK, CONTEXT)
    finally:
        await case.provider.close()
    message = str(info.value)
    assert info.value.retryable
    assert "encrypt failed (BadGateway: " in message and "gave up after 3 attempts" in message
    assert vault_server.calls["encrypt"] == 3


async def test_vault_other_error_status_names_its_type(
    vault_server: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    case = await build_case("vault", request)

    def not_initialized(answer: Any) -> Any:
        raise _vault_error(vault_server, 501, "Vault is not initialized")

    _inject(vault_server, monkeypatch, "encrypt", not_initialized)
    try:
        with pytest.raises(KekProviderError) as info:
            await case.provider.wrap(DEK, CONTEXT)
    finally:
        await case.provider.close()
    assert str(info.value).endswith(
        "encrypt failed: VaultNotInitialized: Vault is not initialized"
    ), info.value
    assert not info.value.retryable
    assert vault_server.calls["encrypt"] == 1


@pytest.mark.parametrize("data", [None, {}, {"ciphertext": 12}])
async def test_vault_encrypt_answer_without_ciphertext_is_refused(
    vault_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    data: Any,
) -> None:
    case = await build_case("vault", request)
    _inject(vault_server, monkeypatch, "encrypt", lambda answer: (200, {**answer[1], "data": data}))
    try:
        with pytest.raises(KekProviderError) as info:
            await case.provider.wrap(DEK, CONTEXT)
    finally:
        await case.provider.close()
    assert str(info.value) == (
        f"Vault Transit key {case.provider.kek_id}: encrypt answered without 'ciphertext'"
    )
    assert not info.value.retryable


async def test_vault_decrypt_answer_with_bad_base64_is_refused(
    vault_server: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    case = await build_case("vault", request)
    wrapped = await case.provider.wrap(DEK, CONTEXT)
    _inject(
        vault_server,
        monkeypatch,
        "decrypt",
        lambda answer: (200, {**answer[1], "data": {"plaintext": "not base64!"}}),
    )
    try:
        with pytest.raises(KekProviderError) as info:
            await case.provider.unwrap(wrapped, CONTEXT)
    finally:
        await case.provider.close()
    assert str(info.value) == (
        f"Vault Transit key {case.provider.kek_id}: decrypt answered malformed plaintext"
    )
    assert not info.value.retryable


async def test_vault_refuses_a_wrapped_key_that_is_not_ascii(
    vault_server: Any, request: pytest.FixtureRequest
) -> None:
    case = await build_case("vault", request)
    try:
        with pytest.raises(KekProviderError, match="is not Vault ciphertext") as info:
            await case.provider.unwrap(b"vault:v1:\xff\xfe", CONTEXT)
    finally:
        await case.provider.close()
    assert not info.value.retryable
    assert vault_server.calls.total() == 0  # refused before asking Vault
