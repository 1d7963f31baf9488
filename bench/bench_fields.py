"""Field encrypt+decrypt round trips and batches, aiocrypt beside its peers, in one run.

    python bench/bench_fields.py [--quick]       (run_all.py calls run())

Round trip of a 64-byte and a 1 KiB string with a context ("users.ssn") where
the implementation takes one. Implementations run in turn, round after round;
each is reported as microseconds per round trip and as the median of its
per-round ratios to raw AESGCM + base64 (the floor: what aiocrypt does, minus
format, codec, key lookup and coroutine), so load on the machine cancels.

Batch: ``encrypt_many`` / ``decrypt_many`` of 10,000 64-byte strings against a
loop of raw AESGCM + base64 over the same values, per value.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
from collections.abc import Callable
from typing import Any

from _common import Loop, interleaved
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aiocrypt import KeyType
from aiocrypt.testing import make_service

CONTEXT = "users.ssn"
SIZES = {"64 B": 64, "1 KiB": 1024}
BATCH = 10_000
BASELINE = "raw AESGCM + base64"


def _value(size: int) -> str:
    return base64.urlsafe_b64encode(os.urandom(size))[:size].decode("ascii")


def raw_aesgcm(value: str) -> Loop:
    aead = AESGCM(AESGCM.generate_key(256))
    aad = CONTEXT.encode()

    def loop(n: int) -> None:
        for _ in range(n):
            nonce = os.urandom(12)
            token = base64.urlsafe_b64encode(nonce + aead.encrypt(nonce, value.encode(), aad))
            raw = base64.urlsafe_b64decode(token)
            aead.decrypt(raw[:12], raw[12:], aad).decode()

    return loop


def aiocrypt_sync(service: Any, event_loop: asyncio.AbstractEventLoop, value: str) -> Loop:
    """The keyring's sync API, as a sync engine uses it: between its hot loops, the next
    usage block is reserved (what the greenlet hooks do; about once per 32k encryptions)."""
    manager = service.key_manager

    def loop(n: int) -> None:
        keyring = service.keyring
        dk = keyring.active(KeyType.PII)
        done = 0
        while done < n:
            if dk.encryptions >= dk.refill_at:
                event_loop.run_until_complete(manager.reserve_usage(KeyType.PII, ahead=True))
                keyring = service.keyring
                dk = keyring.active(KeyType.PII)
            step = min(n - done, max(1, dk.refill_at - dk.encryptions))
            for _ in range(step):
                keyring.decrypt(keyring.encrypt(value, KeyType.PII, CONTEXT), KeyType.PII, CONTEXT)
            done += step

    return loop


def aiocrypt_async(service: Any, event_loop: asyncio.AbstractEventLoop, value: str) -> Loop:
    async def run(n: int) -> None:
        for _ in range(n):
            token = await service.encrypt_field(value, KeyType.PII, context=CONTEXT)
            await service.decrypt_field(token, KeyType.PII, context=CONTEXT)

    def loop(n: int) -> None:
        event_loop.run_until_complete(run(n))

    return loop


def aiocrypt_subject(service: Any, event_loop: asyncio.AbstractEventLoop, value: str) -> Loop:
    """:func:`aiocrypt_async` with ``subject=``: the subject's own key, known and cached
    (docs/subjects.md); the plain case beside it in the same rounds is the comparison."""

    async def run(n: int) -> None:
        for _ in range(n):
            token = await service.encrypt_field(
                value, KeyType.PII, context=CONTEXT, subject="user:42"
            )
            await service.decrypt_field(token, KeyType.PII, context=CONTEXT)

    def loop(n: int) -> None:
        event_loop.run_until_complete(run(n))

    return loop


def tink_aead(value: str) -> Loop | None:
    try:
        import tink
        from tink import aead
    except ImportError:
        return None
    aead.register()
    primitive = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM).primitive(aead.Aead)
    aad = CONTEXT.encode()

    def loop(n: int) -> None:
        for _ in range(n):
            token = base64.urlsafe_b64encode(primitive.encrypt(value.encode(), aad))
            primitive.decrypt(base64.urlsafe_b64decode(token), aad).decode()

    return loop


def fernet(value: str) -> Loop:
    f = Fernet(Fernet.generate_key())

    def loop(n: int) -> None:
        for _ in range(n):
            f.decrypt(f.encrypt(value.encode())).decode()

    return loop


def sqlalchemy_utils_gcm(value: str) -> Loop | None:
    try:
        from sqlalchemy_utils.types.encrypted.encrypted_type import AesGcmEngine
    except ImportError:
        return None
    engine = AesGcmEngine()
    engine._update_key(base64.b64encode(os.urandom(32)).decode())

    def loop(n: int) -> None:
        for _ in range(n):
            engine.decrypt(engine.encrypt(value))

    return loop


def sealed_fields(value: str) -> Loop | None:
    try:
        from sealed_fields import SealedFields, generate_key
    except ImportError:
        return None
    sealer = SealedFields({"users": {"key": generate_key()}})

    def loop(n: int) -> None:
        for _ in range(n):
            sealer.unseal(sealer.seal(value, "users"), "users")

    return loop


def aws_encryption_sdk(value: str, *, caching: bool) -> Loop | None:
    """The AWS Encryption SDK with a raw AES wrapping key (no KMS), optionally cached.

    The algorithm suite is the SDK's fastest committing one without a signature
    (AES_256_GCM_HKDF_SHA512_COMMIT_KEY); its default adds an ECDSA P-384
    signature per message and is slower still.
    """
    try:
        import aws_encryption_sdk as sdk
        from aws_encryption_sdk.caches.local import LocalCryptoMaterialsCache
        from aws_encryption_sdk.identifiers import (
            Algorithm,
            CommitmentPolicy,
            EncryptionKeyType,
            WrappingAlgorithm,
        )
        from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
        from aws_encryption_sdk.key_providers.raw import RawMasterKey
        from aws_encryption_sdk.materials_managers.caching import CachingCryptoMaterialsManager
    except ImportError:
        return None
    key = RawMasterKey(
        provider_id="bench",
        key_id=b"bench-key",
        wrapping_key=WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=os.urandom(32),
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        ),
    )
    client = sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    where: dict[str, Any] = {"key_provider": key}
    if caching:
        where = {
            "materials_manager": CachingCryptoMaterialsManager(
                master_key_provider=key,
                cache=LocalCryptoMaterialsCache(capacity=100),
                max_age=600.0,
                max_messages_encrypted=2**31,
            )
        }
    context = {"aad": CONTEXT}

    def loop(n: int) -> None:
        for _ in range(n):
            sealed, _ = client.encrypt(
                source=value.encode(),
                encryption_context=context,
                algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
                **where,
            )
            client.decrypt(source=sealed, **where)[0].decode()

    return loop


PEERS: list[tuple[str, Callable[[str], Loop | None]]] = [
    ("Tink AEAD + base64", tink_aead),
    ("Fernet", fernet),
    ("sqlalchemy-utils AesGcmEngine", sqlalchemy_utils_gcm),
    ("sealed-fields", sealed_fields),
    ("aws-encryption-sdk, raw AES key", lambda v: aws_encryption_sdk(v, caching=False)),
    ("aws-encryption-sdk, caching CMM", lambda v: aws_encryption_sdk(v, caching=True)),
]
ASYNC = "aiocrypt EncryptionService (async)"
SYNC = "aiocrypt Keyring (sync core)"
SUBJECT = "aiocrypt EncryptionService, subject key (async)"


def run_fields(
    service: Any, event_loop: asyncio.AbstractEventLoop, *, rounds: int, seconds: float
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for label, size in SIZES.items():
        value = _value(size)
        cases: dict[str, Loop] = {
            BASELINE: raw_aesgcm(value),
            ASYNC: aiocrypt_async(service, event_loop, value),
            SUBJECT: aiocrypt_subject(service, event_loop, value),
            SYNC: aiocrypt_sync(service, event_loop, value),
        }
        for name, make in PEERS:
            loop = make(value)
            if loop is not None:
                cases[name] = loop
        # loop before check: the aiocrypt cases must round-trip the value
        token = service.keyring.encrypt(value, KeyType.PII, CONTEXT)
        assert service.keyring.decrypt(token, KeyType.PII, CONTEXT) == value
        token = event_loop.run_until_complete(
            service.encrypt_field(value, KeyType.PII, context=CONTEXT, subject="user:42")
        )
        assert token.startswith("ac2.S-")
        results[label] = interleaved(cases, BASELINE, rounds, seconds)
        print(
            f"fields {label}: "
            + ", ".join(f"{name} {r['ratio']:.2f}x" for name, r in results[label].items()),
            flush=True,
        )
        print(
            f"fields {label}: subject key / plain {subject_vs_plain(results[label]):.2f}x",
            flush=True,
        )
    return results


def subject_vs_plain(cases: dict[str, dict[str, float]]) -> float:
    """A field round trip with a subject key over a plain one, from the same rounds."""
    return cases[SUBJECT]["ratio"] / cases[ASYNC]["ratio"]


def run_batch(
    service: Any, event_loop: asyncio.AbstractEventLoop, *, rounds: int, batch: int
) -> dict[str, Any]:
    values = [_value(64) for _ in range(batch)]
    aead = AESGCM(AESGCM.generate_key(256))
    aad = CONTEXT.encode()
    raw_tokens = [
        base64.urlsafe_b64encode(n + aead.encrypt(n, v.encode(), aad))
        for v in values
        for n in [os.urandom(12)]
    ]
    tokens = event_loop.run_until_complete(
        service.encrypt_many(values, KeyType.PII, context=CONTEXT)
    )
    assert (
        event_loop.run_until_complete(service.decrypt_many(tokens, KeyType.PII, context=CONTEXT))
        == values
    )

    def raw_encrypt(n: int) -> None:
        for _ in range(n):
            for v in values:
                nonce = os.urandom(12)
                base64.urlsafe_b64encode(nonce + aead.encrypt(nonce, v.encode(), aad))

    def raw_decrypt(n: int) -> None:
        for _ in range(n):
            for t in raw_tokens:
                raw = base64.urlsafe_b64decode(t)
                aead.decrypt(raw[:12], raw[12:], aad).decode()

    def many_encrypt(n: int) -> None:
        for _ in range(n):
            event_loop.run_until_complete(
                service.encrypt_many(values, KeyType.PII, context=CONTEXT)
            )

    def many_decrypt(n: int) -> None:
        for _ in range(n):
            event_loop.run_until_complete(
                service.decrypt_many(tokens, KeyType.PII, context=CONTEXT)
            )

    results = {}
    for op, raw, ours in (
        ("encrypt", raw_encrypt, many_encrypt),
        ("decrypt", raw_decrypt, many_decrypt),
    ):
        timed = interleaved({"raw": raw, "aiocrypt": ours}, "raw", rounds, 0.05)
        results[op] = {
            "raw_us": timed["raw"]["us"] / batch,
            "aiocrypt_us": timed["aiocrypt"]["us"] / batch,
            "ratio": timed["aiocrypt"]["ratio"],
        }
        print(f"batch {op}_many: {results[op]['ratio']:.2f}x raw per value", flush=True)
    return {"batch": batch, **results}


def run(*, quick: bool = False, only: set[str] | None = None) -> dict[str, Any]:
    """Results of the ``fields`` and ``batch`` sections (those in ``only``, if given)."""
    event_loop = asyncio.new_event_loop()
    service = make_service()
    event_loop.run_until_complete(service.start())
    event_loop.run_until_complete(service.key_manager.ensure_active([KeyType.PII]))
    results: dict[str, Any] = {}
    try:
        if only is None or "fields" in only:
            results["fields"] = run_fields(
                service, event_loop, rounds=5 if quick else 21, seconds=0.01 if quick else 0.04
            )
        if only is None or "batch" in only:
            results["batch"] = run_batch(
                service, event_loop, rounds=3 if quick else 15, batch=2_000 if quick else BATCH
            )
    finally:
        event_loop.run_until_complete(service.close())
        event_loop.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--subject-only",
        action="store_true",
        help="only the plain and subject-key async round trips (a short check)",
    )
    args = parser.parse_args()
    if args.subject_only:
        global PEERS
        PEERS = []
    results = run(quick=args.quick, only={"fields"} if args.subject_only else None)
    for label, cases in results["fields"].items():
        print(f"\n{label}\n| implementation | us per round trip | ratio to {BASELINE} |")
        print("|---|---:|---:|")
        for name, r in cases.items():
            print(f"| {name} | {r['us']:.2f} | {r['ratio']:.2f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
