"""Field encrypt+decrypt round trip, aiocrypt beside its peers, in one run.

    python bench/bench_fields.py            (or: .venv/bin/python bench/bench_fields.py)

A 64-byte string with a context ("users.ssn") per round trip. Peers:
raw AESGCM + base64 (the floor: what aiocrypt does, minus format, codec, key
lookup and coroutine), Fernet (AES-CBC + HMAC, no context), and Tink's AEAD
(AES-256-GCM, + base64 for a text token). Reported as microseconds per round
trip and as a ratio to raw AESGCM + base64 measured in the same run.
"""

from __future__ import annotations

import asyncio
import base64
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aiocrypt import KeyType
from aiocrypt.testing import make_service

N = 20_000
REPEATS = 7
VALUE = "x" * 64
CONTEXT = "users.ssn"


def timed(loop: Callable[[int], None]) -> float:
    """Median microseconds per iteration over REPEATS runs of N iterations."""
    loop(1000)  # warm up
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        loop(N)
        samples.append((time.perf_counter() - start) / N * 1e6)
    return statistics.median(samples)


def raw_aesgcm() -> Callable[[int], None]:
    aead = AESGCM(AESGCM.generate_key(256))
    aad = CONTEXT.encode()
    plaintext = VALUE.encode()

    def loop(n: int) -> None:
        for _ in range(n):
            nonce = os.urandom(12)
            token = base64.urlsafe_b64encode(nonce + aead.encrypt(nonce, plaintext, aad))
            raw = base64.urlsafe_b64decode(token)
            aead.decrypt(raw[:12], raw[12:], aad)

    return loop


def fernet() -> Callable[[int], None]:
    f = Fernet(Fernet.generate_key())
    plaintext = VALUE.encode()

    def loop(n: int) -> None:
        for _ in range(n):
            f.decrypt(f.encrypt(plaintext))

    return loop


def tink_aead() -> Callable[[int], None] | None:
    try:
        import tink
        from tink import aead
    except ImportError:
        return None
    aead.register()
    primitive = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead)
    aad = CONTEXT.encode()
    plaintext = VALUE.encode()

    def loop(n: int) -> None:
        for _ in range(n):
            token = base64.urlsafe_b64encode(primitive.encrypt(plaintext, aad))
            primitive.decrypt(base64.urlsafe_b64decode(token), aad)

    return loop


def aiocrypt_sync(keyring) -> Callable[[int], None]:  # type: ignore[no-untyped-def]
    def loop(n: int) -> None:
        for _ in range(n):
            keyring.decrypt(keyring.encrypt(VALUE, KeyType.PII, CONTEXT), KeyType.PII, CONTEXT)

    return loop


def aiocrypt_async(service, loop_: asyncio.AbstractEventLoop) -> Callable[[int], None]:  # type: ignore[no-untyped-def]
    async def run(n: int) -> None:
        for _ in range(n):
            token = await service.encrypt_field(VALUE, KeyType.PII, context=CONTEXT)
            await service.decrypt_field(token, KeyType.PII, context=CONTEXT)

    def loop(n: int) -> None:
        loop_.run_until_complete(run(n))

    return loop


def main() -> None:
    event_loop = asyncio.new_event_loop()
    service = make_service()
    event_loop.run_until_complete(service.start())
    event_loop.run_until_complete(service.key_manager.ensure_active([KeyType.PII]))
    cases: list[tuple[str, Callable[[int], None] | None]] = [
        ("raw AESGCM + base64", raw_aesgcm()),
        ("aiocrypt EncryptionService (async)", aiocrypt_async(service, event_loop)),
        ("aiocrypt Keyring (sync core)", aiocrypt_sync(service.keyring)),
        ("Fernet", fernet()),
        ("Tink AEAD + base64", tink_aead()),
    ]
    results = {name: timed(loop) for name, loop in cases if loop is not None}
    event_loop.run_until_complete(service.close())
    event_loop.close()
    base = results["raw AESGCM + base64"]
    print(f"# field round trip: 64-byte str, context, N={N} x {REPEATS} (median)")
    print(f"# {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} cores")
    print("| implementation | us per round trip | ratio to raw AESGCM + base64 |")
    print("|---|---:|---:|")
    for name, micros in results.items():
        print(f"| {name} | {micros:.2f} | {micros / base:.2f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
