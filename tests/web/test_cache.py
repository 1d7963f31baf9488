"""The encrypted Redis cache against the real Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis

from aiocrypt import EncryptionService, KeyType
from aiocrypt.integrations.cache import EncryptedCache

from .conftest import redis_dump


@pytest.fixture
def cache(service: EncryptionService, aredis: aioredis.Redis, redis_prefix: str) -> EncryptedCache:
    return EncryptedCache(service, aredis, prefix=redis_prefix + "c:", default_ttl=60)


VALUES: list[Any] = [
    "text",
    b"\x00bytes",
    42,
    2.5,
    Decimal("12000.50"),
    True,
    None,
    dt.date(2024, 1, 2),
    dt.datetime(2024, 1, 2, 3, 4, tzinfo=dt.UTC),
    uuid.UUID(int=7),
    {"rows": [1, "two", {"three": Decimal("3")}]},
]


@pytest.mark.parametrize("value", VALUES)
async def test_round_trip(cache: EncryptedCache, value: Any) -> None:
    await cache.set("k", value)
    assert await cache.get("k", "MISSING") == value


async def test_miss_delete_and_default(cache: EncryptedCache) -> None:
    assert await cache.get("absent") is None
    assert await cache.get("absent", 0) == 0
    await cache.set("k", "v")
    assert await cache.delete("k") is True
    assert await cache.delete("k") is False
    assert await cache.get("k", "gone") == "gone"


async def test_redis_holds_no_plaintext(cache: EncryptedCache, aredis: aioredis.Redis) -> None:
    await cache.set(
        "report:user-alice", {"ssn": "123-45-6789", "income": Decimal("85000.00")}, ttl=30
    )
    dump = await redis_dump(aredis, cache.prefix)
    assert len(dump) == 1
    ((key, value),) = dump.items()
    for plain in (b"alice", b"report", b"123-45-6789", b"85000", b"ssn", b"income"):
        assert plain not in key and plain not in value
    assert 29_000 < await aredis.pttl(key) <= 30_000


async def test_entry_expires_with_its_ttl(cache: EncryptedCache) -> None:
    await cache.set("short", "lived", ttl=0.3)
    assert await cache.get("short") == "lived"
    await asyncio.sleep(0.4)
    assert await cache.get("short", "expired") == "expired"


async def test_entry_outliving_its_redis_ttl_still_expires(
    cache: EncryptedCache, service: EncryptionService, aredis: aioredis.Redis
) -> None:
    # e.g. restored from a dump without TTLs: the expiry inside the ciphertext still holds
    encrypted_key, encrypted_value = await service.encrypt_cache_data("k", "stale", ttl=0.2)
    await aredis.set(cache.prefix + encrypted_key, encrypted_value)
    assert await cache.get("k") == "stale"
    await asyncio.sleep(0.3)
    assert await cache.get("k", "expired") == "expired"
    assert await redis_dump(aredis, cache.prefix) == {}


async def test_tampered_or_swapped_entries_are_misses(
    cache: EncryptedCache, aredis: aioredis.Redis
) -> None:
    await cache.set("a", "value-a")
    await cache.set("b", "value-b")
    key_a = cache.prefix + await cache.service.encrypt_cache_key("a")
    key_b = cache.prefix + await cache.service.encrypt_cache_key("b")
    await aredis.set(key_b, await aredis.get(key_a))  # a's value under b's key
    assert await cache.get("b", "miss") == "miss"
    assert not await aredis.exists(key_b)
    value = await aredis.get(key_a)
    await aredis.set(key_a, value[:-3] + (b"AAA" if value[-3:] != b"AAA" else b"BBB"))
    assert await cache.get("a", "miss") == "miss"
    await aredis.set(key_a, b"\xff junk")
    assert await cache.get("a", "miss") == "miss"


async def test_get_or_set_computes_once_until_expiry(cache: EncryptedCache) -> None:
    calls = 0

    async def compute() -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"n": calls}

    assert await cache.get_or_set("r", compute, ttl=0.3) == {"n": 1}
    assert await cache.get_or_set("r", compute, ttl=0.3) == {"n": 1}
    assert calls == 1
    await asyncio.sleep(0.4)
    assert await cache.get_or_set("r", compute, ttl=0.3) == {"n": 2}


async def test_cached_none_is_a_hit(cache: EncryptedCache) -> None:
    calls = 0

    async def compute() -> None:
        nonlocal calls
        calls += 1

    await cache.get_or_set("none", compute)
    await cache.get_or_set("none", compute)
    assert calls == 1


async def test_cache_key_rotation_starts_cold(
    cache: EncryptedCache, service: EncryptionService
) -> None:
    await cache.set("k", "v")
    await service.key_manager.rotate_key(KeyType.CACHE, force=True)
    assert await cache.get("k", "cold") == "cold"
    await cache.set("k", "v2")
    assert await cache.get("k") == "v2"


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), float("nan"), True, "10"])
async def test_bad_ttl(cache: EncryptedCache, ttl: Any) -> None:
    with pytest.raises(ValueError):
        await cache.set("k", "v", ttl=ttl)


def test_repr(cache: EncryptedCache) -> None:
    assert "c:" in repr(cache) and "Redis" not in repr(cache)
