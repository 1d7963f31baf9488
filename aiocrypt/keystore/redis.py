"""Redis key store (``aiocrypt[redis]``, redis.asyncio).

Layout under a configurable prefix (default ``aiocrypt:``; give each
application or test its own):

* ``<prefix>keys``      hash: key id -> JSON record (``EncryptionKey.to_dict``)
* ``<prefix>revision``  integer, bumped by every write
* ``<prefix>seal``      the keyset seal of that revision (``aiocrypt._keyset_seal``)
* ``<prefix>usage``     hash: key id -> shared encryption counter (``HINCRBY``)
* ``<prefix>lock:<n>``  lock token with a lease (``SET NX PX``)
* ``<prefix>changes``   pub/sub channel carrying each new revision

Writes run as one Lua script (compare the revision, upsert the records, bump
the revision, publish it), so they are atomic and optimistic. The lock is a
lease with a random token, renewed while held and released with a
compare-and-delete script: a holder that dies stops renewing and its lock
expires after one lease. A holder that loses its lease (a long network
partition) is still safe: its write is refused by the revision check.

For a Redis Cluster put the prefix in a hash tag (``{aiocrypt}:``) so every key
and the script land in one slot. Run Redis with persistence (AOF, ideally
``appendfsync always``): wrapped DEKs that Redis forgets are data lost.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any, Final

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aiocrypt.keystore.redis needs redis: pip install 'aiocrypt[redis]'") from exc

import anyio

from .._config import EncryptionConfig
from .._errors import (
    ConcurrentModificationError,
    ConfigurationError,
    KeyStoreError,
    KeyStoreIntegrityError,
    LockTimeoutError,
)
from .._keys import EncryptionKey
from .._urls import redact_url, scrub
from ._base import KeySet, KeyStore, decode_records, encode_record
from ._subjects_redis import RedisSubjectKeyStore

__all__ = ["RedisKeyStore", "from_config"]

logger = logging.getLogger("aiocrypt.keystore.redis")

DEFAULT_PREFIX: Final = "aiocrypt:"

# KEYS: revision, keys hash, seal. ARGV: expected revision, channel, seal ('' for none),
# id1, record1, id2, ...
_WRITE: Final = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current}
end
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[3], ARGV[3])
else
  redis.call('DEL', KEYS[3])
end
local new = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[2], new)
return {1, new}
"""
_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _reraise_cancellation() -> None:
    """Raise if this task was cancelled but redis-py swallowed the ``CancelledError``.

    Seen with redis 5.3 + hiredis: a cancel landing while a pub/sub message is
    read comes back as an ordinary result, and a watcher loop (``changes()``,
    the lock renewer) would then never stop. ``Task.cancelling()`` still counts it.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class RedisKeyStore(KeyStore):
    """Key records in Redis, shared by every process that uses the same prefix."""

    name = "redis"

    def __init__(
        self,
        client_or_url: aioredis.Redis | str,
        *,
        prefix: str = DEFAULT_PREFIX,
        lock_lease: float = 15.0,
        socket_timeout: float = 10.0,
    ) -> None:
        """Give a ``redis.asyncio.Redis`` (the caller keeps owning it) or a ``redis://`` URL.

        ``lock_lease``: seconds a dead holder keeps the lock (renewed every
        third of it while the holder lives).
        """
        if not prefix:
            raise ValueError("the key prefix cannot be empty")
        if lock_lease < 0.3:
            raise ValueError("lock_lease must be at least 0.3 s")
        self._url = client_or_url if isinstance(client_or_url, str) else None
        if isinstance(client_or_url, str):
            self._where = redact_url(client_or_url)
            self._redis = aioredis.Redis.from_url(
                client_or_url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=min(5.0, socket_timeout),
            )
            self._owns_client = True
        else:
            kwargs = client_or_url.connection_pool.connection_kwargs
            self._where = (
                f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
            )
            self._redis = client_or_url
            self._owns_client = False
        self.prefix = prefix
        self.lock_lease = lock_lease
        self._k_keys = f"{prefix}keys"
        self._k_revision = f"{prefix}revision"
        self._k_usage = f"{prefix}usage"
        self._k_seal = f"{prefix}seal"
        self.channel = f"{prefix}changes"
        self._write_script = self._redis.register_script(_WRITE)
        self._renew_script = self._redis.register_script(_RENEW)
        self._release_script = self._redis.register_script(_RELEASE)
        # locks whose release failed (Redis was down): released before the next attempt
        self._unreleased: dict[str, str] = {}
        self._subjects: RedisSubjectKeyStore | None = None

    def __repr__(self) -> str:
        return f"<RedisKeyStore {self._where} prefix={self.prefix!r}>"

    @contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError, TimeoutError) as exc:
            raise KeyStoreError(
                f"Redis key store {self._where} (prefix {self.prefix!r}): {action} failed "
                f"({type(exc).__name__}: {scrub(str(exc), self._url)}); check that Redis is "
                "running and reachable (ENCRYPTION_REDIS_URL)"
            ) from exc

    # -- lifecycle ----------------------------------------------------------

    async def open(self) -> None:
        with self._translate("connect"):
            await self._redis.ping()

    async def close(self) -> None:
        if self._owns_client:
            with anyio.CancelScope(shield=True), suppress(RedisError, OSError):
                await self._redis.aclose()

    async def drop(self) -> None:
        """Delete everything stored under this prefix (tests, decommissioning)."""
        with self._translate("drop"):
            names = [self._k_keys, self._k_revision, self._k_usage, self._k_seal]
            for pattern in ("lock:*", "subjects:*"):
                async for name in self._redis.scan_iter(match=f"{self._glob_prefix()}{pattern}"):
                    names.append(name)
            await self._redis.delete(*names)

    def subject_store(self) -> RedisSubjectKeyStore:
        """Subject keys under ``<prefix>subjects:`` (docs/subjects.md)."""
        if self._subjects is None:
            self._subjects = RedisSubjectKeyStore(self)
        return self._subjects

    def _glob_prefix(self) -> str:
        return "".join(f"\\{c}" if c in "*?[]\\" else c for c in self.prefix)

    # -- records ------------------------------------------------------------

    async def read(self) -> KeySet:
        with self._translate("read"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(self._k_revision)
                pipe.hgetall(self._k_keys)
                pipe.get(self._k_seal)
                raw_revision, raw_keys, raw_seal = await pipe.execute()
        where = f"Redis key store {self._where} (prefix {self.prefix!r})"
        try:
            revision = int(raw_revision or 0)
        except ValueError:
            raise KeyStoreIntegrityError(f"{where} holds an invalid revision") from None
        seal = None
        if raw_seal is not None:
            try:
                seal = raw_seal.decode("utf-8") if isinstance(raw_seal, bytes) else str(raw_seal)
            except UnicodeDecodeError:
                raise KeyStoreIntegrityError(f"{where} holds an invalid seal") from None
        return KeySet(revision, decode_records(raw_keys.values(), where), seal)

    async def revision(self) -> int:
        with self._translate("read revision"):
            return int(await self._redis.get(self._k_revision) or 0)

    async def write(
        self, keys: Sequence[EncryptionKey], *, expected_revision: int, seal: str | None = None
    ) -> int:
        args: list[Any] = [expected_revision, self.channel, seal or ""]
        for key in keys:
            args += [key.key_id, encode_record(key)]
        with self._translate("write"):
            ok, revision = await self._write_script(
                keys=[self._k_revision, self._k_keys, self._k_seal], args=args
            )
        if not ok:
            raise ConcurrentModificationError(
                f"Redis key store {self._where} is at revision {revision}, not {expected_revision}"
            )
        return int(revision)

    # -- usage counters -----------------------------------------------------

    async def add_usage(self, increments: Mapping[str, int]) -> dict[str, int]:
        if not increments:
            return {}
        with self._translate("count usage"):
            async with self._redis.pipeline(transaction=True) as pipe:
                for key_id, n in increments.items():
                    pipe.hincrby(self._k_usage, key_id, int(n))
                totals = await pipe.execute()
        return {key_id: int(total) for key_id, total in zip(increments, totals, strict=True)}

    async def get_usage(self) -> dict[str, int]:
        with self._translate("read usage"):
            raw = await self._redis.hgetall(self._k_usage)
        return {k.decode() if isinstance(k, bytes) else str(k): int(v) for k, v in raw.items()}

    # -- change notification ------------------------------------------------

    async def changes(self, poll_interval: float = 1.0) -> AsyncIterator[int]:
        """Revisions as published on the channel; ``revision()`` is also checked every
        ``poll_interval`` so a message lost during a disconnection is not missed."""
        last: int | None = None
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                current = await self.revision()
                if last is not None and current != last:
                    last = current
                    yield current
                last = current
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=poll_interval
                    )
                    _reraise_cancellation()
                    if message is not None and message.get("type") == "message":
                        try:
                            revision = int(message["data"])
                        except (TypeError, ValueError):
                            continue  # not ours: the revision check below catches up
                        if revision > last:
                            last = revision
                            yield revision
                    else:
                        current = await self.revision()
                        if current != last:
                            last = current
                            yield current
            except (RedisError, OSError, KeyStoreError) as exc:
                logger.warning(
                    "Redis key store %s: change notifications interrupted (%s); reconnecting",
                    self._where,
                    type(exc).__name__,
                )
            finally:
                with anyio.move_on_after(2, shield=True), suppress(RedisError, OSError):
                    await pubsub.aclose()
            await anyio.sleep(poll_interval)

    # -- locking ------------------------------------------------------------

    @asynccontextmanager
    async def lock(self, name: str = "rotation", *, timeout: float = 30.0) -> AsyncIterator[None]:
        key = f"{self.prefix}lock:{name}"
        token = secrets.token_hex(16)
        lease_ms = int(self.lock_lease * 1000)
        stale = self._unreleased.pop(key, None)
        if stale is not None:
            try:
                with self._translate(f"release stale lock {name!r}"):
                    await self._release_script(keys=[key], args=[stale])
            except KeyStoreError:
                self._unreleased[key] = stale
                raise
        deadline = anyio.current_time() + timeout
        delay = 0.01
        while True:
            with self._translate(f"take lock {name!r}"):
                acquired = await self._redis.set(key, token, nx=True, px=lease_ms)
            if acquired:
                break
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise LockTimeoutError(
                    f"Redis key store {self._where}: lock {name!r} held elsewhere for over "
                    f"{timeout}s"
                )
            await anyio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.2)
        renewer = asyncio.create_task(self._renew(key, token, name))
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                renewer.cancel()
                with anyio.move_on_after(2), suppress(asyncio.CancelledError):
                    await renewer
                try:
                    with anyio.fail_after(5):
                        await self._release_script(keys=[key], args=[token])
                except (RedisError, OSError, TimeoutError) as exc:
                    self._unreleased[key] = token
                    logger.warning(
                        "Redis key store %s: could not release lock %r (%s); it "
                        "expires within %.1fs",
                        self._where,
                        name,
                        type(exc).__name__,
                        self.lock_lease,
                    )

    async def _renew(self, key: str, token: str, name: str) -> None:
        lease_ms = int(self.lock_lease * 1000)
        while True:
            await anyio.sleep(self.lock_lease / 3)
            try:
                renewed = await self._renew_script(keys=[key], args=[token, lease_ms])
            except (RedisError, OSError) as exc:
                _reraise_cancellation()
                logger.warning(
                    "Redis key store %s: could not renew lock %r (%s)",
                    self._where,
                    name,
                    type(exc).__name__,
                )
                continue
            _reraise_cancellation()
            if not renewed:
                logger.error(
                    "Redis key store %s: lock %r was lost (lease expired); writes "
                    "stay safe through the revision check",
                    self._where,
                    name,
                )
                return


def from_config(config: EncryptionConfig) -> RedisKeyStore:
    """Build from ``ENCRYPTION_REDIS_URL``."""
    if not config.redis_url:
        raise ConfigurationError("the redis key store needs ENCRYPTION_REDIS_URL")
    # ENCRYPTION_REDIS_KEY_PREFIX (see docs/backends.md); empty means the default
    prefix = config.redis_key_prefix or DEFAULT_PREFIX
    try:
        return RedisKeyStore(config.redis_url, prefix=prefix)
    except ValueError as exc:
        raise ConfigurationError(f"redis key store: {exc}") from None
