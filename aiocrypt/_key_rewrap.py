"""Master-key rotation and rewrapping: every DEK wrapped again, no data touched.

One part of :class:`~aiocrypt._manager.KeyManager` (docs/architecture.md). Records
are rewrapped in batches, each a sealed compare-and-swap write of the manager, so
an interrupted run resumes where it stopped; the store itself is resealed under
the new KEK at the end (``KeyStore.rekey``). DEKs never stay in a frame an error
could carry away (``DekCache.rewrapped``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ._keys import EncryptionKey
from ._telemetry import annotate, count, traced
from ._urls import redact_url
from .kek._base import KekProvider
from .keystore._base import KeySet

if TYPE_CHECKING:
    from ._manager import KeyManager

__all__ = ["rewrap", "rewrap_keys", "rotate_master_key"]


@traced("aiocrypt.kek.rotate")
async def rotate_master_key(
    manager: KeyManager, new_kek: KekProvider, *, batch_size: int = 50
) -> int:
    """See :meth:`KeyManager.rotate_master_key`."""
    if not manager._opened:
        await manager.open()
    old_kek = manager.kek
    annotate(
        provider=new_kek.backend,
        old_kek_id=redact_url(old_kek.kek_id),
        new_kek_id=redact_url(new_kek.kek_id),
    )
    if new_kek.kek_id == old_kek.kek_id:
        raise ValueError("the new KEK is the current one")
    # both stay usable for unwrapping while records are half rewrapped
    manager._previous_keks[old_kek.kek_id] = old_kek
    manager._previous_keks[new_kek.kek_id] = new_kek
    total = await rewrap(manager, new_kek, lambda key: key.kek_id == new_kek.kek_id, batch_size)
    manager.kek = new_kek
    await manager.refresh(force=True)
    await manager.auditor.emit(
        "master_key_rotated", old_kek=old_kek.kek_id, new_kek=new_kek.kek_id, keys=total
    )
    return total


async def rewrap_keys(
    manager: KeyManager, *, only_foreign: bool = False, batch_size: int = 50
) -> int:
    """See :meth:`KeyManager.rewrap_keys`."""
    if not manager._opened:
        await manager.open()
    kek = manager.kek
    count = await rewrap(
        manager, kek, lambda key: only_foreign and key.kek_id == kek.kek_id, batch_size
    )
    await manager.refresh(force=True)
    return count


@traced("aiocrypt.kek.rewrap")
async def rewrap(
    manager: KeyManager, kek: KekProvider, skip: Callable[[EncryptionKey], bool], batch_size: int
) -> int:
    """Wrap every DEK not ``skip``-ped again under ``kek``, in batches written with
    optimistic concurrency (a rerun after an interruption goes on where it
    stopped), then reseal the store under ``kek``; return the keys rewrapped."""
    annotate(provider=kek.backend, kek_id=redact_url(kek.kek_id), batch_size=batch_size)
    done: set[str] = set()
    batch: list[str] = []

    async def plan(current: KeySet) -> list[EncryptionKey]:
        batch.clear()
        updates = []
        for key in current.keys:
            if key.wrapped_key is None or key.key_id in done or skip(key):
                continue
            wrapped = await manager._deks.rewrapped(key, kek)
            updates.append(key.replace(wrapped_key=wrapped, kek_id=kek.kek_id))
            batch.append(key.key_id)
            if len(updates) >= batch_size:
                break
        return updates

    while True:
        await manager._change(plan)
        if not batch:
            break
        done.update(batch)
        count("aiocrypt.keys.rewrapped", len(batch), provider=kek.backend)
        for key_id in batch:
            await manager.auditor.emit("key_rewrapped", key_id=key_id, new_kek=kek.kek_id)
    # Reseal under ``kek``: the keyset seal (every store) and the file's own MAC key.
    async with manager.store.lock("rotation", timeout=manager.lock_timeout):
        current = await manager._read_verified()
        seal = await manager._seal_for(current, (), kek)
        await manager.store.rekey(kek, seal=seal, expected_revision=current.revision)
    annotate(keys=len(done))
    return len(done)
