"""HashiCorp Vault Transit as the key-encryption key (``aiocrypt[vault]``, hvac).

A DEK is wrapped with ``<mount>/encrypt/<key>`` and unwrapped with
``<mount>/decrypt/<key>``. The canonical context bytes
(``kek._base.canonical_context``) are sent twice, base64-encoded:

* as the key-derivation ``context``: with a *derived* transit key (create it
  with ``derived=true``, or let :meth:`VaultTransitKekProvider.ensure_key`
  do it) every context gets its own derived key, so a wrapped DEK copied onto
  another key record fails Vault's GCM check;
* as ``associated_data`` (Vault 1.13 and later), so the context is still bound
  when an existing key was created without derivation (Vault ignores
  ``context`` for such keys).

hvac is blocking (requests), so every call runs in a worker thread
(``anyio.to_thread``), never on the event loop. The KEK id is
``vault://<mount>/<key>``; Transit key versions are inside Vault's ciphertext
(``vault:vN:...``), so rotating the transit key needs no change here.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

try:
    import hvac
    import hvac.exceptions as hvac_errors
    import requests
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aiocrypt.kek.vault needs hvac: pip install 'aiocrypt[vault]'") from exc

import anyio

from .._config import EncryptionConfig
from .._errors import ConfigurationError, KekProviderError
from .._urls import redact_url
from ._base import KekProvider, canonical_context
from ._retry import RetryPolicy, call_with_retry

__all__ = ["VaultTransitKekProvider", "from_config"]

T = TypeVar("T")

_TRANSIENT: Final = tuple(
    getattr(hvac_errors, name)
    for name in ("RateLimitExceeded", "InternalServerError", "BadGateway", "VaultDown")
    if hasattr(hvac_errors, name)
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _vault_errors(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list | tuple) and errors:
        text = "; ".join(str(e) for e in errors)
    else:
        text = str(exc)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:300] + "..."


class VaultTransitKekProvider(KekProvider):
    """Wraps DEKs with a Vault Transit key (``ENCRYPTION_VAULT_*``)."""

    backend = "vault"

    def __init__(
        self,
        key_name: str = "aiocrypt",
        *,
        client: Any = None,
        url: str | None = None,
        token: str | None = None,
        mount_point: str = "transit",
        namespace: str | None = None,
        verify: bool | str = True,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not key_name or "/" in key_name:
            raise ValueError(f"invalid transit key name {key_name!r}")
        self.key_name = key_name
        self.mount_point = mount_point.strip("/")
        if not self.mount_point:
            raise ValueError("the transit mount point cannot be empty")
        self.retry = retry or RetryPolicy()
        self._owns_client = client is None
        if client is None:
            if not url:
                raise ValueError("a Vault client or a Vault URL is required")
            client = hvac.Client(
                url=url,
                token=token,
                namespace=namespace,
                verify=verify,
                timeout=self.retry.call_timeout,
            )
        self._client = client
        self.url = redact_url(str(getattr(client, "url", url) or url or ""))

    @property
    def kek_id(self) -> str:
        return f"vault://{self.mount_point}/{self.key_name}"

    def __repr__(self) -> str:
        return f"<VaultTransitKekProvider {self.kek_id} at {self.url}>"

    # -- plumbing -----------------------------------------------------------

    def _translate(self, exc: Exception, action: str) -> KekProviderError:
        where = f"Vault Transit key {self.kek_id} at {self.url}: {action}"
        if isinstance(exc, _TRANSIENT):
            return KekProviderError(
                f"{where} failed ({type(exc).__name__}: {_vault_errors(exc)}; throttled or "
                "unavailable, retryable)",
                backend=self.backend,
                retryable=True,
            )
        if isinstance(exc, hvac_errors.Forbidden | hvac_errors.Unauthorized):
            return KekProviderError(
                f"{where}: permission denied ({_vault_errors(exc)}): check that the token is "
                f"valid and its policy allows update on {self.mount_point}/encrypt/"
                f"{self.key_name} and {self.mount_point}/decrypt/{self.key_name}",
                backend=self.backend,
            )
        if isinstance(exc, hvac_errors.InvalidPath):
            return KekProviderError(
                f"{where}: not found ({_vault_errors(exc)}): check the mount point "
                "(ENCRYPTION_VAULT_MOUNT_POINT) and that the transit engine is enabled",
                backend=self.backend,
            )
        if isinstance(exc, hvac_errors.InvalidRequest):
            return KekProviderError(
                f"{where} refused: {_vault_errors(exc)} (the wrapped key was altered, belongs "
                "to another key record, or the transit key does not exist)",
                backend=self.backend,
            )
        if isinstance(exc, hvac_errors.VaultError):
            return KekProviderError(
                f"{where} failed: {type(exc).__name__}: {_vault_errors(exc)}", backend=self.backend
            )
        if isinstance(
            exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError
        ):
            return KekProviderError(
                f"{where}: cannot reach Vault ({type(exc).__name__}): check "
                "ENCRYPTION_VAULT_URL and the network",
                backend=self.backend,
                retryable=True,
            )
        return KekProviderError(
            f"{where} failed unexpectedly ({type(exc).__name__})", backend=self.backend
        )

    async def _call(self, action: str, func: Callable[[], T]) -> T:
        async def call() -> T:
            return await anyio.to_thread.run_sync(func, abandon_on_cancel=True)

        return await call_with_retry(
            call,
            lambda exc: self._translate(exc, action),
            self.retry,
            what=f"Vault Transit key {self.kek_id}: {action}",
            backend=self.backend,
        )

    def _result(self, response: Any, field: str, action: str) -> str:
        try:
            value = response["data"][field]
        except (KeyError, TypeError):
            value = None
        if not isinstance(value, str):
            raise KekProviderError(
                f"Vault Transit key {self.kek_id}: {action} answered without {field!r}",
                backend=self.backend,
            )
        return value

    # -- KekProvider --------------------------------------------------------

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        ctx = _b64(canonical_context(context))
        transit = self._client.secrets.transit
        response = await self._call(
            "encrypt",
            lambda: transit.encrypt_data(
                self.key_name,
                plaintext=_b64(plaintext),
                context=ctx,
                associated_data=ctx,
                mount_point=self.mount_point,
            ),
        )
        return self._result(response, "ciphertext", "encrypt").encode("ascii")

    async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        try:
            ciphertext = bytes(wrapped).decode("ascii")
        except UnicodeDecodeError:
            raise KekProviderError(
                f"Vault Transit key {self.kek_id}: the wrapped key is not Vault ciphertext "
                "(altered?)",
                backend=self.backend,
            ) from None
        ctx = _b64(canonical_context(context))
        transit = self._client.secrets.transit
        response = await self._call(
            "decrypt",
            lambda: transit.decrypt_data(
                self.key_name,
                ciphertext=ciphertext,
                context=ctx,
                associated_data=ctx,
                mount_point=self.mount_point,
            ),
        )
        try:
            return base64.b64decode(self._result(response, "plaintext", "decrypt"), validate=True)
        except (binascii.Error, ValueError):
            raise KekProviderError(
                f"Vault Transit key {self.kek_id}: decrypt answered malformed plaintext",
                backend=self.backend,
            ) from None

    async def ensure_key(self) -> None:
        """Create the transit key as a derived ``aes256-gcm96`` key (no-op if it exists)."""
        transit = self._client.secrets.transit
        await self._call(
            "create key",
            lambda: transit.create_key(self.key_name, derived=True, mount_point=self.mount_point),
        )

    async def close(self) -> None:
        if self._owns_client:
            adapter = getattr(self._client, "adapter", None)
            if adapter is not None:  # pragma: no branch - an hvac.Client always has an adapter
                await anyio.to_thread.run_sync(adapter.close)


def from_config(config: EncryptionConfig) -> VaultTransitKekProvider:
    """Build from ``ENCRYPTION_VAULT_URL``, ``_TOKEN``, ``_TRANSIT_KEY`` and ``_MOUNT_POINT``."""
    if not config.vault_url or not config.vault_token:
        raise ConfigurationError(
            "the vault backend needs ENCRYPTION_VAULT_URL and ENCRYPTION_VAULT_TOKEN"
        )
    try:
        return VaultTransitKekProvider(
            config.vault_transit_key,
            url=config.vault_url,
            token=config.vault_token,
            mount_point=config.vault_mount_point,
        )
    except ValueError as exc:
        raise ConfigurationError(f"vault backend: {exc}") from None
