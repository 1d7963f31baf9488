"""Bulk encryption throughput and event-loop lag, against a one-shot AESGCM call.

    python bench/bench_bulk.py [size_mib ...]      (default: 64 256)

For each size: aiocrypt's encrypt_bulk_data + decrypt_bulk_data (segmented, in a
worker thread) and a one-shot AESGCM encrypt + decrypt run inline in the
coroutine, while a ticker task measures the longest gap between its 1 ms
sleeps (the loop lag other requests would feel).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aiocrypt.testing import make_service


async def measure(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(seconds, worst loop lag); what ``work`` returns is freed after the clock stops."""
    worst = 0.0
    stop = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    result = await work()
    elapsed = time.perf_counter() - start
    stop = True
    await task
    del result  # unmapping hundreds of MiB holds the GIL too: keep it out of the figure
    return elapsed, worst


async def main(sizes: list[int]) -> None:
    service = make_service()
    await service.start()
    aead = AESGCM(AESGCM.generate_key(256))
    print("| size | implementation | GB/s (encrypt+decrypt) | worst loop lag |")
    print("|---:|---|---:|---:|")
    for mib in sizes:
        data = os.urandom(mib * 1024 * 1024)

        async def ours(data: bytes = data) -> object:
            encrypted = await service.encrypt_bulk_data(data)
            plaintext = await service.decrypt_bulk_data(encrypted)
            assert len(plaintext) == len(data)
            return encrypted, plaintext

        async def one_shot(data: bytes = data) -> object:
            nonce = os.urandom(12)
            sealed = aead.encrypt(nonce, data, None)
            plaintext = aead.decrypt(nonce, sealed, None)
            assert len(plaintext) == len(data)
            return sealed, plaintext

        for name, work in (("aiocrypt encrypt_bulk_data (segmented, thread)", ours),
                           ("one-shot AESGCM inline", one_shot)):
            await measure(work)  # warm-up run: first-touch costs of the allocator
            elapsed, lag = await measure(work)
            rate = 2 * len(data) / elapsed / 1e9
            print(f"| {mib} MiB | {name} | {rate:.2f} | {lag * 1000:.1f} ms |")
    await service.close()


if __name__ == "__main__":
    asyncio.run(main([int(a) for a in sys.argv[1:]] or [64, 256]))
