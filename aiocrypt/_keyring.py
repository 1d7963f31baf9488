"""A keyring snapshot: every loaded DEK by key id, and the active one per key type.

Pure and sync: the async ``KeyManager`` builds a new snapshot whenever keys
change and swaps it in whole, so readers never see a half-updated keyring.
Code that cannot await (SQLAlchemy type decorators, Flask session interfaces)
encrypts and decrypts through a snapshot directly.

Text tokens carry a purpose in their associated data (format version 2): a
field by default, ``purpose=Purpose.SESSION`` / ``Purpose.CACHE`` for session
and cache payloads, so a token of one kind never opens as another. Version 1
tokens (no purpose) still open unless the keyring was built with
``accept_format_v1=False``.
"""

from __future__ import annotations

from binascii import a2b_base64
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from cryptography.exceptions import InvalidTag

from . import _compression
from ._codec import STR_TAG, decode_value, encode_value
from ._crypto import DataKey
from ._errors import (
    DecryptionError,
    DecryptionFailure,
    KeyNotFoundError,
    KeyStateError,
    decryption_failed,
)
from ._format import (
    ALG_AES_256_GCM,
    ALG_AES_256_SIV,
    B64_CANONICAL_LAST,
    B64URL_TO_STD,
    FLAG_ZSTD,
    FORMAT_V1,
    FORMAT_V2,
    GCM_TAG_BYTES,
    KEY_ID_DOT_END,
    KEY_ID_DOT_FIRST,
    MAX_FIELD_PLAINTEXT,
    MAX_TOKEN_CHARS,
    TEXT_BODY_HEAD,
    TEXT_GCM_NONCE,
    TEXT_GCM_SEALED,
    TEXT_PREFIX_LEN,
    TEXT_PREFIX_V1,
    TEXT_PREFIX_V2,
    FormatError,
    Purpose,
    b64decode_canonical,
    context_bytes,
    validate_key_id,
)
from ._types import KeyStatus, KeyType, KeyTypeLike

__all__ = ["Keyring", "UnknownKeyError", "undecodable", "unreadable", "wrong_key_type"]

#: NIST SP 800-38D's limit of messages under one key with random 96-bit nonces.
GCM_MESSAGE_LIMIT: Final = 2**32
# Decrypt's fast path takes tokens up to this size (larger ones take the general
# path, which does not copy them); the key id's closing dot is found before this.
_FAST_TOKEN_CHARS: Final = 64 * 1024
_GCM_FIELD: Final = ALG_AES_256_GCM
_MIN_GCM_RAW: Final = TEXT_GCM_SEALED + GCM_TAG_BYTES  # algorithm, flags, nonce, tag
_STR_TAG_BYTE: Final = STR_TAG[0]
_FIELD: Final = Purpose.FIELD


_MALFORMED: Final = DecryptionFailure.MALFORMED
_NOT_READABLE: Final = DecryptionFailure.KEY_NOT_READABLE


class UnknownKeyError(DecryptionError):
    """The token names a key id this snapshot does not hold (the caller may reload once)."""

    key_id: str

    def __init__(self, key_id: str) -> None:
        super().__init__(reason=DecryptionFailure.UNKNOWN_KEY, key_id=key_id)


def unreadable(dk: DataKey, *, for_reencryption: bool = False) -> DecryptionError:
    """Why ``dk`` may not be read (its status, minimum version or age): identifiers only."""
    status = dk.key.status
    if dk.key.decrypt_disabled:
        why = "is below its key type's minimum decryption version"
    elif status is KeyStatus.DESTROYED:
        why = "was destroyed"
    elif status in (KeyStatus.REVOKED, KeyStatus.COMPROMISED) and not for_reencryption:
        why = f"is {status.value} (only re-encryption reads it)"
    else:
        why = "expired past its grace period (only re-encryption reads it)"
    return decryption_failed(_NOT_READABLE, dk.key_id, f"key {dk.key_id} {why}")


def wrong_key_type(dk: DataKey, key_type: KeyTypeLike) -> DecryptionError:
    return decryption_failed(
        DecryptionFailure.WRONG_KEY_TYPE,
        dk.key_id,
        f"token is for key type {dk.key_type.value}, not {KeyType(key_type).value} "
        f"(key {dk.key_id})",
    )


class Keyring:
    """Immutable snapshot of loaded data keys."""

    __slots__ = (
        "_active",
        "_by_id",
        "_by_prefix",
        "accept_format_v1",
        "general_decrypts",
        "on_allowance",
        "on_expired_use",
        "revision",
    )

    def __init__(
        self,
        data_keys: Iterable[DataKey] = (),
        revision: int = 0,
        *,
        on_expired_use: Callable[[DataKey], None] | None = None,
        on_allowance: Callable[[DataKey, Callable[[DataKey], str]], str] | None = None,
        accept_format_v1: bool = True,
    ) -> None:
        self._by_id: dict[str, DataKey] = {}
        self._active: dict[str, DataKey] = {}
        self._by_prefix: dict[str, DataKey] = {}  # "ac2.<key id>." -> key (version 2 only)
        for dk in data_keys:
            self._by_id[dk.key_id] = dk
            self._by_prefix[dk.text_prefix] = dk
            if dk.key.status is KeyStatus.ACTIVE:
                current = self._active.get(dk.key.key_type)
                if current is None or dk.key.version > current.key.version:
                    self._active[dk.key.key_type] = dk
        self.revision = revision
        #: Called (sync) when data is read with an expired key inside its grace period.
        self.on_expired_use = on_expired_use
        #: Whether format version 1 (no purpose binding) is still read; turn it off
        #: once the re-encryption engine moved every row to version 2.
        self.accept_format_v1 = accept_format_v1
        #: Called (sync) by the encrypt paths as ``on_allowance(dk, seal)`` when the
        #: active key's reserved allowance runs low or out: returns ``seal(key)`` for a
        #: key that may encrypt now, or raises ``KeyStateError``. The ``KeyManager``
        #: sets it; a keyring built by hand (no store, no fleet) is held only to the
        #: 2**32 limit per key.
        self.on_allowance = on_allowance
        #: How many ``decrypt`` calls took the general path. Counted there only, so the
        #: fast path pays nothing; tests hold well-formed field tokens at zero, so a
        #: broken fast path cannot hide behind the general one (tests/core).
        self.general_decrypts = 0

    def __repr__(self) -> str:
        return f"<Keyring revision={self.revision} keys={len(self._by_id)}>"

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[DataKey]:
        return iter(self._by_id.values())

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._by_id

    def get(self, key_id: str) -> DataKey | None:
        return self._by_id.get(key_id)

    def active(self, key_type: KeyTypeLike) -> DataKey:
        dk = self._active.get(key_type)
        if dk is None:
            raise KeyNotFoundError(f"no active key of type {KeyType(key_type).value!r} loaded")
        return dk

    def has_active(self, key_type: str) -> bool:
        return key_type in self._active

    def get_active(self, key_type: str) -> DataKey | None:
        return self._active.get(key_type)

    @property
    def active_keys(self) -> Mapping[str, DataKey]:
        return dict(self._active)

    # -- fields -------------------------------------------------------------

    def encrypt(
        self,
        value: Any,
        key_type: KeyTypeLike,
        context: str | bytes | None = None,
        *,
        compression_level: int | None = None,
        purpose: Purpose = _FIELD,
    ) -> str:
        """Encrypt ``value`` with the active key of ``key_type`` (AES-256-GCM, text form)."""
        if type(value) is str and compression_level is None and purpose is _FIELD:
            plaintext = STR_TAG + value.encode()
            dk = self._active.get(key_type)  # the common case
            if dk is not None:
                # The usage limit: claim one encryption with no call between the check
                # and the count, so threads cannot pass refill_at together (under the
                # GIL no other thread runs between these bytecodes; see test_hard_limits).
                claimed = dk.encryptions + 1
                if claimed <= dk.refill_at:
                    dk.encryptions = claimed
                    return dk.seal_field(plaintext, context, 0)
            return self.encrypt_bytes(plaintext, key_type, context, purpose=purpose)
        return self.encrypt_bytes(
            encode_value(value),
            key_type,
            context,
            compression_level=compression_level,
            purpose=purpose,
        )

    def _sealed(self, key_type: KeyTypeLike, seal: Callable[[DataKey], str]) -> str:
        """``seal(active key)``, held to the key's usage allowance.

        Below ``refill_at`` (the common case) it seals at once; from there on the
        keyring's ``on_allowance`` decides, and seals under its lock so concurrent
        threads cannot pass the allowance together.
        """
        dk = self._active.get(key_type)
        if dk is None:
            raise KeyNotFoundError(f"no active key of type {KeyType(key_type).value!r} loaded")
        if self.on_allowance is not None:
            return self.on_allowance(dk, seal)
        if dk.encryptions >= GCM_MESSAGE_LIMIT:
            raise KeyStateError(f"key {dk.key_id} reached 2**32 encryptions")
        return seal(dk)

    def encrypt_bytes(
        self,
        plaintext: bytes,
        key_type: KeyTypeLike,
        context: str | bytes | None = None,
        *,
        compression_level: int | None = None,
        purpose: Purpose = _FIELD,
    ) -> str:
        if len(plaintext) > MAX_FIELD_PLAINTEXT:  # its token would be refused as too long
            raise ValueError(
                f"a field holds at most {MAX_FIELD_PLAINTEXT} bytes; "
                "use encrypt_bulk_data or encrypt_stream"
            )
        if compression_level is None and purpose is _FIELD:
            dk = self._active.get(key_type)
            if dk is not None:
                claimed = dk.encryptions + 1  # as in encrypt(): check and count, no call
                if claimed <= dk.refill_at:
                    dk.encryptions = claimed
                    return dk.seal_field(plaintext, context, 0)
            return self._sealed(key_type, lambda dk: dk.seal_field(plaintext, context))
        if compression_level is None:
            return self._sealed(
                key_type,
                lambda dk: dk.seal_text(plaintext, context_bytes(context), purpose=purpose),
            )
        compressed = _compression.compress(plaintext, compression_level)
        return self._sealed(
            key_type,
            lambda dk: dk.seal_text(compressed, context_bytes(context), FLAG_ZSTD, purpose=purpose),
        )

    def encrypt_deterministic(
        self,
        value: Any,
        key_type: KeyTypeLike,
        context: str | bytes | None = None,
        *,
        purpose: Purpose = _FIELD,
    ) -> str:
        """Equal values under the same key and context give equal tokens (AES-SIV)."""
        plaintext = encode_value(value)
        return self._sealed(
            key_type,
            lambda dk: dk.seal_deterministic(plaintext, context_bytes(context), purpose=purpose),
        )

    def decrypt(
        self,
        token: str,
        key_type: KeyTypeLike,
        context: str | bytes | None = None,
        *,
        for_reencryption: bool = False,
        purpose: Purpose = _FIELD,
    ) -> Any:
        """Authenticate, decrypt and decode a text token; every failure is ``DecryptionError``."""
        # Fast path: a small version 2 AES-GCM field token without flags, of a key that
        # is readable and not expired (_open_fast); any other token goes the general way.
        plaintext = self._open_fast(token, key_type, context, purpose)
        if plaintext is not None:
            try:
                if plaintext[0] == _STR_TAG_BYTE:  # not empty: size > _MIN_GCM_RAW
                    return plaintext[1:].decode()
                return decode_value(plaintext)
            except ValueError:
                pass  # the general path fails too, and says why (only failures pay)
        plaintext = self._open_general(
            token, key_type, context, for_reencryption=for_reencryption, purpose=purpose
        )
        try:
            return decode_value(plaintext)
        except ValueError:
            raise undecodable(token) from None

    def _open_fast(
        self, token: str, key_type: KeyTypeLike, context: str | bytes | None, purpose: Purpose
    ) -> bytes | None:
        """The plaintext of a well-formed field token, or None for the general path.

        It makes every check the general path makes (tests/core/test_coverage_keyring.py,
        tests/test_field_fastpath.py) for the tokens it takes: a field token (``purpose``)
        of at most ``_FAST_TOKEN_CHARS`` characters, version 2, AES-GCM, no flags,
        canonical base64, a key of ``key_type`` that is readable and not expired.
        Anything else, and any failure, is left to the general path, which says why.
        """
        if type(token) is not str or len(token) > _FAST_TOKEN_CHARS or purpose is not _FIELD:
            return None
        dk = self._active.get(key_type)  # most tokens are of the active key
        if dk is not None and token.startswith(dk.text_prefix):
            start = len(dk.text_prefix)
        else:
            start = token.find(".", KEY_ID_DOT_FIRST, KEY_ID_DOT_END) + 1
            dk = self._by_prefix.get(token[:start])  # "ac2.<key id>.": the version too
            if dk is None or dk.key_type != key_type:
                return None
        if not dk.readable or dk.expired:
            return None
        try:
            raw = a2b_base64(token[start:].encode().translate(B64URL_TO_STD), strict_mode=True)
            size = len(raw)
            tail = size % 3
            # non-canonical base64 goes the general way (which says so)
            if (
                size > _MIN_GCM_RAW
                and raw[0] == _GCM_FIELD
                and raw[1] == 0
                and len(token) - start == (size + 2) // 3 * 4
                and not (tail and token[tail - 4] not in B64_CANONICAL_LAST[tail])
            ):
                aad = dk.field_aads.get(context) if type(context) is str else None
                if aad is None:
                    aad = dk.field_aad(context)
                plaintext: bytes = dk.gcm_decrypt(raw[TEXT_GCM_NONCE], raw[TEXT_GCM_SEALED:], aad)
                return plaintext
        except (InvalidTag, ValueError):
            pass
        return None

    def decrypt_bytes(
        self,
        token: str,
        key_type: KeyTypeLike,
        context: str | bytes | None = None,
        *,
        for_reencryption: bool = False,
        purpose: Purpose = _FIELD,
    ) -> bytes:
        """Authenticate and decrypt a text token; every failure is ``DecryptionError``."""
        plaintext = self._open_fast(token, key_type, context, purpose)
        if plaintext is not None:
            return plaintext
        return self._open_general(
            token, key_type, context, for_reencryption=for_reencryption, purpose=purpose
        )

    def _open_general(  # noqa: C901 - the general decrypt path: each branch is a distinct refusal reason, inlined for speed and each tested
        self,
        token: str,
        key_type: KeyTypeLike,
        context: str | bytes | None,
        *,
        for_reencryption: bool,
        purpose: Purpose,
    ) -> bytes:
        """Every token the fast path does not take, and every failure, with its reason."""
        self.general_decrypts += 1
        # Token splitting, check_decryptable and context_bytes inlined.
        # A failure raises a DecryptionError that names its reason; computing it
        # costs nothing on success.
        dk: DataKey | None = None
        try:
            if type(token) is not str or len(token) > MAX_TOKEN_CHARS:
                raise FormatError("not a text token")
            if token.startswith(TEXT_PREFIX_V2):
                version = FORMAT_V2
            elif token.startswith(TEXT_PREFIX_V1) and self.accept_format_v1:
                version = FORMAT_V1
            elif token.startswith(TEXT_PREFIX_V1):
                raise decryption_failed(
                    _MALFORMED,
                    None,
                    "format version 1 tokens are no longer read (accept_format_v1=False)",
                )
            else:
                raise FormatError("not an aiocrypt text token")
            dot = token.find(".", KEY_ID_DOT_FIRST, KEY_ID_DOT_END)
            if dot < 0:
                raise FormatError("no key id")
            dk = self._by_id.get(token[TEXT_PREFIX_LEN:dot])
            if dk is None:
                raise UnknownKeyError(validate_key_id(token[TEXT_PREFIX_LEN:dot]))
            if dk.key.key_type != key_type:
                raise wrong_key_type(dk, key_type)
            if not (dk.readable or (for_reencryption and dk.reencryptable)):
                raise unreadable(dk, for_reencryption=for_reencryption)
            if dk.expired:
                self._expired_use(dk, for_reencryption)
            raw = b64decode_canonical(token, dot + 1)
            if len(raw) < 2:
                raise FormatError("token too short")
            algorithm, flags = raw[0], raw[1]
            if flags & ~FLAG_ZSTD:
                raise FormatError("unknown flags")
            ctx = (
                context.encode("utf-8")
                if type(context) is str and len(context) <= 1024
                else context_bytes(context)
            )
            if algorithm == ALG_AES_256_GCM:
                plaintext = dk.open_gcm_raw(flags, raw, ctx, version=version, purpose=purpose)
            elif algorithm == ALG_AES_256_SIV:
                plaintext = dk.open_siv(
                    flags, raw[TEXT_BODY_HEAD:], ctx, version=version, purpose=purpose
                )
            else:
                raise FormatError("algorithm not valid in text form")
        except InvalidTag:
            raise decryption_failed(
                DecryptionFailure.AUTHENTICATION_FAILED, dk.key_id if dk is not None else None
            ) from None
        except ValueError:  # FormatError and bad key ids are ValueErrors
            raise decryption_failed(_MALFORMED, dk.key_id if dk is not None else None) from None
        if flags & FLAG_ZSTD:
            try:  # no bigger than an uncompressed field could be: no decompression bombs
                return _compression.decompress(plaintext, MAX_FIELD_PLAINTEXT)
            except ValueError:
                raise decryption_failed(
                    _MALFORMED,
                    dk.key_id,
                    f"the decrypted value does not decompress within the limits (key {dk.key_id})",
                ) from None
        return plaintext

    def check_decryptable(
        self, dk: DataKey, key_type: KeyTypeLike, *, for_reencryption: bool = False
    ) -> None:
        if dk.key.key_type != key_type:
            raise wrong_key_type(dk, key_type)
        if not (dk.readable or (for_reencryption and dk.reencryptable)):
            raise unreadable(dk, for_reencryption=for_reencryption)
        if dk.expired:
            self._expired_use(dk, for_reencryption)

    def _expired_use(self, dk: DataKey, for_reencryption: bool) -> None:
        """Past grace: refuse plain reads. Within grace: allow, loudly."""
        if dk.past_grace and not for_reencryption:
            raise unreadable(dk)
        if self.on_expired_use is not None:
            self.on_expired_use(dk)

    def require_encryptable(self, key_type: KeyTypeLike) -> DataKey:
        dk = self.active(key_type)
        if not dk.key.status.can_encrypt:
            raise KeyStateError(f"key {dk.key_id} is {dk.key.status.value}")
        return dk


def undecodable(token: str) -> DecryptionError:
    """An authentic plaintext that the value codec refuses (named by the token's key id)."""
    dot = token.find(".", KEY_ID_DOT_FIRST, KEY_ID_DOT_END)
    key_id = token[TEXT_PREFIX_LEN:dot] if dot > 0 else None
    return decryption_failed(
        _MALFORMED,
        key_id,
        "the decrypted value does not decode" + (f" (key {key_id})" if key_id else ""),
    )
