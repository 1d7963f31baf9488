"""Keyset seals: the key store's contents authenticated under a key only the KEK opens.

Whoever can write Postgres, Redis or the key file must not be able to choose,
revive, relabel or roll back the keys the application uses. The wrap context of
each DEK binds its key id and key type, but a record's status, version, flags
and the store's revision are plain JSON. So every write the ``KeyManager`` makes
also stores a *seal*: one small document, kept by the store beside the records
and written in the same atomic step, that holds

* the seal key (32 random bytes) wrapped by the KEK with the context
  ``{"aiocrypt_purpose": "keyset-seal"}``, and the KEK id that wrapped it;
* the store revision the write produces;
* a SHA-256 digest of every record (its canonical JSON), by key id;
* the forgotten subject keys (``_subjects``): subject key id -> the version key
  that wrapped it when it was forgotten, so a deleted subject key whose row comes
  back from a backup is still refused (absent when empty: older seals unchanged);
* an HMAC-SHA256 under the seal key over all of the above.

A reader unwraps the seal key (once per process: it is pinned by its wrapped
bytes), checks the MAC, the revision and every record's digest, and names the
first record that differs. Without the KEK nobody can make a seal that verifies,
so a record edited, added, removed or relabelled in the store, or a revision
number changed, is refused. Replaying an older, authentic seal with its records
(a restored backup) verifies; the ``KeyManager`` refuses it by never moving to a
lower revision than it has seen (see ``_keyset_state`` for the persisted
high-water mark).

Pure functions and a small stateful verifier; no I/O but the KEK's wrap/unwrap.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._errors import KekProviderError, KeyStateError, KeyStoreIntegrityError
from ._keys import EncryptionKey
from .kek._base import KekProvider

__all__ = ["SEAL_CONTEXT", "KeysetSealer", "Seal", "check_identity", "record_digest"]

SEAL_FORMAT: Final = "aiocrypt.keyset-seal"
SEAL_VERSION: Final = 1
SEAL_CONTEXT: Final = {"aiocrypt_purpose": "keyset-seal"}
SEAL_KEY_BYTES: Final = 32
MAX_SEAL_CHARS: Final = 4 * 1024 * 1024
_DIGEST_RE: Final = re.compile(r"[0-9a-f]{64}")
_MAC_DOMAIN: Final = b"aiocrypt keyset seal v1\x00"


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def record_digest(key: EncryptionKey) -> str:
    """SHA-256 of a record's canonical JSON (every field, the wrapped DEK included)."""
    return hashlib.sha256(_canonical(key.to_dict())).hexdigest()


@dataclass(frozen=True, slots=True)
class Seal:
    """A parsed seal (see the module docstring). The MAC is checked by ``KeysetSealer``."""

    kek_id: str
    wrapped_key: bytes
    revision: int
    records: Mapping[str, str]
    mac: bytes
    forgotten: Mapping[str, str] = field(default_factory=dict)
    """Forgotten subject key id -> the version key id that wrapped it (see ``_subjects``)."""

    def _doc(self) -> dict[str, Any]:
        doc = {
            "format": SEAL_FORMAT,
            "version": SEAL_VERSION,
            "kek_id": self.kek_id,
            "seal_key": base64.b64encode(self.wrapped_key).decode("ascii"),
            "revision": self.revision,
            "records": dict(self.records),
        }
        if self.forgotten:  # only then: seals without it keep their bytes and MACs
            doc["forgotten"] = dict(self.forgotten)
        return doc

    def body(self) -> bytes:
        return _MAC_DOMAIN + _canonical(self._doc())

    def to_text(self) -> str:
        return json.dumps(
            {**self._doc(), "mac": self.mac.hex()}, sort_keys=True, separators=(",", ":")
        )

    @classmethod
    def from_text(cls, text: str | bytes, where: str) -> Seal:
        bad = KeyStoreIntegrityError(f"{where}: the keyset seal is malformed (altered?)")
        if len(text) > MAX_SEAL_CHARS:
            raise bad
        try:
            doc = json.loads(text)
            if (
                not isinstance(doc, dict)
                or doc.get("format") != SEAL_FORMAT
                or doc.get("version") != SEAL_VERSION
            ):
                raise bad
            kek_id, revision, records = doc["kek_id"], doc["revision"], doc["records"]
            if (
                not isinstance(kek_id, str)
                or type(revision) is not int
                or revision < 1
                or not isinstance(records, dict)
            ):
                raise bad
            if not all(
                isinstance(k, str) and isinstance(v, str) and _DIGEST_RE.fullmatch(v)
                for k, v in records.items()
            ):
                raise bad
            forgotten = doc.get("forgotten", {})
            if not isinstance(forgotten, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in forgotten.items()
            ):
                raise bad
            return cls(
                kek_id=kek_id,
                wrapped_key=base64.b64decode(doc["seal_key"], validate=True),
                revision=revision,
                records=records,
                mac=bytes.fromhex(doc["mac"]),
                forgotten=forgotten,
            )
        except (KeyError, TypeError, ValueError, binascii.Error, RecursionError):
            raise bad from None


class KeysetSealer:
    """Makes and checks seals for one ``KeyManager``; holds the unwrapped seal key.

    ``kek_for(kek_id)`` returns the provider that can unwrap a seal key wrapped by
    that KEK (the current one, or an older one during a master-key rotation), or
    raises ``KekProviderError``.
    """

    def __init__(self, kek_for: Callable[[str], KekProvider]) -> None:
        self._kek_for = kek_for
        # (KEK id, wrapped bytes) -> the seal key they unwrap to
        self._keys: dict[tuple[str, bytes], bytes] = {}

    def __repr__(self) -> str:
        return f"<KeysetSealer pinned={len(self._keys)}>"

    def __reduce__(self) -> Any:
        raise TypeError("KeysetSealer objects cannot be pickled")

    async def _unwrap(self, kek_id: str, wrapped: bytes, where: str) -> bytes:
        pinned = self._keys.get((kek_id, wrapped))
        if pinned is not None:
            return pinned
        try:
            material = await self._kek_for(kek_id).unwrap(wrapped, SEAL_CONTEXT)
        except KekProviderError as exc:
            if exc.retryable:  # the KMS is down: not evidence of tampering
                raise
            raise KeyStoreIntegrityError(
                f"{where}: the keyset seal key does not open under KEK {kek_id} (the seal was "
                "replaced, or this is the wrong master key)"
            ) from None
        if len(material) != SEAL_KEY_BYTES:
            raise KeyStoreIntegrityError(f"{where}: the keyset seal key has the wrong size")
        self._keys[(kek_id, wrapped)] = material
        return material

    async def verify(
        self,
        seal_text: str | bytes | None,
        revision: int,
        keys: Iterable[EncryptionKey],
        where: str,
    ) -> Seal | None:
        """Check ``keys`` at ``revision`` against the stored seal; return the seal.

        An empty store (revision 0, no records, no seal) is valid and returns None.
        Every failure is a ``KeyStoreIntegrityError`` naming the store and, where
        one record is to blame, its key id (never any material).
        """
        keys = list(keys)
        if seal_text is None:
            if revision == 0 and not keys:
                return None
            raise KeyStoreIntegrityError(
                f"{where} holds key records that are not sealed (a store written before "
                "aiocrypt sealed keysets, or records added outside aiocrypt): run `aiocrypt "
                "keys adopt` once, with the master key, to check and seal it",
                key_id=None,
            )
        seal = Seal.from_text(seal_text, where)
        material = await self._unwrap(seal.kek_id, seal.wrapped_key, where)
        expected = hmac.new(material, seal.body(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, seal.mac):
            raise KeyStoreIntegrityError(
                f"{where}: the keyset seal failed authentication (it was modified outside aiocrypt)"
            )
        if seal.revision != revision:
            raise KeyStoreIntegrityError(
                f"{where}: the store says revision {revision} but its seal is for revision "
                f"{seal.revision} (the revision was changed outside aiocrypt)"
            )
        seen: set[str] = set()
        for key in keys:
            seen.add(key.key_id)
            digest = seal.records.get(key.key_id)
            if digest is None:
                raise KeyStoreIntegrityError(
                    f"{where}: key record {key.key_id} is not covered by the keyset seal (added "
                    "outside aiocrypt)",
                    key_id=key.key_id,
                )
            if not hmac.compare_digest(digest, record_digest(key)):
                raise KeyStoreIntegrityError(
                    f"{where}: key record {key.key_id} does not match the keyset seal (modified "
                    "outside aiocrypt)",
                    key_id=key.key_id,
                )
            check_identity(key, where)
        missing = sorted(set(seal.records) - seen)
        if missing:
            raise KeyStoreIntegrityError(
                f"{where}: key record {missing[0]} is sealed but missing from the store "
                "(deleted outside aiocrypt)",
                key_id=missing[0],
            )
        return seal

    async def seal(
        self,
        revision: int,
        keys: Iterable[EncryptionKey],
        kek: KekProvider,
        previous: Seal | None,
        forgotten: Mapping[str, str] | None = None,
    ) -> str:
        """A seal for ``keys`` at ``revision``, its key wrapped by ``kek``.

        The seal key of ``previous`` (already verified) is reused, wrapped again only
        when ``kek`` is a different KEK (master-key rotation); an empty store gets a
        fresh one. ``forgotten`` replaces the forgotten subject keys (default: those
        of ``previous``, carried over).
        """
        material: bytes | None = None
        wrapped: bytes | None = None
        if previous is not None:
            material = self._keys.get((previous.kek_id, previous.wrapped_key))
            if previous.kek_id == kek.kek_id:
                wrapped = previous.wrapped_key
        if material is None:
            material = secrets.token_bytes(SEAL_KEY_BYTES)
        if wrapped is None:
            wrapped = await kek.wrap(material, SEAL_CONTEXT)
            self._keys[(kek.kek_id, wrapped)] = material
        if forgotten is None:
            forgotten = previous.forgotten if previous is not None else {}
        unsigned = Seal(
            kek_id=kek.kek_id,
            wrapped_key=wrapped,
            revision=revision,
            records={k.key_id: record_digest(k) for k in keys},
            mac=b"",
            forgotten=dict(forgotten),
        )
        mac = hmac.new(material, unsigned.body(), hashlib.sha256).digest()
        text = Seal(
            unsigned.kek_id,
            unsigned.wrapped_key,
            revision,
            unsigned.records,
            mac,
            unsigned.forgotten,
        ).to_text()
        if len(text) > MAX_SEAL_CHARS:  # every reader would refuse it: never written
            raise KeyStateError(
                f"the keyset seal would exceed {MAX_SEAL_CHARS} characters ("
                f"{len(unsigned.forgotten)} forgotten subject keys): retire old key versions "
                "to prune them (docs/subjects.md)"
            )
        return text

    def derive(self, seal: Seal, info: bytes) -> bytes:
        """A key derived from ``seal``'s (verified, pinned) seal key for ``info``: stable for
        the life of the store (master-key rotations rewrap the seal key, never replace it)."""
        material = self._keys.get((seal.kek_id, seal.wrapped_key))
        if material is None:
            raise KeyStoreIntegrityError("the keyset seal key is not unwrapped yet")
        return HKDF(hashes.SHA256(), 32, None, info).derive(material)

    def forget(self) -> None:
        self._keys.clear()


def check_identity(key: EncryptionKey, where: str) -> None:
    """A record's id, type and version agree (``<type>-v<version>-<random>``), as aiocrypt
    writes them; anything else was not made by a ``KeyManager``."""
    prefix = f"{key.key_type.value}-v{key.version}-"
    if not key.key_id.startswith(prefix):
        raise KeyStoreIntegrityError(
            f"{where}: key record {key.key_id} names type {key.key_type.value!r} version "
            f"{key.version}, which its id does not",
            key_id=key.key_id,
        )
