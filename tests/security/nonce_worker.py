"""A worker process of test_nonce_usage: encrypt in a loop, print one token per line.

Configured entirely through ENCRYPTION_* (the key store and a rotation policy with
a small ``max_encryptions``); argv: worker name, encryptions, go-file to wait for.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from aiocrypt import EncryptionConfig, EncryptionService, KeyType, build_key_manager


async def main(name: str, count: int, go_file: Path) -> None:
    config = EncryptionConfig.from_env()
    service = EncryptionService(build_key_manager(config), config)
    async with service:
        print("ready", flush=True)
        deadline = time.monotonic() + 60
        while not go_file.exists():  # start together, so the processes really race
            if time.monotonic() > deadline:
                raise SystemExit("no go signal")
            await asyncio.sleep(0.005)
        for i in range(count):
            token = await service.encrypt_field(f"{name}:{i}", KeyType.PII, context=name)
            print(token, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
