"""The aiocrypt exception tree.

Every exception raised on purpose by aiocrypt derives from ``AiocryptError``::

    AiocryptError
    ├── ConfigurationError          settings missing, malformed or inconsistent
    ├── DecryptionError             any failure to decrypt; deliberately opaque
    │   └── CacheEntryExpiredError  a cache entry past its TTL
    ├── KeyNotFoundError            no key with that id or key type (also LookupError)
    ├── KeyStateError               the key exists but its state forbids the operation
    ├── KeyStoreError               the key store could not be read or written
    │   ├── KeyStoreIntegrityError  contents failed authentication or could not be parsed
    │   ├── ConcurrentModificationError  a write lost an optimistic-concurrency race
    │   └── LockTimeoutError        the store's rotation lock could not be taken in time
    ├── KekProviderError            the key-encryption-key provider failed (names backend)
    ├── ReencryptionError           a stored value could not be re-encrypted (names the row)
    └── UnsupportedTypeError        a value the codec cannot encode (also TypeError)

Caller mistakes that are not about keys raise the built-in ``TypeError`` or
``ValueError``. No message ever contains key material or plaintext.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AiocryptError",
    "CacheEntryExpiredError",
    "ConcurrentModificationError",
    "ConfigurationError",
    "DecryptionError",
    "KekProviderError",
    "KeyNotFoundError",
    "KeyStateError",
    "KeyStoreError",
    "KeyStoreIntegrityError",
    "LockTimeoutError",
    "ReencryptionError",
    "UnsupportedTypeError",
]


class AiocryptError(Exception):
    """Base class of every error aiocrypt raises on purpose."""


class ConfigurationError(AiocryptError):
    """Settings are missing, malformed or inconsistent."""


class DecryptionError(AiocryptError):
    """A token or blob could not be decrypted.

    Opaque on purpose (as Fernet's ``InvalidToken``): a tampered token, a wrong
    key type or context, an unknown or destroyed key all look the same to the
    caller, so the error gives an attacker nothing to probe.
    """

    def __init__(self, message: str = "decryption failed") -> None:
        super().__init__(message)


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

    Names the table, column and primary key of the row; never its contents.
    """

    def __init__(self, table: str, column: str, primary_key: Any) -> None:
        super().__init__(f"{table}.{column}: a stored value could not be decrypted for "
                         "re-encryption (row primary key in .primary_key)")
        self.table = table
        self.column = column
        self.primary_key = primary_key


class UnsupportedTypeError(AiocryptError, TypeError):
    """The value codec cannot encode a value of this type."""
