"""Fresh keys for the pure-core tests: records and unwrapped DEKs, no store, no KMS."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

from aiocrypt import EncryptionKey, KeyStatus, KeyType
from aiocrypt._crypto import DataKey

NOW = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)


def record(
    key_type: str = "pii",
    version: int = 1,
    status: KeyStatus = KeyStatus.ACTIVE,
    key_id: str | None = None,
    **changes: Any,
) -> EncryptionKey:
    """A key record of ``key_type`` (id ``<type>-v<version>``), valid for a year from NOW."""
    return EncryptionKey(
        key_id or f"{key_type}-v{version}",
        KeyType(key_type),
        version,
        status,
        NOW,
        NOW + _dt.timedelta(days=365),
        **changes,
    )


def data_key(
    key_type: str = "pii",
    version: int = 1,
    status: KeyStatus = KeyStatus.ACTIVE,
    key_id: str | None = None,
    material: bytes | None = None,
    **changes: Any,
) -> DataKey:
    """An unwrapped DEK (fresh random material unless given)."""
    return DataKey(
        record(key_type, version, status, key_id, **changes),
        os.urandom(32) if material is None else material,
    )
