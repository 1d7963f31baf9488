"""AEAD primitives bound to one data-encryption key (pure, sync).

``DataKey`` holds an unwrapped DEK together with the cipher objects built from
it and the associated-data prefixes of every (version, algorithm, flags,
purpose) it may meet, so the hot path builds nothing per call. It writes format
version 2 only; version 1 is opened, never written (deterministic lookup tokens
aside: :meth:`DataKey.deterministic_tokens`). Sub-keys for deterministic
encryption and streams are derived with HKDF, never the DEK reused raw across
algorithms. It has a material-free repr and refuses pickling.
"""

from __future__ import annotations

import binascii
import hmac
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final, NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._format import (
    ALG_AES_256_GCM,
    ALG_AES_256_GCM_STREAM,
    ALG_AES_256_SIV,
    FORMAT_V1,
    FORMAT_V2,
    GCM_NONCE_BYTES,
    GCM_TAG_BYTES,
    STD_TO_B64URL,
    TEXT_GCM_NONCE,
    TEXT_GCM_SEALED,
    FormatError,
    Purpose,
    aad_prefix,
    b64encode_urlsafe,
    context_bytes,
    text_prefix,
)
from ._keys import EncryptionKey
from ._types import KeyStatus

__all__ = [
    "DEK_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "DataKey",
    "derive_key",
    "field_nonce",
    "stream_nonce",
]

DEK_BYTES: Final = 32
NONCE_BYTES: Final = GCM_NONCE_BYTES
TAG_BYTES: Final = GCM_TAG_BYTES
STREAM_SALT_BYTES: Final = 16
STREAM_PREFIX_BYTES: Final = 7
_STREAM_NONCE: Final = struct.Struct(">7sIB")
_GCM_LEAD: Final = (bytes((ALG_AES_256_GCM, 0)), bytes((ALG_AES_256_GCM, 1)))
_GCM_LEAD0: Final = _GCM_LEAD[0]
_FIELD: Final = Purpose.FIELD
#: Field AADs cached per DataKey (one per distinct str context; cleared when full).
FIELD_AAD_CACHE_SIZE: Final = 512
_b2a_base64 = binascii.b2a_base64

# Field nonces: 96 bits from os.urandom for every encryption, fetched NONCE_BATCH
# nonces per call, because one getrandom() call (about 0.5 us here) costs as much
# as the AES-GCM of a small field. Each nonce is taken from the pool by
# deque.popleft, which is atomic: no two threads ever get the same one. A forked
# child starts with an empty pool, so it never reuses a nonce its parent holds.
# Nonces are public (they are in every token); only their uniqueness matters.
NONCE_BATCH: Final = 256
_nonce_pool: deque[bytes] = deque()
_take_nonce = _nonce_pool.popleft
_POOLED: Final = [
    slice(i, i + NONCE_BYTES) for i in range(NONCE_BYTES, NONCE_BYTES * NONCE_BATCH, NONCE_BYTES)
]
if hasattr(os, "register_at_fork"):  # POSIX (where processes can fork)
    os.register_at_fork(after_in_child=_nonce_pool.clear)


def _refill_nonces() -> bytes:
    """The pool ran dry: return a fresh nonce and pool NONCE_BATCH - 1 more."""
    data = os.urandom(NONCE_BYTES * NONCE_BATCH)
    _nonce_pool.extend(map(data.__getitem__, _POOLED))
    return data[:NONCE_BYTES]


def field_nonce() -> bytes:
    """A fresh random 96-bit nonce for a field token."""
    try:
        return _take_nonce()
    except IndexError:
        return _refill_nonces()


RandomSource = Callable[[int], bytes]


def derive_key(material: bytes, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, b"aiocrypt/v1/" + info).derive(material)


class DataKey:
    """An unwrapped DEK ready to encrypt and decrypt. Never logged, never pickled."""

    __slots__ = (
        "_aad_base",
        "_gcm",
        "_gcm_aad",
        "_material",
        "_siv",
        "allowance",
        "encryptions",
        "expired",
        "field_aads",
        "gcm_decrypt",
        "key",
        "key_type",
        "past_grace",
        "readable",
        "reencryptable",
        "refill_at",
        "text_prefix",
        "text_prefix_v1",
    )

    def __init__(self, key: EncryptionKey, material: bytes) -> None:
        if len(material) != DEK_BYTES:
            raise ValueError("data-encryption keys are 32 bytes (AES-256)")
        self.key = key
        self._material = bytes(material)
        self._gcm = AESGCM(self._material)
        self._siv: AESSIV | None = None
        # Associated-data prefix per (version, algorithm, flags, purpose); version 1
        # has no purpose byte, so its entries are the same for every purpose.
        self._aad_base = {
            (version, alg, flags, purpose): aad_prefix(
                version, alg, flags, key.key_id, key.key_type.value, purpose
            )
            for version in (FORMAT_V1, FORMAT_V2)
            for alg in (ALG_AES_256_GCM, ALG_AES_256_SIV, ALG_AES_256_GCM_STREAM)
            for flags in (0, 1)
            for purpose in Purpose
        }
        self._gcm_aad = (
            self._aad_base[(FORMAT_V2, ALG_AES_256_GCM, 0, _FIELD)],
            self._aad_base[(FORMAT_V2, ALG_AES_256_GCM, 1, _FIELD)],
        )
        #: What every (version 2) text token of this key starts with (the keyring's
        #: lookup key), and what its version 1 tokens start with.
        self.text_prefix = text_prefix(key.key_id)
        self.text_prefix_v1 = text_prefix(key.key_id, FORMAT_V1)
        self.key_type = key.key_type
        #: Hot-path helpers for the keyring (see ``Keyring.decrypt``): the AES-GCM
        #: decrypt function, and the flag-less GCM field AAD per str context.
        self.gcm_decrypt = self._gcm.decrypt
        self.field_aads: dict[str, bytes] = {}
        #: Messages sealed with this key by this process (usage limits, statistics).
        self.encryptions = 0
        #: Encryptions this process may make before reserving more from the store.
        self.allowance = 0
        #: Below this count sync paths seal without asking; at it they ask the keyring's
        #: ``on_allowance`` (which reserves the next block ahead, or waits at ``allowance``).
        self.refill_at = 0
        #: Whether plain reads may use this key (withdrawn keys serve re-encryption only).
        self.reencryptable = key.status is not KeyStatus.DESTROYED and not key.decrypt_disabled
        self.readable = self.reencryptable and key.status not in (
            KeyStatus.REVOKED,
            KeyStatus.COMPROMISED,
        )
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

    def aad(
        self,
        algorithm: int,
        flags: int,
        context: bytes,
        *,
        purpose: Purpose,
        version: int = FORMAT_V2,
        stream_params: bytes = b"",
    ) -> bytes:
        """Associated data (see :mod:`aiocrypt._format`); ``stream_params`` only for v2 streams."""
        if version == FORMAT_V1:
            return self._aad_base[(version, algorithm, flags & 1, _FIELD)] + context
        return self._aad_base[(version, algorithm, flags & 1, purpose)] + stream_params + context

    def derive(self, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
        """A sub-key bound to this DEK and ``info`` (blind indexes, caches, streams)."""
        return derive_key(self._material, info, length, salt)

    def hand_usage_to(self, other: DataKey) -> None:
        """Move this key's usage and remaining allowance to ``other`` (the same key,
        loaded again): an old snapshot still holding this object must not spend the
        allowance a second time, so this one keeps none."""
        other.encryptions = self.encryptions
        other.allowance = self.allowance
        other.refill_at = self.refill_at
        self.allowance = self.refill_at = 0

    def holds(self, material: bytes) -> bool:
        """Whether this is the DEK ``material`` (constant time)."""
        return hmac.compare_digest(self._material, material)

    def rebind(self, key: EncryptionKey) -> None:
        """Take ``key``'s record (the same key id and DEK, a new status or wrapping)."""
        if key.key_id != self.key.key_id or key.key_type != self.key_type:
            raise ValueError("rebind takes a record of the same key")
        self.key = key
        self.reencryptable = key.status is not KeyStatus.DESTROYED and not key.decrypt_disabled
        self.readable = self.reencryptable and key.status not in (
            KeyStatus.REVOKED,
            KeyStatus.COMPROMISED,
        )

    # -- AES-256-GCM fields -------------------------------------------------

    def field_aad(self, context: str | bytes | None) -> bytes:
        """Associated data of a flag-less GCM field token bound to ``context``.

        Equals ``aad(ALG_AES_256_GCM, 0, context_bytes(context), purpose=Purpose.FIELD)``;
        str contexts (column names, mostly) are cached in :attr:`field_aads`.
        """
        if type(context) is not str:
            if context is None:
                return self._gcm_aad[0]
            return self._gcm_aad[0] + context_bytes(context)
        aad = self.field_aads.get(context)
        if aad is None:
            aad = self._gcm_aad[0] + context_bytes(context)
            if len(self.field_aads) >= FIELD_AAD_CACHE_SIZE:  # e.g. contexts with row ids
                self.field_aads.clear()
            self.field_aads[context] = aad
        return aad

    def seal_field(self, plaintext: bytes, context: str | bytes | None, count: int = 1) -> str:
        """``seal_text(plaintext, context_bytes(context))``: the field hot path.

        ``count=0``: the caller already counted this encryption (see
        ``Keyring.encrypt``, which claims it before the call, atomically)."""
        aad = self.field_aads.get(context) if type(context) is str else None
        if aad is None:
            aad = self.field_aad(context)
        try:
            nonce = _take_nonce()  # field_nonce(), inlined
        except IndexError:
            nonce = _refill_nonces()
        self.encryptions += count
        body = _b2a_base64(
            _GCM_LEAD0 + nonce + self._gcm.encrypt(nonce, plaintext, aad), newline=False
        )
        return self.text_prefix + body.translate(STD_TO_B64URL).decode()

    def seal_fields(
        self, plaintexts: Iterable[bytes], contexts: Iterable[str | bytes | None]
    ) -> list[str]:
        """:meth:`seal_field` for each (plaintext, context) pair (batches)."""
        seal = self.seal_field
        return [
            seal(plaintext, context)
            for plaintext, context in zip(plaintexts, contexts, strict=True)
        ]

    def seal_text(
        self,
        plaintext: bytes,
        context: bytes,
        flags: int = 0,
        nonce: bytes | None = None,
        *,
        purpose: Purpose = _FIELD,
    ) -> str:
        if nonce is None:
            nonce = field_nonce()
        self.encryptions += 1
        aad = (
            self._gcm_aad[flags]
            if purpose is _FIELD
            else self._aad_base[(FORMAT_V2, ALG_AES_256_GCM, flags, purpose)]
        )
        sealed = self._gcm.encrypt(nonce, plaintext, aad + context)
        body = binascii.b2a_base64(_GCM_LEAD[flags] + nonce + sealed, newline=False)
        return self.text_prefix + body.translate(STD_TO_B64URL).decode("ascii")

    def open_gcm_raw(
        self,
        flags: int,
        raw: bytes,
        context: bytes,
        *,
        version: int = FORMAT_V2,
        purpose: Purpose = _FIELD,
    ) -> bytes:
        """Open algorithm || flags || nonce || ciphertext || tag (the decoded text body)."""
        if len(raw) < TEXT_GCM_SEALED + TAG_BYTES:
            raise FormatError("token too short")
        aad = (
            self._gcm_aad[flags]
            if version == FORMAT_V2 and purpose is _FIELD
            else self.aad(ALG_AES_256_GCM, flags, b"", purpose=purpose, version=version)
        )
        # a view, not a copy, of the ciphertext: a hostile token may be many MiB
        return self._gcm.decrypt(
            raw[TEXT_GCM_NONCE], memoryview(raw)[TEXT_GCM_SEALED:], aad + context
        )

    def open_gcm(
        self,
        flags: int,
        body: bytes | memoryview,
        context: bytes,
        *,
        version: int = FORMAT_V2,
        purpose: Purpose = Purpose.BLOB,
    ) -> bytes:
        if len(body) < NONCE_BYTES + TAG_BYTES:
            raise FormatError("token too short")
        return self._gcm.decrypt(
            bytes(body[:NONCE_BYTES]),
            bytes(body[NONCE_BYTES:]),
            self.aad(ALG_AES_256_GCM, flags, context, purpose=purpose, version=version),
        )

    def gcm_parts(
        self, plaintext: bytes, context: bytes, flags: int = 0, nonce: bytes | None = None
    ) -> tuple[bytes, bytes]:
        """(nonce, ciphertext || tag) for one-shot bulk blobs (version 2, purpose BLOB)."""
        if nonce is None:
            nonce = os.urandom(NONCE_BYTES)
        self.encryptions += 1
        return nonce, self._gcm.encrypt(
            nonce, plaintext, self.aad(ALG_AES_256_GCM, flags, context, purpose=Purpose.BLOB)
        )

    # -- AES-SIV (deterministic) --------------------------------------------

    def _siv_cipher(self) -> AESSIV:
        if self._siv is None:
            self._siv = AESSIV(self.derive(b"aes-siv", 64))
        return self._siv

    def seal_deterministic(
        self, plaintext: bytes, context: bytes, flags: int = 0, *, purpose: Purpose = _FIELD
    ) -> str:
        return self._seal_siv(plaintext, context, flags, purpose, FORMAT_V2)

    def deterministic_tokens(
        self, plaintext: bytes, context: bytes, *, v1: bool = True
    ) -> list[str]:
        """Every token ``plaintext`` may be stored as in a deterministic field (for ``=`` /
        ``IN`` lookups): version 2, then version 1 while ``v1`` (rows not yet migrated).

        A version 1 token made here is only ever compared, never stored.
        """
        tokens = [self._seal_siv(plaintext, context, 0, _FIELD, FORMAT_V2)]
        if v1:
            tokens.append(self._seal_siv(plaintext, context, 0, _FIELD, FORMAT_V1))
        return tokens

    def _seal_siv(
        self, plaintext: bytes, context: bytes, flags: int, purpose: Purpose, version: int
    ) -> str:
        aad = self.aad(ALG_AES_256_SIV, flags, context, purpose=purpose, version=version)
        sealed = self._siv_cipher().encrypt(plaintext, [aad])
        prefix = self.text_prefix if version == FORMAT_V2 else self.text_prefix_v1
        return prefix + b64encode_urlsafe(bytes((ALG_AES_256_SIV, flags)) + sealed)

    def open_siv(
        self,
        flags: int,
        body: bytes | memoryview,
        context: bytes,
        *,
        version: int = FORMAT_V2,
        purpose: Purpose = _FIELD,
    ) -> bytes:
        if len(body) < TAG_BYTES:
            raise FormatError("token too short")
        return self._siv_cipher().decrypt(
            bytes(body),
            [self.aad(ALG_AES_256_SIV, flags, context, purpose=purpose, version=version)],
        )

    # -- segmented streams --------------------------------------------------

    def stream_cipher(self, salt: bytes, *, sealing: bool = False) -> AESGCM:
        if sealing:
            self.encryptions += 1
        return AESGCM(self.derive(b"stream", 32, salt))


def stream_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return _STREAM_NONCE.pack(prefix, index, 1 if last else 0)
