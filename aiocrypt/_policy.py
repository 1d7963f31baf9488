"""Pure rotation-policy decisions: is a key due, expired, past its grace period?"""

from __future__ import annotations

import datetime as _dt

from ._config import KeyRotationPolicy
from ._keys import EncryptionKey
from ._types import KeyStatus

__all__ = [
    "grace_end",
    "is_expired",
    "is_past_grace",
    "rotation_due",
    "rotation_reason",
    "usage_block",
]


def grace_end(key: EncryptionKey, policy: KeyRotationPolicy) -> _dt.datetime:
    return key.expires_at + _dt.timedelta(days=policy.grace_period_days)


def rotation_due(key: EncryptionKey, policy: KeyRotationPolicy) -> _dt.datetime:
    """When ``key`` reaches the policy's rotation interval."""
    return key.created_at + _dt.timedelta(days=policy.rotation_interval_days)


def is_expired(key: EncryptionKey, now: _dt.datetime) -> bool:
    return now >= key.expires_at


def is_past_grace(key: EncryptionKey, policy: KeyRotationPolicy, now: _dt.datetime) -> bool:
    return now >= grace_end(key, policy)


def rotation_reason(
    key: EncryptionKey, policy: KeyRotationPolicy, now: _dt.datetime, usage: int = 0
) -> str | None:
    """Why the active ``key`` must be replaced now ("expiry", "usage", "age"), or None.

    Expiry and usage force a rotation even with ``auto_rotation`` off: past them
    the key is unsafe or out of policy. Age rotates only with ``auto_rotation``.
    """
    if key.status is KeyStatus.COMPROMISED:
        return "compromise"
    if key.status is not KeyStatus.ACTIVE:
        return None
    if now >= key.expires_at:
        return "expiry"
    if usage >= policy.max_encryptions:
        return "usage"
    if policy.auto_rotation and now >= rotation_due(key, policy):
        return "age"
    return None


def usage_block(policy: KeyRotationPolicy, default: int) -> int:
    """How many encryptions one process reserves from the shared counter at a time."""
    return max(1, min(default, policy.max_encryptions // 8))
