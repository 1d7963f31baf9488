"""Every decrypt path delivers the audit event of an expired key at once (issue 21).

Reading data with a key past its max age (inside the grace period) is allowed,
loudly: the keyring's sync hook queues an ``expired_key_used`` event, and the
service must hand it to the async sinks before the call returns, on every
decrypt path, not only on ``decrypt_field``. Each test reads with a fresh
service (the manager warns once per key id) and looks at the sink right after
the call, before anything else could flush it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from aiocrypt import DecryptionError, EncryptionConfig, EncryptionService, KeyStatus, KeyType
from aiocrypt.audit import Auditor, MemoryAuditSink
from aiocrypt.testing import ManualClock, make_service

_SHORT = {"rotation_interval_days": 10, "max_key_age_days": 10, "grace_period_days": 30}
_CONFIG = EncryptionConfig(
    rotation_policies={  # dicts, read by KeyRotationPolicy.from_dict
        kt.value: dict(_SHORT)  # type: ignore[misc]
        for kt in (KeyType.FINANCIAL_DATA, KeyType.SESSION, KeyType.CACHE)
    }
)

Path_ = Callable[[EncryptionService, Path], Awaitable[Callable[[], Awaitable[Any]]]]


async def _field(service: EncryptionService, _: Path) -> Callable[[], Awaitable[Any]]:
    token = await service.encrypt_field(42, context="t.c")
    return lambda: service.decrypt_field(token, context="t.c")


async def _field_general(service: EncryptionService, _: Path) -> Callable[[], Awaitable[Any]]:
    # a token above the inline threshold takes decrypt_field's general path
    size = (await service.get_encryption_stats())["inline_threshold"] + 1
    token = await service.encrypt_field("v" * size, context="t.c")
    return lambda: service.decrypt_field(token, context="t.c")


async def _many(service: EncryptionService, _: Path) -> Callable[[], Awaitable[Any]]:
    tokens = await service.encrypt_many([1, 2, 3])
    return lambda: service.decrypt_many(tokens)


async def _many_one_bad(service: EncryptionService, _: Path) -> Callable[[], Awaitable[Any]]:
    tokens = await service.encrypt_many([1, 2])
    tokens.append(tokens[0][:-8] + "AAAAAAA=")

    async def read() -> None:
        with pytest.raises(DecryptionError):
            await service.decrypt_many(tokens)

    return read


async def _bulk(service: EncryptionService, _: Path) -> Callable[[], Awaitable[Any]]:
    blob = (await service.encrypt_bulk_data(b"x" * 100)).to_bytes()
    return lambda: service.decrypt_bulk_data(blob, key_type=KeyType.FINANCIAL_DATA)


async def _stream(service: EncryptionService, _: Path) -> Callable[[], Awaitable[Any]]:
    parts = [p async for p in service.encrypt_stream([b"y" * 5000], segment_size=1024)]

    async def read() -> bytes:
        return b"".join(
            [p async for p in service.decrypt_stream(parts, key_type=KeyType.FINANCIAL_DATA)]
        )

    return read


async def _file(service: EncryptionService, tmp: Path) -> Callable[[], Awaitable[Any]]:
    (tmp / "plain").write_bytes(b"z" * 3000)
    await service.encrypt_file(tmp / "plain", tmp / "sealed")
    return lambda: service.decrypt_file(
        tmp / "sealed", tmp / "out", key_type=KeyType.FINANCIAL_DATA
    )


async def _session(service: EncryptionService, _: Path) -> Callable[[], Awaitable[Any]]:
    token = await service.encrypt_session_data({"user": 7}, context="sid")
    return lambda: service.decrypt_session_data(token, context="sid")


async def _cache(service: EncryptionService, _: Path) -> Callable[[], Awaitable[Any]]:
    key, value = await service.encrypt_cache_data("k", [1, 2], ttl=None)
    return lambda: service.decrypt_cache_data(key, value)


@pytest.mark.parametrize(
    "path",
    [_field, _field_general, _many, _many_one_bad, _bulk, _stream, _file, _session, _cache],
    ids=lambda f: f.__name__[1:],
)
async def test_expired_key_use_reaches_the_sinks_before_the_call_returns(
    path: Path_, tmp_path: Path
) -> None:
    clock, sink = ManualClock(), MemoryAuditSink()
    service = make_service(
        _CONFIG, clock=clock, refresh_interval=3600.0, watch=False, auditor=Auditor([sink])
    )
    async with service:
        read = await path(service, tmp_path)
        clock.advance(days=11)  # past max age, inside the grace period
        await service.key_manager.rotate_keys_due()
        assert KeyStatus.EXPIRED in {k.status for k in await service.key_manager.list_keys()}
        assert "expired_key_used" not in sink.names()
        await read()
        assert "expired_key_used" in sink.names()
        assert not service.key_manager.auditor.pending
