"""An encrypted cache over Redis.

Keys and values are encrypted with the cache key type (never shared with field
encryption) by ``EncryptionService.encrypt_cache_data``: the Redis key is the
deterministic (AES-SIV) encryption of the cache key, so equal keys meet in
Redis while Redis never holds the key in clear; the value is AES-GCM, bound to
its cache key, and carries its expiry time inside the ciphertext. Redis drops
an entry at its TTL; an entry that outlives it anyway (a restore from a dump,
a changed TTL) refuses to decrypt and counts as a miss, as does a corrupt or
foreign entry, which is deleted.

Rotating the cache key changes every encrypted key, so a rotation starts from
a cold cache; old entries simply expire.

An entry set with ``subject="user:42"`` is sealed under that data subject's
key (``EncryptionService.encrypt_cache_data(..., subject=...)``): once
``forget_subject("user:42")`` has run, it no longer decrypts, so it reads as a
miss (and is deleted) like any unreadable entry, in this process, in every
other one, and in any dump of Redis. Its cache key stays under the cache key
type, so ``get`` and ``delete`` need no subject.

A Redis that does not answer raises ``StoreUnavailableError`` (store
``"cache"``), which the web extensions answer with 503.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from aiocrypt import DecryptionError

from ._outage import translate_outage

if TYPE_CHECKING:
    import redis.asyncio

    from aiocrypt import EncryptionService

__all__ = ["EncryptedCache"]

_T = TypeVar("_T")
_MISSING: Final[Any] = object()


class EncryptedCache:
    """``get`` / ``set`` / ``delete`` with TTLs, encrypted, over ``redis.asyncio``.

    Values are any type the aiocrypt value codec keeps (str, bytes, int, float,
    Decimal, bool, None, date, tz-aware datetime, UUID, lists and dicts of
    those); ``None`` is cached like any other value.
    """

    def __init__(
        self,
        service: EncryptionService,
        redis: redis.asyncio.Redis,
        *,
        prefix: str = "aiocrypt:cache:",
        default_ttl: float = 300,
    ) -> None:
        _check_ttl(default_ttl)
        self.service = service
        self.redis = redis
        self.prefix = prefix
        self.default_ttl = default_ttl

    def __repr__(self) -> str:
        return f"<EncryptedCache prefix={self.prefix!r} default_ttl={self.default_ttl}>"

    async def get(self, key: str, default: Any = None) -> Any:
        """The cached value, or ``default`` when absent, expired or unreadable."""
        encrypted_key = await self.service.encrypt_cache_key(key)
        with translate_outage("cache"):
            raw = await self.redis.get(self.prefix + encrypted_key)
        if raw is None:
            return default
        try:
            token = raw if isinstance(raw, str) else raw.decode("ascii")
            cache_key, value = await self.service.decrypt_cache_data(encrypted_key, token)
        except (DecryptionError, UnicodeDecodeError):
            cache_key, value = None, _MISSING
        if cache_key != key:
            with translate_outage("cache"):
                await self.redis.delete(self.prefix + encrypted_key)
            return default
        return value

    async def set(
        self, key: str, value: Any, ttl: float | None = None, *, subject: str | None = None
    ) -> None:
        """Cache ``value`` under ``key`` for ``ttl`` seconds (default: ``default_ttl``).

        ``subject``: the data subject the value belongs to (``"user:42"``); it is
        sealed under their key, so forgetting them makes it a miss.
        """
        ttl = self.default_ttl if ttl is None else ttl
        _check_ttl(ttl)
        encrypted_key, encrypted_value = await self.service.encrypt_cache_data(
            key, value, ttl, subject=subject
        )
        with translate_outage("cache"):
            await self.redis.set(
                self.prefix + encrypted_key, encrypted_value, px=max(1, math.ceil(ttl * 1000))
            )

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was cached."""
        encrypted_key = await self.service.encrypt_cache_key(key)
        with translate_outage("cache"):
            return bool(await self.redis.delete(self.prefix + encrypted_key))

    async def get_or_set(
        self,
        key: str,
        compute: Callable[[], Awaitable[_T]],
        ttl: float | None = None,
        *,
        subject: str | None = None,
    ) -> _T:
        """The cached value, else ``await compute()``, cached for ``ttl`` seconds
        (under ``subject``'s key when given, as :meth:`set`).

        Concurrent misses each compute (no cross-process lock): keep ``compute``
        idempotent.
        """
        value = await self.get(key, _MISSING)
        if value is _MISSING:
            value = await compute()
            await self.set(key, value, ttl, subject=subject)
        return value  # type: ignore[no-any-return]


def _check_ttl(ttl: float) -> None:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0 or math.isinf(ttl):
        raise ValueError("cache ttl must be a positive, finite number of seconds")
