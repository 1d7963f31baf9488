"""No key material in reprs, DEBUG logs or exception messages."""

from __future__ import annotations

import base64
import logging
import pickle
from pathlib import Path

import pytest

from aiocrypt import (
    CryptoConfigManager,
    DecryptionError,
    EncryptionConfig,
    EncryptionService,
    KeyManager,
    KeyType,
)
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore


def encodings(secret: bytes) -> list[str]:
    forms = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
             base64.urlsafe_b64encode(secret).decode(), base64.b64encode(secret).decode()[:20],
             repr(secret)[2:-1], str(list(secret))[1:-1]]
    return [f for f in forms if len(f) >= 16]


def assert_clean(text: str, secrets: list[bytes]) -> None:
    for secret in secrets:
        for form in encodings(secret):
            assert form not in text, "secret material found in output"


async def test_no_secret_in_reprs_logs_or_errors(key_path: Path, master_key: bytes,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    master_b64 = base64.b64encode(master_key).decode()
    config = EncryptionConfig(master_key=master_b64, storage_path=str(key_path),
                              redis_url="redis://:hunter2hunter2hunter2@127.0.0.1/0")
    kek = LocalKekProvider(master_key)
    store = FileKeyStore(key_path, kek)
    manager = KeyManager(store, kek, config)
    service = EncryptionService(manager)
    texts: list[str] = []
    async with service:
        tokens = [await service.encrypt_field("123-45-6789", kt, context="users.ssn")
                  for kt in KeyType.builtin()]
        await manager.rotate_key(KeyType.PII, force=True)
        revoked = await manager.revoke_key((await manager.get_active_key("api_keys")).key_id)
        deks = [dk._material for dk in service.keyring]
        assert len(deks) == 7
        for obj in [service, manager, store, kek, config, CryptoConfigManager(config),
                    service.keyring, *service.keyring, revoked,
                    *(await manager.list_keys()),
                    await service.encrypt_bulk_data(b"x" * 100)]:
            texts.append(repr(obj))
            texts.append(str(obj))
        texts.append(str(await manager.get_key_statistics()))
        texts.append(str(await service.get_encryption_stats()))
        for bad in (tokens[0][:-3], tokens[1].replace("ac1.", "ac2.")):
            with pytest.raises(DecryptionError) as info:
                await service.decrypt_field(bad, KeyType.PII)
            texts.append(str(info.value) + repr(info.value))
        with pytest.raises(Exception) as wrong:
            async with EncryptionService(KeyManager(
                    FileKeyStore(key_path, LocalKekProvider(bytes(32))),
                    LocalKekProvider(bytes(32)))) as other:
                await other.encrypt_field(1)
        texts.append(str(wrong.value))
        for dk in service.keyring:
            with pytest.raises(TypeError):
                pickle.dumps(dk)
    texts.extend(record.getMessage() for record in caplog.records)
    texts.append(caplog.text)
    joined = "\n".join(texts)
    assert "hunter2hunter2" not in joined
    assert master_b64 not in joined
    assert_clean(joined, [master_key, *deks])
    # the key file holds only wrapped material
    assert_clean(key_path.read_text(), [master_key, *deks])
    assert any("key generated" in r.getMessage() for r in caplog.records)
