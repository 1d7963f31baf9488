"""Azure Key Vault as the key-encryption key (``aiocrypt[azure]``).

A DEK is wrapped with an RSA key's ``wrapKey`` (RSA-OAEP-256) through
azure-keyvault-keys' async ``CryptographyClient``; credentials come from
azure-identity's async ``ClientSecretCredential`` (``ENCRYPTION_AZURE_*``) or
any async credential passed in.

Why a signature. RSA wrapping needs only the public key, which Key Vault hands
to anyone allowed ``get`` (and the SDK wraps locally with it). So whoever can
write the key store and has read the public key can wrap a DEK *of their
choice*; an integrity check keyed by that DEK (the 0x01 envelope below) proves
nothing. The envelope is therefore signed by the vault key's private half,
which never leaves Key Vault::

    0x02 | u8 len | key version | u16 len | RSA-OAEP-256(DEK) | u16 len | signature
    signature = Key Vault sign(PS256, SHA-256("aiocrypt/azure-kv/envelope/v2" 0x00
                               || everything before the signature length || canonical context))

Unwrap verifies the signature locally with the public key of the recorded key
version *before* it asks Key Vault to unwrap, and refuses (``KekProviderError``)
an envelope that is altered, copied onto another key record (the context is
signed) or made by anyone without ``sign`` permission on the key. Public keys
are fetched once per key version (``get``) and kept for the provider's life,
``close()`` included: they are not secret and a version's key never changes.
Key Vault permissions: ``get``, ``wrapKey``, ``unwrapKey`` and ``sign`` (role
"Key Vault Crypto User" grants them all); ``verify`` is not used.

The legacy envelope (written before the signature)::

    0x01 | u8 len | key version | u16 len | RSA-OAEP-256(DEK) | HMAC-SHA256 tag (32)
    tag = HMAC(HKDF(DEK, "azure-kv-context"), everything before the tag || canonical context)

binds the context against mistakes but not against a store writer (see above),
so it is refused unless the provider is built with ``allow_unsigned_legacy=True``
(``ENCRYPTION_AZURE_ALLOW_UNSIGNED_LEGACY=true``). Adopt a store written with it
by one ``aiocrypt keys rewrap`` with that setting on, on a store you trust, then
turn the setting off: every DEK (and the file store's MAC key) is wrapped again
in the signed envelope.

The envelope records the Key Vault key *version* that wrapped the DEK (not a
URL: the vault and key name always come from configuration, so an edited
envelope cannot redirect the credential to another host). After a key
rotation in Key Vault old DEKs keep unwrapping with their version. The KEK id
is ``azure-kv://<vault host>/keys/<name>[/<version>]``.

Calls: the provider GETs each key version it meets once (a versionless key id:
the newest version, on the first wrap after construction or ``close()``) and
builds the SDK's client from that key, so the SDK wraps locally and never GETs
on its own. A wrap is then a local RSA-OAEP and one ``sign``; an unwrap is one
``unwrapKey``. azure-core's own retries are off in the clients built here;
retries are aiocrypt's.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

try:
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.keyvault.keys.aio import KeyClient
    from azure.keyvault.keys.crypto import KeyWrapAlgorithm, SignatureAlgorithm
    from azure.keyvault.keys.crypto.aio import CryptographyClient
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "aiocrypt.kek.azure needs azure-keyvault-keys, azure-identity and aiohttp: "
        "pip install 'aiocrypt[azure]'"
    ) from exc

from .._config import EncryptionConfig
from .._crypto import derive_key
from .._errors import ConfigurationError, KekProviderError
from ._base import KekProvider, canonical_context
from ._retry import RetryPolicy, call_with_retry

__all__ = ["AzureKeyVaultKekProvider", "from_config"]

logger = logging.getLogger("aiocrypt.kek")

_SIGNED: Final = b"\x02"
_LEGACY: Final = b"\x01"
_LEGACY_TAG_BYTES: Final = 32
_SIGNATURE_LABEL: Final = b"aiocrypt/azure-kv/envelope/v2\x00"
_NAME_RE: Final = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_KEY_VERSION_RE: Final = re.compile(r"^[0-9A-Za-z]{1,64}$")
_ALGORITHM: Final = KeyWrapAlgorithm.rsa_oaep_256
# PS256 as RFC 7518 defines it (salt as long as the digest), which Key Vault signs
# with and the SDK's own local verify checks
_SIGNATURE: Final = SignatureAlgorithm.ps256
_PSS: Final = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_TRANSIENT_STATUS: Final = frozenset({408, 429, 500, 502, 503, 504})


def _short(exc: BaseException, limit: int = 300) -> str:
    text = getattr(exc, "message", None) or str(exc)
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _signed_digest(body: bytes, context: Mapping[str, str]) -> bytes:
    """What Key Vault signs for an 0x02 envelope: SHA-256 of label, body and context."""
    return hashlib.sha256(_SIGNATURE_LABEL + body + canonical_context(context)).digest()


def _legacy_tag(dek: bytes, body: bytes, context: Mapping[str, str]) -> bytes:
    mac_key = derive_key(dek, b"azure-kv-context")
    return hmac.new(mac_key, body + canonical_context(context), hashlib.sha256).digest()


class AzureKeyVaultKekProvider(KekProvider):
    """Wraps DEKs with an RSA key in Azure Key Vault (RSA-OAEP-256, envelope signed by the key)."""

    backend = "azure_kv"

    def __init__(
        self,
        key_id: str,
        *,
        credential: Any = None,
        tenant_id: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        client_kwargs: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        allow_unsigned_legacy: bool = False,
    ) -> None:
        """``key_id``: ``https://<vault>.vault.azure.net/keys/<name>[/<version>]``.

        Give ``credential`` (an async ``TokenCredential``; the caller keeps
        owning it) or ``tenant_id`` / ``client_id`` / ``client_secret``.
        ``client_kwargs`` go to every SDK client (e.g. ``connection_verify``).
        ``allow_unsigned_legacy`` also unwraps the unsigned 0x01 envelope, which
        anyone with the public key can forge: for the one rewrap that adopts a
        store written before the signed envelope (see the module docstring).
        """
        parts = urlsplit(key_id)
        segments = parts.path.strip("/").split("/")
        if (
            parts.scheme != "https"
            or not parts.netloc
            or len(segments) not in (2, 3)
            or segments[0] != "keys"
            or not _NAME_RE.match(segments[1])
            or (len(segments) == 3 and not _KEY_VERSION_RE.match(segments[2]))
        ):
            raise ValueError(
                "the Azure key id must look like https://<vault>.vault.azure.net/keys/<name>"
                "[/<version>]"
            )
        self.vault_url = f"https://{parts.netloc}"
        self.key_name = segments[1]
        self.key_version = segments[2] if len(segments) == 3 else None
        self.retry = retry or RetryPolicy()
        self.allow_unsigned_legacy = allow_unsigned_legacy
        self._client_kwargs: dict[str, Any] = {"retry_total": 0, **(client_kwargs or {})}
        self._owns_credential = credential is None
        if credential is None and not (tenant_id and client_id and client_secret):
            raise ValueError("give an async credential, or tenant_id, client_id and client_secret")
        self._secret_credential_args = (tenant_id or "", client_id or "", client_secret or "")
        self._credential = credential
        self._clients: dict[str, Any] = {}
        self._key_client: Any = None
        # key version -> (KeyVaultKey, its RSA public key); kept across close()
        self._public_keys: dict[str, tuple[Any, rsa.RSAPublicKey]] = {}
        self._newest: str | None = None  # a versionless key id's version, until close()
        self._warned_legacy = False

    @property
    def kek_id(self) -> str:
        suffix = f"/{self.key_version}" if self.key_version else ""
        return f"azure-kv://{urlsplit(self.vault_url).netloc}/keys/{self.key_name}{suffix}"

    def _key_url(self, version: str | None) -> str:
        url = f"{self.vault_url}/keys/{self.key_name}"
        return f"{url}/{version}" if version else url

    def _credential_in_use(self) -> Any:
        if self._credential is None:  # built on first use, again after close()
            from azure.identity.aio import ClientSecretCredential

            self._credential = ClientSecretCredential(*self._secret_credential_args)
        return self._credential

    def _client(self, version: str | None) -> Any:
        url = self._key_url(version)
        client = self._clients.get(url)
        if client is None:
            # built from the fetched key, the SDK wraps locally and makes no GET of its own;
            # only a legacy envelope without a version leaves it the URL (and its GET)
            known = self._public_keys.get(version) if version else None
            client = CryptographyClient(
                known[0] if known else url, self._credential_in_use(), **self._client_kwargs
            )
            self._clients[url] = client
        return client

    def _keys(self) -> Any:
        if self._key_client is None:
            self._key_client = KeyClient(
                self.vault_url, self._credential_in_use(), **self._client_kwargs
            )
        return self._key_client

    # -- plumbing -----------------------------------------------------------

    def _error(self, message: str) -> KekProviderError:
        return KekProviderError(
            f"Azure Key Vault key {self.kek_id}: {message}", backend=self.backend
        )

    def _translate(self, exc: Exception, action: str) -> KekProviderError:
        where = f"Azure Key Vault key {self.kek_id}: {action}"
        if isinstance(exc, ClientAuthenticationError):
            return KekProviderError(
                f"{where}: authentication failed ({_short(exc)}): check "
                "ENCRYPTION_AZURE_TENANT_ID, ENCRYPTION_AZURE_CLIENT_ID and "
                "ENCRYPTION_AZURE_CLIENT_SECRET (or the credential passed in)",
                backend=self.backend,
            )
        if isinstance(exc, ResourceNotFoundError):
            return KekProviderError(
                f"{where}: key not found ({_short(exc)}): check ENCRYPTION_AZURE_VAULT_URL "
                "and ENCRYPTION_AZURE_KEY_NAME",
                backend=self.backend,
            )
        if isinstance(exc, HttpResponseError):
            status = exc.status_code or 0
            if status in _TRANSIENT_STATUS or status >= 500:
                return KekProviderError(
                    f"{where} failed with HTTP {status} (throttled or a service-side fault; "
                    f"retryable): {_short(exc)}",
                    backend=self.backend,
                    retryable=True,
                )
            if status == 403:
                return KekProviderError(
                    f"{where}: access denied ({_short(exc)}): check that the vault's access "
                    "policy or RBAC role (Key Vault Crypto User) grants get, wrapKey, "
                    "unwrapKey and sign to this identity",
                    backend=self.backend,
                )
            if status == 400:
                return KekProviderError(
                    f"{where} refused ({_short(exc)}): the wrapped key was altered or was made "
                    "under another key",
                    backend=self.backend,
                )
            return KekProviderError(
                f"{where} failed with HTTP {status}: {_short(exc)}", backend=self.backend
            )
        if isinstance(exc, ServiceRequestError | ServiceResponseError | OSError):
            return KekProviderError(
                f"{where}: cannot reach {self.vault_url} ({type(exc).__name__}): check "
                "ENCRYPTION_AZURE_VAULT_URL and the network",
                backend=self.backend,
                retryable=True,
            )
        if isinstance(exc, AzureError):
            return KekProviderError(
                f"{where} failed: {type(exc).__name__}: {_short(exc)}", backend=self.backend
            )
        return KekProviderError(
            f"{where} failed unexpectedly ({type(exc).__name__})", backend=self.backend
        )

    async def _call(self, action: str, call: Callable[[], Awaitable[Any]]) -> Any:
        return await call_with_retry(
            call,
            lambda exc: self._translate(exc, action),
            self.retry,
            what=f"Azure Key Vault key {self.kek_id}: {action}",
            backend=self.backend,
        )

    async def _fetch(self, version: str | None) -> str:
        """GET ``version`` of the key (None: the newest), keep its public key; its version."""
        key = await self._call("get", lambda: self._keys().get_key(self.key_name, version))
        segments = urlsplit(str(key.id or "")).path.strip("/").split("/")
        fetched = segments[2] if len(segments) == 3 else ""
        jwk = key.key
        if (
            not _KEY_VERSION_RE.match(fetched)
            or fetched != (version or fetched)
            or jwk.kty not in ("RSA", "RSA-HSM")
            or not jwk.n
            or not jwk.e
        ):
            raise self._error(f"Key Vault returned no RSA key for version {version or 'newest'}")
        public = rsa.RSAPublicNumbers(
            int.from_bytes(jwk.e, "big"), int.from_bytes(jwk.n, "big")
        ).public_key()
        self._public_keys.setdefault(fetched, (key, public))
        return fetched

    async def _public_key(self, version: str) -> rsa.RSAPublicKey:
        """The RSA public key of ``version`` of the configured key (one ``get``, then kept)."""
        if version not in self._public_keys:
            await self._fetch(version)
        return self._public_keys[version][1]

    async def _wrapping_version(self) -> str:
        """The configured version, or the newest one, fetched once (again after close())."""
        if self.key_version:
            await self._public_key(self.key_version)
            return self.key_version
        if self._newest is None:
            self._newest = await self._fetch(None)
        return self._newest

    def _signature_holds(
        self, public_key: rsa.RSAPublicKey, digest: bytes, signature: bytes
    ) -> bool:
        try:
            public_key.verify(signature, digest, _PSS, Prehashed(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    # -- KekProvider --------------------------------------------------------

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        dek = bytes(plaintext)
        version = await self._wrapping_version()
        result = await self._call(
            "wrapKey", lambda: self._client(version).wrap_key(_ALGORITHM, dek)
        )
        encrypted = bytes(result.encrypted_key)
        body = (
            _SIGNED
            + len(version).to_bytes(1, "big")
            + version.encode("ascii")
            + len(encrypted).to_bytes(2, "big")
            + encrypted
        )
        digest = _signed_digest(body, context)
        signed = await self._call("sign", lambda: self._client(version).sign(_SIGNATURE, digest))
        signature = bytes(signed.signature)
        # checked once here, so a vault that signs otherwise fails now, not at the next unwrap
        if not self._signature_holds(await self._public_key(version), digest, signature):
            raise self._error(
                f"Key Vault's {_SIGNATURE.value} signature does not verify with "
                f"the public key of version {version}"
            )
        return body + len(signature).to_bytes(2, "big") + signature

    def _parse(self, wrapped: bytes) -> tuple[str, bytes, bytes, bytes]:
        """(key version, RSA-OAEP ciphertext, body, signature or legacy tag) of an envelope."""
        malformed = self._error("the wrapped key is malformed (altered?)")
        kind = wrapped[:1]
        if kind not in (_SIGNED, _LEGACY) or len(wrapped) < 4:
            raise malformed
        vlen = wrapped[1]
        start = 2 + vlen
        try:
            version = wrapped[2:start].decode("ascii")
        except UnicodeDecodeError:
            raise malformed from None
        if (version or kind == _SIGNED) and not _KEY_VERSION_RE.match(version):
            raise malformed
        clen = int.from_bytes(wrapped[start : start + 2], "big")
        end = start + 2 + clen
        if kind == _LEGACY:
            trailer_start, trailer_len = end, _LEGACY_TAG_BYTES
        else:
            trailer_start, trailer_len = end + 2, int.from_bytes(wrapped[end : end + 2], "big")
        if clen == 0 or trailer_len == 0 or len(wrapped) != trailer_start + trailer_len:
            raise malformed
        return version, wrapped[start + 2 : end], wrapped[:end], wrapped[trailer_start:]

    async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        data = bytes(wrapped)
        version, encrypted, body, trailer = self._parse(data)
        if self.key_version and version and version != self.key_version:
            raise self._error(
                f"the wrapped key was made under key version {version}, not the configured one"
            )
        if data[:1] == _LEGACY:
            return await self._unwrap_legacy(version, encrypted, body, trailer, context)
        # the signature first: Key Vault never unwraps what its key did not sign
        public_key = await self._public_key(version)
        if not self._signature_holds(public_key, _signed_digest(body, context), trailer):
            raise self._error(
                "the wrapped key does not belong to this context (moved to another "
                "key record, altered, or not signed by this Key Vault key)"
            )
        result = await self._call(
            "unwrapKey", lambda: self._client(version).unwrap_key(_ALGORITHM, encrypted)
        )
        return bytes(result.key)

    async def _unwrap_legacy(
        self, version: str, encrypted: bytes, body: bytes, tag: bytes, context: Mapping[str, str]
    ) -> bytes:
        if not self.allow_unsigned_legacy:
            raise self._error(
                "the wrapped key is in the unsigned 0x01 envelope, which anyone holding the "
                "vault key's public key can forge, so it is refused. To adopt a store written "
                "before the signed envelope, rewrap it once with the legacy envelope allowed "
                "(ENCRYPTION_AZURE_ALLOW_UNSIGNED_LEGACY=true aiocrypt keys rewrap, or "
                "allow_unsigned_legacy=True), then turn that setting off"
            )
        if not self._warned_legacy:
            self._warned_legacy = True
            logger.warning(
                "Azure Key Vault key %s: unwrapping unsigned 0x01 envelopes "
                "(allow_unsigned_legacy): run 'aiocrypt keys rewrap' and turn the "
                "setting off",
                self.kek_id,
            )
        key_version = version or self.key_version
        result = await self._call(
            "unwrapKey", lambda: self._client(key_version).unwrap_key(_ALGORITHM, encrypted)
        )
        dek = bytes(result.key)
        if not hmac.compare_digest(_legacy_tag(dek, body, context), tag):
            raise self._error(
                "the wrapped key does not belong to this context (moved to another "
                "key record, or altered)"
            )
        return dek

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        key_client, self._key_client = self._key_client, None
        self._newest = None
        for client in clients:
            await client.close()
        if key_client is not None:
            await key_client.close()
        if self._owns_credential and self._credential is not None:
            credential, self._credential = self._credential, None
            await credential.close()


def from_config(config: EncryptionConfig) -> AzureKeyVaultKekProvider:
    """Build from ``ENCRYPTION_AZURE_VAULT_URL``, ``_KEY_NAME`` (``name`` or
    ``name/version``), ``_TENANT_ID``, ``_CLIENT_ID``, ``_CLIENT_SECRET`` and
    ``_ALLOW_UNSIGNED_LEGACY``."""
    if not config.azure_vault_url or not config.azure_key_name:
        raise ConfigurationError(
            "the azure_kv backend needs ENCRYPTION_AZURE_VAULT_URL and ENCRYPTION_AZURE_KEY_NAME"
        )
    key_id = f"{config.azure_vault_url.rstrip('/')}/keys/{config.azure_key_name.strip('/')}"
    try:
        return AzureKeyVaultKekProvider(
            key_id,
            tenant_id=config.azure_tenant_id,
            client_id=config.azure_client_id,
            client_secret=config.azure_client_secret,
            allow_unsigned_legacy=config.azure_allow_unsigned_legacy,
        )
    except ValueError as exc:
        raise ConfigurationError(f"azure_kv backend: {exc}") from None
