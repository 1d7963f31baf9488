"""Azure Key Vault as the key-encryption key (``aiocrypt[azure]``).

A DEK is wrapped with an RSA key's ``wrapKey`` (RSA-OAEP-256) through
azure-keyvault-keys' async ``CryptographyClient``; credentials come from
azure-identity's async ``ClientSecretCredential`` (``ENCRYPTION_AZURE_*``) or
any async credential passed in.

Binding the context. Key Vault's wrap has no associated data, so the context
is bound here, in an authenticated envelope::

    0x01 | u8 len | key version | u16 len | RSA-OAEP-256(DEK) | HMAC-SHA256 tag (32)
    tag = HMAC(HKDF(DEK, "azure-kv-context"), everything before the tag || canonical context)

Unwrap asks Key Vault to unwrap the RSA part, derives the MAC key from the
DEK it got back and refuses (``KekProviderError``) unless the tag matches
the context it was given. Why this design:

* Only a holder of the DEK can compute the tag, and only Key Vault (the
  private key) can recover the DEK, so a wrapped key copied onto another key
  record, or an edited envelope, is refused, as AES-GCM associated data
  would refuse it with the other providers.
* The RSA payload stays exactly the 32-byte key that ``wrapKey`` is meant
  for (works unchanged with HSM-backed keys), and one remote call is made per
  unwrap, as without the binding.
* An RSA public key lets anyone *wrap*; that is inherent to asymmetric key
  wrapping and not something a context can fix. Keep the key store
  write-protected (the file store also MACs its contents).

The envelope records the Key Vault key *version* that wrapped the DEK (not a
URL: the vault and key name always come from configuration, so an edited
envelope cannot redirect the credential to another host). After a key
rotation in Key Vault old DEKs keep unwrapping with their version. The KEK id
is ``azure-kv://<vault host>/keys/<name>[/<version>]``.

The SDK first GETs the public key and wraps locally (Key Vault then sees one
``get`` per client and one ``unwrapKey`` per DEK load); with a versionless key
and no ``keys/get`` permission it wraps remotely but cannot learn the
version, so grant ``get`` or configure a versioned key id. azure-core's own
retries are off in the clients built here; retries are aiocrypt's.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

try:
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.keyvault.keys.crypto import KeyWrapAlgorithm
    from azure.keyvault.keys.crypto.aio import CryptographyClient
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "aiocrypt.kek.azure needs azure-keyvault-keys, azure-identity and aiohttp: "
        "pip install 'aiocrypt[azure]'") from exc

from .._config import EncryptionConfig
from .._crypto import derive_key
from .._errors import ConfigurationError, KekProviderError
from ._base import KekProvider, canonical_context
from ._retry import RetryPolicy, call_with_retry

__all__ = ["AzureKeyVaultKekProvider", "from_config"]

_VERSION: Final = b"\x01"
_TAG_BYTES: Final = 32
_NAME_RE: Final = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_KEY_VERSION_RE: Final = re.compile(r"^[0-9A-Za-z]{1,64}$")
_ALGORITHM: Final = KeyWrapAlgorithm.rsa_oaep_256
_TRANSIENT_STATUS: Final = frozenset({408, 429, 500, 502, 503, 504})


def _short(exc: BaseException, limit: int = 300) -> str:
    text = getattr(exc, "message", None) or str(exc)
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _tag(dek: bytes, body: bytes, context: Mapping[str, str]) -> bytes:
    mac_key = derive_key(dek, b"azure-kv-context")
    return hmac.new(mac_key, body + canonical_context(context), hashlib.sha256).digest()


class AzureKeyVaultKekProvider(KekProvider):
    """Wraps DEKs with an RSA key in Azure Key Vault (RSA-OAEP-256 + context MAC)."""

    backend = "azure_kv"

    def __init__(self, key_id: str, *, credential: Any = None,
                 tenant_id: str | None = None, client_id: str | None = None,
                 client_secret: str | None = None,
                 client_kwargs: Mapping[str, Any] | None = None,
                 retry: RetryPolicy | None = None) -> None:
        """``key_id``: ``https://<vault>.vault.azure.net/keys/<name>[/<version>]``.

        Give ``credential`` (an async ``TokenCredential``; the caller keeps
        owning it) or ``tenant_id`` / ``client_id`` / ``client_secret``.
        ``client_kwargs`` go to every ``CryptographyClient`` (e.g.
        ``connection_verify``).
        """
        parts = urlsplit(key_id)
        segments = parts.path.strip("/").split("/")
        if (parts.scheme != "https" or not parts.netloc or len(segments) not in (2, 3)
                or segments[0] != "keys" or not _NAME_RE.match(segments[1])
                or (len(segments) == 3 and not _KEY_VERSION_RE.match(segments[2]))):
            raise ValueError(
                "the Azure key id must look like https://<vault>.vault.azure.net/keys/<name>"
                "[/<version>]")
        self.vault_url = f"https://{parts.netloc}"
        self.key_name = segments[1]
        self.key_version = segments[2] if len(segments) == 3 else None
        self.retry = retry or RetryPolicy()
        self._client_kwargs: dict[str, Any] = {"retry_total": 0, **(client_kwargs or {})}
        self._owns_credential = credential is None
        if credential is None and not (tenant_id and client_id and client_secret):
            raise ValueError("give an async credential, or tenant_id, client_id and "
                             "client_secret")
        self._secret_credential_args = (tenant_id or "", client_id or "", client_secret or "")
        self._credential = credential
        self._clients: dict[str, Any] = {}

    @property
    def kek_id(self) -> str:
        suffix = f"/{self.key_version}" if self.key_version else ""
        return f"azure-kv://{urlsplit(self.vault_url).netloc}/keys/{self.key_name}{suffix}"

    def _key_url(self, version: str | None) -> str:
        url = f"{self.vault_url}/keys/{self.key_name}"
        return f"{url}/{version}" if version else url

    def _client(self, version: str | None) -> Any:
        url = self._key_url(version)
        client = self._clients.get(url)
        if client is None:
            if self._credential is None:  # built on first use, again after close()
                from azure.identity.aio import ClientSecretCredential

                self._credential = ClientSecretCredential(*self._secret_credential_args)
            client = CryptographyClient(url, self._credential, **self._client_kwargs)
            self._clients[url] = client
        return client

    # -- plumbing -----------------------------------------------------------

    def _translate(self, exc: Exception, action: str) -> KekProviderError:
        where = f"Azure Key Vault key {self.kek_id}: {action}"
        if isinstance(exc, ClientAuthenticationError):
            return KekProviderError(
                f"{where}: authentication failed ({_short(exc)}): check "
                "ENCRYPTION_AZURE_TENANT_ID, ENCRYPTION_AZURE_CLIENT_ID and "
                "ENCRYPTION_AZURE_CLIENT_SECRET (or the credential passed in)",
                backend=self.backend)
        if isinstance(exc, ResourceNotFoundError):
            return KekProviderError(
                f"{where}: key not found ({_short(exc)}): check ENCRYPTION_AZURE_VAULT_URL "
                "and ENCRYPTION_AZURE_KEY_NAME", backend=self.backend)
        if isinstance(exc, HttpResponseError):
            status = exc.status_code or 0
            if status in _TRANSIENT_STATUS or status >= 500:
                return KekProviderError(
                    f"{where} failed with HTTP {status} (throttled or a service-side fault; "
                    f"retryable): {_short(exc)}", backend=self.backend, retryable=True)
            if status == 403:
                return KekProviderError(
                    f"{where}: access denied ({_short(exc)}): check that the vault's access "
                    "policy or RBAC role (Key Vault Crypto User) grants get, wrapKey and "
                    "unwrapKey to this identity", backend=self.backend)
            if status == 400:
                return KekProviderError(
                    f"{where} refused ({_short(exc)}): the wrapped key was altered or was made "
                    "under another key", backend=self.backend)
            return KekProviderError(f"{where} failed with HTTP {status}: {_short(exc)}",
                                    backend=self.backend)
        if isinstance(exc, ServiceRequestError | ServiceResponseError | OSError):
            return KekProviderError(
                f"{where}: cannot reach {self.vault_url} ({type(exc).__name__}): check "
                "ENCRYPTION_AZURE_VAULT_URL and the network", backend=self.backend,
                retryable=True)
        if isinstance(exc, AzureError):
            return KekProviderError(f"{where} failed: {type(exc).__name__}: {_short(exc)}",
                                    backend=self.backend)
        return KekProviderError(f"{where} failed unexpectedly ({type(exc).__name__})",
                                backend=self.backend)

    async def _call(self, action: str, version: str | None, method: str, data: bytes) -> Any:
        async def call() -> Any:
            return await getattr(self._client(version), method)(_ALGORITHM, data)

        return await call_with_retry(
            call, lambda exc: self._translate(exc, action), self.retry,
            what=f"Azure Key Vault key {self.kek_id}: {action}", backend=self.backend)

    # -- KekProvider --------------------------------------------------------

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        result = await self._call("wrapKey", self.key_version, "wrap_key", bytes(plaintext))
        version = self._version_of(str(result.key_id or ""))
        if version and not self.key_version:
            # the client now knows this version: unwrapping with it needs no second GET
            self._clients.setdefault(self._key_url(version), self._client(None))
        encrypted = bytes(result.encrypted_key)
        body = (_VERSION + len(version).to_bytes(1, "big") + version.encode("ascii")
                + len(encrypted).to_bytes(2, "big") + encrypted)
        return body + _tag(bytes(plaintext), body, context)

    def _version_of(self, kid: str) -> str:
        segments = urlsplit(kid).path.strip("/").split("/")
        if len(segments) == 3 and _KEY_VERSION_RE.match(segments[2]):
            return segments[2]
        return self.key_version or ""

    def _parse(self, wrapped: bytes) -> tuple[str, bytes, bytes, bytes]:
        malformed = KekProviderError(
            f"Azure Key Vault key {self.kek_id}: the wrapped key is malformed (altered?)",
            backend=self.backend)
        if len(wrapped) < 2 + 2 + _TAG_BYTES or wrapped[:1] != _VERSION:
            raise malformed
        vlen = wrapped[1]
        start = 2 + vlen
        try:
            version = wrapped[2:start].decode("ascii")
        except UnicodeDecodeError:
            raise malformed from None
        if version and not _KEY_VERSION_RE.match(version):
            raise malformed
        clen = int.from_bytes(wrapped[start:start + 2], "big")
        end = start + 2 + clen
        if clen == 0 or len(wrapped) != end + _TAG_BYTES:
            raise malformed
        return version, wrapped[start + 2:end], wrapped[:end], wrapped[end:]

    async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        version, encrypted, body, tag = self._parse(bytes(wrapped))
        if self.key_version and version and version != self.key_version:
            raise KekProviderError(
                f"Azure Key Vault key {self.kek_id}: the wrapped key was made under key version "
                f"{version}, not the configured one", backend=self.backend)
        result = await self._call("unwrapKey", version or self.key_version, "unwrap_key",
                                  encrypted)
        dek = bytes(result.key)
        if not hmac.compare_digest(_tag(dek, body, context), tag):
            raise KekProviderError(
                f"Azure Key Vault key {self.kek_id}: the wrapped key does not belong to this "
                "context (moved to another key record, or altered)", backend=self.backend)
        return dek

    async def close(self) -> None:
        clients, self._clients = {id(c): c for c in self._clients.values()}, {}
        for client in clients.values():
            await client.close()
        if self._owns_credential and self._credential is not None:
            credential, self._credential = self._credential, None
            await credential.close()


def from_config(config: EncryptionConfig) -> AzureKeyVaultKekProvider:
    """Build from ``ENCRYPTION_AZURE_VAULT_URL``, ``_KEY_NAME`` (``name`` or
    ``name/version``), ``_TENANT_ID``, ``_CLIENT_ID`` and ``_CLIENT_SECRET``."""
    if not config.azure_vault_url or not config.azure_key_name:
        raise ConfigurationError("the azure_kv backend needs ENCRYPTION_AZURE_VAULT_URL and "
                                 "ENCRYPTION_AZURE_KEY_NAME")
    key_id = f"{config.azure_vault_url.rstrip('/')}/keys/{config.azure_key_name.strip('/')}"
    try:
        return AzureKeyVaultKekProvider(
            key_id, tenant_id=config.azure_tenant_id, client_id=config.azure_client_id,
            client_secret=config.azure_client_secret)
    except ValueError as exc:
        raise ConfigurationError(f"azure_kv backend: {exc}") from None
