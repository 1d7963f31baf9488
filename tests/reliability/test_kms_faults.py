"""KEK providers against a KMS that throttles, errors or stops answering.

The loopback Vault Transit and moto AWS KMS test servers (tests/kms_servers/)
answer with the real HTTP statuses and error bodies of the services: a fault
hook in front of their request handlers answers 429 / ThrottlingException,
500 / KMSInternalException, or holds the request without answering. The
providers talk to them with their real client libraries (hvac, aiobotocore).
A blackholed TCP proxy stands for a partition.

What must hold (aiocrypt/kek/_retry.py): throttles and 5xx are retried with
backoff and succeed when the service recovers within the budget; past the
budget the call fails with ``KekProviderError`` (retryable, saying it gave
up); refusals (403) are not retried; a silent service times out instead of
hanging. At the KeyManager level: an outage of the KMS loses no key, keeps
tokens decryptable from the DEK cache, and rotation works again once the
KMS is back.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from aiocrypt import EncryptionService, KekProviderError, KeyManager, KeyType
from aiocrypt.kek._retry import RetryPolicy
from aiocrypt.testing import MemoryKeyStore

try:  # rootdir on sys.path (python -m pytest)
    from tests import kms_servers
except ImportError:  # plain `pytest`: tests/ itself is on sys.path
    import kms_servers

pytest.importorskip("hvac")
pytest.importorskip("aiobotocore")
pytest.importorskip("moto")

#: Short waits; the shape of the default policy. call_timeout bounds one attempt: long
#: enough that an attempt on a loaded 2-core machine still reaches the test server (the
#: tests count the attempts the server saw); the hang tests give a short one of their own.
POLICY = RetryPolicy(
    attempts=3, initial_delay=0.02, max_delay=0.1, call_timeout=5.0, total_timeout=20.0
)
#: A guard against a hang; far above anything the policy allows (not a timing assert).
HANG_GUARD = 30.0


class FaultPlan:
    """What the next KMS key operations get: a queue of faults, then a default."""

    def __init__(self) -> None:
        self.queue: list[str | None] = []
        self.default: str | None = None
        self.injected: Counter[str] = Counter()
        #: Key operations that reached the service (faulted or not): "encrypt", "decrypt".
        self.seen: Counter[str] = Counter()
        self.hang_seconds = 3.0

    def next(self, operation: str) -> str | None:
        self.seen[operation] += 1
        fault = self.queue.pop(0) if self.queue else self.default
        if fault is not None:
            self.injected[fault] += 1
        return fault

    def clear(self) -> None:
        self.queue.clear()
        self.default = None


# -- Vault ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vault_server() -> Iterator[Any]:
    with kms_servers.start_vault_server() as server:
        yield server


@pytest.fixture
def vault(vault_server: Any) -> Iterator[tuple[Any, FaultPlan]]:
    """The Vault test server with a fault hook on transit encrypt/decrypt."""
    import importlib

    VaultError = importlib.import_module(f"{kms_servers.__name__}.vault").VaultError

    plan = FaultPlan()
    original = vault_server.handle

    def handle(method: str, path: str, query: Any, headers: Any, body: Any) -> Any:
        if "/encrypt/" in path or "/decrypt/" in path:
            fault = plan.next("encrypt" if "/encrypt/" in path else "decrypt")
            if fault == "429":
                raise VaultError(429, 'request path "transit/encrypt": rate limit quota exceeded')
            if fault == "500":
                raise VaultError(500, "internal error")
            if fault == "hang":
                time.sleep(plan.hang_seconds)
        return original(method, path, query, headers, body)

    vault_server.handle = handle
    vault_server.access_denied = False
    try:
        yield vault_server, plan
    finally:
        vault_server.handle = original
        vault_server.access_denied = False


async def _vault_provider(server: Any, policy: RetryPolicy = POLICY) -> Any:
    from aiocrypt.kek.vault import VaultTransitKekProvider

    provider = VaultTransitKekProvider(
        f"rel-{secrets.token_hex(4)}", url=server.url, token=server.token, retry=policy
    )
    await provider.ensure_key()
    return provider


CONTEXT = {"aiocrypt_key_id": "rel-test", "aiocrypt_key_type": "pii"}


async def test_vault_throttle_and_5xx_are_retried_until_success(vault: Any, summary: Any) -> None:
    """429 then 500 answers: the wrap is retried with backoff and succeeds on the third try;
    the wrapped key unwraps."""
    server, plan = vault
    provider = await _vault_provider(server)
    try:
        plan.queue = ["429", "500"]
        async with asyncio.timeout(HANG_GUARD):
            wrapped = await provider.wrap(b"k" * 32, CONTEXT)
        assert plan.seen["encrypt"] == 3
        plan.queue = ["429"]
        assert await provider.unwrap(wrapped, CONTEXT) == b"k" * 32
        assert plan.seen["decrypt"] == 2
    finally:
        await provider.close()
    summary(
        backend="vault",
        faults_injected=sum(plan.injected.values()),
        attempts=plan.seen["encrypt"] + plan.seen["decrypt"],
        errors=0,
    )


@pytest.mark.parametrize("fault", ["429", "500"])
async def test_vault_persistent_fault_gives_up_after_budget(
    vault: Any, fault: str, summary: Any
) -> None:
    """A KMS that keeps throttling (or failing with 500): KekProviderError after exactly
    ``attempts`` calls, marked retryable, saying it gave up; nothing hangs."""
    server, plan = vault
    provider = await _vault_provider(server)
    try:
        plan.default = fault
        async with asyncio.timeout(HANG_GUARD):
            with pytest.raises(KekProviderError) as info:
                await provider.wrap(b"k" * 32, CONTEXT)
    finally:
        await provider.close()
    assert info.value.retryable and info.value.backend == "vault"
    assert f"gave up after {POLICY.attempts} attempts" in str(info.value)
    assert plan.seen["encrypt"] == POLICY.attempts
    assert "k" * 32 not in str(info.value)
    summary(
        backend="vault",
        fault=fault,
        faults_injected=plan.injected[fault],
        error=type(info.value).__name__,
        attempts=plan.seen["encrypt"],
    )


async def test_vault_refusal_is_not_retried(vault: Any, summary: Any) -> None:
    """403 (permission denied) fails at once: one call, not retryable."""
    server, plan = vault
    provider = await _vault_provider(server)
    try:
        server.access_denied = True
        with pytest.raises(KekProviderError) as info:
            await provider.wrap(b"k" * 32, CONTEXT)
    finally:
        await provider.close()
    assert not info.value.retryable
    assert plan.seen["encrypt"] == 1
    summary(backend="vault", fault="403", attempts=1, error=type(info.value).__name__)


async def test_vault_that_never_answers_times_out(vault: Any, summary: Any) -> None:
    """A Vault that accepts the request and never answers: each attempt is cut at
    ``call_timeout`` and the call fails with KekProviderError instead of hanging."""
    server, plan = vault
    policy = RetryPolicy(
        attempts=2, initial_delay=0.01, max_delay=0.02, call_timeout=0.5, total_timeout=5.0
    )
    provider = await _vault_provider(server, policy)
    try:
        plan.default = "hang"
        plan.hang_seconds = 2.0
        started = time.monotonic()
        async with asyncio.timeout(HANG_GUARD):
            with pytest.raises(KekProviderError) as info:
                await provider.wrap(b"k" * 32, CONTEXT)
        elapsed = time.monotonic() - started
    finally:
        await provider.close()
    assert info.value.retryable
    assert plan.seen["encrypt"] == policy.attempts
    summary(
        backend="vault",
        fault="hang",
        faults_injected=plan.injected["hang"],
        error=type(info.value).__name__,
        attempts=plan.seen["encrypt"],
        seconds_to_fail=round(elapsed, 2),
    )


# -- AWS KMS (moto) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_server() -> Iterator[Any]:
    with kms_servers.start_moto_kms_server() as server:
        yield server


class _AwsFaults:
    """WSGI layer in front of moto answering KMS faults as AWS does."""

    def __init__(self, app: Callable[..., Iterable[bytes]], plan: FaultPlan) -> None:
        self.app, self.plan = app, plan

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target in ("TrentService.Encrypt", "TrentService.Decrypt"):
            fault = self.plan.next(target.split(".")[1].lower())
            if fault == "throttle":
                return self._answer(
                    start_response, "400 Bad Request", "ThrottlingException", "Rate exceeded"
                )
            if fault == "500":
                return self._answer(
                    start_response,
                    "500 Internal Server Error",
                    "KMSInternalException",
                    "internal error",
                )
            if fault == "hang":
                time.sleep(self.plan.hang_seconds)
        return self.app(environ, start_response)

    @staticmethod
    def _answer(start_response: Any, status: str, code: str, message: str) -> Iterable[bytes]:
        import json

        body = json.dumps({"__type": code, "message": message}).encode()
        start_response(
            status,
            [("Content-Type", "application/x-amz-json-1.1"), ("Content-Length", str(len(body)))],
        )
        return [body]


@pytest.fixture
def aws(moto_server: Any) -> Iterator[tuple[Any, FaultPlan]]:
    plan = FaultPlan()
    wsgi = moto_server._moto._server  # werkzeug server: handlers read .app per request
    original = wsgi.app
    wsgi.app = _AwsFaults(original, plan)
    try:
        yield moto_server, plan
    finally:
        wsgi.app = original


async def _aws_provider(
    server: Any, endpoint: str | None = None, policy: RetryPolicy = POLICY
) -> Any:
    from aiobotocore.session import get_session

    from aiocrypt.kek.aws import AwsKmsKekProvider

    async with get_session().create_client("kms", **server.client_kwargs) as kms:
        arn = str((await kms.create_key(Description="reliability"))["KeyMetadata"]["Arn"])
    return AwsKmsKekProvider(
        arn,
        access_key_id="testing",
        secret_access_key="testing",
        endpoint_url=endpoint or server.url,
        retry=policy,
    )


async def test_aws_throttling_is_retried_until_success(aws: Any, summary: Any) -> None:
    """ThrottlingException then KMSInternalException (500): retried, then the wrap succeeds
    and unwraps."""
    server, plan = aws
    provider = await _aws_provider(server)
    try:
        plan.seen.clear()
        plan.queue = ["throttle", "500"]
        async with asyncio.timeout(HANG_GUARD):
            wrapped = await provider.wrap(b"a" * 32, CONTEXT)
            assert await provider.unwrap(wrapped, CONTEXT) == b"a" * 32
    finally:
        await provider.close()
    assert plan.seen["encrypt"] == 3 and plan.seen["decrypt"] == 1
    summary(
        backend="aws_kms",
        faults_injected=sum(plan.injected.values()),
        attempts=plan.seen["encrypt"] + plan.seen["decrypt"],
        errors=0,
    )


@pytest.mark.parametrize("fault", ["throttle", "500"])
async def test_aws_persistent_fault_gives_up_after_budget(
    aws: Any, fault: str, summary: Any
) -> None:
    """Throttled (or 500) on every call: KekProviderError after ``attempts`` calls,
    retryable, naming the AWS error code."""
    server, plan = aws
    provider = await _aws_provider(server)
    try:
        plan.seen.clear()
        plan.default = fault
        async with asyncio.timeout(HANG_GUARD):
            with pytest.raises(KekProviderError) as info:
                await provider.wrap(b"a" * 32, CONTEXT)
    finally:
        await provider.close()
    code = "ThrottlingException" if fault == "throttle" else "KMSInternalException"
    assert info.value.retryable and code in str(info.value)
    assert f"gave up after {POLICY.attempts} attempts" in str(info.value)
    assert plan.seen["encrypt"] == POLICY.attempts
    summary(
        backend="aws_kms",
        fault=fault,
        faults_injected=plan.injected[fault],
        error=type(info.value).__name__,
        attempts=plan.seen["encrypt"],
    )


async def test_aws_partition_times_out(aws: Any, fault_proxy: Any, summary: Any) -> None:
    """KMS behind a blackholed link (accepts, never answers): each attempt times out and the
    call fails with KekProviderError; after the link heals the same provider works."""
    server, _ = aws
    host, port = server.address
    proxy = await fault_proxy(host, port)
    policy = RetryPolicy(
        attempts=2, initial_delay=0.01, max_delay=0.02, call_timeout=0.5, total_timeout=5.0
    )
    provider = await _aws_provider(server, f"http://127.0.0.1:{proxy.port}", policy)
    try:
        wrapped = await provider.wrap(b"a" * 32, CONTEXT)
        proxy.blackhole()
        async with asyncio.timeout(HANG_GUARD):
            with pytest.raises(KekProviderError) as info:
                await provider.unwrap(wrapped, CONTEXT)
        assert info.value.retryable
        proxy.heal()
        assert await provider.unwrap(wrapped, CONTEXT) == b"a" * 32
    finally:
        await provider.close()
    summary(
        backend="aws_kms",
        fault="blackhole",
        faults_injected=proxy.stats.blackholed,
        error=type(info.value).__name__,
        recovered=True,
    )


# -- the key manager over a failing KMS -------------------------------------------


async def test_kms_outage_loses_no_key_and_rotation_resumes(vault: Any, summary: Any) -> None:
    """Keys wrapped by Vault; Vault throttles, then fails for good, then recovers.

    Must hold: first-use key creation rides out two throttles; during the outage
    tokens still decrypt (unwrapped DEKs are cached), rotation fails with
    KekProviderError and leaves the store exactly as it was (no key lost, the
    old key still active); after recovery rotation works and every token,
    old and new, decrypts.
    """
    server, plan = vault
    provider = await _vault_provider(server)
    store = MemoryKeyStore()
    manager = KeyManager(store, provider, watch=False)
    service = EncryptionService(manager)
    tokens: dict[str, str] = {}
    errors = 0
    async with service:
        plan.queue = ["429", "429"]
        for i in range(50):
            tokens[f"value-{i}"] = await service.encrypt_field(
                f"value-{i}", KeyType.PII, context="rel.kms"
            )
        v1 = await manager.get_active_key(KeyType.PII)
        before = await store.read()

        plan.default = "500"
        with pytest.raises(KekProviderError):
            await manager.rotate_key(KeyType.PII, force=True)
        errors += 1
        assert await store.read() == before
        assert (await manager.get_active_key(KeyType.PII)).key_id == v1.key_id
        for plaintext, token in tokens.items():
            assert await service.decrypt_field(token, KeyType.PII, context="rel.kms") == plaintext
        for i in range(50, 60):  # encryption with the cached active key goes on
            tokens[f"value-{i}"] = await service.encrypt_field(
                f"value-{i}", KeyType.PII, context="rel.kms"
            )

        plan.clear()
        v2 = await manager.rotate_key(KeyType.PII, force=True)
        assert v2.version == 2
        tokens["after"] = await service.encrypt_field("after", KeyType.PII, context="rel.kms")
        assert v2.key_id in tokens["after"]
        held = {k.key_id for k in (await store.read()).keys}
        assert held == {v1.key_id, v2.key_id}
        for plaintext, token in tokens.items():
            assert await service.decrypt_field(token, KeyType.PII, context="rel.kms") == plaintext
    await provider.close()
    summary(
        operations=len(tokens) * 2,
        faults_injected=sum(plan.injected.values()),
        expected_errors=errors,
        key_versions=len(held),
        tokens_checked=len(tokens),
    )
