"""What a ``KeyManager`` trusts of its key store, and why (docs/threat-model.md).

The store is writable by the attacker this library is for, so nothing read from
it is used before the guard has checked it:

* the keyset seal (``_keyset_seal``): every record and the revision, under a key
  only the KEK unwraps;
* the high-water mark: never a lower revision than one already verified (and,
  with a state file on the host, than any process of the host verified);
* transitions: no key comes back from ``compromised``, ``revoked`` or
  ``destroyed``, re-activates, or disappears;
* usage counters: a shared total below the highest seen (or below zero) is
  replaced by that highest total.

The guard only decides; the manager audits and logs what it refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Final

import anyio

from ._errors import KeyStoreIntegrityError
from ._keys import EncryptionKey
from ._keyset_seal import KeysetSealer, Seal
from ._keyset_state import KeysetStateFile
from ._subjects import prunable
from ._types import KeyStatus
from .kek._base import KekProvider
from .keystore._base import KeySet, merge

__all__ = ["KeysetGuard"]

#: Statuses a key never leaves except for the ones listed (store edits cannot revive it).
_TERMINAL: Final = {
    KeyStatus.COMPROMISED: {KeyStatus.COMPROMISED, KeyStatus.DESTROYED},
    KeyStatus.REVOKED: {KeyStatus.REVOKED, KeyStatus.COMPROMISED, KeyStatus.DESTROYED},
    KeyStatus.DESTROYED: {KeyStatus.DESTROYED},
}
_NONE: Final[Mapping[str, str]] = MappingProxyType({})


class KeysetGuard:
    """Verifies keysets read from one store and seals the ones written to it."""

    def __init__(
        self,
        kek_for: Callable[[str], KekProvider],
        *,
        where: str,
        store_identity: str,
        state_path: str | None = None,
    ) -> None:
        self.where = where
        self._sealer = KeysetSealer(kek_for)
        self._seal: Seal | None = None  # the seal of the last verified keyset
        self.high_water = 0  # the highest store revision verified
        self._statuses: dict[str, KeyStatus] = {}  # last verified status per key id
        self._usage_floor: dict[str, int] = {}  # highest shared usage total per key id
        self._state_file = KeysetStateFile(state_path) if state_path else None
        self._state_loaded = False
        self._identity = store_identity
        #: Whether a keyset (even an empty store) has been verified yet.
        self.verified_once = False

    def __repr__(self) -> str:
        return f"<KeysetGuard {self.where} revision>={self.high_water}>"

    # -- the host's high-water marks ------------------------------------------

    async def load_state(self) -> None:
        """Start from the high-water marks persisted on this host (if configured)."""
        if self._state_file is None or self._state_loaded:
            return
        state = await anyio.to_thread.run_sync(self._state_file.read)
        self.high_water = max(self.high_water, state.revisions.get(self._identity, 0))
        for key_id, total in state.usage.items():
            self._usage_floor[key_id] = max(total, self._usage_floor.get(key_id, 0))
        self._state_loaded = True

    async def persist(self) -> None:
        if self._state_file is not None:
            await anyio.to_thread.run_sync(
                self._state_file.raise_to,
                {self._identity: self.high_water},
                dict(self._usage_floor),
            )

    # -- reading --------------------------------------------------------------

    async def verify(self, keyset: KeySet) -> None:
        """Accept ``keyset`` or raise ``KeyStoreIntegrityError`` (nothing is updated then)."""
        if keyset.revision < self.high_water:
            raise KeyStoreIntegrityError(
                f"{self.where} went back from revision {self.high_water} to "
                f"{keyset.revision}: an older copy (a restored backup?) is refused; see the "
                "runbook to accept a restore deliberately"
            )
        seal = await self._sealer.verify(keyset.seal, keyset.revision, keyset.keys, self.where)
        self._check_transitions(keyset)
        self._seal = seal
        self._statuses = {k.key_id: k.status for k in keyset.keys}
        self.verified_once = True
        if keyset.revision > self.high_water:
            self.high_water = keyset.revision
            await self.persist()

    def _check_transitions(self, keyset: KeySet) -> None:
        present = {k.key_id for k in keyset.keys}
        for key in keyset.keys:
            before = self._statuses.get(key.key_id)
            if before is None or before is key.status:
                continue
            allowed = _TERMINAL.get(before)
            if (
                allowed is not None and key.status not in allowed
            ) or key.status is KeyStatus.ACTIVE:
                raise KeyStoreIntegrityError(
                    f"{self.where}: key {key.key_id} went from {before.value} back to "
                    f"{key.status.value}, which aiocrypt never does",
                    key_id=key.key_id,
                )
        gone = sorted(set(self._statuses) - present)
        if gone:
            raise KeyStoreIntegrityError(
                f"{self.where}: key record {gone[0]} disappeared (records are never deleted)",
                key_id=gone[0],
            )

    # -- writing --------------------------------------------------------------

    async def seal_for(
        self,
        current: KeySet,
        updates: Sequence[EncryptionKey],
        kek: KekProvider,
        forget: Mapping[str, str] | None = None,
    ) -> str:
        """The seal of the keyset that writing ``updates`` over (verified) ``current`` makes.

        The forgotten subject keys carry over, with ``forget`` (subject key id ->
        wrapping key id) added, less those no backup could unwrap any more
        (``_subjects.prunable``: every version that could have wrapped them destroyed).
        """
        keys = merge(current.keys, updates)
        forgotten = dict(self._seal.forgotten) if self._seal is not None else {}
        forgotten.update(forget or {})
        for key_id in prunable(forgotten, keys):
            del forgotten[key_id]
        return await self._sealer.seal(current.revision + 1, keys, kek, self._seal, forgotten)

    @property
    def seal(self) -> Seal | None:
        """The seal of the last verified keyset (a new object whenever it changes)."""
        return self._seal

    @property
    def forgotten(self) -> Mapping[str, str]:
        """Forgotten subject key ids (-> wrapping key id) of the last verified keyset."""
        return self._seal.forgotten if self._seal is not None else _NONE

    def derive(self, info: bytes) -> bytes | None:
        """A key derived from the verified seal key (None while the store has no seal)."""
        return None if self._seal is None else self._sealer.derive(self._seal, info)

    async def seal_unverified(self, keyset: KeySet, kek: KekProvider) -> str:
        """A first seal, with a fresh seal key, for ``keyset`` as it is (adoption only)."""
        return await self._sealer.seal(keyset.revision + 1, keyset.keys, kek, None)

    # -- usage counters -------------------------------------------------------

    def usage_start(self, key_id: str, total: int, request: int) -> tuple[int, int | None]:
        """Where a reservation of ``request`` that brought the shared counter to ``total``
        starts, and the floor used instead when the counter went backwards (else None)."""
        start = total - request
        floor = self._usage_floor.get(key_id, 0)
        rolled_back = floor if start < floor else None
        start = max(start, floor)
        self._usage_floor[key_id] = start + request
        return start, rolled_back

    def forget(self) -> None:
        self._sealer.forget()
