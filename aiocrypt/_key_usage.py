"""Fleet-wide usage reservations: no key seals more than its limit, across processes.

One part of :class:`~aiocrypt._manager.KeyManager` (docs/architecture.md). Every
process reserves blocks of encryptions from the store's shared counter
(``KeyStore.add_usage``) before it seals, so the fleet as a whole stays under a
policy's ``max_encryptions`` and under 2**32 messages per key (NIST SP 800-38D,
random 96-bit nonces), whatever a policy or the store says. The counters are
checked against the floors the manager has seen (``KeysetGuard``): a counter
lowered in the store is refused, not trusted.

Async callers wait for a reservation. Sync callers (SQLAlchemy column types,
Flask views) seal through :meth:`UsageReservations.sync_allowance`: below the
allowance they seal and start the next reservation in the background; at the
allowance a thread other than the loop's waits for it, and code on the loop's
own thread gets ``KeyStateError`` (it cannot wait for its own loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import anyio

from . import _policy
from ._crypto import DataKey
from ._errors import KeyStateError
from ._keyring import GCM_MESSAGE_LIMIT, Keyring
from ._keys import EncryptionKey
from ._types import KeyType, KeyTypeLike

if TYPE_CHECKING:
    from ._manager import KeyManager

__all__ = ["UsageReservations", "still_active"]

logger = logging.getLogger("aiocrypt.keys")

#: Encryptions before the end of a reserved allowance that sync callers make under a lock.
_SYNC_MARGIN: Final = 64


def still_active(key_id: str) -> Callable[[EncryptionKey | None], bool]:
    """Rotate only if ``key_id`` is still the active key (single-flight across processes)."""
    return lambda active: active is not None and active.key_id == key_id


class UsageReservations:
    """The manager's usage reservations (one per manager)."""

    def __init__(self, manager: KeyManager) -> None:
        self._manager = manager
        self._lock = anyio.Lock()
        self._sync_lock = threading.Lock()  # sync seals between refill_at and the allowance
        self._reserving: set[KeyType] = set()  # key types with a background reservation
        self._background: set[asyncio.Future[None]] = set()

    def cancel_background(self) -> None:
        """Cancel reservations started for sync callers (the manager is closing)."""
        for task in list(self._background):
            task.cancel()

    async def reserve(self, key_type: KeyTypeLike, *, ahead: bool = False) -> Keyring:
        """See :meth:`KeyManager.reserve_usage`."""
        manager = self._manager
        kt = KeyType(key_type)
        policy = manager.config.rotation_policy(kt)
        limit = min(policy.max_encryptions, GCM_MESSAGE_LIMIT)
        # Every round that finds the key used up rotates it (or sees that another
        # process did), and the first reservation on a new key always gets at least
        # one encryption: the fleet makes progress each round. Under a small limit
        # and heavy contention this process can still lose several rounds in a row,
        # so the bound is time (like the rotation lock's), not a count of rounds.
        deadline = time.monotonic() + manager.lock_timeout
        while True:
            keyring = await manager._lifecycle.ensure_active_unreserved([kt])
            dk = keyring.active(kt)
            async with self._lock:
                if dk.encryptions < (dk.refill_at if ahead else dk.allowance):
                    return keyring
                overrun = max(0, dk.encryptions - dk.allowance)  # counted by sync callers
                request = _policy.usage_block(policy, manager.usage_block) + overrun
                total = (await manager.store.add_usage({dk.key_id: request}))[dk.key_id]
                start = await self._usage_start(dk, total, request) + overrun
                usable = max(0, min(start - overrun + request, limit) - start)
                dk.allowance = max(dk.allowance, dk.encryptions) + usable
                # Sync callers seal without a lock below refill_at: keep a margin for
                # threads that passed that check together (the last ones go under a lock).
                dk.refill_at = max(0, dk.allowance - max(usable // 2, _SYNC_MARGIN))
                await manager._guard.persist()
                if usable or dk.encryptions < dk.allowance:
                    return keyring
            manager.auditor.emit_nowait(
                "usage_limit_reached", key_id=dk.key_id, key_type=kt.value, limit=limit
            )
            if time.monotonic() > deadline:
                raise KeyStateError(
                    f"could not reserve encryption allowance for {kt.value} "
                    f"keys within {manager.lock_timeout:g} s: other processes "
                    f"used up every new key first"
                )
            await manager._lifecycle.activate_new(
                kt, reason="usage", only_if=still_active(dk.key_id)
            )

    async def _usage_start(self, dk: DataKey, total: int, request: int) -> int:
        """Where this reservation starts in the key's shared counter.

        Counters only go up: a total below what this process (or this host, with a
        state file) has seen, or below zero, was written by someone else. It is
        audited and the highest total seen is used instead, so nobody can reset a
        key's usage by editing the store.
        """
        manager = self._manager
        start, floor = manager._guard.usage_start(dk.key_id, total, request)
        if floor is not None:
            manager.integrity_failures += 1
            logger.error(
                "usage counter of key %s went backwards in the %s (to %d, %d seen): "
                "counting from the highest seen",
                dk.key_id,
                manager._where,
                total - request,
                floor,
            )
            await manager.auditor.emit(
                "usage_counter_rolled_back",
                key_id=dk.key_id,
                key_type=dk.key.key_type.value,
                seen=floor,
                found=total - request,
            )
        return start

    def sync_allowance(self, dk: DataKey, seal: Callable[[DataKey], str]) -> str:
        """For the keyring's sync encrypt paths: ``seal`` with an active key that may
        encrypt now.

        Below the hard allowance a reservation of the next block is started in the
        background and ``dk`` seals, under a lock so that threads racing at the
        allowance cannot pass it together. At the allowance, a thread other than the
        event loop's waits for a reservation (the Flask extension's request
        threads); code on the loop's own thread cannot wait, so it gets
        ``KeyStateError`` (a reservation is started for the next call).
        """
        manager = self._manager
        kt = dk.key.key_type
        loop = manager._loop
        usable_loop = loop is not None and not loop.is_closed() and loop.is_running()
        # each round waits for a reservation: bounded, not endless
        for _ in range(1000):  # pragma: no branch - 1000 reservations each used up by others first
            with self._sync_lock:
                if dk.encryptions >= GCM_MESSAGE_LIMIT:
                    raise KeyStateError(f"key {dk.key_id} reached 2**32 encryptions")
                if dk.encryptions < dk.allowance:
                    if dk.encryptions >= dk.refill_at and usable_loop:
                        self._reserve_in_background(kt)
                    return seal(dk)
            if not usable_loop or threading.get_ident() == manager._loop_thread:
                break
            assert loop is not None
            future = asyncio.run_coroutine_threadsafe(self.reserve(kt), loop)
            dk = future.result(timeout=manager.lock_timeout + 10).active(kt)
        if usable_loop:
            self._reserve_in_background(kt)
        raise KeyStateError(
            f"the encryption allowance of key {dk.key_id} is used up, and synchronous code on "
            "the event loop's thread cannot wait for more: encrypt through the async API "
            "(await service.encrypt_field(...)), or retry once the reservation started now "
            "completes"
        )

    def _reserve_in_background(self, key_type: KeyType) -> None:
        """Start ``reserve(ahead=True)`` on the manager's loop (once at a time)."""
        manager = self._manager
        if key_type in self._reserving or manager._loop is None:
            return
        self._reserving.add(key_type)

        async def reserve() -> None:
            try:
                await self.reserve(key_type, ahead=True)
            except Exception as exc:  # the next sync call tries again
                logger.warning(
                    "background usage reservation for %s keys failed (%s)",
                    key_type.value,
                    type(exc).__name__,
                )
            finally:
                self._reserving.discard(key_type)

        def start() -> None:
            task = asyncio.ensure_future(reserve())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        try:
            if threading.get_ident() == manager._loop_thread:
                start()
            else:
                manager._loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop closed meanwhile
            self._reserving.discard(key_type)

    async def flush_unreserved(self) -> None:
        """Record encryptions sync callers made beyond their allowance (batched)."""
        manager = self._manager
        for dk in list(manager._keyring.active_keys.values()):
            if dk.encryptions > dk.allowance:
                with contextlib.suppress(Exception):  # the next reservation counts them
                    await self.reserve(dk.key.key_type)
