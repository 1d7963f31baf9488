"""Audit events, sinks and the fan-out ``Auditor``."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

from .._errors import AiocryptError

__all__ = ["AuditEvent", "AuditSink", "Auditor", "LoggingAuditSink", "MemoryAuditSink"]

logger = logging.getLogger("aiocrypt.audit")
_internal = logging.getLogger("aiocrypt")

#: Event names aiocrypt emits.
EVENTS: Final = frozenset(
    {
        "key_generated",
        "key_rotated",
        "key_revoked",
        "key_compromised",
        "key_expired",
        "key_destroyed",
        "key_destroy_refused",
        "key_rewrapped",
        "master_key_rotated",
        "min_decryption_version_raised",
        "expired_key_used",
        "decrypt_failures",
        "decrypt_failure_spike",
        "policy_run",
        "usage_limit_reached",
        "audit_chain_upgraded",
    }
)


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited fact. ``details`` holds only non-secret, JSON-serialisable values."""

    event: str
    at: _dt.datetime = field(default_factory=_utcnow)
    key_id: str | None = None
    key_type: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "at": self.at.isoformat(),
            "key_id": self.key_id,
            "key_type": self.key_type,
            "details": dict(self.details),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)


@runtime_checkable
class AuditSink(Protocol):
    """Receives audit events. ``emit`` must not raise for a well-formed event."""

    async def emit(self, event: AuditEvent) -> None: ...


class LoggingAuditSink:
    """JSON lines on the ``aiocrypt.audit`` logger (WARNING for security events)."""

    _LOUD: Final = frozenset(
        {
            "key_compromised",
            "decrypt_failure_spike",
            "expired_key_used",
            "key_destroyed",
            "key_revoked",
            "usage_limit_reached",
            "keystore_integrity_failure",
            "usage_counter_rolled_back",
            "keystore_adopted",
        }
    )

    async def emit(self, event: AuditEvent) -> None:
        self.emit_sync(event)

    def emit_sync(self, event: AuditEvent) -> None:
        level = logging.WARNING if event.event in self._LOUD else logging.INFO
        logger.log(level, "%s", event.to_json())


class MemoryAuditSink:
    """Keeps events in a list (tests, and ``aiocrypt.testing``)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    async def emit(self, event: AuditEvent) -> None:
        self.events.append(event)

    def names(self) -> list[str]:
        return [e.event for e in self.events]


class Auditor:
    """Fans events out to sinks; aggregates decryption failures.

    Failures are counted per key type. At most one ``decrypt_failures`` summary is
    emitted per ``failure_window`` seconds, and a ``decrypt_failure_spike`` is
    emitted (once per window) when, within the window, at least
    ``spike_min_attempts`` decryptions were attempted and more than
    ``spike_ratio`` of them failed, or when a batch fails more than that ratio.
    """

    def __init__(
        self,
        sinks: Sequence[AuditSink] | None = None,
        *,
        failure_window: float = 60.0,
        spike_ratio: float = 0.5,
        spike_min_attempts: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sinks: list[AuditSink] = list(sinks) if sinks is not None else [LoggingAuditSink()]
        self.failure_window = failure_window
        self.spike_ratio = spike_ratio
        self.spike_min_attempts = spike_min_attempts
        self._clock = clock
        self._window_start = clock()
        self._window_successes = 0
        self._failures: Counter[str] = Counter()
        self._spiked: set[str] = set()
        #: Events emitted from sync code, not yet delivered to async sinks.
        self.pending: list[AuditEvent] = []

    async def emit(
        self, event: str, *, key_id: str | None = None, key_type: str | None = None, **details: Any
    ) -> AuditEvent:
        record = AuditEvent(event, key_id=key_id, key_type=key_type, details=details)
        await self.flush()
        await self._send(record)
        return record

    def emit_nowait(
        self, event: str, *, key_id: str | None = None, key_type: str | None = None, **details: Any
    ) -> None:
        """From sync code: logged at once, delivered to async sinks on the next ``flush()``."""
        record = AuditEvent(event, key_id=key_id, key_type=key_type, details=details)
        for sink in self.sinks:
            if isinstance(sink, LoggingAuditSink):
                sink.emit_sync(record)
        self.pending.append(record)

    async def flush(self) -> None:
        pending, self.pending = self.pending, []
        for record in pending:
            await self._send(record, skip_logging=True)

    async def _send(self, record: AuditEvent, *, skip_logging: bool = False) -> None:
        for sink in self.sinks:
            if skip_logging and isinstance(sink, LoggingAuditSink):
                continue
            try:
                await sink.emit(record)
            except Exception as exc:  # an audit sink must not break encryption
                # aiocrypt's own messages hold no secret (a tampered audit chain says
                # what it found); a driver's may, so only its type is logged
                reason = str(exc) if isinstance(exc, AiocryptError) else type(exc).__name__
                _internal.error("audit sink %s failed: %s", type(sink).__name__, reason)

    # -- decryption outcomes ------------------------------------------------

    async def record_failures(
        self, key_type: str, failures: int, *, successes_total: int, batch_size: int = 1
    ) -> None:
        """Account ``failures`` decryption failures of ``key_type``.

        ``successes_total`` is the caller's running count of successful
        decryptions (so the hot path pays nothing for auditing); the window's
        failure ratio is judged against the successes since the window began.
        A batch of ``batch_size`` with more than ``spike_ratio`` failures is a
        spike by itself.
        """
        now = self._clock()
        if now - self._window_start >= self.failure_window:
            if self._failures:
                await self.emit(
                    "decrypt_failures",
                    window_seconds=self.failure_window,
                    by_key_type=dict(self._failures),
                )
            self._window_start = now
            self._window_successes = successes_total
            self._failures.clear()
            self._spiked.clear()
        self._failures[key_type] += failures
        if key_type in self._spiked:
            return
        window_failures = sum(self._failures.values())
        attempts = window_failures + max(0, successes_total - self._window_successes)
        batch_spike = batch_size >= 2 and failures > batch_size * self.spike_ratio
        window_spike = (
            attempts >= self.spike_min_attempts and window_failures > attempts * self.spike_ratio
        )
        if batch_spike or window_spike:
            self._spiked.add(key_type)
            await self.emit(
                "decrypt_failure_spike",
                key_type=key_type,
                failures_in_window=window_failures,
                attempts_in_window=attempts,
                batch_failures=failures,
                batch_size=batch_size,
            )
