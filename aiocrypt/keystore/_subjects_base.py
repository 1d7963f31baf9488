"""The subject-key store interface: where wrapped per-subject DEKs live (docs/subjects.md).

Beside the ``KeyStore`` of version keys, and usually in the same backend (the key
store's ``subject_store()`` gives it). Contract shared by every implementation:

* ``find(lookup)`` returns the live record or the tombstone filed under a lookup
  hash; ``get(key_id)`` the live record or the forgotten marker of a key id. Both
  are one indexed read: a million subjects cost what ten do.
* ``insert(record)`` files a new live record under its lookup hash only if that
  hash is free, and returns what the store now holds there: two processes making
  the first key of one subject at once both end with the one that won.
* ``forget(lookup, record, tombstone)`` deletes the live ``record`` (only if it is
  still the one filed there), keeps a forgotten marker under its key id, and
  frees the lookup hash, or files ``tombstone`` there instead.
* ``rewrap(records, previous)`` replaces the wrapped DEK of each record still
  wrapped by ``previous`` (compare and set, row by row); ``wrapped_by`` pages
  through the live records of one wrapping key in key-id order; ``census`` counts
  live records per wrapping key id.

Nothing here is trusted: every live record is authenticated when it is unwrapped
(``_subjects.unwrap_subject_key``), and forgotten key ids are refused from the
sealed keyset whatever the store holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

from .._subjects import SubjectKeyRecord

__all__ = ["SubjectKeyStore"]


class SubjectKeyStore(ABC):
    """Persists subject-key records (see the module docstring)."""

    #: Short name used in messages ("memory", "file", "redis", "postgres").
    name: str = "unknown"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Create what the store needs. Idempotent."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the store holds of its own (never the key store's client)."""

    @abstractmethod
    async def find(self, lookup: str) -> SubjectKeyRecord | None:
        """The live record or tombstone filed under ``lookup``."""

    @abstractmethod
    async def get(self, key_id: str) -> SubjectKeyRecord | None:
        """The live record or forgotten marker of ``key_id``."""

    @abstractmethod
    async def insert(self, record: SubjectKeyRecord) -> SubjectKeyRecord:
        """File ``record`` if its lookup hash is free; return what is filed there now."""

    async def insert_many(self, records: Sequence[SubjectKeyRecord]) -> int:
        """Insert many new records (imports, tests); return how many were filed."""
        filed = 0
        for record in records:
            filed += (await self.insert(record)).key_id == record.key_id
        return filed

    @abstractmethod
    async def forget(
        self, lookup: str, record: SubjectKeyRecord | None, tombstone: SubjectKeyRecord | None
    ) -> None:
        """Delete ``record`` (if still filed under ``lookup``), keep its forgotten marker,
        and free ``lookup`` or file ``tombstone`` under it."""

    @abstractmethod
    async def rewrap(self, records: Sequence[SubjectKeyRecord], previous: str) -> int:
        """Store each record's new wrapping where the stored one is still wrapped by
        ``previous``; return how many were replaced."""

    @abstractmethod
    async def wrapped_by(
        self, wrapping_key_id: str, *, after: str = "", limit: int = 1000
    ) -> list[SubjectKeyRecord]:
        """Live records wrapped by ``wrapping_key_id`` with key ids above ``after``, in
        key-id order, at most ``limit``."""

    @abstractmethod
    async def census(self, wrapping_key_ids: Iterable[str]) -> dict[str, int]:
        """Live records per wrapping key id (each id asked for, 0 when none)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    def __reduce__(self) -> Any:
        raise TypeError(f"{type(self).__name__} objects cannot be pickled")
