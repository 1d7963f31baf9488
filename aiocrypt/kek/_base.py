"""The key-encryption-key (KEK) provider interface.

A KEK provider wraps and unwraps data-encryption keys; it is called when a DEK
is created or loaded, never per field. The ``context`` is bound to the wrapped
key (AES-GCM associated data, AWS encryption context, Vault derivation context,
GCP additional authenticated data), so a wrapped DEK copied onto another key
record fails to unwrap.

Every ``wrap`` / ``unwrap`` of every provider (subclasses included) is timed for
the observers registered with ``observe_kek_calls`` (``aiocrypt.metrics`` puts a
histogram there) and traced as the span ``aiocrypt.kms.wrap`` / ``unwrap``
(``aiocrypt._telemetry``). KEK calls are rare (a DEK created or loaded), so this
costs nothing on the field path.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from .._telemetry import span
from .._urls import redact_url

__all__ = [
    "KekCallObserver",
    "KekProvider",
    "canonical_context",
    "observe_kek_calls",
    "unobserve_kek_calls",
]

logger = logging.getLogger("aiocrypt.kek")


class KekCallObserver(Protocol):
    """Told about each finished KEK provider call (held by weak reference)."""

    def kek_call_finished(self, backend: str, operation: str, outcome: str, seconds: float) -> None:
        """``operation`` is ``wrap`` or ``unwrap``; ``outcome`` is ``ok`` or ``error``."""


_observers: weakref.WeakSet[KekCallObserver] = weakref.WeakSet()
_observing: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "aiocrypt_kek_observing", default=False
)


def observe_kek_calls(observer: KekCallObserver) -> None:
    """Report every KEK provider call of this process to ``observer`` (a weak reference)."""
    _observers.add(observer)


def unobserve_kek_calls(observer: KekCallObserver) -> None:
    _observers.discard(observer)


_Method = Callable[[Any, bytes, Mapping[str, str]], Awaitable[bytes]]


def _observed(operation: str, method: _Method) -> _Method:
    name = f"aiocrypt.kms.{operation}"

    @functools.wraps(method)
    async def call(self: KekProvider, data: bytes, context: Mapping[str, str]) -> bytes:
        if _observing.get():  # a subclass calling super() is one call
            return await method(self, data, context)
        token = _observing.set(True)
        outcome = "error"
        start = time.perf_counter()
        try:
            with span(
                name, provider=self.backend, operation=operation, kek_id=redact_url(self.kek_id)
            ):
                result = await method(self, data, context)
            outcome = "ok"
            return result
        finally:
            seconds = time.perf_counter() - start
            _observing.reset(token)
            for observer in list(_observers):
                try:
                    observer.kek_call_finished(self.backend, operation, outcome, seconds)
                except Exception:  # an observer must never break a KEK call
                    logger.exception("KEK call observer %r failed", observer)

    call.__aiocrypt_observed__ = True  # type: ignore[attr-defined]
    return call


def canonical_context(context: Mapping[str, str]) -> bytes:
    """The context as canonical bytes (sorted keys, no whitespace)."""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode("utf-8")


class KekProvider(ABC):
    """Wraps and unwraps DEKs under a key that never leaves the provider (or the process)."""

    #: Short backend name used in messages and statistics ("local", "aws_kms", ...).
    backend: str = "unknown"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("wrap", "unwrap"):
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "__aiocrypt_observed__", False):
                setattr(cls, name, _observed(name, method))

    @property
    @abstractmethod
    def kek_id(self) -> str:
        """A stable, non-secret identifier of the KEK (recorded with each wrapped DEK)."""

    @abstractmethod
    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        """Encrypt ``plaintext`` (a DEK) bound to ``context``."""

    @abstractmethod
    async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        """Decrypt what :meth:`wrap` returned; raises ``KekProviderError`` on any failure."""

    async def check(self) -> None:
        """Raise ``KekProviderError`` if the provider is unreachable (health checks)."""
        probe = await self.wrap(b"\x00" * 32, {"aiocrypt_purpose": "health-check"})
        await self.unwrap(probe, {"aiocrypt_purpose": "health-check"})

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and connections."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kek_id}>"

    def __reduce__(self) -> Any:
        raise TypeError(f"{type(self).__name__} objects cannot be pickled")
