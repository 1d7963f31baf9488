"""One translation of a Redis outage into ``StoreUnavailableError``, for sessions and the cache.

Connection and timeout errors of redis-py (sync or asyncio: the same classes)
mean "Redis did not answer"; other Redis errors (a wrong type, a script error)
are bugs and pass through unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from aiocrypt import StoreUnavailableError

__all__ = ["OUTAGE_ERRORS", "SOCKET_TIMEOUT", "translate_outage"]

OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError)
#: Socket timeouts (seconds) of the Redis clients the web extensions create from a URL, so a
#: Redis that stops answering is an outage (503) rather than requests that hang; a
#: ``?socket_timeout=`` / ``?socket_connect_timeout=`` in the URL takes precedence.
SOCKET_TIMEOUT: Final = 5.0


@contextlib.contextmanager
def translate_outage(store: str) -> Iterator[None]:
    """Re-raise a Redis connection or timeout error as ``StoreUnavailableError(store)``."""
    try:
        yield
    except OUTAGE_ERRORS as exc:
        raise StoreUnavailableError(store) from exc
