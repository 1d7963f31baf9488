"""A re-encryption worker process for the SIGKILL test (not a test module).

Reads everything from the environment: the master key (never argv, which other
users of the machine can see), the key file, the DSN and the table spec.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os

from aiocrypt import AsyncpgDatabase, KeyManager, ReencryptionEngine, TableSpec
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore


async def main() -> None:
    env = os.environ
    kek = LocalKekProvider(base64.b64decode(env["AIOCRYPT_TEST_MASTER_KEY"]))
    manager = KeyManager(FileKeyStore(env["AIOCRYPT_TEST_KEY_PATH"], kek), kek)
    await manager.open()
    spec = TableSpec.from_dict(json.loads(env["AIOCRYPT_TEST_SPEC"]))
    database = AsyncpgDatabase(
        env["AIOCRYPT_TEST_DSN"], checkpoint_table=env["AIOCRYPT_TEST_CHECKPOINTS"]
    )
    engine = ReencryptionEngine(
        manager,
        database,
        tables=[spec],
        batch_size=int(env["AIOCRYPT_TEST_BATCH"]),
        rate_limit=float(env["AIOCRYPT_TEST_RATE"]),
    )
    print("started", flush=True)
    await engine.reencrypt(spec.name)
    print("finished", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
