"""The key-store interface: where wrapped DEKs and their metadata live.

Contract shared by every store (file, memory, Redis, Postgres):

* ``read()`` returns every key record and the store's revision (0 when empty).
* ``write(keys, expected_revision=r, seal=s)`` upserts the given records, bumps
  the revision to ``r + 1`` and stores ``s`` (the keyset seal, an opaque text the
  ``KeyManager`` makes, see ``aiocrypt._keyset_seal``) in one atomic step, only if
  the store is still at ``r``; otherwise it raises ``ConcurrentModificationError``
  and changes nothing (optimistic concurrency). ``read()`` returns the seal with
  the records of the same snapshot. Records are never deleted: a destroyed key
  keeps its metadata, without material.
* ``lock(name)`` is an async context manager giving one holder at a time across
  processes (the rotation lock); a holder that dies releases it.
* ``revision()`` is a cheap way to learn whether anything changed.
* ``changes()`` yields the new revision whenever the store changes (pub/sub,
  LISTEN/NOTIFY; polling ``revision()`` by default), so every process sees a
  rotation within seconds.
* ``subject_store()`` gives the ``SubjectKeyStore`` beside it (per-subject keys).
* ``add_usage({key_id: n})`` adds to shared per-key encryption counters and
  returns the new totals; processes batch their increments.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import KeyStoreIntegrityError
from .._keys import EncryptionKey

if TYPE_CHECKING:
    from ..kek._base import KekProvider
    from ._subjects_base import SubjectKeyStore

__all__ = ["KeySet", "KeyStore", "decode_records", "encode_record"]


@dataclass(frozen=True, slots=True)
class KeySet:
    """Everything a store holds at one revision."""

    revision: int
    keys: tuple[EncryptionKey, ...]
    seal: str | None = None
    """The keyset seal stored with this revision (None: an empty or unsealed store)."""

    def by_id(self) -> dict[str, EncryptionKey]:
        return {k.key_id: k for k in self.keys}


class KeyStore(ABC):
    """Persists key records with optimistic concurrency and a cross-process lock."""

    #: Short name used in messages and statistics ("file", "memory", ...).
    name: str = "unknown"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect / create what the store needs. Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abstractmethod
    async def read(self) -> KeySet:
        """Every record and the current revision."""

    @abstractmethod
    async def write(
        self, keys: Sequence[EncryptionKey], *, expected_revision: int, seal: str | None = None
    ) -> int:
        """Upsert ``keys`` and store ``seal`` if the store is at ``expected_revision``;
        return the new revision (always ``expected_revision + 1``)."""

    @abstractmethod
    def lock(
        self, name: str = "rotation", *, timeout: float = 30.0
    ) -> AbstractAsyncContextManager[None]:
        """Exclusive lock across processes; raises ``LockTimeoutError`` after ``timeout`` s."""

    async def rekey(self, kek: KekProvider, *, seal: str, expected_revision: int) -> int:
        """Reseal the store under ``kek``, the last step of a master-key rotation or a
        rewrap: store ``seal`` (the keyset seal the manager made under ``kek``) as
        :meth:`write` with no records does, and return the new revision. A store
        whose own integrity key is wrapped by the KEK (the file store) rewraps that
        key too, so the old KEK no longer opens it."""
        return await self.write((), expected_revision=expected_revision, seal=seal)

    async def revision(self) -> int:
        return (await self.read()).revision

    async def changes(self, poll_interval: float = 1.0) -> AsyncIterator[int]:
        """Yield each new revision as it appears (default: poll ``revision()``)."""
        import anyio

        last = await self.revision()
        while True:
            await anyio.sleep(poll_interval)
            current = await self.revision()
            if current != last:
                last = current
                yield current

    def subject_store(self) -> SubjectKeyStore | None:
        """Where this store keeps subject keys (docs/subjects.md): the same backend,
        one instance per store; None for a store that keeps none."""
        return None

    @abstractmethod
    async def add_usage(self, increments: Mapping[str, int]) -> dict[str, int]:
        """Add to the shared encryption counters of these key ids; return their new totals."""

    @abstractmethod
    async def get_usage(self) -> dict[str, int]:
        """Every key id's shared encryption counter."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def __reduce__(self) -> Any:
        raise TypeError(f"{type(self).__name__} objects cannot be pickled")


def merge(
    current: Sequence[EncryptionKey], updates: Sequence[EncryptionKey]
) -> list[EncryptionKey]:
    """Upsert ``updates`` into ``current`` by key id, keeping order of first appearance."""
    merged = {k.key_id: k for k in current}
    for key in updates:
        merged[key.key_id] = key
    return list(merged.values())


def encode_record(key: EncryptionKey) -> str:
    """A key record as the JSON text the Redis and Postgres stores keep."""
    return json.dumps(key.to_dict(), sort_keys=True)


def decode_records(
    records: Iterable[str | bytes | Mapping[str, Any]], where: str
) -> tuple[EncryptionKey, ...]:
    """Parse stored records (JSON text or dicts), oldest first.

    A malformed record is a ``KeyStoreIntegrityError`` naming the store (``where``),
    never the record's contents.
    """
    try:
        keys = [
            EncryptionKey.from_dict(json.loads(r) if isinstance(r, (str, bytes)) else dict(r))
            for r in records
        ]
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        ArithmeticError,
        RecursionError,
    ) as exc:  # a record that is not an object, an absurd number...
        raise KeyStoreIntegrityError(
            f"{where} holds an invalid key record ({type(exc).__name__})"
        ) from None
    keys.sort(key=lambda k: (k.created_at, k.key_id))
    return tuple(keys)
