"""AWS KMS as the key-encryption key (``aiocrypt[aws]``, aiobotocore).

A DEK is wrapped with KMS ``Encrypt`` and unwrapped with ``Decrypt``; the
context dict is the KMS ``EncryptionContext``, so KMS itself refuses to
decrypt a wrapped key copied onto another key record (and CloudTrail logs
the context of every call). ``Decrypt`` names the KMS key too, so a wrapped key
made under another KMS key is refused instead of silently accepted.

The KEK id is ``aws-kms://<key id, key ARN, alias or alias ARN as configured>``.
Pass a ready aiobotocore KMS client (``client=``; the caller keeps owning it)
or settings (region, credentials, endpoint for moto or LocalStack); without
credentials the default AWS chain (environment, profile, instance role)
applies. The client built here has botocore's retries switched off: retries
are aiocrypt's (see ``aiocrypt.kek._retry``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any, Final

try:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        CredentialRetrievalError,
        HTTPClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aiocrypt.kek.aws needs aiobotocore: pip install 'aiocrypt[aws]'") from exc

import anyio

from .._config import EncryptionConfig
from .._errors import ConfigurationError, KekProviderError
from .._urls import redact_url
from ._base import KekProvider
from ._retry import RetryPolicy, call_with_retry

__all__ = ["AwsKmsKekProvider", "from_config"]

_ARN_REGION: Final = re.compile(r"^arn:aws[\w-]*:kms:([a-z0-9-]+):")
# Error codes that mean "try again later"; anything answered with HTTP 5xx too.
_TRANSIENT: Final = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_HINTS: Final = {
    "AccessDeniedException": "check that the IAM policy and the key policy allow {action} "
    "for these credentials",
    "InvalidCiphertextException": "the wrapped key was altered, or belongs to another key "
    "record (encryption context mismatch)",
    "IncorrectKeyException": "the wrapped key was made under another KMS key",
    "NotFoundException": "check ENCRYPTION_AWS_KMS_KEY_ID and ENCRYPTION_AWS_REGION",
    "DisabledException": "the KMS key is disabled: enable it",
    "KMSInvalidStateException": "the KMS key is disabled or pending deletion",
    "InvalidKeyUsageException": "the KMS key is not a symmetric ENCRYPT_DECRYPT key",
    "UnrecognizedClientException": "check the AWS credentials",
    "InvalidClientTokenId": "check the AWS credentials",
    "InvalidSignatureException": "check the AWS secret access key",
    "SignatureDoesNotMatch": "check the AWS secret access key",
    "ExpiredTokenException": "the AWS session token expired: refresh the credentials",
}


def _short(text: object, limit: int = 300) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


class AwsKmsKekProvider(KekProvider):
    """Wraps DEKs with an AWS KMS symmetric key."""

    backend = "aws_kms"

    def __init__(
        self,
        key_id: str,
        *,
        client: Any = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        endpoint_url: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not key_id or not isinstance(key_id, str):
            raise ValueError("an AWS KMS key id, key ARN or alias is required")
        if bool(access_key_id) != bool(secret_access_key):
            raise ValueError("access_key_id and secret_access_key go together")
        self.key_id = key_id
        match = _ARN_REGION.match(key_id)
        self.region = region or (match.group(1) if match else None)
        self.endpoint_url = endpoint_url
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._session_token = session_token
        self.retry = retry or RetryPolicy()
        self._client = client
        self._stack: AsyncExitStack | None = None
        self._client_lock = anyio.Lock()

    @property
    def kek_id(self) -> str:
        return f"aws-kms://{self.key_id}"

    def __repr__(self) -> str:
        where = f" endpoint={redact_url(self.endpoint_url)}" if self.endpoint_url else ""
        return f"<AwsKmsKekProvider {self.kek_id} region={self.region}{where}>"

    async def _kms(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            # False for a task that waited here while another built the client
            # (test_aws_concurrent_first_calls_build_one_client); CPython 3.11 reports that
            # jump as one to the block's last line, so coverage cannot record it
            if self._client is None:  # pragma: no branch - jump misreported by CPython 3.11
                if not self.region:
                    raise KekProviderError(
                        f"AWS KMS key {self.kek_id}: no region (set ENCRYPTION_AWS_REGION or "
                        "use a key ARN)",
                        backend=self.backend,
                    )
                # total_max_attempts counts the first call; botocore's max_attempts=1 would
                # still retry once, doubling every call under our own retry loop
                config = AioConfig(
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    connect_timeout=min(5.0, self.retry.call_timeout),
                    read_timeout=self.retry.call_timeout,
                )
                stack = AsyncExitStack()
                self._client = await stack.enter_async_context(
                    get_session().create_client(
                        "kms",
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        aws_access_key_id=self._access_key_id,
                        aws_secret_access_key=self._secret_access_key,
                        aws_session_token=self._session_token,
                        config=config,
                    )
                )
                self._stack = stack
        return self._client

    def _translate(self, exc: Exception, action: str) -> KekProviderError:
        where = f"AWS KMS key {self.kek_id}: {action}"
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "unknown"))
            message = _short(error.get("Message", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _TRANSIENT or status >= 500 or status == 429:
                return KekProviderError(
                    f"{where} failed with {code} (throttled or a service-side fault; retryable)"
                    f": {message}",
                    backend=self.backend,
                    retryable=True,
                )
            hint = _HINTS.get(code, "check the key id, the region and the credentials")
            return KekProviderError(
                f"{where} failed with {code}: {message} ({hint.format(action=action)})",
                backend=self.backend,
            )
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
            return KekProviderError(
                f"{where}: no usable AWS credentials ({type(exc).__name__}): set "
                "ENCRYPTION_AWS_ACCESS_KEY_ID / ENCRYPTION_AWS_SECRET_ACCESS_KEY or configure "
                "the default credential chain",
                backend=self.backend,
            )
        # botocore raises NoRegionError only while building a client: _kms() refuses a
        # missing region before that, and a caller's client cannot be built without one
        if isinstance(exc, NoRegionError):  # pragma: no cover - _kms() checks the region first
            return KekProviderError(
                f"{where}: no region: set ENCRYPTION_AWS_REGION", backend=self.backend
            )
        if isinstance(exc, (ConnectionError, HTTPClientError, OSError)):
            endpoint = self.endpoint_url or f"the KMS endpoint of {self.region}"
            return KekProviderError(
                f"{where}: cannot reach {endpoint} ({type(exc).__name__}: {_short(exc)}); "
                "check the endpoint and the network",
                backend=self.backend,
                retryable=True,
            )
        if isinstance(exc, BotoCoreError):
            return KekProviderError(
                f"{where} failed: {type(exc).__name__}: {_short(exc)}", backend=self.backend
            )
        return KekProviderError(
            f"{where} failed unexpectedly ({type(exc).__name__})", backend=self.backend
        )

    async def _call(self, action: str, method: str, **params: Any) -> dict[str, Any]:
        async def call() -> dict[str, Any]:
            kms = await self._kms()
            result: dict[str, Any] = await getattr(kms, method)(**params)
            return result

        return await call_with_retry(
            call,
            lambda exc: self._translate(exc, action),
            self.retry,
            what=f"AWS KMS key {self.kek_id}: {action}",
            backend=self.backend,
        )

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        result = await self._call(
            "kms:Encrypt",
            "encrypt",
            KeyId=self.key_id,
            Plaintext=bytes(plaintext),
            EncryptionContext=dict(context),
        )
        return bytes(result["CiphertextBlob"])

    async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        result = await self._call(
            "kms:Decrypt",
            "decrypt",
            KeyId=self.key_id,
            CiphertextBlob=bytes(wrapped),
            EncryptionContext=dict(context),
        )
        return bytes(result["Plaintext"])

    async def close(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            self._client = None
            await stack.aclose()


def from_config(config: EncryptionConfig) -> AwsKmsKekProvider:
    """Build from ``ENCRYPTION_AWS_KMS_KEY_ID``, ``_REGION``, ``_ACCESS_KEY_ID``,
    ``_SECRET_ACCESS_KEY`` and ``_ENDPOINT_URL``."""
    if not config.aws_kms_key_id:
        raise ConfigurationError("the aws_kms backend needs ENCRYPTION_AWS_KMS_KEY_ID")
    try:
        return AwsKmsKekProvider(
            config.aws_kms_key_id,
            region=config.aws_region,
            access_key_id=config.aws_access_key_id,
            secret_access_key=config.aws_secret_access_key,
            endpoint_url=config.aws_endpoint_url,
        )
    except ValueError as exc:
        raise ConfigurationError(f"aws_kms backend: {exc}") from None
