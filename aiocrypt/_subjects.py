"""Subject keys: one random DEK per data subject and key type (docs/subjects.md).

Pure and sync: identifiers, the lookup hash, the wrapping of a subject DEK under
its key type's version DEK, the stored record, and the forgotten-set rules. The
async part (store reads, the cache, forget, rewrap) is ``_subjects_keys``.

* A subject key id is ``S-`` and 22 base64url characters (16 random bytes): it
  fits the key-id grammar of ``_format`` (so tokens stay ``ac2.<key id>.<...>``),
  reveals nothing about the subject, and can never be a version key id, which
  always starts with its key type's name (a lower-case letter, ``_types``).
* The store finds a subject's key by ``lookup``: HMAC-SHA256 of the key type and
  the subject id under a key derived from the keyset seal key (which only the KEK
  opens, and which lives as long as the store). The subject id itself is never
  stored.
* The DEK is wrapped with AES-256-GCM under a key derived from the key type's
  active version DEK; the associated data binds the subject key id, the lookup
  hash, the key type, the wrapping key id and the record version, so whoever can
  write the store cannot move a wrapped DEK to another subject, key type or record.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._crypto import DEK_BYTES, NONCE_BYTES, DataKey
from ._errors import DecryptionError, DecryptionFailure, KeyStoreIntegrityError, decryption_failed
from ._format import TEXT_PREFIX_LEN, TEXT_PREFIX_V2, key_id_dot
from ._keys import EncryptionKey
from ._types import KeyStatus, KeyType

__all__ = [
    "LOOKUP_INFO",
    "RECORD_VERSION",
    "SUBJECT_KEY_PREFIX",
    "SUBJECT_TOKEN_PREFIX",
    "SubjectKeyRecord",
    "SubjectState",
    "is_subject_key_id",
    "lookup_hash",
    "new_subject_key_id",
    "prunable",
    "subject_data_key",
    "subject_forgotten",
    "token_key_id",
    "tombstone_record",
    "unwrap_subject_key",
    "wrap_subject_key",
]

#: Every subject key id starts with this (never a key type's first letter: those are
#: lower case), and every token of a subject key with ``SUBJECT_TOKEN_PREFIX``.
SUBJECT_KEY_PREFIX: Final = "S-"
SUBJECT_TOKEN_PREFIX: Final = TEXT_PREFIX_V2 + SUBJECT_KEY_PREFIX
_ID_RANDOM_BYTES: Final = 16
_SUBJECT_ID_RE: Final = re.compile(r"S-[A-Za-z0-9_-]{22}")
_LOOKUP_RE: Final = re.compile(r"[0-9a-f]{64}")
#: The version of the wrapped record (bound in its associated data).
RECORD_VERSION: Final = 1
#: HKDF info of the lookup key (derived from the keyset seal key).
LOOKUP_INFO: Final = b"aiocrypt/v1/subject-lookup"
_WRAP_INFO: Final = b"subject-key-wrap"
_WRAP_DOMAIN: Final = b"aiocrypt subject key\x00"
#: A subject id is any non-empty str up to this many UTF-8 bytes.
MAX_SUBJECT_BYTES: Final = 1024
_FAR_FUTURE: Final = _dt.datetime(9999, 1, 1, tzinfo=_dt.UTC)


class SubjectState:
    """What a stored subject-key record is (strings, as stored)."""

    LIVE: Final = "live"
    #: The key was forgotten: no DEK; the lookup hash is free again.
    FORGOTTEN: Final = "forgotten"
    #: The subject was forgotten with ``tombstone=True``: no new key is made for it.
    TOMBSTONE: Final = "tombstone"


def new_subject_key_id() -> str:
    return SUBJECT_KEY_PREFIX + base64.urlsafe_b64encode(os.urandom(_ID_RANDOM_BYTES)).decode(
        "ascii"
    ).rstrip("=")


def is_subject_key_id(key_id: str) -> bool:
    """Whether ``key_id`` is a well-formed subject key id (never a version key's)."""
    return _SUBJECT_ID_RE.fullmatch(key_id) is not None


def token_key_id(token: str) -> str:
    """The key id a text token names ('' when it names none)."""
    end = key_id_dot(token)
    return token[TEXT_PREFIX_LEN:end] if end > 0 else ""


def subject_bytes(subject: str) -> bytes:
    """The subject id as bytes; ``TypeError`` / ``ValueError`` for what cannot be one."""
    if not isinstance(subject, str):
        raise TypeError(f"subject must be str, not {type(subject).__name__}")
    raw = subject.encode("utf-8")
    if not raw or len(raw) > MAX_SUBJECT_BYTES:
        raise ValueError(f"a subject id is 1-{MAX_SUBJECT_BYTES} bytes of UTF-8")
    return raw


def lookup_hash(lookup_key: bytes, key_type: KeyType, subject: str) -> str:
    """Where the store files ``subject``'s ``key_type`` key: hex HMAC-SHA256, no subject id."""
    kt = key_type.value.encode("ascii")
    return hmac.new(
        lookup_key, bytes((len(kt),)) + kt + subject_bytes(subject), hashlib.sha256
    ).hexdigest()


@dataclass(frozen=True, slots=True)
class SubjectKeyRecord:
    """One subject key as the subject-key store holds it (no DEK in the clear, ever).

    ``state`` is ``live`` (``wrapped`` holds the DEK wrapped by ``wrapping_key_id``),
    ``forgotten`` (kept by key id only, so a read can say why it fails) or
    ``tombstone`` (kept by lookup only: the subject gets no new key).
    """

    key_id: str
    key_type: KeyType
    lookup: str
    wrapping_key_id: str
    wrapped: bytes | None
    created_at: _dt.datetime
    state: str = SubjectState.LIVE
    version: int = RECORD_VERSION

    def __repr__(self) -> str:  # no wrapped DEK, no lookup hash
        return f"<SubjectKeyRecord {self.key_id} {self.key_type.value} {self.state}>"

    def __reduce__(self) -> Any:
        raise TypeError("SubjectKeyRecord objects cannot be pickled")

    def to_json(self) -> str:
        return json.dumps(
            {
                "key_id": self.key_id,
                "key_type": self.key_type.value,
                "lookup": self.lookup,
                "wrapping_key_id": self.wrapping_key_id,
                "wrapped": None
                if self.wrapped is None
                else base64.b64encode(self.wrapped).decode("ascii"),
                "created_at": self.created_at.isoformat(),
                "state": self.state,
                "version": self.version,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> SubjectKeyRecord:
        """Parse a stored record; anything malformed is ``KeyStoreIntegrityError``."""
        try:
            doc = json.loads(text)
            wrapped = doc["wrapped"]
            created = _dt.datetime.fromisoformat(doc["created_at"])
            record = cls(
                key_id=str(doc["key_id"]),
                key_type=KeyType(doc["key_type"]),
                lookup=str(doc["lookup"]),
                wrapping_key_id=str(doc["wrapping_key_id"]),
                wrapped=None if wrapped is None else base64.b64decode(wrapped, validate=True),
                created_at=created,
                state=str(doc["state"]),
                version=int(doc["version"]),
            )
            if (
                created.tzinfo is None
                or record.state
                not in (SubjectState.LIVE, SubjectState.FORGOTTEN, SubjectState.TOMBSTONE)
                or (record.state == SubjectState.LIVE) != (wrapped is not None)
            ):
                raise ValueError
            if record.state != SubjectState.TOMBSTONE and not _SUBJECT_ID_RE.fullmatch(
                record.key_id
            ):
                raise ValueError
            if record.state != SubjectState.FORGOTTEN and not _LOOKUP_RE.fullmatch(record.lookup):
                raise ValueError
            return record
        except (KeyError, TypeError, ValueError, binascii.Error, RecursionError):
            raise KeyStoreIntegrityError(f"{where} holds a malformed subject-key record") from None

    def forgotten(self) -> SubjectKeyRecord:
        """What is kept of this key once forgotten: its id, type and wrapping key id."""
        return SubjectKeyRecord(
            self.key_id,
            self.key_type,
            "",
            self.wrapping_key_id,
            None,
            self.created_at,
            SubjectState.FORGOTTEN,
            self.version,
        )


def tombstone_record(
    key_type: KeyType, lookup: str, key_id: str, at: _dt.datetime
) -> SubjectKeyRecord:
    """The record that keeps ``lookup`` taken: no new key for that subject."""
    return SubjectKeyRecord(key_id, key_type, lookup, "", None, at, SubjectState.TOMBSTONE)


def _wrap_aad(
    key_id: str, lookup: str, key_type: KeyType, wrapping_key_id: str, version: int
) -> bytes:
    parts = [key_id, lookup, key_type.value, wrapping_key_id, str(version)]
    return _WRAP_DOMAIN + b"".join(len(p).to_bytes(2, "big") + p.encode("ascii") for p in parts)


def wrap_cipher(wrapping: DataKey) -> AESGCM:
    """The AES-256-GCM key that wraps subject DEKs under ``wrapping`` (derived, not its DEK)."""
    return AESGCM(wrapping.derive(_WRAP_INFO))


def wrap_subject_key(
    cipher: AESGCM,
    wrapping_key_id: str,
    material: bytes,
    key_id: str,
    lookup: str,
    key_type: KeyType,
    created_at: _dt.datetime,
) -> SubjectKeyRecord:
    """A live record holding ``material`` wrapped by ``cipher`` (of ``wrapping_key_id``)."""
    nonce = os.urandom(NONCE_BYTES)
    wrapped = nonce + cipher.encrypt(
        nonce, material, _wrap_aad(key_id, lookup, key_type, wrapping_key_id, RECORD_VERSION)
    )
    return SubjectKeyRecord(key_id, key_type, lookup, wrapping_key_id, wrapped, created_at)


def unwrap_subject_key(cipher: AESGCM, record: SubjectKeyRecord) -> bytes | None:
    """The DEK of a live ``record``, or None when it does not authenticate (relabelled,
    swapped, edited, or wrapped by another key than it says)."""
    wrapped = record.wrapped
    if wrapped is None or len(wrapped) != NONCE_BYTES + DEK_BYTES + 16:
        return None
    try:
        return cipher.decrypt(
            wrapped[:NONCE_BYTES],
            wrapped[NONCE_BYTES:],
            _wrap_aad(
                record.key_id,
                record.lookup,
                record.key_type,
                record.wrapping_key_id,
                record.version,
            ),
        )
    except InvalidTag:
        return None


def subject_data_key(record: SubjectKeyRecord, material: bytes) -> DataKey:
    """A ``DataKey`` for a subject DEK: its tokens name the subject key id and bind its
    key type like any version key's (the same associated data, the same wire format)."""
    key = EncryptionKey(
        key_id=record.key_id,
        key_type=record.key_type,
        version=1,
        status=KeyStatus.ACTIVE,
        created_at=record.created_at,
        expires_at=_FAR_FUTURE,
    )
    dk = DataKey(key, material)
    dk.allowance = dk.refill_at = 2**32  # per key; see docs/subjects.md (usage limits)
    return dk


def subject_forgotten(key_id: str) -> DecryptionError:
    return decryption_failed(DecryptionFailure.SUBJECT_FORGOTTEN, key_id)


def prunable(forgotten: Mapping[str, str], keys: Iterable[EncryptionKey]) -> set[str]:
    """Forgotten subject key ids whose every possible wrapping key is destroyed.

    A subject key was only ever wrapped by versions of its key type up to the one
    that wrapped it when it was forgotten (rewrapping only moves forward). Once all
    of those are destroyed, no backup of its row can be unwrapped: the entry may go.
    An entry whose wrapping key is not in the keyset is kept.
    """
    by_id = {k.key_id: k for k in keys}
    live: dict[str, list[int]] = {}
    for key in by_id.values():
        if key.status is not KeyStatus.DESTROYED:
            live.setdefault(key.key_type.value, []).append(key.version)
    gone = set()
    for key_id, wrapping_key_id in forgotten.items():
        wrapping = by_id.get(wrapping_key_id)
        if wrapping is not None and not any(
            v <= wrapping.version for v in live.get(wrapping.key_type.value, ())
        ):
            gone.add(key_id)
    return gone
