"""No DEK in any frame's locals when an error leaves the key manager (issue 14, item 10).

Error reporters that capture locals (Sentry, Rollbar, ``traceback.TracebackException(...,
capture_locals=True)``) ship every frame's variables off the host. When the new KEK's
wrap failed during a master-key rotation, the unwrapped DEK sat in the rotation loop's
locals. The KMS here is the loop-back Vault test server, refusing ``encrypt`` (wrap).
"""

from __future__ import annotations

import traceback
from typing import Any

import pytest

from aiocrypt import KekProviderError, KeyManager, KeyType
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import MemoryKeyStore

from .conftest import FAST_RETRY


def _values(value: Any, depth: int = 0) -> list[Any]:
    """``value`` and what it holds (containers, object attributes), a few levels deep."""
    found = [value]
    if depth > 3:
        return found
    if isinstance(value, dict):
        for item in [*value.keys(), *value.values()]:
            found += _values(item, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            found += _values(item, depth + 1)
    return found


def locals_of(error: BaseException) -> list[tuple[str, Any]]:
    """(frame and name, value) of every local of every frame of ``error``'s traceback and
    of the errors chained to it (with what containers among them hold)."""
    values: list[tuple[str, Any]] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for frame, _ in traceback.walk_tb(current.__traceback__):
            if frame.f_code.co_filename == __file__:  # this test's own frame holds the DEKs
                continue
            for name, value in frame.f_locals.items():
                where = f"{frame.f_code.co_name}:{name}"
                values += [(where, v) for v in _values(value)]
        current = current.__cause__ or current.__context__
    return values


@pytest.mark.parametrize("phase", ["rotate_master_key", "generate_key"])
async def test_no_dek_in_traceback_locals_when_the_kek_fails_to_wrap(
    vault_server: Any, phase: str
) -> None:
    from aiocrypt.kek.vault import VaultTransitKekProvider

    old = LocalKekProvider.generate()
    new = VaultTransitKekProvider(
        "kek-locals", url=vault_server.url, token=vault_server.token, retry=FAST_RETRY
    )
    await new.ensure_key()
    store = MemoryKeyStore()
    manager = KeyManager(store, old, watch=False)
    async with manager:
        for kt in (KeyType.PII, KeyType.FINANCIAL_DATA):
            await manager.get_active_key(kt)
        assert len(manager.keyring) == 2
        vault_server.denied_operations = {"encrypt"}
        with pytest.raises(KekProviderError) as info:
            if phase == "rotate_master_key":
                await manager.rotate_master_key(new)
            else:
                manager.kek = new
                await manager.generate_key(KeyType.PII)
        leaked = [
            (where, v)
            for where, v in locals_of(info.value)
            if isinstance(v, (bytes, bytearray, memoryview)) and len(v) == 32
        ]
        # the names of the frames and variables only: a failure must not print a key
        if leaked:
            pytest.fail(f"32-byte values in the locals of {[where for where, _ in leaked]}")
        # what was captured still says what failed, without the material
        summary = "".join(traceback.format_exception(info.value))
        assert "KekProviderError" in summary
        manager.kek = old
    await new.close()
