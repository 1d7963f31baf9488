"""Readers of ciphertext written by other tools, for migrating it onto aiocrypt tokens.

A reader turns one stored legacy value into the plaintext text it was made from;
the column's ``legacy_type`` then parses that text (``"true"`` -> True, ISO
dates, ...) exactly as it parses plaintext written before encryption. Readers
exist only for the migration window: a column configured with one accepts that
legacy form from anyone who can write the database, so the configuration is
explicit and is removed once the census shows no legacy value left
(docs/sqlalchemy.md, "Migrating from sqlalchemy-utils or Fernet").

* :class:`SqlalchemyUtilsReader`: sqlalchemy-utils ``StringEncryptedType`` /
  ``EncryptedType`` with ``AesEngine`` (CBC, the IV is the first 16 bytes of the
  key, one of four paddings, no authentication), ``AesGcmEngine`` (base64 of
  IV (12) || tag (16) || ciphertext) or ``FernetEngine``; the engine key is
  SHA-256 of the configured key, as sqlalchemy-utils derives it. Reimplemented
  from its documented algorithm: sqlalchemy-utils is not imported.
* :class:`FernetReader`: Fernet tokens under one or more keys (MultiFernet order).

A reader holds key material: its repr names the form only, and it refuses pickling.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["FernetReader", "LegacyReader", "LegacyTokenError", "SqlalchemyUtilsReader"]


class LegacyTokenError(ValueError):
    """A stored value is not a valid token of the reader's form (never says why)."""


def _stored_text(stored: Any) -> str:
    # EncryptedType (LargeBinary) stores the base64 text as bytes; Postgres bytea cast
    # to text arrives in hex form ("\x4869...").
    if isinstance(stored, (bytes, bytearray, memoryview)):
        stored = bytes(stored).decode("ascii", "replace")
    if not isinstance(stored, str):
        raise LegacyTokenError("not a legacy token")
    text: str = stored
    if text.startswith("\\x"):
        try:
            text = bytes.fromhex(text[2:]).decode("ascii")
        except (ValueError, UnicodeDecodeError):
            raise LegacyTokenError("not a legacy token") from None
    return text


class LegacyReader(ABC):
    """Opens one legacy ciphertext form. ``name`` identifies the reader in a
    ``ColumnSpec`` (a job carries the name, the worker holds the reader)."""

    name: str

    @abstractmethod
    def _open(self, stored: str) -> bytes: ...

    def open(self, stored: Any) -> str:
        """The plaintext text of ``stored``; raises :class:`LegacyTokenError`."""
        plaintext = self._open(_stored_text(stored))
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise LegacyTokenError("not a legacy token") from None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def __reduce__(self) -> Any:
        raise TypeError(f"{type(self).__name__} holds key material and cannot be pickled")


def _unpad_pkcs5(data: bytes) -> bytes:
    n = data[-1] if data else 0
    if not 1 <= n <= 16 or len(data) < 16 or data[-n:] != bytes([n]) * n:
        raise LegacyTokenError("not a legacy token")
    return data[:-n]


def _unpad_zeroes(data: bytes) -> bytes:
    n = data[-1] if data else 0
    if not 1 <= n <= 16:
        raise LegacyTokenError("not a legacy token")
    return data[:-n]


_UNPAD: Final[dict[str, Callable[[bytes], bytes]]] = {
    "pkcs5": _unpad_pkcs5,
    "oneandzeroes": lambda data: data.rstrip(b"\x00").rstrip(b"\x80"),
    "zeroes": _unpad_zeroes,
    "naive": lambda data: data.rstrip(b"*"),
}

SqlalchemyUtilsEngine = Literal["aes", "aes_gcm", "fernet"]


class SqlalchemyUtilsReader(LegacyReader):
    """Tokens of sqlalchemy-utils ``StringEncryptedType(type, key, engine, padding)``.

    ``key``: the key given to sqlalchemy-utils (str or bytes; a callable key per
    row is not supported). ``engine``: ``"aes"`` (``AesEngine``), ``"aes_gcm"``
    (``AesGcmEngine``) or ``"fernet"`` (``FernetEngine``). ``padding``: the
    ``AesEngine`` padding (``"pkcs5"``, ``"oneandzeroes"``, ``"zeroes"``, or
    ``"naive"``, sqlalchemy-utils' default).

    ``AesEngine`` tokens carry no authentication and a fixed IV: anyone who can
    write the column can alter them, and they are re-encrypted as they are found.
    """

    def __init__(
        self,
        key: str | bytes,
        engine: SqlalchemyUtilsEngine,
        *,
        padding: str | None = None,
        name: str | None = None,
    ) -> None:
        if callable(key) or not isinstance(key, (str, bytes)):
            raise TypeError("give the sqlalchemy-utils key itself (str or bytes)")
        secret = hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()
        self.engine = engine
        self.name = name or f"sqlalchemy_utils_{engine}"
        if engine == "aes":
            mechanism = padding or "naive"
            if mechanism not in _UNPAD:
                raise ValueError(f"unknown padding {padding!r}; use one of {sorted(_UNPAD)}")
            self._unpad = _UNPAD[mechanism]
            self._cbc = Cipher(algorithms.AES(secret), modes.CBC(secret[:16]))
        elif engine == "aes_gcm":
            self._gcm = AESGCM(secret)
        elif engine == "fernet":
            self._fernet = Fernet(base64.urlsafe_b64encode(secret))
        else:
            raise ValueError("engine must be 'aes', 'aes_gcm' or 'fernet'")

    def _open(self, stored: str) -> bytes:
        if self.engine == "fernet":
            try:
                return self._fernet.decrypt(stored.encode("ascii"))
            except (InvalidToken, UnicodeEncodeError):
                raise LegacyTokenError("not a legacy token") from None
        try:
            raw = base64.b64decode(stored, validate=True)
        except (binascii.Error, ValueError):
            raise LegacyTokenError("not a legacy token") from None
        if self.engine == "aes_gcm":
            if len(raw) < 28:
                raise LegacyTokenError("not a legacy token")
            try:
                return self._gcm.decrypt(raw[:12], raw[28:] + raw[12:28], None)
            except InvalidTag:
                raise LegacyTokenError("not a legacy token") from None
        if not raw or len(raw) % 16:
            raise LegacyTokenError("not a legacy token")
        decryptor = self._cbc.decryptor()
        return self._unpad(decryptor.update(raw) + decryptor.finalize())


class FernetReader(LegacyReader):
    """Fernet tokens under any of ``keys`` (url-safe base64 Fernet keys, as
    ``MultiFernet`` takes them); ``ttl`` refuses tokens older than that many seconds."""

    def __init__(
        self, keys: Sequence[str | bytes], *, ttl: int | None = None, name: str = "fernet"
    ) -> None:
        if isinstance(keys, (str, bytes)) or not keys:
            raise TypeError("give a list of one or more Fernet keys")
        self._fernet = MultiFernet([Fernet(k) for k in keys])
        self._ttl = ttl
        self.name = name

    def _open(self, stored: str) -> bytes:
        try:
            return self._fernet.decrypt(stored.encode("ascii"), ttl=self._ttl)
        except (InvalidToken, UnicodeEncodeError):
            raise LegacyTokenError("not a legacy token") from None
