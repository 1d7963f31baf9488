"""The subject keys of one ``KeyManager``: created on first use, cached, forgotten, rewrapped.

One part of :class:`~aiocrypt._manager.KeyManager` (docs/subjects.md); the pure
pieces (ids, lookup hash, wrapping, records) are in ``_subjects``.

* **Cache.** Unwrapped subject DEKs are kept in two bounded LRU maps, by
  (key type, subject id) for encryption and by key id for decryption, each entry
  for at most ``dek_cache_seconds``. Every use checks the key id against the
  forgotten-set of the last verified keyset (a dict lookup), so a forget made by
  any process takes effect here as soon as this process sees the new keyset
  revision (the store's change feed, or ``refresh_interval`` at the latest).
* **Forget.** The subject key ids go into the sealed keyset's forgotten-set in one
  compare-and-swap write (a store rollback to before it is refused by the
  keyset guard's high-water mark), then their rows are deleted from the subject
  store. A row that reappears later (a restored backup) is still refused.
* **Rewrap.** After a rotation every live subject key still wrapped by an older
  version of its key type is wrapped again by the active one, in batches; the
  census (rows per wrapping key id) keeps retirement from destroying a version
  that still wraps any.

Just over 500 lines: the four lifecycle steps above share one cache and one store
protocol and change together; the record format itself lives in ``_subjects``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._crypto import DEK_BYTES, DataKey
from ._errors import (
    DecryptionError,
    DecryptionFailure,
    KeyStateError,
    KeyStoreIntegrityError,
    decryption_failed,
)
from ._keyring import Keyring
from ._keys import EncryptionKey
from ._subjects import (
    LOOKUP_INFO,
    SubjectKeyRecord,
    SubjectState,
    is_subject_key_id,
    lookup_hash,
    new_subject_key_id,
    subject_data_key,
    subject_forgotten,
    token_key_id,
    tombstone_record,
    unwrap_subject_key,
    wrap_cipher,
    wrap_subject_key,
)
from ._telemetry import span
from ._types import KeyStatus, KeyType, KeyTypeLike
from .keystore._base import KeySet
from .keystore._subjects_base import SubjectKeyStore

if TYPE_CHECKING:
    from ._manager import KeyManager

__all__ = ["ForgetReport", "SubjectKeys", "SubjectRewrapReport"]

logger = logging.getLogger("aiocrypt.subjects")

#: Unwrapped subject keys kept per map (by subject, by key id) before the least
#: recently used is dropped. A cached key with its one-key keyring holds its AES
#: objects and associated data: about 12 KiB (tracemalloc), so some 50 MiB when full.
DEFAULT_MAX_CACHED: Final = 4096


@dataclass(frozen=True, slots=True)
class ForgetReport:
    """What :meth:`EncryptionService.forget_subject` did.

    ``subject_key_ids`` are the keys destroyed (one per key type the subject had a
    key of), ``lookups`` the lookup hashes they were filed under (what the audit
    event records: ``subject_reference`` computes it again from a subject id),
    ``revision`` the keyset revision that carries them in its forgotten-set.
    """

    key_types: tuple[KeyType, ...]
    subject_key_ids: tuple[str, ...]
    lookups: tuple[str, ...]
    tombstone: bool
    revision: int

    @property
    def forgotten(self) -> bool:
        """Whether any key was destroyed (False: the subject had none)."""
        return bool(self.subject_key_ids)


@dataclass(frozen=True, slots=True)
class SubjectRewrapReport:
    """What :meth:`KeyManager.rewrap_subjects` did for one key type."""

    key_type: KeyType
    wrapping_key_id: str
    rewrapped: int
    batches: int
    remaining: Mapping[str, int]
    """Live subject keys per older wrapping key id after the run (all 0 when done)."""


class _Entry:
    """A cached subject key: its DataKey, its one-key keyring, until when it may be used
    without a look at the store, and the keyset seal its id was last checked against."""

    __slots__ = ("dk", "ring", "seal", "until")

    def __init__(self, dk: DataKey, ring: Keyring, until: float, seal: object) -> None:
        self.dk = dk
        self.ring = ring
        self.until = until
        self.seal = seal


class _Cache:
    """A bounded LRU map of entries."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[object, _Entry] = OrderedDict()

    def put(self, key: object, entry: _Entry) -> None:
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)


class SubjectKeys:
    """Subject keys for one manager (``manager.subjects``)."""

    def __init__(
        self,
        manager: KeyManager,
        store: SubjectKeyStore | None = None,
        *,
        max_cached: int = DEFAULT_MAX_CACHED,
    ) -> None:
        if max_cached < 1:
            raise ValueError("the subject-key cache holds at least 1 key")
        self._manager = manager
        self._guard = manager._guard
        self._store = store
        self._opened = False
        self._by_subject = _Cache(max_cached)
        self._by_id = _Cache(max_cached)
        self._lookup_key: bytes | None = None
        self._ciphers: dict[str, AESGCM] = {}  # wrapping key id -> its wrap cipher

    def __repr__(self) -> str:
        return f"<SubjectKeys cached={len(self._by_subject.entries)}+{len(self._by_id.entries)}>"

    # -- the store ------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether the key store keeps subject keys (every store aiocrypt ships does)."""
        return self._store is not None or self._manager.store.subject_store() is not None

    async def store(self) -> SubjectKeyStore:
        if self._store is None:
            self._store = self._manager.store.subject_store()
            if self._store is None:
                raise KeyStateError(
                    f"the {self._manager.store.name} key store keeps no "
                    "subject keys (give the KeyManager a subject_store)"
                )
        if not self._opened:
            await self._store.open()
            self._opened = True
        return self._store

    def clear(self) -> None:
        """Drop every cached subject DEK (closing, tests)."""
        self._by_subject.entries.clear()
        self._by_id.entries.clear()
        self._ciphers.clear()
        self._lookup_key = None

    # -- the cache (sync: the hot paths) ---------------------------------------

    def _usable(self, entry: _Entry) -> bool:
        """Whether a cached entry may still be used: younger than ``dek_cache_seconds``,
        and its key not forgotten in the keyset last verified (checked again only when
        that keyset changed: the hot path compares one object)."""
        if time.monotonic() > entry.until:
            return False
        seal = self._guard.seal
        if entry.seal is not seal:
            if entry.dk.key_id in self._guard.forgotten:
                return False
            entry.seal = seal
        return True

    def cached(self, key_type: KeyType, subject: str) -> DataKey | None:
        """The cached DEK of ``subject``'s ``key_type`` key, if any (no I/O)."""
        key = (key_type, subject)
        entry = self._by_subject.entries.get(key)
        if entry is None or not self._usable(entry):
            return None
        self._by_subject.entries.move_to_end(key)
        return entry.dk

    def cached_ring(self, key_id: str) -> Keyring | None:
        """A one-key keyring of the cached subject key ``key_id``, if any (no I/O)."""
        entry = self._by_id.entries.get(key_id)
        if entry is None or not self._usable(entry):
            return None
        self._by_id.entries.move_to_end(key_id)
        return entry.ring

    def ring_of(self, token: str) -> Keyring | None:
        """:meth:`cached_ring` of the key a subject token names."""
        return self.cached_ring(token_key_id(token))

    def _remember(self, dk: DataKey, subject: tuple[KeyType, str] | None) -> Keyring:
        ring = Keyring((dk,), accept_format_v1=False)
        until = time.monotonic() + self._manager.config.performance.dek_cache_seconds
        if dk.key_id in self._guard.forgotten:  # forgotten while it was being read
            raise subject_forgotten(dk.key_id)
        self._by_id.put(dk.key_id, _Entry(dk, ring, until, self._guard.seal))
        if subject is not None:
            self._by_subject.put(subject, _Entry(dk, ring, until, self._guard.seal))
        return ring

    # -- lookups ----------------------------------------------------------------

    def _lookup(self) -> bytes:
        if self._lookup_key is None:
            key = self._manager._guard.derive(LOOKUP_INFO)
            if key is None:
                raise KeyStateError("the key store has no sealed keyset yet: create a key first")
            self._lookup_key = key
        return self._lookup_key

    def reference(self, subject: str, key_type: KeyTypeLike) -> str:
        """The lookup hash of ``subject``'s ``key_type`` key (what audit events record)."""
        return lookup_hash(self._lookup(), KeyType(key_type), subject)

    def _cipher(self, wrapping: DataKey) -> AESGCM:
        cipher = self._ciphers.get(wrapping.key_id)
        if cipher is None:
            if len(self._ciphers) > 64:
                self._ciphers.clear()
            cipher = self._ciphers[wrapping.key_id] = wrap_cipher(wrapping)
        return cipher

    async def _wrapping_key(self, record: SubjectKeyRecord) -> DataKey | None:
        manager = self._manager
        dk = manager.keyring.get(record.wrapping_key_id) or await manager.load_key(
            record.wrapping_key_id
        )
        if dk is None or dk.key_type != record.key_type or not dk.reencryptable:
            return None
        return dk

    async def _open(self, record: SubjectKeyRecord) -> DataKey | None:
        """The DataKey of a live record; None when its wrapping key cannot open it.
        ``KeyStoreIntegrityError`` (audited) when the record fails authentication."""
        wrapping = await self._wrapping_key(record)
        if wrapping is None:
            return None
        material = unwrap_subject_key(self._cipher(wrapping), record)
        if material is None:
            error = KeyStoreIntegrityError(
                f"{self._manager.store.name} subject-key store: subject key {record.key_id} "
                "failed authentication (edited, relabelled or swapped outside aiocrypt)",
                key_id=record.key_id,
            )
            await self._manager._refuse(error)
            raise error
        try:
            return subject_data_key(record, material)
        finally:
            del material

    # -- encryption: the key of a subject --------------------------------------

    async def key_for(self, key_type: KeyType, subject: str) -> DataKey:
        """``subject``'s ``key_type`` DEK: cached, else read, else created (race-safe).

        The caller has made sure the key type has an active version (the service's
        ``_keyring(key_type)``). ``KeyStateError`` for a tombstoned subject.
        """
        dk = self.cached(key_type, subject)
        if dk is not None:
            return dk
        manager = self._manager
        store = await self.store()
        lookup = lookup_hash(self._lookup(), key_type, subject)
        for _ in range(3):
            record = await store.find(lookup)
            if record is not None and record.state == SubjectState.TOMBSTONE:
                raise KeyStateError(
                    f"this subject was forgotten with a tombstone: no new "
                    f"{key_type.value} key is made for it"
                )
            if record is not None and record.key_id in manager._guard.forgotten:
                # a forget stopped between its keyset write and the row's deletion
                await store.forget(lookup, record, None)
                record = None
            if record is None:
                record = await store.insert(self._new_record(key_type, lookup))
                if record.state != SubjectState.LIVE:
                    continue
            dk = await self._open(record)
            if dk is None:
                raise KeyStateError(
                    f"subject key {record.key_id}: its wrapping key {record.wrapping_key_id} "
                    "is not readable (destroyed or disabled)"
                )
            if dk.key_id in self._guard.forgotten:
                continue  # forgotten while it was read: the subject gets a new key
            self._remember(dk, (key_type, subject))
            return dk
        # each try lost a race to another process's forget of this subject (a new key of
        # ours forgotten before we used it): three forgets timed inside one call, untestable
        raise KeyStateError(  # pragma: no cover - three races lost inside one call
            "the subject-key store kept changing; gave up after 3 tries"
        )

    def _new_record(self, key_type: KeyType, lookup: str) -> SubjectKeyRecord:
        active = self._manager.keyring.active(key_type)
        material = os.urandom(DEK_BYTES)
        try:
            return wrap_subject_key(
                self._cipher(active),
                active.key_id,
                material,
                new_subject_key_id(),
                lookup,
                key_type,
                self._manager._clock(),
            )
        finally:
            del material

    async def exists(self, key_type: KeyType, subject: str) -> bool:
        """Whether ``subject`` has a live ``key_type`` key (no key is created)."""
        if self.cached(key_type, subject) is not None:
            return True
        record = await (await self.store()).find(lookup_hash(self._lookup(), key_type, subject))
        return (
            record is not None
            and record.state == SubjectState.LIVE
            and record.key_id not in self._manager._guard.forgotten
        )

    # -- decryption: the key a token names ---------------------------------------

    async def ring(self, key_id: str) -> Keyring:
        """A one-key keyring of subject key ``key_id``; ``DecryptionError`` saying why not
        (forgotten, not in this store, wrapping key unreadable)."""
        ring = self.cached_ring(key_id)
        if ring is not None:
            return ring
        if key_id in self._manager._guard.forgotten:
            raise subject_forgotten(key_id)
        if not is_subject_key_id(key_id):
            raise decryption_failed(
                DecryptionFailure.UNKNOWN_KEY, None, "token names no valid key id"
            )
        record = await (await self.store()).get(key_id)
        if record is None:
            raise decryption_failed(
                DecryptionFailure.UNKNOWN_KEY,
                key_id,
                f"subject key {key_id} is not in this key store",
            )
        if record.state != SubjectState.LIVE:
            raise subject_forgotten(key_id)
        if record.key_id != key_id:
            raise decryption_failed(
                DecryptionFailure.UNKNOWN_KEY,
                key_id,
                f"subject key {key_id} is not in this key store",
            )
        try:
            dk = await self._open(record)
        except KeyStoreIntegrityError:
            raise decryption_failed(
                DecryptionFailure.KEY_NOT_READABLE,
                key_id,
                f"subject key {key_id} failed authentication",
            ) from None
        if dk is None:
            raise decryption_failed(
                DecryptionFailure.KEY_NOT_READABLE,
                key_id,
                f"subject key {key_id}: its wrapping key {record.wrapping_key_id} is not readable",
            )
        return self._remember(dk, None)

    async def rings(self, key_ids: Iterable[str]) -> dict[str, Keyring | DecryptionError]:
        """:meth:`ring` of each key id, or the error saying why not (batches)."""
        found: dict[str, Keyring | DecryptionError] = {}
        for key_id in key_ids:
            try:
                found[key_id] = await self.ring(key_id)
            except DecryptionError as exc:
                found[key_id] = exc
        return found

    # -- forget -------------------------------------------------------------------

    def _key_types(self) -> list[KeyType]:
        return sorted(
            {k.key_type for k in self._manager._records.keys if k.status is not KeyStatus.DESTROYED}
        )

    async def forget(
        self,
        subject: str,
        *,
        key_type: KeyTypeLike | None = None,
        tombstone: bool = False,
        actor: str | None = None,
    ) -> ForgetReport:
        """See :meth:`EncryptionService.forget_subject`."""
        manager = self._manager
        await manager.refresh(force=True)
        key_types = [KeyType(key_type)] if key_type is not None else self._key_types()
        if key_type is not None and self._guard.seal is None:
            await manager.ensure_active(key_types)  # a store with no keyset yet: its lookup key
        with span(
            "aiocrypt.subject.forget",
            key_type=",".join(k.value for k in key_types),
            tombstone=tombstone,
        ) as operation:
            store = await self.store()
            found: list[tuple[KeyType, str, SubjectKeyRecord | None]] = []
            for kt in key_types:
                lookup = lookup_hash(self._lookup(), kt, subject)
                record = await store.find(lookup)
                live = record if record is not None and record.state == SubjectState.LIVE else None
                found.append((kt, lookup, live))
            forget = {r.key_id: r.wrapping_key_id for _, _, r in found if r is not None}
            revision = manager._records.revision
            if forget:  # the erasure itself: from here on no process reads these keys
                revision = (await manager._change(_no_updates, forget=forget)).revision
            for kt in key_types:
                self._by_subject.entries.pop((kt, subject), None)
            for key_id in forget:
                self._by_id.entries.pop(key_id, None)
            report = ForgetReport(
                tuple(key_types),
                tuple(forget),
                tuple(lookup for _, lookup, r in found if r is not None),
                tombstone,
                revision,
            )
            # audited before the rows are deleted: a store outage there leaves the keys
            # forgotten (refused by the keyset) and a rerun deletes what is left
            await manager.auditor.emit(
                "subject_forgotten",
                key_type=key_types[0].value if len(key_types) == 1 else None,
                actor=actor,
                key_types=[k.value for k in key_types],
                subject_key_ids=list(report.subject_key_ids),
                lookups=list(report.lookups),
                tombstone=tombstone,
                revision=revision,
            )
            now = manager._clock()
            for kt, lookup, record in found:
                stone = (
                    tombstone_record(kt, lookup, record.key_id if record else "", now)
                    if tombstone
                    else None
                )
                if record is not None or stone is not None:
                    await store.forget(lookup, record, stone)
            operation.set(outcome="forgotten" if forget else "no_key", keys=len(forget))
        logger.info("subject forgotten: %d key(s) %s", len(forget), ", ".join(forget) or "-")
        return report

    # -- rotation: rewrap and census -------------------------------------------------

    async def census(self, key_type: KeyTypeLike | None = None) -> dict[str, int]:
        """Live subject keys per wrapping key id (every version key not destroyed, of
        ``key_type`` or of all types; 0 where none)."""
        kt = None if key_type is None else KeyType(key_type)
        await self._manager.current_keyring()
        return await self.count(
            [
                k.key_id
                for k in self._manager._records.keys
                if k.status is not KeyStatus.DESTROYED and (kt is None or k.key_type == kt)
            ]
        )

    async def count(self, wrapping_key_ids: Iterable[str]) -> dict[str, int]:
        """Live subject keys wrapped by each of these version keys (0 where none)."""
        ids = list(wrapping_key_ids)
        if not ids or not self.enabled:
            return dict.fromkeys(ids, 0)
        return await (await self.store()).census(ids)

    async def rewrap(self, key_type: KeyTypeLike, *, batch_size: int = 1000) -> SubjectRewrapReport:
        """See :meth:`KeyManager.rewrap_subjects`."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        manager = self._manager
        kt = KeyType(key_type)
        keyring = await manager.refresh(force=True)
        active = keyring.active(kt)
        store = await self.store()
        older = [
            k.key_id
            for k in manager._records.keys
            if k.key_type == kt
            and k.status is not KeyStatus.DESTROYED
            and k.key_id != active.key_id
        ]
        total = batches = 0
        for wrapping_id in older:
            after = ""
            while True:
                with span(
                    "aiocrypt.subject.rewrap",
                    key_type=kt.value,
                    wrapping_key_id=wrapping_id,
                    new_wrapping_key_id=active.key_id,
                ) as operation:
                    batch = await store.wrapped_by(wrapping_id, after=after, limit=batch_size)
                    if not batch:
                        operation.set(outcome="done", count=0)
                        break
                    after = batch[-1].key_id
                    updates = await self._rewrapped(batch, active)
                    done = await store.rewrap(updates, wrapping_id)
                    operation.set(outcome="ok", count=done)
                total += done
                batches += 1
        remaining = await store.census(older) if older else {}
        await manager.auditor.emit(
            "subject_keys_rewrapped",
            key_type=kt.value,
            key_id=active.key_id,
            count=total,
            batches=batches,
            remaining=sum(remaining.values()),
        )
        return SubjectRewrapReport(kt, active.key_id, total, batches, remaining)

    async def _rewrapped(
        self, batch: Sequence[SubjectKeyRecord], active: DataKey
    ) -> list[SubjectKeyRecord]:
        """``batch`` wrapped again by ``active``; forgotten or unauthentic records are left
        out (and counted by the census until a forget or an operator removes them)."""
        forgotten = self._manager._guard.forgotten
        new_cipher = self._cipher(active)
        updates = []
        for record in batch:
            if record.key_id in forgotten:
                continue
            wrapping = await self._wrapping_key(record)
            material = (
                None if wrapping is None else unwrap_subject_key(self._cipher(wrapping), record)
            )
            if material is None:
                logger.error("subject key %s does not unwrap: not rewrapped", record.key_id)
                continue
            try:
                updates.append(
                    wrap_subject_key(
                        new_cipher,
                        active.key_id,
                        material,
                        record.key_id,
                        record.lookup,
                        record.key_type,
                        record.created_at,
                    )
                )
            finally:
                del material  # never in a traceback's locals
        return updates


async def _no_updates(_current: KeySet) -> list[EncryptionKey]:
    return []
