"""The key-encryption-key (KEK) provider interface.

A KEK provider wraps and unwraps data-encryption keys; it is called when a DEK
is created or loaded, never per field. The ``context`` is bound to the wrapped
key (AES-GCM associated data, AWS encryption context, Vault derivation context,
GCP additional authenticated data), so a wrapped DEK copied onto another key
record fails to unwrap.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

__all__ = ["KekProvider", "canonical_context"]


def canonical_context(context: Mapping[str, str]) -> bytes:
    """The context as canonical bytes (sorted keys, no whitespace)."""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode("utf-8")


class KekProvider(ABC):
    """Wraps and unwraps DEKs under a key that never leaves the provider (or the process)."""

    #: Short backend name used in messages and statistics ("local", "aws_kms", ...).
    backend: str = "unknown"

    @property
    @abstractmethod
    def kek_id(self) -> str:
        """A stable, non-secret identifier of the KEK (recorded with each wrapped DEK)."""

    @abstractmethod
    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        """Encrypt ``plaintext`` (a DEK) bound to ``context``."""

    @abstractmethod
    async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        """Decrypt what :meth:`wrap` returned; raises ``KekProviderError`` on any failure."""

    async def check(self) -> None:
        """Raise ``KekProviderError`` if the provider is unreachable (health checks)."""
        probe = await self.wrap(b"\x00" * 32, {"aiocrypt_purpose": "health-check"})
        await self.unwrap(probe, {"aiocrypt_purpose": "health-check"})

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and connections."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kek_id}>"

    def __reduce__(self) -> Any:
        raise TypeError(f"{type(self).__name__} objects cannot be pickled")
