"""Subject keys in a JSON file beside the key file (``FileKeyStore.subject_store()``).

For small deployments: every change reads, changes and atomically replaces the
whole file (``.<key file>.subjects.json``, mode 0600) under ``flock``, so it costs
O(subjects); reads reuse the parsed file while it is unchanged. Use the Redis or
PostgreSQL store beyond some thousands of subjects. The records authenticate
themselves (the wrapped DEK's associated data), so the file has no MAC of its own.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Final, TypeVar

import anyio

from .._errors import KeyStoreError, KeyStoreIntegrityError
from .._subjects import SubjectKeyRecord
from ._subjects_base import SubjectKeyStore
from ._subjects_memory import MemorySubjectKeyStore

__all__ = ["FileSubjectKeyStore"]

_FORMAT: Final = "aiocrypt.subject-keys"
_MAX_BYTES: Final = 256 * 1024 * 1024
T = TypeVar("T")


class FileSubjectKeyStore(SubjectKeyStore):
    """Subject keys in one JSON file; the parsed contents are a ``MemorySubjectKeyStore``."""

    name = "file"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._cached: tuple[tuple[int, int], MemorySubjectKeyStore] | None = None

    def __repr__(self) -> str:
        return f"<FileSubjectKeyStore {str(self.path)!r}>"

    def _lock(self) -> int:
        """Take the file's lock (blocking: call in a thread); returns the fd to close."""
        lock = self.path.with_name(f".{self.path.name}.lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyStoreError(f"cannot open lock file {lock}: {exc.strerror}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _load(self) -> MemorySubjectKeyStore:
        where = f"subject-key file {self.path}"
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return MemorySubjectKeyStore()
        version = (stat.st_mtime_ns, stat.st_size)
        if self._cached is not None and self._cached[0] == version:
            return self._cached[1]
        try:
            with open(self.path, "rb") as fh:
                data = fh.read(_MAX_BYTES + 1)
            doc = json.loads(data)
            if len(data) > _MAX_BYTES or doc.get("format") != _FORMAT:
                raise ValueError
            loaded = MemorySubjectKeyStore()
            for text in doc["records"]:
                record = SubjectKeyRecord.from_json(text, where)
                if record.state == "tombstone":
                    loaded.by_lookup[record.lookup] = record
                else:
                    loaded.by_id[record.key_id] = record
                    if record.state == "live":
                        loaded.by_lookup[record.lookup] = record
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise KeyStoreIntegrityError(f"{where} is unreadable or malformed") from None
        self._cached = (version, loaded)
        return loaded

    def _save(self, contents: MemorySubjectKeyStore) -> None:
        from .file import replace_file

        records = list(contents.by_id.values()) + [
            r for r in contents.by_lookup.values() if r.state == "tombstone"
        ]
        payload = json.dumps({"format": _FORMAT, "records": [r.to_json() for r in records]}).encode(
            "utf-8"
        )
        try:
            replace_file(self.path, payload)
        except OSError as exc:
            raise KeyStoreError(f"cannot write {self.path}: {exc.strerror}") from None
        self._cached = None

    async def _read(self, op: Callable[[MemorySubjectKeyStore], Awaitable[T]]) -> T:
        contents = await anyio.to_thread.run_sync(self._load)
        return await op(contents)

    async def _change(self, op: Callable[[MemorySubjectKeyStore], Awaitable[T]]) -> T:
        fd = await anyio.to_thread.run_sync(self._lock)
        try:
            contents = await anyio.to_thread.run_sync(self._load)
            self._cached = None  # changed below: reread, never served half-changed
            result = await op(contents)
            await anyio.to_thread.run_sync(self._save, contents)
            return result
        finally:
            os.close(fd)  # releases the lock

    async def find(self, lookup: str) -> SubjectKeyRecord | None:
        return await self._read(lambda c: c.find(lookup))

    async def get(self, key_id: str) -> SubjectKeyRecord | None:
        return await self._read(lambda c: c.get(key_id))

    async def insert(self, record: SubjectKeyRecord) -> SubjectKeyRecord:
        return await self._change(lambda c: c.insert(record))

    async def insert_many(self, records: Sequence[SubjectKeyRecord]) -> int:
        return await self._change(lambda c: c.insert_many(records))

    async def forget(
        self, lookup: str, record: SubjectKeyRecord | None, tombstone: SubjectKeyRecord | None
    ) -> None:
        await self._change(lambda c: c.forget(lookup, record, tombstone))

    async def rewrap(self, records: Sequence[SubjectKeyRecord], previous: str) -> int:
        return await self._change(lambda c: c.rewrap(records, previous))

    async def wrapped_by(
        self, wrapping_key_id: str, *, after: str = "", limit: int = 1000
    ) -> list[SubjectKeyRecord]:
        return await self._read(lambda c: c.wrapped_by(wrapping_key_id, after=after, limit=limit))

    async def census(self, wrapping_key_ids: Iterable[str]) -> dict[str, int]:
        ids = list(wrapping_key_ids)
        return await self._read(lambda c: c.census(ids))
