"""The public surface for adapters: what aiocrypt's integrations (SQLAlchemy, Alembic,
ARQ, Flask, Quart) and third-party adapters (another ORM, framework or job queue) may
import from the core, besides the application API in ``aiocrypt``.

Everything under ``aiocrypt._*`` is private and may change in any release; the
names here are public and follow the version's compatibility promise. They are
low level (cryptography's ``hazmat`` in spirit): an adapter that stays with the
application API (``EncryptionService``, ``Keyring``, ``aiocrypt.reencrypt``) needs
none of them. See docs/architecture.md, "Plugin points".

* **keys**: :class:`DataKey`, one unwrapped data key as the ``Keyring`` hands it
  out (``keyring.active(key_type)``, ``keyring.get(key_id)``): seal and open
  tokens, HMAC for blind indexes; never in a repr or a pickle.
  ``KeyTypeLike``: a ``KeyType`` or its value, what every ``key_type=`` takes.
* **the wire format, for SQL and columns**: :func:`text_prefix` (what every token
  of a key id starts with), :data:`TEXT_PREFIXES`, :func:`token_sql` and
  :func:`key_id_sql` (SQL that recognises a token and reads its key id without
  decrypting), :func:`context_bytes` (associated data from a context),
  :func:`encode_value` and :class:`NaiveDateTime` (the value codec),
  :class:`Header` (a binary ciphertext's parsed header, ``EncryptedData.header``).
* **errors**: :func:`decryption_failed` (a ``DecryptionError`` with its reason,
  as the core raises them).
* **legacy ciphertext**: :class:`LegacyReader` and the two readers, for migrating
  columns written by other tools.
* **settings**: :func:`parse_bool` (the one boolean parser), :func:`redact_url`
  and :func:`scrub` (the one URL-redaction rule).
"""

from __future__ import annotations

from ._codec import NaiveDateTime, encode_value
from ._crypto import DataKey
from ._errors import decryption_failed
from ._format import TEXT_PREFIXES, Header, context_bytes, key_id_sql, text_prefix, token_sql
from ._legacy import FernetReader, LegacyReader, LegacyTokenError, SqlalchemyUtilsReader
from ._parse import FALSE_WORDS, TRUE_WORDS, parse_bool
from ._types import KeyTypeLike
from ._urls import redact_url, scrub

__all__ = [
    "FALSE_WORDS",
    "TEXT_PREFIXES",
    "TRUE_WORDS",
    "DataKey",
    "FernetReader",
    "Header",
    "KeyTypeLike",
    "LegacyReader",
    "LegacyTokenError",
    "NaiveDateTime",
    "SqlalchemyUtilsReader",
    "context_bytes",
    "decryption_failed",
    "encode_value",
    "key_id_sql",
    "parse_bool",
    "redact_url",
    "scrub",
    "text_prefix",
    "token_sql",
]
