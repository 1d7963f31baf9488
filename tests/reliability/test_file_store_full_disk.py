"""The file key store on a full disk.

A tmpfs cannot be mounted here, so the disk fills where the store touches it:
``os.write`` / ``os.fsync`` / ``os.replace`` raise ``OSError(ENOSPC)`` for
files in the key directory only (the descriptor's path is checked through
/proc/self/fd), at the moment a rotation writes the new document; one case
writes half the document first, as a filling disk does.

What must hold: the rotation fails with ``KeyStoreError`` naming the file and
the cause (never key material); the key file is byte-for-byte the one before
(the write went to a temporary file that is removed); no temporary file is
left; the previous key stays active; a fresh process (new store, new manager,
same master key) loads the file and decrypts every token written before; once
space is back, the rotation succeeds and every version still decrypts.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aiocrypt import EncryptionService, KeyManager, KeyStoreError, KeyType
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore


class FullDisk:
    """Makes file operations on paths under ``directory`` fail with ENOSPC when armed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
        self.directory = str(directory.resolve())
        self.armed: str | None = None
        self.injected = 0
        real_write, real_fsync, real_replace = os.write, os.fsync, os.replace

        def in_dir_fd(fd: int) -> bool:
            try:
                return os.readlink(f"/proc/self/fd/{fd}").startswith(self.directory)
            except OSError:
                return False

        def fail() -> None:
            self.injected += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def write(fd: int, data: Any) -> int:
            if self.armed in ("write", "partial") and in_dir_fd(fd):
                if self.armed == "partial" and len(data) > 1:
                    self.armed = "write"  # half now, then the disk is full
                    return real_write(fd, bytes(data[: len(data) // 2]))
                fail()
            return real_write(fd, data)

        def fsync(fd: int) -> None:
            if self.armed == "fsync" and in_dir_fd(fd) and os.path.isfile(f"/proc/self/fd/{fd}"):
                fail()
            real_fsync(fd)

        def replace(src: Any, dst: Any, **kwargs: Any) -> None:
            if self.armed == "replace" and str(dst).startswith(self.directory):
                fail()
            real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)


def _open(key_path: Path, master_key: bytes) -> tuple[KeyManager, EncryptionService]:
    kek = LocalKekProvider(master_key)
    manager = KeyManager(FileKeyStore(key_path, kek), kek, watch=False)
    return manager, EncryptionService(manager)


@pytest.mark.parametrize("where", ["write", "partial", "fsync", "replace"])
async def test_full_disk_during_rotation_keeps_the_key_file(
    where: str,
    key_path: Path,
    master_key: bytes,
    monkeypatch: pytest.MonkeyPatch,
    summary: Callable[..., None],
) -> None:
    """ENOSPC while a rotation writes the key file: KeyStoreError, file intact, keys intact."""
    manager, service = _open(key_path, master_key)
    tokens: dict[str, tuple[KeyType, str]] = {}
    async with service:
        for kt in (KeyType.PII, KeyType.FINANCIAL_DATA):
            for i in range(10):
                tokens[f"{kt.value}-v1-{i}"] = (
                    kt,
                    await service.encrypt_field(f"{kt.value}-v1-{i}", kt, context="rel.disk"),
                )
        await manager.rotate_key(KeyType.PII, force=True)
        for i in range(10):
            tokens[f"pii-v2-{i}"] = (
                KeyType.PII,
                await service.encrypt_field(f"pii-v2-{i}", KeyType.PII, context="rel.disk"),
            )
        active = (await manager.get_active_key(KeyType.PII)).key_id
        before = key_path.read_bytes()
        files_before = sorted(p.name for p in key_path.parent.iterdir())

        disk = FullDisk(monkeypatch, key_path.parent)
        disk.armed = where
        with pytest.raises(KeyStoreError) as info:
            await manager.rotate_key(KeyType.PII, force=True)
        disk.armed = None
        message = str(info.value)
        assert str(key_path) in message and "No space left on device" in message, message
        assert master_key.hex() not in message
        assert key_path.read_bytes() == before
        assert sorted(p.name for p in key_path.parent.iterdir()) == files_before
        assert (await manager.get_active_key(KeyType.PII)).key_id == active

    # a fresh process reads the file and decrypts everything
    manager2, service2 = _open(key_path, master_key)
    async with service2:
        assert (await manager2.get_active_key(KeyType.PII)).key_id == active
        for plaintext, (kt, token) in tokens.items():
            assert await service2.decrypt_field(token, kt, context="rel.disk") == plaintext
        # space is back: the rotation goes through and nothing older is lost
        v3 = await manager2.rotate_key(KeyType.PII, force=True)
        assert v3.version == 3
        versions = sorted(k.version for k in await manager2.list_keys(KeyType.PII))
        assert versions == [1, 2, 3]
        for plaintext, (kt, token) in tokens.items():
            assert await service2.decrypt_field(token, kt, context="rel.disk") == plaintext
    summary(
        fault=f"ENOSPC at {where}",
        faults_injected=disk.injected,
        error=type(info.value).__name__,
        tokens_checked=len(tokens),
        key_versions_after=len(versions),
        key_file_intact=True,
    )


async def test_full_disk_on_first_write_leaves_no_file(
    key_path: Path, master_key: bytes, monkeypatch: pytest.MonkeyPatch, summary: Callable[..., None]
) -> None:
    """ENOSPC on the very first write (store creation): KeyStoreError, no key file and no
    temporary file left behind; the next attempt creates the store normally."""
    disk = FullDisk(monkeypatch, key_path.parent)
    _, service = _open(key_path, master_key)
    disk.armed = "write"
    with pytest.raises(KeyStoreError):
        await service.encrypt_field("x", KeyType.PII)
    disk.armed = None
    assert not key_path.exists()
    assert not [p for p in key_path.parent.iterdir() if p.name.endswith(".tmp")]
    token = await service.encrypt_field("x", KeyType.PII)
    assert await service.decrypt_field(token, KeyType.PII) == "x"
    await service.close()
    summary(
        fault="ENOSPC at first write",
        faults_injected=disk.injected,
        error="KeyStoreError",
        recovered=True,
    )
