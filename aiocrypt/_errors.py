"""The aiocrypt exception tree.

Every exception raised on purpose by aiocrypt derives from ``AiocryptError``::

    AiocryptError
    ├── ConfigurationError          settings missing, malformed or inconsistent
    ├── DecryptionError             any failure to decrypt; .reason says which kind
    │   └── CacheEntryExpiredError  a cache entry past its TTL
    ├── KeyNotFoundError            no key with that id or key type (also LookupError)
    ├── KeyStateError               the key exists but its state forbids the operation
    ├── KeyStoreError               the key store could not be read or written
    │   ├── KeyStoreIntegrityError  contents failed authentication or could not be parsed
    │   ├── ConcurrentModificationError  a write lost an optimistic-concurrency race
    │   └── LockTimeoutError        the store's rotation lock could not be taken in time
    ├── KekProviderError            the key-encryption-key provider failed (names backend)
    ├── UnknownKeyTypeError         a key type not declared, or not a valid name (also
    │                               ValueError); names the nearest declared key types
    ├── ReencryptionError           a stored value could not be re-encrypted (names the row)
    ├── StoreUnavailableError       the Redis behind web sessions or the cache did not answer
    └── UnsupportedTypeError        a value the codec cannot encode (also TypeError)

Caller mistakes that are not about keys raise the built-in ``TypeError`` or
``ValueError``. No message ever contains key material or plaintext.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AiocryptError",
    "CacheEntryExpiredError",
    "ConcurrentModificationError",
    "ConfigurationError",
    "DecryptionError",
    "DecryptionFailure",
    "DecryptionLocation",
    "decryption_failed",
    "KekProviderError",
    "KeyNotFoundError",
    "KeyStateError",
    "KeyStoreError",
    "KeyStoreIntegrityError",
    "LockTimeoutError",
    "ReencryptionError",
    "StoreUnavailableError",
    "UnknownKeyTypeError",
    "UnsupportedTypeError",
]


_logger = logging.getLogger("aiocrypt")


class AiocryptError(Exception):
    """Base class of every error aiocrypt raises on purpose."""


class ConfigurationError(AiocryptError):
    """Settings are missing, malformed or inconsistent."""


class DecryptionFailure(enum.StrEnum):
    """Why a decryption failed: what the token's public parts and the keyring tell.

    Authentication failures (a wrong context, a tampered or truncated body,
    another row's or another purpose's token) are one reason on purpose: AES-GCM
    and AES-SIV cannot tell them apart, and an error that guessed would hand an
    attacker an oracle. The other reasons come from what every token shows in
    clear (its format, key id and key type) and from the keyring's records.
    """

    #: Not a token of any known form: plaintext where a token was expected, bad
    #: base64, a body too short to hold a nonce and a tag, an unknown algorithm or
    #: flag, a refused format version (``accept_format_v1=False``), or a plaintext
    #: that authenticated but does not decode (or decompress within the limits).
    MALFORMED = "malformed"
    #: The token's key is of another key type than the one asked for.
    WRONG_KEY_TYPE = "wrong_key_type"
    #: The token names a key id this key store does not hold.
    UNKNOWN_KEY = "unknown_key"
    #: The key exists but may not be read: revoked, compromised, destroyed, below
    #: the minimum decryption version, or expired past its grace period.
    KEY_NOT_READABLE = "key_not_readable"
    #: Structurally a token of another purpose (a one-shot bulk blob given to a
    #: stream reader). Text tokens bind their purpose in the associated data only,
    #: so a session token read as a field fails as ``AUTHENTICATION_FAILED``.
    WRONG_PURPOSE = "wrong_purpose"
    #: The AEAD tag did not verify (see the class docstring).
    AUTHENTICATION_FAILED = "authentication_failed"
    #: The token's subject key was forgotten (``forget_subject``): erased on purpose.
    SUBJECT_FORGOTTEN = "subject_forgotten"


_REASON_TEXT: dict[DecryptionFailure | None, str] = {
    None: "",
    DecryptionFailure.MALFORMED: "not a valid token",
    DecryptionFailure.WRONG_KEY_TYPE: "token is for another key type",
    DecryptionFailure.UNKNOWN_KEY: "token names a key this store does not hold",
    DecryptionFailure.KEY_NOT_READABLE: "the token's key may not be read",
    DecryptionFailure.WRONG_PURPOSE: "token is of another purpose",
    DecryptionFailure.AUTHENTICATION_FAILED: (
        "token did not authenticate (tampered, truncated, or another context or row)"
    ),
    DecryptionFailure.SUBJECT_FORGOTTEN: "subject forgotten",
}


@dataclass(frozen=True, slots=True)
class DecryptionLocation:
    """Where a value that failed to decrypt is stored (the column types and the
    re-encryption engine fill it in). Identifiers only: never the value."""

    table: str
    column: str
    primary_key: Any = None

    def __str__(self) -> str:
        where = f"{self.table}.{self.column}"
        if self.primary_key is None:
            return where
        return f"{where}, primary key {self.primary_key!r}"


class DecryptionError(AiocryptError):
    """A token or blob could not be decrypted.

    ``reason`` (a :class:`DecryptionFailure`, None when not known) says which kind
    of failure; ``key_id`` is the key id the token names when it names one (public
    in every token); ``location`` is where the value is stored, when the caller
    knows. The message is safe to log: it never holds the token, the value or
    key material. Authentication failures stay one reason among themselves (see
    :class:`DecryptionFailure`).
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: DecryptionFailure | None = None,
        key_id: str | None = None,
        location: DecryptionLocation | None = None,
        detail: str | None = None,
    ) -> None:
        self.reason = reason
        self.key_id = key_id
        self.location = location
        self.detail = detail
        super().__init__(message if message is not None else self._message())

    def _message(self) -> str:
        text = self.detail or _REASON_TEXT[self.reason]
        if self.key_id is not None and self.detail is None:
            text += f" (key {self.key_id})"
        message = f"decryption failed: {text}" if text else "decryption failed"
        if self.location is not None:
            message += f" ({self.location})"
        return message

    def located(self, location: DecryptionLocation) -> DecryptionError:
        """The same failure at ``location`` (a new error of the same reason and key id)."""
        return DecryptionError(
            reason=self.reason, key_id=self.key_id, location=location, detail=self.detail
        )


def decryption_failed(
    reason: DecryptionFailure, key_id: str | None = None, detail: str | None = None
) -> DecryptionError:
    """A ``DecryptionError`` for ``reason``, logged at DEBUG on the ``aiocrypt`` logger.

    ``detail`` replaces the generic text; it must name identifiers only (key ids,
    key types, statuses), never a token, a value or key material.
    """
    error = DecryptionError(reason=reason, key_id=key_id, detail=detail)
    _logger.debug("decryption failed: reason=%s key_id=%s: %s", reason.value, key_id, error)
    return error


class CacheEntryExpiredError(DecryptionError):
    """A cache entry authenticated correctly but is past its expiry time."""

    def __init__(self, message: str = "cache entry expired") -> None:
        super().__init__(message)


class KeyNotFoundError(AiocryptError, LookupError):
    """No key with the given id (or no key of the given type) exists."""


class KeyStateError(AiocryptError):
    """The key exists, but its state forbids what was asked (e.g. encrypting with a revoked key)."""


class KeyStoreError(AiocryptError):
    """The key store could not be read or written."""


class KeyStoreIntegrityError(KeyStoreError):
    """The key store's contents failed authentication or could not be parsed.

    ``key_id`` names the record to blame when there is one (never any material).
    """

    def __init__(self, message: str, *, key_id: str | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id


class ConcurrentModificationError(KeyStoreError):
    """Another writer changed the key store since it was read; re-read and retry."""


class LockTimeoutError(KeyStoreError):
    """The key store's lock could not be acquired within the timeout."""


class KekProviderError(AiocryptError):
    """The key-encryption-key provider failed; the message names the backend and what to check."""

    def __init__(self, message: str, *, backend: str = "", retryable: bool = False) -> None:
        super().__init__(message)
        self.backend = backend
        self.retryable = retryable


class ReencryptionError(AiocryptError):
    """A stored value could not be re-encrypted (it does not decrypt, or is not a token).

    Names the table, column and primary key of the row (``location``) and, when
    the value is a token, why it did not decrypt (``reason``, ``key_id``); never
    its contents.
    """

    def __init__(
        self,
        table: str,
        column: str,
        primary_key: Any,
        *,
        reason: DecryptionFailure | None = None,
        key_id: str | None = None,
    ) -> None:
        why = f" ({_REASON_TEXT[reason]})" if reason is not None else ""
        super().__init__(
            f"{table}.{column}: a stored value could not be decrypted for "
            f"re-encryption{why} (row primary key in .primary_key)"
        )
        self.table = table
        self.column = column
        self.primary_key = primary_key
        self.reason = reason
        self.key_id = key_id

    @property
    def location(self) -> DecryptionLocation:
        return DecryptionLocation(self.table, self.column, self.primary_key)


class StoreUnavailableError(AiocryptError):
    """The Redis behind encrypted sessions or the encrypted cache did not answer.

    ``store`` is ``"session"`` or ``"cache"``. The web extensions answer it with
    503 and ``Retry-After`` unless the app registers its own error handler for
    it; the Redis client's exception is the ``__cause__``.
    """

    def __init__(self, store: str) -> None:
        super().__init__(f"the {store} store (Redis) is unavailable")
        self.store = store


class UnknownKeyTypeError(AiocryptError, ValueError):
    """A key type that is not a valid name, or that the configuration does not declare.

    ``suggestions`` are the nearest declared names (case-insensitive, nearest first);
    the message names them and says how to declare a new key type. A name that does
    not look like one (it could be a value passed in the wrong argument) is not repeated.
    """

    def __init__(self, message: str, *, suggestions: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.suggestions = suggestions


class UnsupportedTypeError(AiocryptError, TypeError):
    """The value codec cannot encode a value of this type."""
