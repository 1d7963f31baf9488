"""Google Cloud KMS as the key-encryption key (``aiocrypt[gcp]``).

A DEK is wrapped with Cloud KMS ``Encrypt`` and unwrapped with ``Decrypt``
through google-cloud-kms' ``KeyManagementServiceAsyncClient``, with the
canonical context bytes as ``additional_authenticated_data``: Cloud KMS
refuses to decrypt a wrapped key copied onto another key record.

Integrity: every request carries the CRC32C of its data
(``plaintext_crc32c``, ``ciphertext_crc32c``,
``additional_authenticated_data_crc32c``) and every answer is checked
(``verified_*`` flags, ``ciphertext_crc32c`` / ``plaintext_crc32c``, and that the
version used belongs to the configured key), as Google recommends; a mismatch
is treated as corruption in transit and retried.

The KEK id is ``gcp-kms://projects/<p>/locations/<l>/keyRings/<r>/cryptoKeys/<k>``.
Pass a ready async client (the caller keeps owning it) or let the provider
build one with Application Default Credentials. ``endpoint`` overrides the API
endpoint; an ``http://host:port`` endpoint means a plaintext channel without
credentials, for emulators and test servers only. The GAPIC client's own
retries are off (``retry=None`` per call); retries are aiocrypt's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

try:
    import grpc
    from google.api_core import exceptions as gexc
    from google.api_core.client_options import ClientOptions
    from google.auth import exceptions as auth_exc
    from google.cloud import kms_v1
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "aiocrypt.kek.gcp needs google-cloud-kms: pip install 'aiocrypt[gcp]'"
    ) from exc

import anyio

from .._config import EncryptionConfig
from .._errors import ConfigurationError, KekProviderError
from ._base import KekProvider, canonical_context
from ._retry import RetryPolicy, call_with_retry

__all__ = ["GcpKmsKekProvider", "from_config"]

_KEY_NAME_RE: Final = re.compile(
    r"^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+$"
)
_TRANSIENT: Final = (
    gexc.TooManyRequests,
    gexc.ResourceExhausted,
    gexc.ServerError,
    gexc.DeadlineExceeded,
    gexc.Aborted,
    gexc.ServiceUnavailable,
)


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE: Final = _crc_table()


def _crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli) as Cloud KMS uses it (inputs here are a few hundred bytes)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _short(exc: BaseException, limit: int = 300) -> str:
    text = getattr(exc, "message", None) or str(exc)
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class GcpKmsKekProvider(KekProvider):
    """Wraps DEKs with a Cloud KMS symmetric key."""

    backend = "gcp_kms"

    def __init__(
        self,
        key_name: str,
        *,
        client: Any = None,
        endpoint: str | None = None,
        credentials: Any = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not _KEY_NAME_RE.match(key_name or ""):
            raise ValueError(
                "the Cloud KMS key name must look like projects/<p>/locations/<l>"
                "/keyRings/<r>/cryptoKeys/<k>"
            )
        self.key_name = key_name
        self.endpoint = endpoint
        self.retry = retry or RetryPolicy()
        self._credentials = credentials
        self._client = client
        self._owns_client = client is None

    @property
    def kek_id(self) -> str:
        return f"gcp-kms://{self.key_name}"

    def __repr__(self) -> str:
        where = f" endpoint={self.endpoint}" if self.endpoint else ""
        return f"<GcpKmsKekProvider {self.kek_id}{where}>"

    def _kms(self) -> Any:
        # built on first use: a grpc.aio channel belongs to the running event loop
        if self._client is None:
            if self.endpoint and self.endpoint.startswith("http://"):
                from google.cloud.kms_v1.services.key_management_service.transports import (
                    KeyManagementServiceGrpcAsyncIOTransport,
                )

                channel = grpc.aio.insecure_channel(self.endpoint[len("http://") :].rstrip("/"))
                self._client = kms_v1.KeyManagementServiceAsyncClient(
                    transport=KeyManagementServiceGrpcAsyncIOTransport(channel=channel)
                )
            else:
                options = ClientOptions(api_endpoint=self.endpoint) if self.endpoint else None
                self._client = kms_v1.KeyManagementServiceAsyncClient(
                    credentials=self._credentials, client_options=options
                )
        return self._client

    def _translate(self, exc: Exception, action: str) -> KekProviderError:
        where = f"Cloud KMS key {self.kek_id}: {action}"
        if isinstance(exc, _TRANSIENT) and not isinstance(exc, gexc.MethodNotImplemented):
            return KekProviderError(
                f"{where} failed ({type(exc).__name__}: {_short(exc)}; throttled or "
                "unavailable, retryable): check the endpoint and the network if it persists",
                backend=self.backend,
                retryable=True,
            )
        if isinstance(
            exc, gexc.PermissionDenied | gexc.Unauthenticated | gexc.Forbidden | gexc.Unauthorized
        ):
            return KekProviderError(
                f"{where}: permission denied ({_short(exc)}): check that the credentials "
                "have roles/cloudkms.cryptoKeyEncrypterDecrypter on the key",
                backend=self.backend,
            )
        if isinstance(exc, gexc.NotFound):
            return KekProviderError(
                f"{where}: key not found ({_short(exc)}): check ENCRYPTION_GCP_PROJECT_ID, "
                "_LOCATION, _KEYRING and _KEY_NAME",
                backend=self.backend,
            )
        if isinstance(exc, gexc.InvalidArgument):
            return KekProviderError(
                f"{where} refused ({_short(exc)}): the wrapped key was altered, belongs to "
                "another key record (context mismatch) or to another key",
                backend=self.backend,
            )
        if isinstance(exc, gexc.FailedPrecondition):
            return KekProviderError(
                f"{where} refused ({_short(exc)}): the key version is disabled or destroyed",
                backend=self.backend,
            )
        if isinstance(exc, gexc.GoogleAPICallError):
            return KekProviderError(
                f"{where} failed: {type(exc).__name__}: {_short(exc)}", backend=self.backend
            )
        if isinstance(exc, auth_exc.DefaultCredentialsError | auth_exc.RefreshError):
            return KekProviderError(
                f"{where}: no usable Google credentials ({type(exc).__name__}): set "
                "GOOGLE_APPLICATION_CREDENTIALS or run on a service account",
                backend=self.backend,
            )
        if isinstance(exc, auth_exc.TransportError | OSError):
            return KekProviderError(
                f"{where}: cannot reach Cloud KMS ({type(exc).__name__}): check the endpoint "
                "and the network",
                backend=self.backend,
                retryable=True,
            )
        return KekProviderError(
            f"{where} failed unexpectedly ({type(exc).__name__})", backend=self.backend
        )

    def _corrupt(self, action: str, what: str) -> KekProviderError:
        return KekProviderError(
            f"Cloud KMS key {self.kek_id}: {action} answer failed its integrity check ({what}); "
            "corrupted in transit",
            backend=self.backend,
            retryable=True,
        )

    async def _call(self, action: str, method: str, request: dict[str, Any], check: Any) -> Any:
        async def call() -> Any:
            response = await getattr(self._kms(), method)(
                request=request, retry=None, timeout=self.retry.call_timeout
            )
            check(response)
            return response

        return await call_with_retry(
            call,
            lambda exc: self._translate(exc, action),
            self.retry,
            what=f"Cloud KMS key {self.kek_id}: {action}",
            backend=self.backend,
        )

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        plaintext = bytes(plaintext)
        aad = canonical_context(context)

        def check(response: Any) -> None:
            if not response.verified_plaintext_crc32c:
                raise self._corrupt("Encrypt", "plaintext not verified")
            if not response.verified_additional_authenticated_data_crc32c:
                raise self._corrupt("Encrypt", "associated data not verified")
            if response.ciphertext_crc32c != _crc32c(response.ciphertext):
                raise self._corrupt("Encrypt", "ciphertext checksum")
            if not str(response.name).startswith(self.key_name + "/cryptoKeyVersions/"):
                raise KekProviderError(
                    f"Cloud KMS key {self.kek_id}: Encrypt answered for another key "
                    f"({response.name})",
                    backend=self.backend,
                )

        response = await self._call(
            "Encrypt",
            "encrypt",
            {
                "name": self.key_name,
                "plaintext": plaintext,
                "additional_authenticated_data": aad,
                "plaintext_crc32c": _crc32c(plaintext),
                "additional_authenticated_data_crc32c": _crc32c(aad),
            },
            check,
        )
        return bytes(response.ciphertext)

    async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        wrapped = bytes(wrapped)
        aad = canonical_context(context)

        def check(response: Any) -> None:
            if response.plaintext_crc32c != _crc32c(response.plaintext):
                raise self._corrupt("Decrypt", "plaintext checksum")

        response = await self._call(
            "Decrypt",
            "decrypt",
            {
                "name": self.key_name,
                "ciphertext": wrapped,
                "additional_authenticated_data": aad,
                "ciphertext_crc32c": _crc32c(wrapped),
                "additional_authenticated_data_crc32c": _crc32c(aad),
            },
            check,
        )
        return bytes(response.plaintext)

    async def close(self) -> None:
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            with anyio.move_on_after(5, shield=True):
                await client.transport.close()


def from_config(config: EncryptionConfig) -> GcpKmsKekProvider:
    """Build from ``ENCRYPTION_GCP_PROJECT_ID``, ``_LOCATION``, ``_KEYRING``, ``_KEY_NAME``
    and ``_ENDPOINT``."""
    parts = (config.gcp_project_id, config.gcp_location, config.gcp_keyring, config.gcp_key_name)
    if not all(parts):
        raise ConfigurationError(
            "the gcp_kms backend needs ENCRYPTION_GCP_PROJECT_ID, ENCRYPTION_GCP_LOCATION, "
            "ENCRYPTION_GCP_KEYRING and ENCRYPTION_GCP_KEY_NAME"
        )
    project, location, ring, key = parts
    name = f"projects/{project}/locations/{location}/keyRings/{ring}/cryptoKeys/{key}"
    try:
        return GcpKmsKekProvider(name, endpoint=config.gcp_endpoint)
    except ValueError as exc:
        raise ConfigurationError(f"gcp_kms backend: {exc}") from None
