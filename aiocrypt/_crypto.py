"""AEAD primitives bound to one data-encryption key (pure, sync).

``DataKey`` holds an unwrapped DEK together with the cipher objects built from
it, so the hot path builds nothing per call. Sub-keys for deterministic
encryption and streams are derived with HKDF, never the DEK reused raw across
algorithms. It has a material-free repr and refuses pickling.
"""

from __future__ import annotations

import binascii
import os
import struct
from collections.abc import Callable
from typing import Any, Final, NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._format import (
    ALG_AES_256_GCM,
    ALG_AES_256_GCM_STREAM,
    ALG_AES_256_SIV,
    FORMAT_VERSION,
    TEXT_PREFIX,
    FormatError,
    b64encode_urlsafe,
)
from ._keys import EncryptionKey
from ._types import KeyStatus

__all__ = ["DEK_BYTES", "NONCE_BYTES", "TAG_BYTES", "DataKey", "derive_key", "stream_nonce"]

DEK_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
STREAM_SALT_BYTES: Final = 16
STREAM_PREFIX_BYTES: Final = 7
_STREAM_NONCE: Final = struct.Struct(">7sIB")
_GCM_LEAD: Final = (bytes((ALG_AES_256_GCM, 0)), bytes((ALG_AES_256_GCM, 1)))
_STD_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")

RandomSource = Callable[[int], bytes]


def derive_key(material: bytes, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, b"aiocrypt/v1/" + info).derive(material)


class DataKey:
    """An unwrapped DEK ready to encrypt and decrypt. Never logged, never pickled."""

    __slots__ = ("_aad_base", "_gcm", "_gcm_aad", "_material", "_siv", "_text_prefix",
                 "allowance", "encryptions", "expired", "key", "past_grace", "readable",
                 "reencryptable")

    def __init__(self, key: EncryptionKey, material: bytes) -> None:
        if len(material) != DEK_BYTES:
            raise ValueError("data-encryption keys are 32 bytes (AES-256)")
        self.key = key
        self._material = bytes(material)
        self._gcm = AESGCM(self._material)
        self._siv: AESSIV | None = None
        kid = key.key_id.encode("ascii")
        kt = key.key_type.value.encode("ascii")
        tail = bytes((len(kt),)) + kt
        # Associated-data prefix per algorithm: header || len(key type) || key type.
        self._aad_base = {
            (alg, flags): bytes((FORMAT_VERSION, alg, flags, len(kid))) + kid + tail
            for alg in (ALG_AES_256_GCM, ALG_AES_256_SIV, ALG_AES_256_GCM_STREAM)
            for flags in (0, 1)
        }
        self._gcm_aad = (self._aad_base[(ALG_AES_256_GCM, 0)],
                         self._aad_base[(ALG_AES_256_GCM, 1)])
        self._text_prefix = f"{TEXT_PREFIX}{key.key_id}."
        #: Messages sealed with this key by this process (usage limits, statistics).
        self.encryptions = 0
        #: Encryptions this process may make before reserving more from the store.
        self.allowance = 0
        #: Whether plain reads may use this key (withdrawn keys serve re-encryption only).
        self.reencryptable = key.status is not KeyStatus.DESTROYED and not key.decrypt_disabled
        self.readable = self.reencryptable and key.status not in (KeyStatus.REVOKED,
                                                                  KeyStatus.COMPROMISED)
        #: Past max age (decrypts loudly) / past the grace period too (refuses reads).
        #: Set by the KeyManager from its clock whenever it builds a keyring.
        self.expired = False
        self.past_grace = False

    # -- identity & safety --------------------------------------------------

    @property
    def key_id(self) -> str:
        return self.key.key_id

    def __repr__(self) -> str:
        return f"<DataKey {self.key.key_id} {self.key.status.value}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("DataKey objects cannot be pickled")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("DataKey objects cannot be pickled")

    def aad(self, algorithm: int, flags: int, context: bytes) -> bytes:
        return self._aad_base[(algorithm, flags & 1)] + context

    def derive(self, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
        """A sub-key bound to this DEK and ``info`` (blind indexes, caches, streams)."""
        return derive_key(self._material, info, length, salt)

    def with_key(self, key: EncryptionKey) -> DataKey:
        """The same material under updated metadata (status changes); usage carries over."""
        updated = DataKey(key, self._material)
        updated.encryptions = self.encryptions
        updated.allowance = self.allowance
        return updated

    # -- AES-256-GCM fields -------------------------------------------------

    def seal_text(self, plaintext: bytes, context: bytes, flags: int = 0,
                  nonce: bytes | None = None) -> str:
        if nonce is None:
            nonce = os.urandom(NONCE_BYTES)
        self.encryptions += 1
        sealed = self._gcm.encrypt(nonce, plaintext, self._gcm_aad[flags] + context)
        body = binascii.b2a_base64(_GCM_LEAD[flags] + nonce + sealed, newline=False)
        return self._text_prefix + body.translate(_STD_TO_URLSAFE).decode("ascii")

    def open_gcm_raw(self, flags: int, raw: bytes, context: bytes) -> bytes:
        """Open algorithm || flags || nonce || ciphertext || tag (the decoded text body)."""
        if len(raw) < 2 + NONCE_BYTES + TAG_BYTES:
            raise FormatError("token too short")
        return self._gcm.decrypt(raw[2:14], raw[14:], self._gcm_aad[flags] + context)

    def open_gcm(self, flags: int, body: bytes | memoryview, context: bytes) -> bytes:
        if len(body) < NONCE_BYTES + TAG_BYTES:
            raise FormatError("token too short")
        return self._gcm.decrypt(bytes(body[:NONCE_BYTES]), bytes(body[NONCE_BYTES:]),
                                 self.aad(ALG_AES_256_GCM, flags, context))

    def gcm_parts(self, plaintext: bytes, context: bytes, flags: int = 0,
                  nonce: bytes | None = None) -> tuple[bytes, bytes]:
        """(nonce, ciphertext || tag) for bulk blobs."""
        if nonce is None:
            nonce = os.urandom(NONCE_BYTES)
        self.encryptions += 1
        return nonce, self._gcm.encrypt(nonce, plaintext,
                                        self.aad(ALG_AES_256_GCM, flags, context))

    # -- AES-SIV (deterministic) --------------------------------------------

    def _siv_cipher(self) -> AESSIV:
        if self._siv is None:
            self._siv = AESSIV(self.derive(b"aes-siv", 64))
        return self._siv

    def seal_deterministic(self, plaintext: bytes, context: bytes, flags: int = 0) -> str:
        sealed = self._siv_cipher().encrypt(plaintext, [self.aad(ALG_AES_256_SIV, flags, context)])
        return self._text_prefix + b64encode_urlsafe(bytes((ALG_AES_256_SIV, flags)) + sealed)

    def open_siv(self, flags: int, body: bytes | memoryview, context: bytes) -> bytes:
        if len(body) < TAG_BYTES:
            raise FormatError("token too short")
        return self._siv_cipher().decrypt(bytes(body),
                                          [self.aad(ALG_AES_256_SIV, flags, context)])

    # -- segmented streams --------------------------------------------------

    def stream_cipher(self, salt: bytes, *, sealing: bool = False) -> AESGCM:
        if sealing:
            self.encryptions += 1
        return AESGCM(self.derive(b"stream", 32, salt))


def stream_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return _STREAM_NONCE.pack(prefix, index, 1 if last else 0)

