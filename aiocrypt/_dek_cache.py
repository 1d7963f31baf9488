"""The DEKs a ``KeyManager`` holds: unwrapped once, cached, never left in a frame.

One part of :class:`~aiocrypt._manager.KeyManager` (docs/architecture.md). A DEK is
unwrapped by the KEK provider that wrapped it when its record first appears, and
again after ``dek_cache_seconds`` of the performance mode or when anything in its
authenticated record changes: the KEK provider is never called per field. There
is one :class:`DataKey` object per key id however many keyring snapshots hold it,
so they share its usage count.

Wrapping, unwrapping and rewrapping keep the DEK off every frame an error could
carry away: error reporters that capture locals (Sentry and the like) would
otherwise ship it off the host (tests/backends/test_dek_locals.py).
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import TYPE_CHECKING, Final

from . import _policy
from ._crypto import DEK_BYTES, DataKey
from ._errors import KekProviderError
from ._keys import EncryptionKey
from ._keyset_seal import record_digest
from ._telemetry import annotate, count, traced
from ._types import KeyStatus
from .kek._base import KekProvider
from .keystore._base import KeySet

if TYPE_CHECKING:
    from ._manager import KeyManager

__all__ = ["DekCache", "scrubbed", "wrap_context"]

_FAR_FUTURE: Final = _dt.datetime.max.replace(tzinfo=_dt.UTC)


def wrap_context(key: EncryptionKey) -> dict[str, str]:
    """What a KEK provider binds a wrapped DEK to: its key id and key type."""
    return {"aiocrypt_key_id": key.key_id, "aiocrypt_key_type": key.key_type.value}


def scrubbed(error: BaseException) -> BaseException:
    """``error`` without tracebacks on it or its causes: their frames held a DEK."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__
    return error


def _bind(
    cached: tuple[str, DataKey, float] | None, key: EncryptionKey, material: bytes
) -> DataKey:
    """The DataKey for a record just unwrapped: the cached object updated in place when
    it holds the same DEK, so that there is one object (one usage count) per key id
    however many snapshots hold it; a new one otherwise."""
    if cached is not None and cached[1].holds(material):
        cached[1].rebind(key)
        return cached[1]
    dk = DataKey(key, material)
    if cached is not None:
        cached[1].hand_usage_to(dk)
    return dk


class DekCache:
    """The manager's unwrapped DEKs, keyed by key id and the digest of their record."""

    def __init__(self, manager: KeyManager) -> None:
        self._manager = manager
        # key id -> (digest of its record, DataKey, monotonic time unwrapped)
        self._entries: dict[str, tuple[str, DataKey, float]] = {}
        #: Keyring rebuilds that reused an unwrapped DEK / had to call the KEK provider.
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._entries.clear()

    def expired(self) -> bool:
        """Whether some DEK was unwrapped longer ago than ``dek_cache_seconds``."""
        max_age = self._manager.config.performance.dek_cache_seconds
        now = time.monotonic()
        return any(now - at > max_age for _, _, at in self._entries.values())

    @traced("aiocrypt.keys.load")
    async def build(self, keyset: KeySet) -> tuple[list[DataKey], _dt.datetime]:
        """The DataKeys of every live record of ``keyset`` (unwrapping what the cache does
        not hold), their expiry flags set; and the next moment a flag changes."""
        manager = self._manager
        max_age = manager.config.performance.dek_cache_seconds
        mono = time.monotonic()
        now = manager._clock()
        boundary = _FAR_FUTURE
        entries: dict[str, tuple[str, DataKey, float]] = {}
        unwrapped: list[EncryptionKey] = []
        for key in keyset.keys:
            if key.status is KeyStatus.DESTROYED or key.wrapped_key is None:
                continue
            # Keyed by the whole authenticated record: any change to it unwraps afresh.
            digest = record_digest(key)
            cached = self._entries.get(key.key_id)
            if cached is not None and cached[0] == digest and mono - cached[2] <= max_age:
                # The same object: snapshots that still hold it share its usage count.
                dk, unwrapped_at = cached[1], cached[2]
                self.hits += 1
            else:
                dk, unwrapped_at = _bind(cached, key, await self.unwrap(key)), mono
                self.misses += 1
                unwrapped.append(key)
            if key.status is not KeyStatus.ACTIVE:  # old snapshots may hold it as active
                dk.allowance = dk.refill_at = 0
            policy = manager.config.rotation_policy(key.key_type)
            dk.expired = _policy.is_expired(key, now)
            dk.past_grace = _policy.is_past_grace(key, policy, now)
            if not dk.past_grace:
                boundary = min(
                    boundary, _policy.grace_end(key, policy) if dk.expired else key.expires_at
                )
            entries[key.key_id] = (digest, dk, unwrapped_at)
        self._entries = entries
        annotate(
            revision=keyset.revision,
            keys=len(entries),
            unwrapped=len(unwrapped),
            cache_hits=len(entries) - len(unwrapped),
            key_ids=tuple(k.key_id for k in unwrapped),
            key_types=tuple(sorted({k.key_type.value for k in unwrapped})),
        )
        count("aiocrypt.keys.unwrapped", len(unwrapped))
        count("aiocrypt.dek_cache.hits", len(entries) - len(unwrapped))
        return [dk for _, dk, _ in entries.values()], boundary

    def adopt(self, keyset: KeySet, new_material: dict[str, bytes]) -> None:
        """Cache the DEKs this process just made (no unwrap of what it wrapped itself)."""
        now = time.monotonic()
        by_id = keyset.by_id()
        for key_id, material in new_material.items():
            key = by_id.get(key_id)
            if key is not None and key.wrapped_key is not None:
                dk = _bind(self._entries.get(key_id), key, material)
                self._entries[key_id] = (record_digest(key), dk, now)

    def _kek_for(self, key: EncryptionKey) -> KekProvider:
        manager = self._manager
        return manager._kek_by_id(key.kek_id or manager.kek.kek_id, f"key {key.key_id}")

    async def unwrap(self, key: EncryptionKey) -> bytes:
        assert key.wrapped_key is not None
        material = await self._kek_for(key).unwrap(key.wrapped_key, wrap_context(key))
        if len(material) == DEK_BYTES:
            return material
        del material  # never in a traceback's locals
        raise KekProviderError(
            f"key {key.key_id} unwrapped to a key of the wrong size",
            backend=self._manager.kek.backend,
        )

    async def check_unwraps(self, key: EncryptionKey) -> None:
        """Unwrap ``key`` and throw the material away (adoption's proof of origin)."""
        await self.unwrap(key)

    async def wrap(self, kek: KekProvider, material: bytes, key: EncryptionKey) -> bytes:
        """``kek.wrap`` of a DEK; on failure the error leaves with no frame that held it."""
        try:
            return await kek.wrap(material, wrap_context(key))
        except BaseException as exc:  # re-raised, scrubbed
            failure = exc
        del material
        raise scrubbed(failure)

    async def rewrapped(self, key: EncryptionKey, kek: KekProvider) -> bytes:
        """``key``'s DEK unwrapped and wrapped again by ``kek``, the DEK kept off every
        frame an error could carry away."""
        try:
            material = await self.unwrap(key)
            try:
                return await kek.wrap(material, wrap_context(key))
            finally:
                del material  # gone from this frame before any error leaves it
        except BaseException as exc:  # re-raised, scrubbed
            failure = exc
        raise scrubbed(failure)
