"""Test doubles for applications' own tests: no cloud, no files.

``FakeKekProvider`` behaves like a KMS (it wraps with a random in-memory key,
binds the context, counts calls and can be told to fail) and
``MemoryKeyStore`` keeps keys in memory. ``make_service()`` wires both into a
ready ``EncryptionService``.
"""

from __future__ import annotations

import datetime
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._config import EncryptionConfig
from ._errors import KekProviderError
from ._keys import utcnow
from ._manager import KeyManager
from ._service import EncryptionService
from ._types import KeyTypeLike
from .kek._base import KekProvider
from .kek.local import LocalKekProvider
from .keystore.memory import MemoryKeyStore

__all__ = ["FakeKekProvider", "ManualClock", "MemoryKeyStore", "make_key_manager", "make_service"]


class FakeKekProvider(KekProvider):
    """An in-memory stand-in for a KMS.

    ``calls`` counts wrap/unwrap calls; set ``fail_with`` to a ``KekProviderError``
    (or ``deny()``) to make every call fail as a real provider would.
    """

    backend = "fake"

    def __init__(self, name: str = "fake") -> None:
        self._inner = LocalKekProvider(os.urandom(32))
        self._kek_id = f"fake-kms://{name}/{self._inner.kek_id.split(':', 1)[1]}"
        self.calls: Counter[str] = Counter()
        self.fail_with: KekProviderError | None = None

    @property
    def kek_id(self) -> str:
        return self._kek_id

    def deny(self) -> None:
        self.fail_with = KekProviderError(
            f"fake KMS {self._kek_id}: access denied (check the key policy)", backend="fake"
        )

    async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        self.calls["wrap"] += 1
        if self.fail_with is not None:
            raise self.fail_with
        return self._inner.wrap_sync(plaintext, context)

    async def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        self.calls["unwrap"] += 1
        if self.fail_with is not None:
            raise self.fail_with
        try:
            return self._inner.unwrap_sync(wrapped, context)
        except KekProviderError:
            raise KekProviderError(
                f"fake KMS {self._kek_id}: cannot unwrap", backend="fake"
            ) from None


class ManualClock:
    """A clock that moves only when told: pass it as ``clock=`` to test key expiry."""

    def __init__(self, start: datetime.datetime | None = None) -> None:
        self.now = start or datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        """Move forward by a ``timedelta(**kwargs)``: ``clock.advance(days=91)``."""
        self.now += datetime.timedelta(**kwargs)


def make_key_manager(config: EncryptionConfig | None = None, **kwargs: Any) -> KeyManager:
    """A KeyManager over a fresh memory store and fake KMS."""
    return KeyManager(MemoryKeyStore(), FakeKekProvider(), config, **kwargs)


def make_service(
    config: EncryptionConfig | None = None,
    *,
    clock: Callable[[], datetime.datetime] = utcnow,
    preload: Sequence[KeyTypeLike] = (),
    **kwargs: Any,
) -> EncryptionService:
    """An EncryptionService over a fresh memory store and fake KMS (``clock`` for both).

    ``preload`` key types get their keys at start; other keyword arguments go to
    the ``KeyManager``.
    """
    return EncryptionService(
        make_key_manager(config, clock=clock, **kwargs), clock=clock, preload=preload
    )
