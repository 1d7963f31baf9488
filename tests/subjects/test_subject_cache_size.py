"""The subject-key cache size is set from the ``KeyManager`` constructor (docs/subjects.md)."""

from __future__ import annotations

import os

import pytest

from aiocrypt import EncryptionService, KeyManager, KeyType
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import MemoryKeyStore

PII = KeyType.PII


async def test_the_subject_cache_keeps_as_many_keys_as_the_manager_is_told() -> None:
    manager = KeyManager(
        MemoryKeyStore(), LocalKekProvider(os.urandom(32)), watch=False, subject_cache_size=2
    )
    svc = EncryptionService(manager)
    await svc.start()
    try:
        tokens = [await svc.encrypt_field(i, PII, subject=f"user:{i}") for i in range(3)]
        subjects = manager.subjects
        assert subjects.cached(PII, "user:0") is None  # the least recently used went
        assert subjects.cached(PII, "user:1") is not None
        assert subjects.cached(PII, "user:2") is not None
        assert [await svc.decrypt_field(t, PII) for t in tokens] == [0, 1, 2]  # read again
        assert sum(subjects.cached_ring(t.split(".")[1]) is not None for t in tokens) == 2
    finally:
        await svc.close()


def test_a_subject_cache_holds_at_least_one_key() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        KeyManager(
            MemoryKeyStore(), LocalKekProvider(os.urandom(32)), watch=False, subject_cache_size=0
        )
