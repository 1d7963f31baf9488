"""Writes keys.json and meta.json with aiocrypt 0.1.0 (commit e543e0e), once.

Run from a checkout of that commit:
    git worktree add /tmp/oldmain e543e0e
    cd /tmp/oldmain && python /path/to/tests/vectors/legacy_store/generate.py OUTDIR
The files are frozen: they are what a store written before keyset seals looks like.
The master key is a test vector (it protects nothing but these files).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from aiocrypt import EncryptionService, KeyManager, KeyType
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore


async def main(out: Path) -> None:
    master = os.urandom(32)
    kek = LocalKekProvider(master)
    path = out / "keys.json"
    manager = KeyManager(FileKeyStore(path, kek), kek, watch=False)
    service = EncryptionService(manager)
    tokens = []
    async with service:
        for kt, value in ((KeyType.PII, "123-45-6789"), (KeyType.FINANCIAL_DATA, 75000.5)):
            tokens.append(
                {
                    "key_type": kt.value,
                    "context": "users.x",
                    "value": value,
                    "token": await service.encrypt_field(value, kt, context="users.x"),
                }
            )
        old = await manager.get_active_key(KeyType.PII)
        await manager.rotate_key(KeyType.PII, force=True)
        tokens.append(
            {
                "key_type": "pii",
                "context": "users.y",
                "value": 42,
                "token": await service.encrypt_field(42, KeyType.PII, context="users.y"),
            }
        )
        fin = await manager.get_active_key(KeyType.FINANCIAL_DATA)
        await manager.mark_compromised(fin.key_id, "test vector")
        session = await manager.get_active_key(KeyType.SESSION)
        await manager.revoke_key(session.key_id, "test vector")
        statuses = {k.key_id: k.status.value for k in await manager.list_keys()}
        assert statuses[old.key_id] == "decrypt_only"
    (out / "meta.json").write_text(
        json.dumps(
            {
                "written_by": "aiocrypt 0.1.0 (e543e0e)",
                "master_key_hex": master.hex(),
                "statuses": statuses,
                "tokens": tokens,
            },
            indent=1,
            sort_keys=True,
        )
        + "\n"
    )


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
