"""The smallest complete use of aiocrypt: explicit construction, no environment needed.

python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from aiocrypt import EncryptionService, KeyManager, KeyType
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        kek = LocalKekProvider(os.urandom(32))  # in production: ENCRYPTION_MASTER_KEY
        manager = KeyManager(FileKeyStore(Path(tmp) / "keys.json", kek), kek)
        async with EncryptionService(manager) as service:
            token = await service.encrypt_field("123-45-6789", KeyType.PII, context="users.ssn")
            print("stored:", token)
            print("read:  ", await service.decrypt_field(token, KeyType.PII, context="users.ssn"))
            blob = await service.encrypt_bulk_data(b"quarterly export" * 1000, KeyType.AUDIT_LOGS)
            print("bulk:  ", blob.algorithm, len(blob.to_bytes()), "bytes")
            enc_key, enc_value = await service.encrypt_cache_data("report:42", {"total": 9}, 60)
            print("cache: ", await service.decrypt_cache_data(enc_key, enc_value))


if __name__ == "__main__":
    asyncio.run(main())
