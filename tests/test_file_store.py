"""The file key store: atomic, 0600, authenticated, process-safe, and loud when wrong."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aiocrypt import (
    ConcurrentModificationError,
    EncryptionService,
    KeyManager,
    KeyStoreError,
    KeyStoreIntegrityError,
    KeyType,
    LockTimeoutError,
)
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore


def make(path: Path, master_key: bytes) -> EncryptionService:
    kek = LocalKekProvider(master_key)
    return EncryptionService(KeyManager(FileKeyStore(path, kek), kek))


async def test_keys_survive_a_restart_and_file_is_0600(key_path: Path, master_key: bytes) -> None:
    async with make(key_path, master_key) as svc:
        token = await svc.encrypt_field("123-45-6789", KeyType.PII, context="users.ssn")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    async with make(key_path, master_key) as svc:
        assert await svc.decrypt_field(token, KeyType.PII, context="users.ssn") == "123-45-6789"
    leftovers = [p.name for p in key_path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


async def test_wrong_master_key_is_reported_as_such(key_path: Path, master_key: bytes) -> None:
    async with make(key_path, master_key) as svc:
        await svc.encrypt_field(1, KeyType.PII)
    before = key_path.read_bytes()
    with pytest.raises(KeyStoreIntegrityError, match="ENCRYPTION_MASTER_KEY"):
        async with make(key_path, os.urandom(32)) as svc:
            await svc.encrypt_field(1, KeyType.PII)
    assert key_path.read_bytes() == before


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edit", "drop_mac", "empty"])
async def test_damaged_file_is_refused_and_left_untouched(
    key_path: Path, master_key: bytes, damage: str
) -> None:
    async with make(key_path, master_key) as svc:
        await svc.encrypt_field(1, KeyType.PII)
    original = key_path.read_bytes()
    if damage == "truncate":
        key_path.write_bytes(original[: len(original) // 2])
    elif damage == "garbage":
        key_path.write_bytes(b"\x00\xff" * 50)
    elif damage == "empty":
        key_path.write_bytes(b"")
    else:
        doc = json.loads(original)
        if damage == "edit":
            doc["keys"][0]["status"] = "revoked"
        else:
            del doc["mac"]
        key_path.write_text(json.dumps(doc))
    damaged = key_path.read_bytes()
    with pytest.raises(KeyStoreIntegrityError) as info:
        async with make(key_path, master_key) as svc:
            await svc.key_manager.rotate_key(KeyType.PII, force=True)
    assert str(key_path) in str(info.value)
    assert key_path.read_bytes() == damaged


async def test_missing_directory_is_a_clear_error(tmp_path: Path, master_key: bytes) -> None:
    path = tmp_path / "nowhere" / "keys.json"
    with pytest.raises(KeyStoreError, match="does not exist"):
        async with make(path, master_key) as svc:
            await svc.encrypt_field(1, KeyType.PII)
    assert not path.parent.exists()


async def test_write_with_stale_revision_is_refused(key_path: Path, master_key: bytes) -> None:
    kek = LocalKekProvider(master_key)
    store = FileKeyStore(key_path, kek)
    async with KeyManager(store, kek) as manager:
        await manager.get_active_key(KeyType.PII)
        keyset = await store.read()
        await manager.rotate_key(KeyType.PII, force=True)
        with pytest.raises(ConcurrentModificationError):
            await store.write(list(keyset.keys), expected_revision=keyset.revision)


_HOLD_LOCK = textwrap.dedent("""
    import asyncio, sys, os
    from aiocrypt.kek import LocalKekProvider
    from aiocrypt.keystore import FileKeyStore
    async def main():
        store = FileKeyStore(sys.argv[1], LocalKekProvider(os.urandom(32)))
        async with store.lock("rotation"):
            print("locked", flush=True)
            sys.stdin.readline()
    asyncio.run(main())
""")


async def test_rotation_lock_is_exclusive_across_processes_and_freed_on_death(
    key_path: Path, master_key: bytes
) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(key_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "locked"
            store = FileKeyStore(key_path, LocalKekProvider(master_key))
            with pytest.raises(LockTimeoutError):
                async with store.lock("rotation", timeout=0.3):
                    pass
            proc.kill()  # the holder dies without releasing
            proc.wait()
            async with store.lock("rotation", timeout=5):
                pass
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


_ROTATE = textwrap.dedent("""
    import asyncio, base64, sys
    from aiocrypt import KeyManager, KeyType
    from aiocrypt.kek import LocalKekProvider
    from aiocrypt.keystore import FileKeyStore
    async def main():
        kek = LocalKekProvider(base64.b64decode(sys.argv[2]))
        async with KeyManager(FileKeyStore(sys.argv[1], kek), kek) as manager:
            for _ in range(5):
                await manager.rotate_key(KeyType.PII, force=True)
    asyncio.run(main())
""")


async def test_concurrent_rotations_from_processes_lose_nothing(
    key_path: Path, master_key: bytes, master_key_b64: str
) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", _ROTATE, str(key_path), master_key_b64])
        for _ in range(3)
    ]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    kek = LocalKekProvider(master_key)
    keys = [k for k in (await FileKeyStore(key_path, kek).read()).keys if k.key_type == KeyType.PII]
    assert sorted(k.version for k in keys) == list(range(1, 16))
    assert sum(k.status.value == "active" for k in keys) == 1
