"""``aiocrypt._policy``: the usage boundary and the usage block's floor (issue 21, #4)."""

from __future__ import annotations

import datetime as _dt

import pytest

from aiocrypt import KeyStatus
from aiocrypt._config import KeyRotationPolicy
from aiocrypt._policy import rotation_reason, usage_block

from ._core_keys import NOW, record

LIMIT = 1000


@pytest.mark.parametrize(
    ("usage", "reason"),
    [
        (0, None),
        (LIMIT - 1, None),
        (LIMIT, "usage"),
        (LIMIT + 1, "usage"),
        (2**40, "usage"),
    ],
)
def test_usage_rotates_the_active_key_from_the_limit_on(usage: int, reason: str | None) -> None:
    policy = KeyRotationPolicy("pii", max_encryptions=LIMIT)  # type: ignore[arg-type]  # coerced
    assert rotation_reason(record(), policy, NOW + _dt.timedelta(days=1), usage) == reason
    # a key no longer active is never rotated for its usage
    retired = record(status=KeyStatus.DECRYPT_ONLY)
    assert rotation_reason(retired, policy, NOW, usage) is None


@pytest.mark.parametrize(
    ("limit", "default", "block"),
    [
        (1, 65536, 1),
        (7, 65536, 1),
        (8, 65536, 1),
        (15, 65536, 1),
        (16, 65536, 2),
        (800, 65536, 100),
        (800, 64, 64),
        (800, 100, 100),
        (2**32, 65536, 65536),
        (1, 0, 1),
    ],
)
def test_usage_block_is_an_eighth_of_the_limit_at_least_one(
    limit: int, default: int, block: int
) -> None:
    assert (
        usage_block(
            KeyRotationPolicy("pii", max_encryptions=limit),  # type: ignore[arg-type]
            default,
        )
        == block
    )  # ("pii" is coerced to KeyType)
