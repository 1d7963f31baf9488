"""The rotation-policy decisions of ``aiocrypt._policy`` at their exact boundaries.

Each test pins a line a mutant of ``./dev mutate aiocrypt/_policy.py`` changed
without any other test noticing (docs/testing.md).
"""

from __future__ import annotations

import datetime as _dt

import pytest

from aiocrypt import KeyStatus, KeyType
from aiocrypt._config import KeyRotationPolicy
from aiocrypt._keys import EncryptionKey
from aiocrypt._policy import (
    grace_end,
    is_expired,
    is_past_grace,
    rotation_due,
    rotation_reason,
    usage_block,
)

CREATED = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)
EXPIRES = CREATED + _dt.timedelta(days=365)
TICK = _dt.timedelta(microseconds=1)


def key(status: KeyStatus = KeyStatus.ACTIVE) -> EncryptionKey:
    return EncryptionKey("pii-v1", KeyType.PII, 1, status, CREATED, EXPIRES)


def policy(**changes: object) -> KeyRotationPolicy:
    settings: dict[str, object] = {
        "key_type": KeyType.PII,
        "rotation_interval_days": 90,
        "grace_period_days": 30,
        "max_encryptions": 1000,
    }
    settings.update(changes)
    return KeyRotationPolicy(**settings)  # type: ignore[arg-type]


def test_grace_end_and_rotation_due_are_later_by_the_policy_days() -> None:
    assert grace_end(key(), policy()) == EXPIRES + _dt.timedelta(days=30)
    assert rotation_due(key(), policy()) == CREATED + _dt.timedelta(days=90)


def test_expiry_starts_at_expires_at_exactly() -> None:
    assert not is_expired(key(), EXPIRES - TICK)
    assert is_expired(key(), EXPIRES) is True


def test_grace_ends_at_grace_end_exactly() -> None:
    end = EXPIRES + _dt.timedelta(days=30)
    assert not is_past_grace(key(), policy(), end - TICK)
    assert is_past_grace(key(), policy(), end) is True


@pytest.mark.parametrize(
    "status", [KeyStatus.ACTIVE, KeyStatus.DECRYPT_ONLY, KeyStatus.EXPIRED, KeyStatus.REVOKED]
)
def test_compromise_comes_first_whatever_else_is_due(status: KeyStatus) -> None:
    compromised = key(KeyStatus.COMPROMISED)
    assert rotation_reason(compromised, policy(), EXPIRES, usage=10**6) == "compromise"
    assert rotation_reason(compromised, policy(), CREATED) == "compromise"
    # and only a compromised key says so
    assert rotation_reason(key(status), policy(), CREATED) != "compromise"


@pytest.mark.parametrize(
    "status", [KeyStatus.DECRYPT_ONLY, KeyStatus.EXPIRED, KeyStatus.REVOKED, KeyStatus.DESTROYED]
)
def test_only_the_active_key_is_ever_rotated(status: KeyStatus) -> None:
    # expired, over its usage and old: an inactive key has no reason to rotate
    assert rotation_reason(key(status), policy(), EXPIRES + TICK, usage=10**6) is None


def test_expiry_forces_rotation_at_expires_at_exactly() -> None:
    no_age = policy(auto_rotation=False)
    assert rotation_reason(key(), no_age, EXPIRES - TICK) is None
    assert rotation_reason(key(), no_age, EXPIRES) == "expiry"
    # expiry is named before usage
    assert rotation_reason(key(), no_age, EXPIRES, usage=1000) == "expiry"


def test_usage_forces_rotation_at_the_limit_exactly() -> None:
    no_age = policy(auto_rotation=False)
    assert rotation_reason(key(), no_age, CREATED, usage=999) is None
    assert rotation_reason(key(), no_age, CREATED, usage=1000) == "usage"
    assert rotation_reason(key(), no_age, CREATED, usage=1001) == "usage"
    # usage is named before age
    assert rotation_reason(key(), policy(), CREATED + _dt.timedelta(days=90), usage=1000) == "usage"


def test_usage_defaults_to_none_spent() -> None:
    one = policy(max_encryptions=1, auto_rotation=False)
    assert rotation_reason(key(), one, CREATED) is None
    assert rotation_reason(key(), one, CREATED, usage=1) == "usage"


def test_age_rotates_at_the_interval_and_only_with_auto_rotation() -> None:
    due = CREATED + _dt.timedelta(days=90)
    assert rotation_reason(key(), policy(), due - TICK) is None
    assert rotation_reason(key(), policy(), due) == "age"
    assert rotation_reason(key(), policy(auto_rotation=False), due) is None
    assert rotation_reason(key(), policy(auto_rotation=False), due - TICK) is None


@pytest.mark.parametrize(
    ("max_encryptions", "default", "block"),
    [
        (1, 65536, 1),  # an eighth rounds down to 0: at least one
        (7, 65536, 1),
        (8, 65536, 1),
        (16, 65536, 2),
        (72, 65536, 9),
        (80, 65536, 10),
        (2**32, 65536, 65536),  # the process default caps it
        (2**32, 3, 3),
    ],
)
def test_usage_block_is_an_eighth_of_the_limit_between_one_and_the_default(
    max_encryptions: int, default: int, block: int
) -> None:
    assert usage_block(policy(max_encryptions=max_encryptions), default) == block
