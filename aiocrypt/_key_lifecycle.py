"""Key lifecycle transitions: new versions, rotation by policy, expiry, withdrawal.

One part of :class:`~aiocrypt._manager.KeyManager` (docs/architecture.md). Every
transition is a plan handed to the manager's ``_change``: run under the store's
rotation lock against the verified keyset, written with compare-and-swap and a
new keyset seal, retried on a race, then audited. A new DEK is made here and
wrapped at once; it is cached by the manager (``DekCache.adopt``), never left in
a frame an error could carry away.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _policy
from ._crypto import DEK_BYTES
from ._dek_cache import scrubbed
from ._errors import KeyNotFoundError, KeyStateError
from ._key_usage import still_active
from ._keyring import Keyring
from ._keys import EncryptionKey
from ._telemetry import annotate, count, traced
from ._types import KeyStatus, KeyType, KeyTypeLike
from .keystore._base import KeySet

if TYPE_CHECKING:
    from ._manager import KeyManager

__all__ = ["Lifecycle", "Rotation", "RotationRun"]

logger = logging.getLogger("aiocrypt.keys")


@dataclass(frozen=True, slots=True)
class Rotation:
    """One rotation a policy run made."""

    key_type: str
    old_key_id: str
    new_key_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RotationRun:
    """What :meth:`KeyManager.run_rotation_policy` did: rotations, keys marked expired,
    and the key ids whose data should be re-encrypted."""

    checked_at: _dt.datetime
    rotated: tuple[Rotation, ...]
    expired: tuple[str, ...]
    reencrypt: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The ``rotate_keys_due()`` form."""
        return {
            "checked_at": self.checked_at.isoformat(),
            "rotated": [
                {
                    "key_type": r.key_type,
                    "old_key_id": r.old_key_id,
                    "new_key_id": r.new_key_id,
                    "reason": r.reason,
                }
                for r in self.rotated
            ],
            "expired": list(self.expired),
            "reencrypt": list(self.reencrypt),
        }


class Lifecycle:
    """The manager's key transitions (one per manager, holding none of its state)."""

    def __init__(self, manager: KeyManager) -> None:
        self._manager = manager

    async def _new_key(self, key_type: KeyType, version: int) -> tuple[EncryptionKey, bytes]:
        manager = self._manager
        now = manager._clock()
        policy = manager.config.rotation_policy(key_type)
        key = EncryptionKey(
            key_id=f"{key_type.value}-v{version}-{secrets.token_hex(4)}",
            key_type=key_type,
            version=version,
            status=KeyStatus.ACTIVE,
            created_at=now,
            expires_at=now + _dt.timedelta(days=policy.max_key_age_days),
            kek_id=manager.kek.kek_id,
            activated_at=now,
            status_changed_at=now,
        )
        material = os.urandom(DEK_BYTES)
        try:
            wrapped = await manager._deks.wrap(manager.kek, material, key)
        except BaseException as exc:  # re-raised, scrubbed
            failure = exc
        else:
            return key.replace(wrapped_key=wrapped), material
        del material
        raise scrubbed(failure)

    @traced("aiocrypt.key.rotate")
    async def activate_new(
        self, key_type: KeyType, *, reason: str, only_if: Callable[[EncryptionKey | None], bool]
    ) -> tuple[EncryptionKey, EncryptionKey | None]:
        """Create a new active version when ``only_if(current active)`` holds.

        Returns (active key afterwards, the key it replaced or None if nothing changed).
        """
        manager = self._manager
        annotate(key_type=key_type.value, reason=reason)
        created: dict[str, bytes] = {}
        replaced: list[EncryptionKey] = []

        async def plan(current: KeySet) -> list[EncryptionKey]:
            created.clear()
            replaced.clear()
            same_type = [k for k in current.keys if k.key_type == key_type]
            active = [k for k in same_type if k.status is KeyStatus.ACTIVE]
            if not only_if(max(active, key=lambda k: k.version) if active else None):
                return []
            version = max((k.version for k in same_type), default=0) + 1
            key, material = await self._new_key(key_type, version)
            created[key.key_id] = material
            now = manager._clock()
            retired = [
                k.replace(
                    status=KeyStatus.DECRYPT_ONLY,
                    retired_at=now,
                    status_changed_at=now,
                    status_reason=f"rotated ({reason})",
                )
                for k in active
            ]
            replaced.extend(active)
            return [*retired, key]

        try:
            keyset = await manager._change(plan, created)
        except BaseException:
            created.clear()  # the frames of this error hold the dict: empty it of DEKs
            raise
        made = bool(created)
        created.clear()
        active_key = self._active_record(keyset, key_type)
        if made:
            old = replaced[0] if replaced else None
            annotate(
                outcome="created" if old is None else "rotated",
                new_key_id=active_key.key_id,
                version=active_key.version,
                **({} if old is None else {"old_key_id": old.key_id}),
            )
            count("aiocrypt.keys.created", key_type=key_type.value, reason=reason)
            logger.info(
                "key generated: %s (type %s, %s)", active_key.key_id, key_type.value, reason
            )
            await manager.auditor.emit(
                "key_generated",
                key_id=active_key.key_id,
                key_type=key_type.value,
                version=active_key.version,
                reason=reason,
            )
            if old is not None:
                await manager.auditor.emit(
                    "key_rotated",
                    key_id=old.key_id,
                    key_type=key_type.value,
                    new_key_id=active_key.key_id,
                    reason=reason,
                )
            return active_key, old
        annotate(outcome="unchanged", key_id=active_key.key_id)
        return active_key, None

    @staticmethod
    def _active_record(keyset: KeySet, key_type: KeyType) -> EncryptionKey:
        active = [k for k in keyset.keys if k.key_type == key_type and k.status is KeyStatus.ACTIVE]
        if not active:
            raise KeyNotFoundError(f"no active key of type {key_type.value!r}")
        return max(active, key=lambda k: k.version)

    def _check_key_size(self, key_size: int | None) -> None:
        if key_size not in (None, 256):
            raise ValueError(f"key_size {key_size} is not supported: aiocrypt uses 256-bit keys")

    async def generate_key(
        self, key_type: KeyTypeLike, key_size: int | None = None
    ) -> EncryptionKey:
        """See :meth:`KeyManager.generate_key`."""
        manager = self._manager
        self._check_key_size(key_size)
        return (
            await self.activate_new(
                manager.config.declared_key_type(key_type),
                reason="generated",
                only_if=lambda _: True,
            )
        )[0]

    async def ensure_active(self, key_types: Iterable[KeyTypeLike]) -> Keyring:
        """See :meth:`KeyManager.ensure_active`."""
        manager = self._manager
        kts = [KeyType(kt) for kt in key_types]
        keyring = await self.ensure_active_unreserved(kts)
        for kt in kts:
            dk = keyring.active(kt)
            if dk.encryptions >= dk.refill_at:
                keyring = await manager.reserve_usage(kt, ahead=True)
        return keyring

    async def ensure_active_unreserved(self, key_types: Iterable[KeyTypeLike]) -> Keyring:
        """An active key for each key type (the first version of a declared type is made
        here), without reserving an allowance: for callers that only look."""
        manager = self._manager
        keyring = await manager.current_keyring()
        for key_type in key_types:
            kt = KeyType(key_type)
            if not keyring.has_active(kt):
                # the first key of a key type: only a declared one (a typo gets none)
                manager.config.declared_key_type(kt)
                await self.activate_new(
                    kt, reason="first use", only_if=lambda active: active is None
                )
                keyring = manager._keyring
        return keyring

    async def get_active_key(self, key_type: KeyTypeLike) -> EncryptionKey:
        """See :meth:`KeyManager.get_active_key`."""
        keyring = await self.ensure_active_unreserved([key_type])  # no allowance: it only looks
        return keyring.active(key_type).key

    async def rotate_key(self, key_type: KeyTypeLike, force: bool = False) -> EncryptionKey:
        """See :meth:`KeyManager.rotate_key`."""
        manager = self._manager
        kt = manager.config.declared_key_type(key_type)
        if force:
            return (await self.activate_new(kt, reason="forced", only_if=lambda _: True))[0]
        usage = await manager.store.get_usage() if manager._opened else {}
        policy = manager.config.rotation_policy(kt)

        def due(active: EncryptionKey | None) -> bool:
            return (
                active is None
                or _policy.rotation_reason(
                    active, policy, manager._clock(), usage.get(active.key_id, 0)
                )
                is not None
            )

        return (await self.activate_new(kt, reason="policy", only_if=due))[0]

    @traced("aiocrypt.key.rotation_policy")
    async def run_rotation_policy(self) -> RotationRun:
        """See :meth:`KeyManager.run_rotation_policy`."""
        manager = self._manager
        if not manager._opened:
            await manager.open()
        await manager.refresh(force=True)
        now = manager._clock()
        usage = await manager.store.get_usage()
        rotated: list[Rotation] = []
        for key in [k for k in manager._records.keys if k.status is KeyStatus.ACTIVE]:
            policy = manager.config.rotation_policy(key.key_type)
            reason = _policy.rotation_reason(key, policy, now, usage.get(key.key_id, 0))
            if reason is None:
                continue
            try:
                new_key, old = await self.activate_new(
                    key.key_type, reason=reason, only_if=still_active(key.key_id)
                )
            except KeyNotFoundError:  # another process retired the key type meanwhile
                continue
            if old is not None:
                rotated.append(Rotation(key.key_type.value, old.key_id, new_key.key_id, reason))
        expired = await self.expire_retired()
        reencrypt = sorted(
            {r.old_key_id for r in rotated}
            | {
                k.key_id
                for k in manager._records.keys
                if k.reencrypt_required and k.status is not KeyStatus.DESTROYED
            }
        )
        await manager.auditor.emit(
            "policy_run", rotated=len(rotated), expired=len(expired), reencrypt=len(reencrypt)
        )
        annotate(rotated=len(rotated), expired=len(expired), reencrypt=len(reencrypt))
        return RotationRun(now, tuple(rotated), tuple(expired), tuple(reencrypt))

    async def expire_retired(self) -> list[str]:
        """Mark retired keys past their maximum age EXPIRED; their ids."""
        manager = self._manager
        expired: list[str] = []

        async def plan(current: KeySet) -> list[EncryptionKey]:
            expired.clear()
            now = manager._clock()
            updates = []
            for key in current.keys:
                if key.status is KeyStatus.DECRYPT_ONLY and _policy.is_expired(key, now):
                    updates.append(
                        key.replace(
                            status=KeyStatus.EXPIRED,
                            status_changed_at=now,
                            status_reason="past maximum age",
                        )
                    )
                    expired.append(key.key_id)
            return updates

        keyset = await manager._change(plan)
        by_id = keyset.by_id()
        for key_id in expired:
            await manager.auditor.emit(
                "key_expired", key_id=key_id, key_type=by_id[key_id].key_type.value
            )
        return expired

    async def revoke_key(self, key_id: str, reason: str = "Manual revocation") -> EncryptionKey:
        """See :meth:`KeyManager.revoke_key`."""
        return await self._withdraw(key_id, KeyStatus.REVOKED, reason)

    async def mark_compromised(self, key_id: str, reason: str) -> EncryptionKey:
        """See :meth:`KeyManager.mark_compromised`."""
        return await self._withdraw(key_id, KeyStatus.COMPROMISED, reason)

    async def _withdraw(self, key_id: str, status: KeyStatus, reason: str) -> EncryptionKey:
        manager = self._manager
        was_active = False

        async def plan(current: KeySet) -> list[EncryptionKey]:
            nonlocal was_active
            key = current.by_id().get(key_id)
            if key is None:
                raise KeyNotFoundError(f"no key with id {key_id!r}")
            if key.status is KeyStatus.DESTROYED:
                raise KeyStateError(f"key {key_id} is destroyed")
            was_active = key.status is KeyStatus.ACTIVE
            now = manager._clock()
            return [
                key.replace(
                    status=status,
                    status_reason=reason[:500],
                    status_changed_at=now,
                    retired_at=key.retired_at or now,
                    reencrypt_required=key.reencrypt_required or status is KeyStatus.COMPROMISED,
                )
            ]

        keyset = await manager._change(plan)
        key = keyset.by_id()[key_id]
        event = "key_compromised" if status is KeyStatus.COMPROMISED else "key_revoked"
        logger.warning("key %s: %s (%s)", key_id, status.value, reason[:200])
        await manager.auditor.emit(
            event,
            key_id=key_id,
            key_type=key.key_type.value,
            reason=reason[:500],
            was_active=was_active,
        )
        if was_active:
            await self.activate_new(
                key.key_type, reason=status.value, only_if=lambda active: active is None
            )
        return key
