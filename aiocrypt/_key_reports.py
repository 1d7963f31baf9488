"""What a ``KeyManager`` reports: key statistics and a reachability probe.

One part of :class:`~aiocrypt._manager.KeyManager` (docs/architecture.md). The
statistics are typed (:class:`KeyStatistics`); ``get_key_statistics()`` keeps the
dict the seed's API returns, built from them. Nothing here shows key material:
key ids, types, versions, ages, counts.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _policy
from ._types import KeyStatus

if TYPE_CHECKING:
    from ._manager import KeyManager

__all__ = ["ActiveKeyInfo", "KeyStatistics", "RotationNeed", "key_statistics", "probe"]


@dataclass(frozen=True, slots=True)
class ActiveKeyInfo:
    """The active key of one key type: age, time to rotation and expiry, usage."""

    key_id: str
    version: int
    age_days: float
    days_to_rotation: float
    days_to_expiry: float
    #: encryptions reserved in blocks by every process (what the limit counts), ahead
    #: of those made by up to one block per process
    usage_reserved: int
    usage_block: int
    usage_limit: int
    auto_rotation: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "version": self.version,
            "age_days": self.age_days,
            "days_to_rotation": self.days_to_rotation,
            "days_to_expiry": self.days_to_expiry,
            "usage_reserved": self.usage_reserved,
            "usage_block": self.usage_block,
            "usage": self.usage_reserved,  # = usage_reserved (the older name)
            "usage_limit": self.usage_limit,
            "auto_rotation": self.auto_rotation,
        }


@dataclass(frozen=True, slots=True)
class RotationNeed:
    """A key that should be rotated (or whose data re-encrypted), and why."""

    key_type: str
    key_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class KeyStatistics:
    """Keys by type and status, what needs rotating and why, usage, the DEK cache."""

    total_keys: int
    by_type: Mapping[str, Mapping[str, int]]
    by_status: Mapping[str, int]
    active_keys: Mapping[str, ActiveKeyInfo]
    rotation_needed: tuple[RotationNeed, ...]
    reencrypt_required: tuple[str, ...]
    store: str
    store_revision: int
    kek_provider: str
    kek_id: str
    dek_cache_hits: int
    dek_cache_misses: int

    def to_dict(self) -> dict[str, Any]:
        """The ``get_key_statistics()`` form."""
        return {
            "total_keys": self.total_keys,
            "by_type": {t: dict(c) for t, c in self.by_type.items()},
            "by_status": dict(self.by_status),
            "active_keys": {t: info.to_dict() for t, info in self.active_keys.items()},
            "rotation_needed": [
                {"key_type": n.key_type, "key_id": n.key_id, "reason": n.reason}
                for n in self.rotation_needed
            ],
            "reencrypt_required": list(self.reencrypt_required),
            "store": self.store,
            "store_revision": self.store_revision,
            "kek_provider": self.kek_provider,
            "kek_id": self.kek_id,
            "dek_cache": {"hits": self.dek_cache_hits, "misses": self.dek_cache_misses},
        }


def _days(delta: _dt.timedelta) -> float:
    return round(delta.total_seconds() / 86400, 2)


async def key_statistics(manager: KeyManager) -> KeyStatistics:
    """See :meth:`KeyManager.key_statistics`."""
    keys = await manager.list_keys()
    now = manager._clock()
    try:
        usage = await manager.store.get_usage()
    except Exception:  # statistics without usage beat none: usage shows as 0
        usage = {}
    by_type: dict[str, dict[str, int]] = {}
    by_status: dict[str, int] = {s.value: 0 for s in KeyStatus}
    active: dict[str, ActiveKeyInfo] = {}
    rotation_needed: list[RotationNeed] = []
    for key in keys:
        by_type.setdefault(key.key_type.value, {}).setdefault(key.status.value, 0)
        by_type[key.key_type.value][key.status.value] += 1
        by_status[key.status.value] += 1
        policy = manager.config.rotation_policy(key.key_type)
        reason = _policy.rotation_reason(key, policy, now, usage.get(key.key_id, 0))
        if key.status is KeyStatus.ACTIVE:
            rotate_at = _policy.rotation_due(key, policy)
            active[key.key_type.value] = ActiveKeyInfo(
                key.key_id,
                key.version,
                _days(key.age(now)),
                _days(rotate_at - now),
                _days(key.expires_at - now),
                usage.get(key.key_id, 0),
                _policy.usage_block(policy, manager.usage_block),
                policy.max_encryptions,
                policy.auto_rotation,
            )
            if reason is None and not policy.auto_rotation and now >= rotate_at:
                reason = "age"
        if reason is not None and (key.status is KeyStatus.ACTIVE or reason == "compromise"):
            rotation_needed.append(RotationNeed(key.key_type.value, key.key_id, reason))
    return KeyStatistics(
        total_keys=len(keys),
        by_type=by_type,
        by_status=by_status,
        active_keys=active,
        rotation_needed=tuple(rotation_needed),
        reencrypt_required=tuple(
            k.key_id for k in keys if k.reencrypt_required and k.status is not KeyStatus.DESTROYED
        ),
        store=manager.store.name,
        store_revision=manager._records.revision,
        kek_provider=manager.kek.backend,
        kek_id=manager.kek.kek_id,
        dek_cache_hits=manager.dek_cache_hits,
        dek_cache_misses=manager.dek_cache_misses,
    )


async def probe(manager: KeyManager) -> dict[str, Any]:
    """See :meth:`KeyManager.health`: whether the store and the KEK provider answer."""
    result: dict[str, Any] = {}
    checks: tuple[tuple[str, Callable[[], Awaitable[object]]], ...] = (
        ("key_store", manager.store.revision),
        ("kek_provider", manager.kek.check),
    )
    for name, check in checks:
        try:
            await check()
            result[f"{name}_reachable"] = True
        except Exception as exc:  # a probe reports, never raises
            result[f"{name}_reachable"] = False
            result[f"{name}_error"] = type(exc).__name__
    return result
