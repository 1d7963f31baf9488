"""A health report for probes and dashboards, built on ``KeyManager.health()``.

``await health(service)`` never raises and never shows a secret: it says
whether the key store and the KEK provider answer (error class names only),
whether each key type in use has an active key that is not past its rotation
date, and how the DEK cache is doing. The overall status is the worst check:
``ok``, ``degraded`` (still encrypting and decrypting, but something needs
attention: a rotation is overdue, an expected key is missing) or ``failing``
(the key store or KEK provider is unreachable, or the service is not running).
Web probes answer 200 for ``ok`` / ``degraded`` and 503 for ``failing``
(``HealthReport.http_status``).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import anyio

from ._manager import KeyManager
from ._policy import rotation_due
from ._service import EncryptionService
from ._types import KeyType, KeyTypeLike

__all__ = ["HealthCheck", "HealthReport", "health"]

Status = Literal["ok", "degraded", "failing"]
_RANK: Final[dict[str, int]] = {"ok": 0, "degraded": 1, "failing": 2}


def _worst(statuses: Iterable[Status]) -> Status:
    return max(statuses, key=_RANK.__getitem__, default="ok")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """One check: its status and non-secret details (backend names, counts, error classes)."""

    status: Status
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The result of :func:`health`; ``to_dict()`` is the JSON the web probes return."""

    status: Status
    checks: dict[str, HealthCheck]
    checked_at: _dt.datetime

    @property
    def http_status(self) -> int:
        """503 when failing, else 200 (a degraded service still serves)."""
        return 503 if self.status == "failing" else 200

    def with_check(self, name: str, check: HealthCheck) -> HealthReport:
        """This report plus one check (a web extension's Redis), the status recomputed."""
        checks = {**self.checks, name: check}
        return HealthReport(_worst(c.status for c in checks.values()), checks, self.checked_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "checked_at": self.checked_at.isoformat(),
            "checks": {
                name: {"status": check.status, **check.detail}
                for name, check in self.checks.items()
            },
        }


async def health(
    target: EncryptionService | KeyManager,
    *,
    key_types: Iterable[KeyTypeLike] | None = None,
    timeout: float = 5.0,
) -> HealthReport:
    """Check the service (or a bare ``KeyManager``) and return a :class:`HealthReport`.

    ``key_types``: the key types that must have an active key (default: those
    the service preloads plus every type with an active key loaded). ``timeout``
    bounds the key store and KEK provider probes together, so a black-holed
    host makes the report ``failing`` instead of hanging the probe.
    """
    manager = target.key_manager if isinstance(target, EncryptionService) else target
    checks: dict[str, HealthCheck] = {}
    if isinstance(target, EncryptionService):
        state = "running" if target.started else "stopped"
        checks["service"] = HealthCheck("ok" if target.started else "failing", {"state": state})

    probe: dict[str, Any] | None = None
    with anyio.move_on_after(timeout):
        probe = await manager.health()
    checks["key_store"], checks["kek_provider"] = _probe_checks(manager, probe)

    now = manager._clock()
    checks["active_keys"] = _active_keys(manager, now, _expected(target, key_types))
    keyring = manager.keyring
    checks["dek_cache"] = HealthCheck(
        "ok",
        {
            "hits": manager.dek_cache_hits,
            "misses": manager.dek_cache_misses,
            "loaded_keys": len(keyring),
            "max_age_seconds": manager.config.performance.dek_cache_seconds,
        },
    )
    overall = _worst(check.status for check in checks.values())
    return HealthReport(overall, checks, now)


def _expected(
    target: EncryptionService | KeyManager, key_types: Iterable[KeyTypeLike] | None
) -> set[KeyType]:
    if key_types is not None:
        return {KeyType(kt) for kt in key_types}
    manager = target.key_manager if isinstance(target, EncryptionService) else target
    expected = {KeyType(kt) for kt in manager.keyring.active_keys}
    if isinstance(target, EncryptionService):
        expected.update(target._preload)
    return expected


def _probe_checks(
    manager: KeyManager, probe: dict[str, Any] | None
) -> tuple[HealthCheck, HealthCheck]:
    """The key store's and the KEK provider's checks from the manager's probe (``None``:
    it timed out)."""
    store: dict[str, Any] = {"backend": manager.store.name}
    kek: dict[str, Any] = {"backend": manager.kek.backend}
    if probe is None:
        store.update(reachable=False, error="TimeoutError")
        kek.update(reachable=None, error="not checked (key store probe timed out)")
    else:
        store["reachable"] = probe["key_store_reachable"]
        if not store["reachable"]:
            store["error"] = probe.get("key_store_error", "unknown")
        kek["reachable"] = probe["kek_provider_reachable"]
        if not kek["reachable"]:
            kek["error"] = probe.get("kek_provider_error", "unknown")
    return (
        HealthCheck("ok" if store["reachable"] else "failing", store),
        HealthCheck("ok" if kek["reachable"] else "failing", kek),
    )


def _active_keys(manager: KeyManager, now: _dt.datetime, expected: set[KeyType]) -> HealthCheck:
    active = manager.keyring.active_keys
    by_type: dict[str, dict[str, Any]] = {}
    for kt in sorted(expected):
        dk = active.get(kt)
        if dk is None:
            by_type[str(kt)] = {"status": "degraded", "problem": "no active key loaded"}
            continue
        key = dk.key
        policy = manager.config.rotation_policy(kt)
        rotate_at = rotation_due(key, policy)
        entry: dict[str, Any] = {
            "status": "ok",
            "key_id": key.key_id,
            "version": key.version,
            "age_days": round(key.age(now).total_seconds() / 86400, 2),
            "days_to_rotation": round((rotate_at - now).total_seconds() / 86400, 2),
        }
        if now >= key.expires_at:
            entry.update(status="degraded", problem="active key is past its maximum age")
        elif now >= rotate_at:
            entry.update(status="degraded", problem="rotation is overdue")
        by_type[str(kt)] = entry
    return HealthCheck(_worst(e["status"] for e in by_type.values()), {"key_types": by_type})
