"""Subject keys in memory (``MemoryKeyStore.subject_store()``; tests, single processes)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .._subjects import SubjectKeyRecord, SubjectState
from ._subjects_base import SubjectKeyStore

__all__ = ["MemorySubjectKeyStore"]


class MemorySubjectKeyStore(SubjectKeyStore):
    """Records in dicts, shared by every manager given the same ``MemoryKeyStore``."""

    name = "memory"

    def __init__(self) -> None:
        #: lookup hash -> live record or tombstone; key id -> live record or forgotten marker
        self.by_lookup: dict[str, SubjectKeyRecord] = {}
        self.by_id: dict[str, SubjectKeyRecord] = {}

    async def find(self, lookup: str) -> SubjectKeyRecord | None:
        return self.by_lookup.get(lookup)

    async def get(self, key_id: str) -> SubjectKeyRecord | None:
        return self.by_id.get(key_id)

    async def insert(self, record: SubjectKeyRecord) -> SubjectKeyRecord:
        current = self.by_lookup.setdefault(record.lookup, record)
        if current is record:
            self.by_id[record.key_id] = record
        return current

    async def forget(
        self, lookup: str, record: SubjectKeyRecord | None, tombstone: SubjectKeyRecord | None
    ) -> None:
        current = self.by_lookup.get(lookup)
        if record is not None and current is not None and current.key_id == record.key_id:
            del self.by_lookup[lookup]
        if record is not None:
            self.by_id[record.key_id] = record.forgotten()
        if tombstone is not None:
            self.by_lookup[lookup] = tombstone

    async def rewrap(self, records: Sequence[SubjectKeyRecord], previous: str) -> int:
        done = 0
        for record in records:
            current = self.by_id.get(record.key_id)
            if (
                current is not None
                and current.state == SubjectState.LIVE
                and current.wrapping_key_id == previous
            ):
                self.by_id[record.key_id] = self.by_lookup[record.lookup] = record
                done += 1
        return done

    async def wrapped_by(
        self, wrapping_key_id: str, *, after: str = "", limit: int = 1000
    ) -> list[SubjectKeyRecord]:
        found = sorted(
            (
                r
                for r in self.by_id.values()
                if r.state == SubjectState.LIVE
                and r.wrapping_key_id == wrapping_key_id
                and r.key_id > after
            ),
            key=lambda r: r.key_id,
        )
        return found[:limit]

    async def census(self, wrapping_key_ids: Iterable[str]) -> dict[str, int]:
        counts = dict.fromkeys(wrapping_key_ids, 0)
        for record in self.by_id.values():
            if record.state == SubjectState.LIVE and record.wrapping_key_id in counts:
                counts[record.wrapping_key_id] += 1
        return counts
