"""Census-gated key retirement: cleanup, minimum decryption versions, ``retire``.

One part of :class:`~aiocrypt._manager.KeyManager` (docs/architecture.md): the
decisions that destroy or disable keys, each taken only on evidence that no data
needs them. The census (rows per key id, from the re-encryption engine) is that
evidence; a caller's confirmation counts only for keys the census does not cover,
never against rows it counts. Every change goes through the manager's sealed,
compare-and-swap write and is audited.

Just over 500 lines: cleanup, retire and the minimum decryption version share
one census-gated plan and its refusals; splitting them would split the one
rule that no counted row's key is destroyed.
"""

from __future__ import annotations

import datetime as _dt
import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import _policy
from ._errors import KeyNotFoundError, KeyStateError
from ._keys import EncryptionKey
from ._telemetry import annotate, count, traced
from ._types import KeyStatus, KeyType, KeyTypeLike
from .keystore._base import KeySet

if TYPE_CHECKING:
    from ._manager import KeyManager

__all__ = [
    "Census",
    "CleanupEntry",
    "CleanupReport",
    "KeyReferences",
    "KeyRetirement",
    "RetiredKey",
    "RetirementReason",
    "min_decryption_version",
]

logger = logging.getLogger("aiocrypt.keys")

#: Rows per key id of the data a census covers, or a coroutine function returning
#: that. Only an explicit 0 marks a key unreferenced: a key id absent from the
#: census is of data the census does not cover, and is kept.
Census = Mapping[str, int] | Callable[[], Awaitable[Mapping[str, int]]]


class RetirementReason(enum.Enum):
    """Why a key could be retired (the ``key_destroyed`` audit event's reason)."""

    CENSUS_NO_ROWS = "retired: census shows no rows"
    CONFIRMED_UNREFERENCED = "confirmed unreferenced"


@dataclass(frozen=True, slots=True)
class RetiredKey:
    """One key :meth:`KeyManager.retire_key` destroyed (or, in a dry run, would destroy)."""

    key_id: str
    version: int
    status_before: KeyStatus
    reason: RetirementReason


@dataclass(frozen=True, slots=True)
class KeyRetirement:
    """What :meth:`KeyManager.retire_key` / :meth:`~KeyManager.retire_key_type` did.

    ``min_decryption_version`` is the key type's minimum decryption version
    afterwards (raised past the retired keys when they were its oldest enabled
    versions); with ``dry_run`` nothing changed and everything is what would be.
    """

    key_type: KeyType
    keys: tuple[RetiredKey, ...]
    min_decryption_version_before: int
    min_decryption_version: int
    type_retired: bool
    dry_run: bool


@dataclass(frozen=True, slots=True)
class CleanupEntry:
    """One key cleanup destroyed or kept, and why (``forced``: destroyed by ``force=True``
    without a reference check)."""

    key_id: str
    reason: str
    forced: bool = False


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What :meth:`KeyManager.cleanup` destroyed and what it kept."""

    destroyed: tuple[CleanupEntry, ...]
    kept: tuple[CleanupEntry, ...]

    def to_dict(self) -> dict[str, list[dict[str, str]]]:
        """The ``cleanup_report()`` form: ``{"destroyed": [...], "kept": [...]}``."""
        return {
            "destroyed": [{"key_id": e.key_id, "reason": e.reason} for e in self.destroyed],
            "kept": [{"key_id": e.key_id, "reason": e.reason} for e in self.kept],
        }


def min_decryption_version(keys: Iterable[EncryptionKey]) -> int:
    """The lowest version of a key type's ``keys`` that may decrypt (every version
    below it is ``decrypt_disabled``); one past the newest when none may."""
    versions = [(k.version, k.decrypt_disabled) for k in keys]
    enabled = [v for v, disabled in versions if not disabled]
    return min(enabled, default=max((v for v, _ in versions), default=0) + 1)


class KeyReferences:
    """The manager's census-gated decisions (one per manager, holding none of its state)."""

    def __init__(self, manager: KeyManager) -> None:
        self._manager = manager

    async def _unreferenced(
        self, confirm_unreferenced: Iterable[str], census: Census | None
    ) -> tuple[set[str], Mapping[str, int] | None]:
        """Key ids known to be unreferenced, and the census consulted (if any).

        A confirmation never outweighs the census: a key it counts rows on is not
        unreferenced, whoever says so (the census is evidence, a confirmation a belief).
        """
        confirmed = set(confirm_unreferenced)
        counts = await self._run_census(census)
        if counts is None:
            return confirmed, None
        counted = {key_id for key_id, rows in counts.items() if rows}
        return (confirmed - counted) | {
            key_id for key_id, rows in counts.items() if not rows
        }, counts

    async def _run_census(self, census: Census | None) -> Mapping[str, int] | None:
        """Rows per key id from ``census`` (else ``self._manager.census``); None without either."""
        source = census if census is not None else self._manager.census
        if source is None:
            return None
        counts = await source() if callable(source) else source
        manager = self._manager
        manager.last_census, manager.last_census_at = dict(counts), manager._clock()
        return counts

    @traced("aiocrypt.key.cleanup")
    async def cleanup(  # noqa: C901 - census-gated destruction: every refusal is one guard, kept together so the decision reads top to bottom
        self,
        *,
        confirm_unreferenced: Iterable[str] = (),
        census: Census | None = None,
        force: bool = False,
    ) -> CleanupReport:
        """Destroy keys past max age + grace that nothing references: what was destroyed
        and what kept, and why (see :meth:`KeyManager.cleanup_expired_keys`)."""
        manager = self._manager
        if not manager._opened:
            await manager.open()
        await manager.refresh(force=True)
        await manager._lifecycle.expire_retired()
        unreferenced, counts = await self._unreferenced(confirm_unreferenced, census)
        confirmed = set(confirm_unreferenced)
        destroyed: list[CleanupEntry] = []
        kept: list[CleanupEntry] = []

        async def plan(current: KeySet) -> list[EncryptionKey]:
            destroyed.clear()
            kept.clear()
            now = manager._clock()
            updates = []
            wrapping = await manager.subjects.count(
                k.key_id
                for k in current.keys
                if k.status not in (KeyStatus.DESTROYED, KeyStatus.ACTIVE)
            )
            for key in current.keys:
                if key.status in (KeyStatus.DESTROYED, KeyStatus.ACTIVE):
                    continue
                policy = manager.config.rotation_policy(key.key_type)
                if not _policy.is_past_grace(key, policy, now):
                    continue
                if wrapping.get(key.key_id):  # not even forced: every subject key under it
                    kept.append(CleanupEntry(key.key_id, _wraps_subjects(key, wrapping)))
                    continue
                if key.key_id in unreferenced or force:
                    forced = key.key_id not in unreferenced
                    how = (
                        "confirmed unreferenced by caller"
                        if key.key_id in confirmed
                        else "census: no rows left"
                        if not forced
                        else "FORCED without a reference check"
                    )
                    updates.append(
                        key.replace(
                            status=KeyStatus.DESTROYED,
                            wrapped_key=None,
                            status_changed_at=now,
                            status_reason=how,
                        )
                    )
                    destroyed.append(CleanupEntry(key.key_id, how, forced))
                elif counts is None:
                    kept.append(
                        CleanupEntry(key.key_id, "no census and not confirmed unreferenced")
                    )
                elif key.key_id in counts:
                    kept.append(
                        CleanupEntry(
                            key.key_id,
                            "data may still reference it: the "
                            f"census reports {counts[key.key_id]} rows",
                        )
                    )
                else:
                    kept.append(
                        CleanupEntry(
                            key.key_id, "the census does not cover it (and it is not confirmed)"
                        )
                    )
            by_id = current.by_id()
            done = {item.key_id for item in destroyed}
            told = {item.key_id for item in kept}
            for key_id in sorted(confirmed - done - told):  # why a confirmation did nothing
                rows = (counts or {}).get(key_id)
                kept.append(
                    CleanupEntry(
                        key_id,
                        (
                            f"data may still reference it: the census reports {rows} rows"
                            if rows
                            else self._not_cleaned_up(by_id.get(key_id), key_id, now)
                        ),
                    )
                )
            return updates

        keyset = await manager._change(plan)
        by_id = keyset.by_id()
        for item in destroyed:
            key_type = by_id[item.key_id].key_type.value
            if item.forced:
                logger.warning("key %s DESTROYED by force (no reference check)", item.key_id)
            await manager.auditor.emit(
                "key_destroyed",
                key_id=item.key_id,
                key_type=key_type,
                reason=item.reason,
                forced=force,
            )
            count("aiocrypt.keys.destroyed", key_type=key_type)
        annotate(
            destroyed=len(destroyed),
            kept=len(kept),
            forced=force,
            census=counts is not None,
            destroyed_key_ids=tuple(item.key_id for item in destroyed),
        )
        for item in kept:
            logger.info("key %s kept: %s", item.key_id, item.reason)
            if item.key_id in by_id:  # not a key id the caller mistyped
                await manager.auditor.emit(
                    "key_destroy_refused",
                    key_id=item.key_id,
                    key_type=by_id[item.key_id].key_type.value,
                    reason=item.reason,
                )
        return CleanupReport(tuple(destroyed), tuple(kept))

    def _not_cleaned_up(self, key: EncryptionKey | None, key_id: str, now: _dt.datetime) -> str:
        """Why cleanup left a key the caller confirmed unreferenced."""
        if key is None:
            return "no such key in this store"
        if key.status is KeyStatus.DESTROYED:
            return "already destroyed"
        if key.status is KeyStatus.ACTIVE:
            return (
                f"the active {key.key_type.value} key is never destroyed: rotate first, "
                f"re-encrypt, then 'aiocrypt keys retire {key_id}'"
            )
        end = _policy.grace_end(key, self._manager.config.rotation_policy(key.key_type))
        return (
            f"not past max age + grace (until {end:%Y-%m-%d}); cleanup destroys only those: "
            f"to retire it now, 'aiocrypt keys retire {key_id}'"
        )

    async def get_min_decryption_version(self, key_type: KeyTypeLike) -> int:
        return min_decryption_version(await self._manager.list_keys(key_type))

    async def set_min_decryption_version(
        self,
        key_type: KeyTypeLike,
        version: int,
        *,
        confirm_unreferenced: Iterable[str] = (),
        census: Census | None = None,
    ) -> int:
        """See :meth:`KeyManager.set_min_decryption_version`."""
        kt = KeyType(key_type)
        keys = await self._manager.list_keys(kt)
        active = [k for k in keys if k.status is KeyStatus.ACTIVE]
        if active and version > active[0].version:
            raise ValueError(
                f"{kt.value}: minimum version {version} is above the active "
                f"version {active[0].version}"
            )
        unreferenced, _ = await self._unreferenced(confirm_unreferenced, census)
        older = [
            k
            for k in keys
            if k.version < version
            and k.status is not KeyStatus.DESTROYED
            and not k.decrypt_disabled
        ]
        wrapping = await self._manager.subjects.count(k.key_id for k in older)
        for key in older:
            if wrapping.get(key.key_id):
                raise KeyStateError(_wraps_subjects(key, wrapping))
        referenced = [k.key_id for k in older if k.key_id not in unreferenced]
        if referenced:
            raise KeyStateError(
                f"{kt.value}: cannot raise the minimum decryption version to {version}: data "
                f"may still reference {', '.join(referenced)} (re-encrypt it first)"
            )

        async def plan(current: KeySet) -> list[EncryptionKey]:
            return [
                k.replace(decrypt_disabled=k.version < version)
                for k in current.keys
                if k.key_type == kt and k.decrypt_disabled != (k.version < version)
            ]

        await self._manager._change(plan)
        await self._manager.auditor.emit(
            "min_decryption_version_raised", key_type=kt.value, version=version
        )
        return version

    # -- retiring keys --------------------------------------------------------

    async def retire_key(
        self,
        key_id: str,
        *,
        census: Census | None = None,
        confirm_unreferenced: Iterable[str] = (),
        dry_run: bool = False,
    ) -> KeyRetirement:
        """See :meth:`KeyManager.retire_key` (the rules are stated there)."""

        def select(current: KeySet) -> tuple[KeyType, list[EncryptionKey]]:
            key = current.by_id().get(key_id)
            if key is None:
                raise KeyNotFoundError(f"no key with id {key_id!r}")
            if key.status is KeyStatus.DESTROYED:
                raise KeyStateError(f"key {key_id} is already destroyed")
            if key.status is KeyStatus.ACTIVE:
                raise KeyStateError(
                    f"key {key_id} is the active {key.key_type.value} key: rotate first "
                    f"(aiocrypt keys rotate {key.key_type.value} --force), re-encrypt its data, "
                    "then retire it"
                )
            return key.key_type, [key]

        return await self._retire(
            select,
            census=census,
            confirmed=set(confirm_unreferenced),
            dry_run=dry_run,
            whole_type=False,
        )

    async def retire_key_type(
        self,
        key_type: KeyTypeLike,
        *,
        census: Census | None = None,
        confirm_unreferenced: Iterable[str] = (),
        dry_run: bool = False,
    ) -> KeyRetirement:
        """See :meth:`KeyManager.retire_key_type` (the rules are stated there)."""
        kt = KeyType(key_type)  # not declared_key_type(): a mistaken type is undeclared
        if kt in self._manager.config.known_key_types:
            raise KeyStateError(
                f"{kt.value} is a declared key type, not one created by mistake: retire its "
                "old keys one by one (retire_key); to retire the type itself, remove it from "
                "the configuration's key types first (the predefined ones cannot be)"
            )

        def select(current: KeySet) -> tuple[KeyType, list[EncryptionKey]]:
            same_type = [k for k in current.keys if k.key_type == kt]
            if not same_type:
                raise KeyNotFoundError(f"no key of type {kt.value!r}")
            live = [k for k in same_type if k.status is not KeyStatus.DESTROYED]
            if not live:
                raise KeyStateError(f"every {kt.value} key is already destroyed")
            return kt, live

        return await self._retire(
            select,
            census=census,
            confirmed=set(confirm_unreferenced),
            dry_run=dry_run,
            whole_type=True,
        )

    @traced("aiocrypt.key.retire")
    async def _retire(
        self,
        select: Callable[[KeySet], tuple[KeyType, list[EncryptionKey]]],
        *,
        census: Census | None,
        confirmed: set[str],
        dry_run: bool,
        whole_type: bool,
    ) -> KeyRetirement:
        """Destroy the keys ``select`` picks from the verified keyset, each only if the
        census shows no rows on it or the caller confirmed it (all or none), and raise
        the type's minimum decryption version past them where they were the oldest."""
        counts = await self._run_census(census)
        outcome: list[KeyRetirement] = []

        async def plan(current: KeySet) -> list[EncryptionKey]:
            outcome.clear()
            kt, targets = select(current)
            wrapping = await self._manager.subjects.count(k.key_id for k in targets)
            for key in targets:  # whoever confirms: destroying it would erase every subject
                if wrapping.get(key.key_id):
                    raise KeyStateError(_wraps_subjects(key, wrapping))
            retired = [
                RetiredKey(
                    k.key_id, k.version, k.status, self._retirement_reason(k, counts, confirmed)
                )
                for k in targets
            ]
            now = self._manager._clock()
            reasons = {r.key_id: r.reason for r in retired}
            after = [
                k.replace(
                    status=KeyStatus.DESTROYED,
                    wrapped_key=None,
                    status_changed_at=now,
                    retired_at=k.retired_at or now,
                    status_reason=reasons[k.key_id].value,
                )
                if k.key_id in reasons
                else k
                for k in current.keys
                if k.key_type == kt
            ]
            # The new floor: the oldest version still able to decrypt. Every version below
            # it is destroyed or already disabled, so disabling them takes nothing away.
            floor = min(
                (
                    k.version
                    for k in after
                    if k.status is not KeyStatus.DESTROYED and not k.decrypt_disabled
                ),
                default=max(k.version for k in after) + 1,
            )
            after = [k.replace(decrypt_disabled=True) if k.version < floor else k for k in after]
            before_by_id = current.by_id()
            outcome.append(
                KeyRetirement(
                    kt,
                    tuple(retired),
                    min_decryption_version(before_by_id[k.key_id] for k in after),
                    min_decryption_version(after),
                    whole_type,
                    dry_run,
                )
            )
            if dry_run:
                return []
            return [k for k in after if k != before_by_id[k.key_id]]

        await self._manager._change(plan)
        result = outcome[0]
        annotate(
            key_type=result.key_type.value,
            dry_run=dry_run,
            whole_type=whole_type,
            census=counts is not None,
            key_ids=tuple(k.key_id for k in result.keys),
            min_decryption_version=result.min_decryption_version,
        )
        if dry_run:
            return result
        for key in result.keys:
            logger.warning("key %s DESTROYED: %s", key.key_id, key.reason.value)
            count("aiocrypt.keys.destroyed", key_type=result.key_type.value)
            await self._manager.auditor.emit(
                "key_destroyed",
                key_id=key.key_id,
                key_type=result.key_type.value,
                reason=key.reason.value,
                forced=False,
                retired=True,
            )
        if result.min_decryption_version != result.min_decryption_version_before:
            await self._manager.auditor.emit(
                "min_decryption_version_raised",
                key_type=result.key_type.value,
                version=result.min_decryption_version,
            )
        if whole_type:
            await self._manager.auditor.emit(
                "key_type_retired",
                key_type=result.key_type.value,
                keys=[k.key_id for k in result.keys],
            )
        return result

    @staticmethod
    def _retirement_reason(
        key: EncryptionKey, counts: Mapping[str, int] | None, confirmed: set[str]
    ) -> RetirementReason:
        """Why ``key`` may be destroyed now; ``KeyStateError`` saying why not otherwise."""
        rows = None if counts is None else counts.get(key.key_id)
        if rows:
            raise KeyStateError(
                f"key {key.key_id}: the census counts {rows} rows on it: re-encrypt them first"
            )
        if rows == 0:
            return RetirementReason.CENSUS_NO_ROWS
        if key.key_id in confirmed:
            return RetirementReason.CONFIRMED_UNREFERENCED
        why = "no census was given" if counts is None else "the census does not cover it"
        raise KeyStateError(
            f"key {key.key_id}: {why}; confirm that no data references it "
            "(confirm_unreferenced, or --confirm-unreferenced)"
        )


def _wraps_subjects(key: EncryptionKey, wrapping: Mapping[str, int]) -> str:
    """Why ``key`` is kept: subject keys are still wrapped by it (docs/subjects.md)."""
    return (
        f"key {key.key_id} still wraps {wrapping[key.key_id]} subject keys: rewrap them "
        f"under the active key first (aiocrypt subjects rewrap --key-type "
        f"{key.key_type.value})"
    )
