"""The local master-key KEK provider (``ENCRYPTION_MASTER_KEY``).

Wrapping is AES-256-GCM under a key derived from the master key with HKDF, with
the canonical context as associated data. Wrapped form: version (1) || nonce (12)
|| ciphertext || tag (16). The KEK id is a fingerprint derived from the master
key by HKDF under a separate label, so it identifies the key without revealing it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._crypto import derive_key
from .._errors import KekProviderError
from ._base import KekProvider, canonical_context

__all__ = ["LocalKekProvider"]

_VERSION: Final = b"\x01"
_AAD_LABEL: Final = b"aiocrypt/v1/local-kek\x00"


class LocalKekProvider(KekProvider):
    """KEK held in process memory, derived from a 32-byte master key."""

    backend = "local"

    def __init__(self, master_key: bytes) -> None:
        if not isinstance(master_key, bytes) or len(master_key) != 32:
            raise ValueError("the master key must be 32 bytes")
        self._aead = AESGCM(derive_key(master_key, b"local-kek-wrap"))
        self._kek_id = "local:" + derive_key(master_key, b"local-kek-id", 8).hex()

    @classmethod
    def generate(cls) -> LocalKekProvider:
        return cls(os.urandom(32))

    @property
    def kek_id(self) -> str:
        return self._kek_id

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        return self.wrap_sync(plaintext, context)

    async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        return self.unwrap_sync(wrapped, context)

    def wrap_sync(
        self, plaintext: bytes, context: Mapping[str, str], *, nonce: bytes | None = None
    ) -> bytes:
        if nonce is None:
            nonce = os.urandom(12)
        aad = _AAD_LABEL + canonical_context(context)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def unwrap_sync(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        if len(wrapped) < 1 + 12 + 16 or wrapped[:1] != _VERSION:
            raise KekProviderError("local KEK: wrapped key is malformed", backend=self.backend)
        aad = _AAD_LABEL + canonical_context(context)
        try:
            return self._aead.decrypt(wrapped[1:13], wrapped[13:], aad)
        except InvalidTag:
            raise KekProviderError(
                f"local KEK {self._kek_id}: cannot unwrap the key (wrong master key, or the "
                "wrapped key was altered or moved to another key record)",
                backend=self.backend,
            ) from None
