"""KeyManager: generates, rotates, revokes, expires, destroys and loads DEKs.

It owns no crypto of its own: it reads records from a ``KeyStore``, unwraps
them with a ``KekProvider`` and publishes an immutable ``Keyring`` snapshot that
the service (and sync code) encrypts with. Every change is made under the
store's rotation lock and written with optimistic concurrency, then the
snapshot is rebuilt, so a failed write leaves the previous keys in force.
Policy decisions are pure functions in ``_policy``; events go to an ``Auditor``.

Nothing read from the store is trusted until it is authenticated
(``_keyset_guard``): every write carries a keyset seal (``_keyset_seal``) that
only the KEK can make, every read is checked against it, and the manager never
moves to a lower store revision than it has seen, nor lets a key leave a
terminal state (compromised, revoked, destroyed) or a usage counter go down.
A store that fails those checks is refused with ``KeyStoreIntegrityError``,
audited, and the last verified keys keep serving. See docs/threat-model.md.

This module is the facade and what every part shares: opening, the change feed,
refresh and the keyring, authenticating reads, and the one write path
(``_change``). The parts each have a module (docs/architecture.md):
``_dek_cache`` (unwrapped DEKs), ``_key_usage`` (fleet-wide usage reservations),
``_key_lifecycle`` (new versions, rotation, expiry, withdrawal),
``_key_retirement`` (census-gated cleanup and retirement), ``_key_rewrap``
(master-key rotation) and ``_key_reports``. It is over 500 lines because the
public methods keep their full documentation here, where users read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio

from . import _key_reports, _key_rewrap
from ._config import EncryptionConfig
from ._crypto import DataKey
from ._dek_cache import DekCache
from ._errors import (
    ConcurrentModificationError,
    KekProviderError,
    KeyNotFoundError,
    KeyStoreIntegrityError,
)
from ._key_lifecycle import Lifecycle, RotationRun
from ._key_reports import KeyStatistics
from ._key_retirement import (
    Census,
    CleanupEntry,
    CleanupReport,
    KeyReferences,
    KeyRetirement,
    RetiredKey,
    RetirementReason,
)
from ._key_usage import UsageReservations
from ._keyring import Keyring
from ._keys import EncryptionKey, utcnow
from ._keyset_guard import KeysetGuard
from ._keyset_seal import check_identity
from ._subjects_keys import DEFAULT_MAX_CACHED, SubjectKeys, SubjectRewrapReport
from ._telemetry import span
from ._types import KeyStatus, KeyType, KeyTypeLike
from .audit import Auditor
from .kek._base import KekProvider
from .keystore._base import KeySet, KeyStore
from .keystore._subjects_base import SubjectKeyStore

__all__ = [
    "AdoptionReport",
    "Census",
    "CleanupEntry",
    "CleanupReport",
    "KeyManager",
    "KeyRetirement",
    "RetiredKey",
    "RetirementReason",
]

logger = logging.getLogger("aiocrypt.keys")

Clock = Callable[[], _dt.datetime]
_WRITE_RETRIES: Final = 5
_FAR_FUTURE: Final = _dt.datetime.max.replace(tzinfo=_dt.UTC)


@dataclass(frozen=True, slots=True)
class AdoptionReport:
    """What :meth:`KeyManager.adopt_store` found and sealed."""

    already_sealed: bool
    revision: int
    key_ids: tuple[str, ...]


class KeyManager:
    """Life cycle of data-encryption keys over one store and one KEK provider.

    * ``refresh_interval`` bounds how stale this process's view of the store may
      get; with ``watch=True`` a background task also follows the store's change
      notifications, so a rotation made elsewhere arrives sooner.
    * Unwrapped DEKs are re-unwrapped after ``dek_cache_seconds`` of the
      performance mode: the KEK provider is never called per field.
    * ``previous_keks`` open keys still wrapped by an older KEK (during and after
      an interrupted master-key rotation).
    * ``usage_block`` is how many encryptions this process reserves at a time from
      the store's shared counter, which is what keeps the whole fleet under a
      policy's ``max_encryptions``.
    * ``subject_cache_size`` is how many unwrapped subject keys this process keeps,
      per map (by subject for encryption, by key id for decryption; docs/subjects.md).
    """

    def __init__(
        self,
        store: KeyStore,
        kek: KekProvider,
        config: EncryptionConfig | None = None,
        *,
        clock: Clock = utcnow,
        refresh_interval: float = 5.0,
        lock_timeout: float = 30.0,
        auditor: Auditor | None = None,
        previous_keks: Sequence[KekProvider] = (),
        watch: bool = True,
        usage_block: int = 65536,
        subject_store: SubjectKeyStore | None = None,
        subject_cache_size: int = DEFAULT_MAX_CACHED,
    ) -> None:
        self.store = store
        self.kek = kek
        self.config = config if config is not None else EncryptionConfig()
        self.auditor = auditor if auditor is not None else Auditor()
        self._clock = clock
        self.refresh_interval = refresh_interval
        self.lock_timeout = lock_timeout
        self.usage_block = usage_block
        self.watch = watch
        self._previous_keks = {p.kek_id: p for p in previous_keks}
        self._keyring = Keyring()
        self._records: KeySet = KeySet(0, ())
        self._deks = DekCache(self)
        self._fresh_until = float("-inf")  # monotonic time the snapshot goes stale
        self._next_boundary = _FAR_FUTURE  # next expiry / end of grace among keys
        self._refresh_lock = anyio.Lock()
        self._opened = False
        self._missing: dict[str, float] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._warned_expired: set[str] = set()
        # what is trusted of the store, and why (see the module docstring)
        self._guard = KeysetGuard(
            self._kek_by_id,
            where=f"{store.name} key store",
            store_identity=repr(store),
            state_path=self.config.keyset_state_path,
        )
        #: Keysets refused because they failed authentication, rolled back or revived a key.
        self.integrity_failures = 0
        #: Why the last refresh refused the store (None when it verified).
        self.integrity_error: KeyStoreIntegrityError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._usage = UsageReservations(self)
        self._lifecycle = Lifecycle(self)
        #: Where ``cleanup_expired_keys`` and ``set_min_decryption_version`` learn
        #: which keys data still references (the re-encryption census).
        self.census: Census | None = None
        #: The rows per key id the census last reported, and when (metrics read it).
        self.last_census: Mapping[str, int] | None = None
        self.last_census_at: _dt.datetime | None = None
        self._references = KeyReferences(self)
        #: Per-subject keys (docs/subjects.md), kept in ``subject_store`` or, by
        #: default, in the key store's own (``store.subject_store()``).
        self.subjects = SubjectKeys(self, subject_store, max_cached=subject_cache_size)

    def __repr__(self) -> str:
        return (
            f"<KeyManager store={self.store.name} kek={self.kek.kek_id} keys={len(self._keyring)}>"
        )

    # -- lifecycle ----------------------------------------------------------

    async def open(self) -> None:
        if not self._opened:
            await self.store.open()
            self._opened = True
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            await self._guard.load_state()
            await self.refresh(force=True)
            if self.watch:
                self._watch_task = asyncio.get_running_loop().create_task(self._follow_changes())

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            if self._watch_task is not None:
                self._watch_task.cancel()
                # bounded: a client library that swallows the cancellation must not hang close()
                with anyio.move_on_after(5), contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._watch_task
                self._watch_task = None
            self._usage.cancel_background()
            await self.auditor.flush()
            self._deks.clear()
            self.subjects.clear()
            self._guard.forget()
            self._keyring = Keyring()
            await self.store.close()
            await self.kek.close()

    async def __aenter__(self) -> KeyManager:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _follow_changes(self) -> None:
        """Refresh on every change the store announces; back off while it is down."""
        while self._opened:
            try:
                async for _ in self.store.changes(poll_interval=max(0.2, self.refresh_interval)):
                    await self.refresh(force=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: the bounded-age refresh remains
                logger.warning(
                    "key store change notifications interrupted (%s); retrying", type(exc).__name__
                )
                await anyio.sleep(min(5.0, max(0.5, self.refresh_interval)))
                continue
            # the feed ended on its own (a store of the application's whose changes()
            # returns): wait a poll before the next, or this loop would never yield
            await anyio.sleep(max(0.2, self.refresh_interval))

    # -- the keyring --------------------------------------------------------

    @property
    def keyring(self) -> Keyring:
        """The current snapshot (sync access; call ``await refresh()`` to update it)."""
        return self._keyring

    def _mark_fresh(self) -> None:
        self._fresh_until = time.monotonic() + self.refresh_interval

    def is_stale(self) -> bool:
        return time.monotonic() > self._fresh_until

    async def current_keyring(self) -> Keyring:
        if not self._opened:
            await self.open()
        elif self.is_stale():
            await self.refresh()
        return self._keyring

    async def refresh(self, *, force: bool = False) -> Keyring:
        """Reload records from the store if they changed (or ``force``), rebuild the snapshot."""
        async with self._refresh_lock:
            if not force and not self.is_stale():
                return self._keyring
            revision = await self.store.revision()
            if (
                force
                or revision != self._records.revision
                or self._deks.expired()
                or self._clock() >= self._next_boundary
            ):
                try:
                    await self._rebuild(await self._read_verified())
                    self.integrity_error = None
                except KeyStoreIntegrityError as exc:
                    # Refused and audited in _read_verified. Keep serving the keys last
                    # verified; with none yet there is nothing safe to serve.
                    self.integrity_error = exc
                    if not self._guard.verified_once:
                        raise
            self._mark_fresh()
        await self._usage.flush_unreserved()
        await self.auditor.flush()
        return self._keyring

    # -- authenticating what the store returns --------------------------------

    def _kek_by_id(self, kek_id: str, what: str = "the keyset seal") -> KekProvider:
        if kek_id == self.kek.kek_id:
            return self.kek
        provider = self._previous_keks.get(kek_id)
        if provider is None:
            raise KekProviderError(
                f"{what} is wrapped by KEK {kek_id}, but the configured KEK is "
                f"{self.kek.kek_id} (pass the old one in previous_keks to finish a master-key "
                "rotation)",
                backend=self.kek.backend,
            )
        return provider

    @property
    def _where(self) -> str:
        return f"{self.store.name} key store"

    async def _refuse(self, exc: KeyStoreIntegrityError) -> None:
        self.integrity_failures += 1
        logger.error("key store refused: %s", exc)
        await self.auditor.emit(
            "keystore_integrity_failure",
            key_id=exc.key_id,
            store=self.store.name,
            reason=str(exc)[:500],
        )

    async def _read_verified(self) -> KeySet:
        """Read the store and authenticate it (``KeysetGuard``); refusals are audited."""
        keyset = await self.store.read()
        try:
            await self._guard.verify(keyset)
        except KeyStoreIntegrityError as exc:
            await self._refuse(exc)
            raise
        return keyset

    async def _seal_for(
        self, current: KeySet, updates: Sequence[EncryptionKey], kek: KekProvider | None = None
    ) -> str:
        return await self._guard.seal_for(current, updates, kek or self.kek)

    async def adopt_store(self) -> AdoptionReport:
        """Check and seal a store written before aiocrypt sealed keysets (once, with the KEK).

        Every record must unwrap under the configured KEK (or ``previous_keks``)
        with its own key id and type bound, carry an id that matches its type and
        version, and each key type may have at most one active key; then the keyset
        is sealed as it is, in one write, and audited with every key id. What it
        cannot know is whether a status was edited before the upgrade: compare the
        audited list with your audit trail (docs/runbook.md). A store that is
        already sealed is only verified.
        """
        await self.store.open()
        async with self.store.lock("rotation", timeout=self.lock_timeout):
            keyset = await self.store.read()
            if keyset.seal is not None or (keyset.revision == 0 and not keyset.keys):
                await self._read_verified()
                return AdoptionReport(True, keyset.revision, tuple(k.key_id for k in keyset.keys))
            active: dict[KeyType, str] = {}
            for key in keyset.keys:
                check_identity(key, self._where)
                if key.status is KeyStatus.ACTIVE:
                    if key.key_type in active:
                        raise KeyStoreIntegrityError(
                            f"{self._where}: two active {key.key_type.value} keys "
                            f"({active[key.key_type]}, {key.key_id}): not adopted",
                            key_id=key.key_id,
                        )
                    active[key.key_type] = key.key_id
                if key.wrapped_key is not None:
                    try:
                        await self._deks.check_unwraps(key)
                    except KekProviderError as exc:
                        raise KeyStoreIntegrityError(
                            f"{self._where}: key record {key.key_id} does not unwrap under the "
                            f"configured KEK ({exc}): not adopted",
                            key_id=key.key_id,
                        ) from None
            seal = await self._guard.seal_unverified(keyset, self.kek)
            revision = await self.store.write([], expected_revision=keyset.revision, seal=seal)
            await self.auditor.emit(
                "keystore_adopted",
                store=self.store.name,
                revision=revision,
                keys=[f"{k.key_id}:{k.status.value}" for k in keyset.keys],
            )
        logger.warning(
            "key store adopted and sealed at revision %d (%d keys)", revision, len(keyset.keys)
        )
        return AdoptionReport(False, revision, tuple(k.key_id for k in keyset.keys))

    @property
    def dek_cache_hits(self) -> int:
        """Keyring rebuilds that reused an unwrapped DEK."""
        return self._deks.hits

    @property
    def dek_cache_misses(self) -> int:
        """Keyring rebuilds that had to call the KEK provider to unwrap a DEK."""
        return self._deks.misses

    async def _rebuild(self, keyset: KeySet) -> None:
        keys, boundary = await self._deks.build(keyset)
        self._records = keyset
        self._next_boundary = boundary
        self._keyring = Keyring(
            keys,
            keyset.revision,
            accept_format_v1=self.config.accept_format_v1,
            on_expired_use=self._expired_key_used,
            on_allowance=self._usage.sync_allowance,
        )
        logger.debug("keyring rebuilt at store revision %d: %d keys", keyset.revision, len(keys))

    def _expired_key_used(self, dk: DataKey) -> None:
        if dk.key_id in self._warned_expired:
            return
        self._warned_expired.add(dk.key_id)
        logger.warning(
            "data read with EXPIRED key %s (in its grace period): re-encrypt it", dk.key_id
        )
        self.auditor.emit_nowait(
            "expired_key_used",
            key_id=dk.key_id,
            key_type=dk.key.key_type.value,
            past_grace=dk.past_grace,
        )

    async def load_key(self, key_id: str) -> DataKey | None:
        """Reload once for a key id this process has not seen (e.g. rotated elsewhere).

        Unknown ids are remembered for a second so a flood of bad tokens cannot
        turn into a flood of store reads.
        """
        dk = self._keyring.get(key_id)
        if dk is not None:
            return dk
        now = time.monotonic()
        if now - self._missing.get(key_id, float("-inf")) < 1.0:
            return None
        with span("aiocrypt.keys.load_key") as op:
            await self.refresh(force=True)
            dk = self._keyring.get(key_id)
            # an id no key has came from a token, anyone's text: it is not recorded
            if dk is None:
                op.set(outcome="unknown")
            else:
                op.set(outcome="loaded", key_id=key_id, key_type=dk.key.key_type.value)
        if dk is None:
            if len(self._missing) > 1024:
                self._missing.clear()
            self._missing[key_id] = now
        return dk

    # -- usage limits (_key_usage) ---------------------------------------------

    async def reserve_usage(self, key_type: KeyTypeLike, *, ahead: bool = False) -> Keyring:
        """Give the active ``key_type`` key a fresh encryption allowance from the store.

        Processes reserve blocks from the shared counter, so the fleet as a
        whole never encrypts more than the policy's ``max_encryptions`` (and never
        more than 2**32, whatever the policy or the store says) under one key.
        When the key is used up it is rotated (once, whoever gets there first) and
        the new key gets the allowance. ``ahead``: reserve the next block before
        this one runs out (sync callers cannot wait for it).
        """
        return await self._usage.reserve(key_type, ahead=ahead)

    # -- changing keys ------------------------------------------------------

    async def _change(
        self,
        plan: Callable[[KeySet], Awaitable[Sequence[EncryptionKey]]],
        new_material: dict[str, bytes] | None = None,
        *,
        forget: Mapping[str, str] | None = None,
    ) -> KeySet:
        """Apply ``plan`` (records to upsert) under the rotation lock, retrying CAS races;
        ``forget`` adds subject keys to the sealed forgotten-set (a write even without
        records)."""
        if not self._opened:
            await self.open()
        async with self.store.lock("rotation", timeout=self.lock_timeout):
            for _ in range(_WRITE_RETRIES):
                current = await self._read_verified()
                updates = await plan(current)
                if not updates and not forget:
                    await self._rebuild(current)
                    return current
                seal = await self._guard.seal_for(current, updates, self.kek, forget)
                try:
                    await self.store.write(updates, expected_revision=current.revision, seal=seal)
                except ConcurrentModificationError:
                    continue
                keyset = await self._read_verified()
                if new_material:
                    self._deks.adopt(keyset, new_material)
                await self._rebuild(keyset)
                self._mark_fresh()
                return keyset
            raise ConcurrentModificationError("key store kept changing; gave up after 5 tries")

    # -- key transitions (_key_lifecycle) --------------------------------------

    async def generate_key(
        self, key_type: KeyTypeLike, key_size: int | None = None
    ) -> EncryptionKey:
        """Create a new version of ``key_type`` and make it active (the old one decrypts only).

        ``key_type`` must be declared (``config.known_key_types``): else
        ``UnknownKeyTypeError`` naming the nearest, and nothing is created.
        """
        return await self._lifecycle.generate_key(key_type, key_size)

    async def ensure_active(self, key_types: Iterable[KeyTypeLike]) -> Keyring:
        """Make sure each key type has an active key (creating the first version if needed)
        with an encryption allowance reserved, so sync code may seal with it at once."""
        return await self._lifecycle.ensure_active(key_types)

    async def get_active_key(self, key_type: KeyTypeLike) -> EncryptionKey:
        """The active key of ``key_type``, created on first use."""
        return await self._lifecycle.get_active_key(key_type)

    async def get_key(self, key_id: str) -> EncryptionKey:
        if not self._opened:
            await self.open()
        key = self._records.by_id().get(key_id)
        if key is None:
            await self.refresh(force=True)
            key = self._records.by_id().get(key_id)
        if key is None:
            raise KeyNotFoundError(f"no key with id {key_id!r}")
        return key

    async def rotate_key(self, key_type: KeyTypeLike, force: bool = False) -> EncryptionKey:
        """Rotate ``key_type`` if its policy says it is due (or ``force``); return the active key.

        The previous version becomes DECRYPT_ONLY: everything encrypted with it
        still decrypts, new data uses the new version. ``key_type`` must be declared,
        as for :meth:`generate_key`.
        """
        return await self._lifecycle.rotate_key(key_type, force)

    async def run_rotation_policy(self) -> RotationRun:
        """Run the rotation policy over every key type; report what was done.

        Rotates each active key that is past its interval (with ``auto_rotation``),
        its maximum age, or its usage limit; marks retired keys past their maximum
        age EXPIRED. Safe to run from several processes at once: each rotation is
        re-checked under the store lock, so a key is rotated once. The report's
        ``reencrypt`` lists key ids whose data should be re-encrypted.
        """
        return await self._lifecycle.run_rotation_policy()

    async def rotate_keys_due(self) -> dict[str, Any]:
        """:meth:`run_rotation_policy` as a dict (``checked_at``, ``rotated``, ``expired``,
        ``reencrypt``)."""
        return (await self.run_rotation_policy()).to_dict()

    async def revoke_key(self, key_id: str, reason: str = "Manual revocation") -> EncryptionKey:
        """Withdraw a key: it never encrypts again and plain reads refuse its data.

        If it was the active key, a new version is activated at once.
        """
        return await self._lifecycle.revoke_key(key_id, reason)

    async def mark_compromised(self, key_id: str, reason: str) -> EncryptionKey:
        """The key is believed exposed: stop encrypting with it now, rotate, re-encrypt its data.

        Plain reads of its data refuse from now on; re-encryption may still read
        it (``for_reencryption=True``), and ``rotate_keys_due()`` lists it under
        ``reencrypt`` until it is destroyed.
        """
        return await self._lifecycle.mark_compromised(key_id, reason)

    async def list_keys(
        self, key_type: KeyTypeLike | None = None, status: KeyStatus | str | None = None
    ) -> list[EncryptionKey]:
        if not self._opened:
            await self.open()
        await self.refresh(force=True)
        if self.integrity_error is not None:  # operators see the refusal, not stale keys
            raise self.integrity_error
        kt = None if key_type is None else KeyType(key_type)
        st = None if status is None else KeyStatus(status)
        keys = [
            k
            for k in self._records.keys
            if (kt is None or k.key_type == kt) and (st is None or k.status is st)
        ]
        return sorted(keys, key=lambda k: (k.key_type.value, k.version))

    # -- references, cleanup, minimum versions (_key_retirement) --------------

    async def cleanup_expired_keys(
        self,
        *,
        confirm_unreferenced: Iterable[str] = (),
        census: Census | None = None,
        force: bool = False,
    ) -> int:
        """Destroy keys past max age + grace that nothing references; return how many.

        A key is destroyed only when the census says no data is left on it, or
        the caller lists it in ``confirm_unreferenced`` (a key the census counts
        rows on is kept, confirmed or not), or ``force=True`` (never the default;
        audited as forced). Any other key past grace is kept, and the audit log
        says why. Retired keys past max age are marked EXPIRED on the way. Active
        keys are never destroyed: rotate them first.
        """
        return len(
            (
                await self.cleanup(
                    confirm_unreferenced=confirm_unreferenced, census=census, force=force
                )
            ).destroyed
        )

    async def cleanup(
        self,
        *,
        confirm_unreferenced: Iterable[str] = (),
        census: Census | None = None,
        force: bool = False,
    ) -> CleanupReport:
        """:meth:`cleanup_expired_keys` with the detail: each key destroyed and kept, why."""
        return await self._references.cleanup(
            confirm_unreferenced=confirm_unreferenced, census=census, force=force
        )

    async def cleanup_report(
        self,
        *,
        confirm_unreferenced: Iterable[str] = (),
        census: Census | None = None,
        force: bool = False,
    ) -> dict[str, list[dict[str, str]]]:
        """:meth:`cleanup` as a dict: ``{"destroyed": [...], "kept": [...]}``."""
        return (
            await self.cleanup(
                confirm_unreferenced=confirm_unreferenced, census=census, force=force
            )
        ).to_dict()

    async def get_min_decryption_version(self, key_type: KeyTypeLike) -> int:
        return await self._references.get_min_decryption_version(key_type)

    async def set_min_decryption_version(
        self,
        key_type: KeyTypeLike,
        version: int,
        *,
        confirm_unreferenced: Iterable[str] = (),
        census: Census | None = None,
    ) -> int:
        """Refuse decryption with versions below ``version`` (Vault's min_decryption_version).

        Raising it is allowed only when no data references an older version
        (census or ``confirm_unreferenced``; a version the census counts rows on is
        refused, confirmed or not); lowering it re-enables them.
        """
        return await self._references.set_min_decryption_version(
            key_type, version, confirm_unreferenced=confirm_unreferenced, census=census
        )

    async def retire_key(
        self,
        key_id: str,
        *,
        census: Census | None = None,
        confirm_unreferenced: Iterable[str] = (),
        dry_run: bool = False,
    ) -> KeyRetirement:
        """Destroy ``key_id`` now, whatever its age, once no data references it.

        For a key that is no longer active (after a rotation and a full
        re-encryption): the census (``census=`` or ``self.census``) must count 0
        rows on it, or the caller lists it in ``confirm_unreferenced`` (a key the
        census does not cover). While the census counts rows on it the key is
        refused with ``KeyStateError``, confirmed or not: the census is evidence.
        The active key is refused (rotate first). When it was the oldest version
        that still decrypts, the type's minimum decryption version is raised past
        it. Audited as ``key_destroyed``; ``dry_run`` checks everything and
        changes nothing.
        """
        return await self._references.retire_key(
            key_id, census=census, confirm_unreferenced=confirm_unreferenced, dry_run=dry_run
        )

    async def retire_key_type(
        self,
        key_type: KeyTypeLike,
        *,
        census: Census | None = None,
        confirm_unreferenced: Iterable[str] = (),
        dry_run: bool = False,
    ) -> KeyRetirement:
        """Retire a key type created by mistake: destroy every key of it, the active one too.

        Only for a type the configuration does not declare (``config.known_key_types``):
        a declared one is refused, so a slip of the operator cannot shred a type in use.
        Each key must be unreferenced as for :meth:`retire_key` (census 0 rows or
        listed in ``confirm_unreferenced``), or nothing changes at all. No new
        version is made active: the type has no active key afterwards, and
        ``ensure_active`` (the first encryption with it) would create one again
        only if asked. All in one sealed write; audited as ``key_type_retired``
        and one ``key_destroyed`` per key. Stop whatever encrypts with the type
        first: a process that encrypts with it before it sees the change (within
        its ``refresh_interval``) writes data no key opens.
        """
        return await self._references.retire_key_type(
            key_type, census=census, confirm_unreferenced=confirm_unreferenced, dry_run=dry_run
        )

    # -- master-key rotation (_key_rewrap) --------------------------------------

    async def rotate_master_key(self, new_kek: KekProvider, *, batch_size: int = 50) -> int:
        """Rewrap every DEK under ``new_kek`` without touching any data; return keys rewrapped.

        Works in batches, each written with optimistic concurrency, so an
        interrupted run resumes where it stopped when called again (records
        already under ``new_kek`` are skipped). The old KEK keeps working until the
        end; then the store itself is resealed (the file store's MAC key) and
        ``self.kek`` becomes ``new_kek``: the old master key no longer opens it.
        """
        return await _key_rewrap.rotate_master_key(self, new_kek, batch_size=batch_size)

    async def rewrap_keys(self, *, only_foreign: bool = False, batch_size: int = 50) -> int:
        """Wrap every DEK again under the current KEK (``self.kek``); return keys rewrapped.

        For a KMS that rotated its backing key, or for records still wrapped by an
        older KEK (given in ``previous_keks``): each DEK is unwrapped by whichever
        KEK holds it and wrapped afresh by the current one; no data is touched.
        ``only_foreign`` skips records already under the current KEK id. Batches
        are written with optimistic concurrency, so an interrupted run can simply
        be repeated. The store itself is resealed under the current KEK at the end.
        """
        return await _key_rewrap.rewrap_keys(self, only_foreign=only_foreign, batch_size=batch_size)

    # -- subject keys (_subjects_keys) -------------------------------------------

    async def rewrap_subjects(
        self, key_type: KeyTypeLike, *, batch_size: int = 1000
    ) -> SubjectRewrapReport:
        """Wrap every subject key of ``key_type`` still under an older version again under
        the active one, in batches (after a rotation; no data is touched).

        Each batch is a compare-and-set per record, so an interrupted run is simply
        repeated; until it is done the census (:meth:`subject_census`) keeps the
        older versions from being destroyed.
        """
        if not self._opened:
            await self.open()
        return await self.subjects.rewrap(key_type, batch_size=batch_size)

    async def subject_census(self, key_type: KeyTypeLike | None = None) -> dict[str, int]:
        """Live subject keys per wrapping key id (each version key not destroyed)."""
        if not self._opened:
            await self.open()
        return await self.subjects.census(key_type)

    # -- reporting (_key_reports) ---------------------------------------------

    async def key_statistics(self) -> KeyStatistics:
        """Keys by type and status, what needs rotating and why, usage, the DEK cache."""
        return await _key_reports.key_statistics(self)

    async def get_key_statistics(self) -> dict[str, Any]:
        """:meth:`key_statistics` as the seed's dict."""
        return (await self.key_statistics()).to_dict()

    async def health(self) -> dict[str, Any]:
        """Whether the key store and the KEK provider answer (never raises)."""
        return await _key_reports.probe(self)
