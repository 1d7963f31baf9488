"""KeyManager: generates, rotates, revokes and loads data-encryption keys.

It owns no crypto of its own: it reads records from a ``KeyStore``, unwraps
them with a ``KekProvider`` and publishes an immutable ``Keyring`` snapshot that
the service (and sync code) encrypts with. Every change is made under the
store's rotation lock and written with optimistic concurrency, then the
snapshot is rebuilt, so a failed write leaves the previous keys in force.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import anyio

from ._config import EncryptionConfig
from ._crypto import DEK_BYTES, DataKey
from ._errors import (
    ConcurrentModificationError,
    KekProviderError,
    KeyNotFoundError,
    KeyStateError,
)
from ._keyring import Keyring
from ._keys import EncryptionKey, utcnow
from ._types import KeyStatus, KeyType, KeyTypeLike
from .kek._base import KekProvider
from .keystore._base import KeySet, KeyStore

__all__ = ["KeyManager"]

logger = logging.getLogger("aiocrypt.keys")

Clock = Callable[[], _dt.datetime]
_WRITE_RETRIES: Final = 5


def _wrap_context(key: EncryptionKey) -> dict[str, str]:
    return {"aiocrypt_key_id": key.key_id, "aiocrypt_key_type": key.key_type.value}


class KeyManager:
    """Life cycle of data-encryption keys over one store and one KEK provider.

    ``refresh_interval`` bounds how stale this process's view of the store may
    get (a rotation made elsewhere is picked up within it); unwrapped DEKs are
    re-unwrapped after the performance mode's ``dek_cache_seconds``.
    """

    def __init__(self, store: KeyStore, kek: KekProvider,
                 config: EncryptionConfig | None = None, *,
                 clock: Clock = utcnow, refresh_interval: float = 5.0,
                 lock_timeout: float = 30.0) -> None:
        self.store = store
        self.kek = kek
        self.config = config if config is not None else EncryptionConfig()
        self._clock = clock
        self.refresh_interval = refresh_interval
        self.lock_timeout = lock_timeout
        self._keyring = Keyring()
        self._records: KeySet = KeySet(0, ())
        # key id -> (wrapped bytes, DataKey, monotonic time unwrapped)
        self._dek_cache: dict[str, tuple[bytes, DataKey, float]] = {}
        self._fresh_until = float("-inf")  # monotonic time the snapshot goes stale
        self._refresh_lock = anyio.Lock()
        self._opened = False
        self._missing: dict[str, float] = {}

    def __repr__(self) -> str:
        return (f"<KeyManager store={self.store.name} kek={self.kek.kek_id} "
                f"keys={len(self._keyring)}>")

    # -- lifecycle ----------------------------------------------------------

    async def open(self) -> None:
        if not self._opened:
            await self.store.open()
            self._opened = True
            await self.refresh(force=True)

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            self._dek_cache.clear()
            self._keyring = Keyring()
            await self.store.close()
            await self.kek.close()

    async def __aenter__(self) -> KeyManager:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

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
            if force or revision != self._records.revision or self._dek_cache_expired():
                await self._rebuild(await self.store.read())
            self._mark_fresh()
            return self._keyring

    def _dek_cache_expired(self) -> bool:
        max_age = self.config.performance.dek_cache_seconds
        now = time.monotonic()
        return any(now - at > max_age for _, _, at in self._dek_cache.values())

    async def _rebuild(self, keyset: KeySet) -> None:
        max_age = self.config.performance.dek_cache_seconds
        now = time.monotonic()
        cache: dict[str, tuple[bytes, DataKey, float]] = {}
        for key in keyset.keys:
            if key.status is KeyStatus.DESTROYED or key.wrapped_key is None:
                continue
            cached = self._dek_cache.get(key.key_id)
            if cached is not None and cached[0] == key.wrapped_key and now - cached[2] <= max_age:
                cache[key.key_id] = (key.wrapped_key, cached[1].with_key(key), cached[2])
                continue
            material = await self._unwrap(key)
            cache[key.key_id] = (key.wrapped_key, DataKey(key, material), now)
        self._dek_cache = cache
        self._records = keyset
        self._keyring = Keyring((dk for _, dk, _ in cache.values()), keyset.revision)
        logger.debug("keyring rebuilt at store revision %d: %d keys", keyset.revision, len(cache))

    async def _unwrap(self, key: EncryptionKey) -> bytes:
        if key.kek_id and key.kek_id != self.kek.kek_id:
            raise KekProviderError(
                f"key {key.key_id} is wrapped by KEK {key.kek_id}, but the configured KEK is "
                f"{self.kek.kek_id}", backend=self.kek.backend)
        assert key.wrapped_key is not None
        material = await self.kek.unwrap(key.wrapped_key, _wrap_context(key))
        if len(material) != DEK_BYTES:
            raise KekProviderError(f"key {key.key_id} unwrapped to a key of the wrong size",
                                   backend=self.kek.backend)
        return material

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
        await self.refresh(force=True)
        dk = self._keyring.get(key_id)
        if dk is None:
            if len(self._missing) > 1024:
                self._missing.clear()
            self._missing[key_id] = now
        return dk

    # -- changing keys ------------------------------------------------------

    async def _change(self, plan: Callable[[KeySet], Awaitable[Sequence[EncryptionKey]]],
                      new_material: dict[str, bytes] | None = None) -> KeySet:
        """Apply ``plan`` (records to upsert) under the rotation lock, retrying CAS races."""
        if not self._opened:
            await self.open()
        async with self.store.lock("rotation", timeout=self.lock_timeout):
            for _ in range(_WRITE_RETRIES):
                current = await self.store.read()
                updates = await plan(current)
                if not updates:
                    await self._rebuild(current)
                    return current
                try:
                    await self.store.write(updates, expected_revision=current.revision)
                except ConcurrentModificationError:
                    continue
                keyset = await self.store.read()
                if new_material:
                    now = time.monotonic()
                    by_id = keyset.by_id()
                    for key_id, material in new_material.items():
                        key = by_id.get(key_id)
                        if key is not None and key.wrapped_key is not None:
                            self._dek_cache[key_id] = (key.wrapped_key, DataKey(key, material),
                                                       now)
                await self._rebuild(keyset)
                self._mark_fresh()
                return keyset
            raise ConcurrentModificationError("key store kept changing; gave up after 5 tries")

    async def _new_key(self, key_type: KeyType, version: int) -> tuple[EncryptionKey, bytes]:
        now = self._clock()
        policy = self.config.rotation_policy(key_type)
        key = EncryptionKey(
            key_id=f"{key_type.value}-v{version}-{secrets.token_hex(4)}",
            key_type=key_type,
            version=version,
            status=KeyStatus.ACTIVE,
            created_at=now,
            expires_at=now + _dt.timedelta(days=policy.max_key_age_days),
            kek_id=self.kek.kek_id,
            activated_at=now,
            status_changed_at=now,
        )
        material = os.urandom(DEK_BYTES)
        wrapped = await self.kek.wrap(material, _wrap_context(key))
        return key.replace(wrapped_key=wrapped), material

    async def _activate_new(self, key_type: KeyType, *,
                            only_if: Callable[[EncryptionKey | None], bool]) -> EncryptionKey:
        """Create a new active version when ``only_if(current active)`` holds."""
        created: dict[str, bytes] = {}

        async def plan(current: KeySet) -> list[EncryptionKey]:
            created.clear()
            same_type = [k for k in current.keys if k.key_type == key_type]
            active = [k for k in same_type if k.status is KeyStatus.ACTIVE]
            if not only_if(max(active, key=lambda k: k.version) if active else None):
                return []
            version = max((k.version for k in same_type), default=0) + 1
            key, material = await self._new_key(key_type, version)
            created[key.key_id] = material
            now = self._clock()
            retired = [k.replace(status=KeyStatus.DECRYPT_ONLY, retired_at=now,
                                 status_changed_at=now, status_reason="rotated")
                       for k in active]
            return [*retired, key]

        keyset = await self._change(plan, created)
        for key_id in created:
            logger.info("key generated: %s (type %s)", key_id, key_type.value)
        return self._active_record(keyset, key_type)

    @staticmethod
    def _active_record(keyset: KeySet, key_type: KeyType) -> EncryptionKey:
        active = [k for k in keyset.keys if k.key_type == key_type
                  and k.status is KeyStatus.ACTIVE]
        if not active:
            raise KeyNotFoundError(f"no active key of type {key_type.value!r}")
        return max(active, key=lambda k: k.version)

    def _check_key_size(self, key_size: int | None) -> None:
        if key_size not in (None, 256):
            raise ValueError(f"key_size {key_size} is not supported: aiocrypt uses 256-bit keys")

    async def generate_key(self, key_type: KeyTypeLike,
                           key_size: int | None = None) -> EncryptionKey:
        """Create a new version of ``key_type`` and make it active (the old one decrypts only)."""
        self._check_key_size(key_size)
        return await self._activate_new(KeyType(key_type), only_if=lambda _: True)

    async def ensure_active(self, key_types: Iterable[KeyTypeLike]) -> Keyring:
        """Make sure each key type has an active key (creating the first version if needed)."""
        keyring = await self.current_keyring()
        for key_type in key_types:
            kt = KeyType(key_type)
            if kt not in keyring.active_keys:
                await self._activate_new(kt, only_if=lambda active: active is None)
                keyring = self._keyring
        return keyring

    async def get_active_key(self, key_type: KeyTypeLike) -> EncryptionKey:
        """The active key of ``key_type``, created on first use."""
        keyring = await self.ensure_active([key_type])
        return keyring.active(key_type).key

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

    def _rotation_due(self, key: EncryptionKey | None) -> bool:
        if key is None:
            return True
        policy = self.config.rotation_policy(key.key_type)
        return key.age(self._clock()) >= _dt.timedelta(days=policy.rotation_interval_days)

    async def rotate_key(self, key_type: KeyTypeLike, force: bool = False) -> EncryptionKey:
        """Rotate ``key_type`` if its policy says it is due (or ``force``); return the active key.

        The previous version becomes DECRYPT_ONLY: everything encrypted with it
        still decrypts, new data uses the new version.
        """
        kt = KeyType(key_type)
        if force:
            return await self._activate_new(kt, only_if=lambda _: True)
        return await self._activate_new(kt, only_if=self._rotation_due)

    async def revoke_key(self, key_id: str, reason: str = "Manual revocation") -> EncryptionKey:
        """Withdraw a key: it never encrypts again and plain reads refuse its data.

        If it was the active key, a new version is activated at once.
        """
        return await self._set_status(key_id, KeyStatus.REVOKED, reason)

    async def _set_status(self, key_id: str, status: KeyStatus, reason: str) -> EncryptionKey:
        was_active = False

        async def plan(current: KeySet) -> list[EncryptionKey]:
            nonlocal was_active
            key = current.by_id().get(key_id)
            if key is None:
                raise KeyNotFoundError(f"no key with id {key_id!r}")
            if key.status is KeyStatus.DESTROYED:
                raise KeyStateError(f"key {key_id} is destroyed")
            was_active = key.status is KeyStatus.ACTIVE
            now = self._clock()
            return [key.replace(status=status, status_reason=reason[:500], status_changed_at=now,
                                retired_at=key.retired_at or now)]

        keyset = await self._change(plan)
        key = keyset.by_id()[key_id]
        logger.warning("key %s: %s (%s)", key_id, status.value, reason[:200])
        if was_active:
            await self._activate_new(key.key_type, only_if=lambda active: active is None)
        return key

    async def list_keys(self, key_type: KeyTypeLike | None = None,
                        status: KeyStatus | str | None = None) -> list[EncryptionKey]:
        if not self._opened:
            await self.open()
        await self.refresh(force=True)
        kt = None if key_type is None else KeyType(key_type)
        st = None if status is None else KeyStatus(status)
        keys = [k for k in self._records.keys
                if (kt is None or k.key_type == kt) and (st is None or k.status is st)]
        return sorted(keys, key=lambda k: (k.key_type.value, k.version))

    async def cleanup_expired_keys(self, *, confirm_unreferenced: Iterable[str] = (),
                                   force: bool = False) -> int:
        """Expire keys past their maximum age; destroy those past the grace period too.

        A key is destroyed only if the caller confirms nothing references it
        (``confirm_unreferenced``: key ids with no data left, from a
        re-encryption census) or passes ``force=True`` (logged loudly). Active
        keys are never destroyed here: rotate them first. Returns the number
        of keys destroyed.
        """
        confirmed = set(confirm_unreferenced)
        destroyed: list[str] = []
        kept: list[str] = []

        async def plan(current: KeySet) -> list[EncryptionKey]:
            destroyed.clear()
            kept.clear()
            now = self._clock()
            updates = []
            for key in current.keys:
                if key.status in (KeyStatus.DESTROYED, KeyStatus.ACTIVE) or now < key.expires_at:
                    continue
                grace = _dt.timedelta(days=self.config.rotation_policy(
                    key.key_type).grace_period_days)
                if now >= key.expires_at + grace and (force or key.key_id in confirmed):
                    updates.append(key.replace(
                        status=KeyStatus.DESTROYED, wrapped_key=None, status_changed_at=now,
                        status_reason="forced destruction" if force and key.key_id not in
                        confirmed else "expired and unreferenced"))
                    destroyed.append(key.key_id)
                    continue
                if now >= key.expires_at + grace:
                    kept.append(key.key_id)
                if key.status is KeyStatus.DECRYPT_ONLY:
                    updates.append(key.replace(status=KeyStatus.EXPIRED, status_changed_at=now,
                                               status_reason="past maximum age"))
            return updates

        await self._change(plan)
        for key_id in destroyed:
            if force and key_id not in confirmed:
                logger.warning("key %s DESTROYED by force (no reference check)", key_id)
            else:
                logger.info("key %s destroyed (expired, confirmed unreferenced)", key_id)
        for key_id in kept:
            logger.info("key %s kept: past grace but not confirmed unreferenced", key_id)
        return len(destroyed)

    # -- reporting ----------------------------------------------------------

    async def get_key_statistics(self) -> dict[str, Any]:
        keys = await self.list_keys()
        now = self._clock()
        by_type: dict[str, dict[str, int]] = {}
        by_status: dict[str, int] = {s.value: 0 for s in KeyStatus}
        active: dict[str, dict[str, Any]] = {}
        rotation_needed: list[dict[str, Any]] = []
        for key in keys:
            by_type.setdefault(key.key_type.value, {}).setdefault(key.status.value, 0)
            by_type[key.key_type.value][key.status.value] += 1
            by_status[key.status.value] += 1
            if key.status is KeyStatus.ACTIVE:
                policy = self.config.rotation_policy(key.key_type)
                rotate_at = key.created_at + _dt.timedelta(days=policy.rotation_interval_days)
                active[key.key_type.value] = {
                    "key_id": key.key_id,
                    "version": key.version,
                    "age_days": round(key.age(now).total_seconds() / 86400, 2),
                    "days_to_rotation": round((rotate_at - now).total_seconds() / 86400, 2),
                    "days_to_expiry": round((key.expires_at - now).total_seconds() / 86400, 2),
                }
                if now >= key.expires_at:
                    rotation_needed.append({"key_type": key.key_type.value,
                                            "key_id": key.key_id, "reason": "expiry"})
                elif now >= rotate_at:
                    rotation_needed.append({"key_type": key.key_type.value,
                                            "key_id": key.key_id, "reason": "age"})
            elif key.status is KeyStatus.COMPROMISED:
                rotation_needed.append({"key_type": key.key_type.value,
                                        "key_id": key.key_id, "reason": "compromise"})
        return {
            "total_keys": len(keys),
            "by_type": by_type,
            "by_status": by_status,
            "active_keys": active,
            "rotation_needed": rotation_needed,
            "store": self.store.name,
            "store_revision": self._records.revision,
            "kek_provider": self.kek.backend,
            "kek_id": self.kek.kek_id,
        }
