"""In-memory key store for tests and single-process tools (shared by reference)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import anyio

from .._errors import ConcurrentModificationError, LockTimeoutError
from .._keys import EncryptionKey
from ._base import KeySet, KeyStore, merge
from ._subjects_memory import MemorySubjectKeyStore

__all__ = ["MemoryKeyStore"]


class MemoryKeyStore(KeyStore):
    """Keeps records in a dict; every ``KeyManager`` given the same instance shares them."""

    name = "memory"

    def __init__(self) -> None:
        self._keys: list[EncryptionKey] = []
        self._revision = 0
        self._seal: str | None = None
        self._locks: dict[str, anyio.Semaphore] = {}
        self.writes = 0
        self._usage: dict[str, int] = {}
        self._subjects: MemorySubjectKeyStore | None = None

    async def read(self) -> KeySet:
        return KeySet(self._revision, tuple(self._keys), self._seal)

    async def write(
        self, keys: Sequence[EncryptionKey], *, expected_revision: int, seal: str | None = None
    ) -> int:
        if expected_revision != self._revision:
            raise ConcurrentModificationError(
                f"memory key store is at revision {self._revision}, not {expected_revision}"
            )
        self._keys = merge(self._keys, keys)
        self._revision += 1
        self._seal = seal
        self.writes += 1
        return self._revision

    async def revision(self) -> int:
        return self._revision

    def subject_store(self) -> MemorySubjectKeyStore:
        if self._subjects is None:
            self._subjects = MemorySubjectKeyStore()
        return self._subjects

    async def add_usage(self, increments: Mapping[str, int]) -> dict[str, int]:
        for key_id, n in increments.items():
            self._usage[key_id] = self._usage.get(key_id, 0) + n
        return {key_id: self._usage[key_id] for key_id in increments}

    async def get_usage(self) -> dict[str, int]:
        return dict(self._usage)

    @asynccontextmanager
    async def lock(self, name: str = "rotation", *, timeout: float = 30.0) -> AsyncIterator[None]:
        lock = self._locks.setdefault(name, anyio.Semaphore(1))
        with anyio.move_on_after(timeout) as scope:
            await lock.acquire()
        if scope.cancelled_caught:
            raise LockTimeoutError(f"memory key store: lock {name!r} not acquired in {timeout}s")
        try:
            yield
        finally:
            lock.release()
