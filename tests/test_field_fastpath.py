"""The field hot path: pooled nonces, cached AADs, and the one-frame decrypt.

The fast paths must behave exactly as the general ones: same tokens (wire
format), same rejections, exact usage counts, and never a repeated nonce, not
across threads and not across a fork.
"""

from __future__ import annotations

import base64
import os
import threading
import warnings
from decimal import Decimal

import pytest

from aiocrypt import DecryptionError, EncryptionService, KeyType
from aiocrypt._codec import encode_value
from aiocrypt._crypto import FIELD_AAD_CACHE_SIZE, NONCE_BATCH, NONCE_BYTES, field_nonce
from aiocrypt._keyring import Keyring


def nonce_of(token: str) -> bytes:
    body = token.rsplit(".", 1)[1]
    return base64.urlsafe_b64decode(body)[2 : 2 + NONCE_BYTES]


async def started_keyring(service: EncryptionService, key_type: KeyType) -> Keyring:
    await service.key_manager.ensure_active([key_type])
    return service.keyring


async def test_nonces_never_repeat_across_pool_refills(service: EncryptionService) -> None:
    keyring = await started_keyring(service, KeyType.PII)
    tokens = [
        keyring.encrypt("same value", KeyType.PII, "users.ssn") for _ in range(3 * NONCE_BATCH + 7)
    ]
    nonces = {nonce_of(t) for t in tokens}
    assert len(nonces) == len(tokens)
    assert all(len(n) == NONCE_BYTES for n in nonces)
    assert {keyring.decrypt(t, KeyType.PII, "users.ssn") for t in tokens} == {"same value"}


async def test_nonces_never_repeat_across_threads(service: EncryptionService) -> None:
    keyring = await started_keyring(service, KeyType.PII)
    per_thread, threads = 2 * NONCE_BATCH, 8
    results: list[list[str]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def work(out: list[str]) -> None:
        start.wait()
        for _ in range(per_thread):
            out.append(keyring.encrypt("v", KeyType.PII, "t.c"))

    workers = [threading.Thread(target=work, args=(out,)) for out in results]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    tokens = [t for out in results for t in out]
    assert len(tokens) == per_thread * threads
    assert len({nonce_of(t) for t in tokens}) == len(tokens)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork only")
def test_forked_child_does_not_reuse_the_parents_pooled_nonces() -> None:
    field_nonce()  # the pool now holds NONCE_BATCH - 1 nonces the parent will use next
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns when other threads exist; the child
        warnings.simplefilter("ignore", DeprecationWarning)  # only runs field_nonce()
        pid = os.fork()
    if pid == 0:  # child: report the nonces it gets, then leave without cleanup
        try:
            os.close(read_fd)
            os.write(write_fd, b"".join(field_nonce() for _ in range(NONCE_BATCH)))
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        child = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(child) == NONCE_BATCH * NONCE_BYTES
    child_nonces = {child[i : i + NONCE_BYTES] for i in range(0, len(child), NONCE_BYTES)}
    parent_nonces = {field_nonce() for _ in range(NONCE_BATCH)}
    assert len(child_nonces) == len(parent_nonces) == NONCE_BATCH
    assert not child_nonces & parent_nonces


async def test_usage_is_counted_exactly_on_every_path(service: EncryptionService) -> None:
    keyring = await started_keyring(service, KeyType.PII)
    dk = keyring.active(KeyType.PII)
    before = dk.encryptions
    for value in ("text", b"raw", 7, Decimal("1.5"), None, {"a": [1, 2]}):
        keyring.encrypt(value, KeyType.PII, "t.c")
    keyring.encrypt_bytes(b"\x01abc", KeyType.PII, b"t.c")
    await service.encrypt_field("async", KeyType.PII, context="t.c")
    await service.encrypt_field(12.5, KeyType.PII, context="t.c")
    await service.encrypt_many(["a", "b", 3], KeyType.PII, context="t.c")
    assert service.keyring.active(KeyType.PII) is dk
    assert dk.encryptions - before == 6 + 1 + 2 + 3


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x" * 64,
        "é€😀",
        "x" * 70_000,
        b"\x00\xff",
        0,
        -1,
        2**70,
        1.5,
        Decimal("-0.001"),
        True,
        False,
        None,
        ["a", 1, None],
        {"k": {"n": [1.5]}},
    ],
)
async def test_fast_and_general_paths_agree(service: EncryptionService, value: object) -> None:
    keyring = await started_keyring(service, KeyType.PII)
    token = keyring.encrypt(value, KeyType.PII, "users.note")
    assert token == token.strip() and token.startswith("ac2.")
    decoded = keyring.decrypt(token, KeyType.PII, "users.note")
    assert decoded == value and type(decoded) is type(value)
    assert keyring.decrypt_bytes(token, KeyType.PII, "users.note") == encode_value(value)
    for context in ("users.note2", "", None, b"users.note2"):
        with pytest.raises(DecryptionError):
            keyring.decrypt(token, KeyType.PII, context)
    with pytest.raises(DecryptionError):
        keyring.decrypt(token, KeyType.FINANCIAL_DATA, "users.note")


async def test_bytes_str_and_none_contexts_bind_the_same_bytes(service: EncryptionService) -> None:
    keyring = await started_keyring(service, KeyType.PII)
    token = keyring.encrypt("v", KeyType.PII, "users.ssn")
    assert keyring.decrypt(token, KeyType.PII, b"users.ssn") == "v"
    # a bytearray context binds too, though the signature says str | bytes
    assert keyring.decrypt(token, KeyType.PII, bytearray(b"users.ssn")) == "v"  # type: ignore[arg-type]
    token = keyring.encrypt("v", KeyType.PII, None)
    assert keyring.decrypt(token, KeyType.PII, "") == "v"
    assert keyring.decrypt(token, KeyType.PII, b"") == "v"
    with pytest.raises(TypeError):
        keyring.encrypt("v", KeyType.PII, 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        keyring.encrypt("v", KeyType.PII, "c" * 5000)  # contexts are at most 4096 bytes


async def test_context_aad_cache_stays_bounded_and_correct(service: EncryptionService) -> None:
    keyring = await started_keyring(service, KeyType.PII)
    dk = keyring.active(KeyType.PII)
    contexts = [f"users.ssn:{row}" for row in range(FIELD_AAD_CACHE_SIZE * 2 + 3)]
    tokens = [keyring.encrypt(c, KeyType.PII, c) for c in contexts]
    assert len(dk.field_aads) <= FIELD_AAD_CACHE_SIZE
    for context, token in zip(contexts, tokens, strict=True):
        assert keyring.decrypt(token, KeyType.PII, context) == context
    with pytest.raises(DecryptionError):
        keyring.decrypt(tokens[0], KeyType.PII, contexts[1])


def non_canonical_variants(token: str) -> list[str]:
    prefix, body = token.rsplit(".", 1)
    raw = base64.urlsafe_b64decode(body)
    standard = base64.b64encode(raw).decode()
    variants = [
        f"{prefix}.{body}=",  # padding after padding or after a full quad
        f"{prefix}.{body}====",
        f"{prefix}.{body.rstrip('=')}",  # unpadded
        f"{prefix}.{body} ",
        f"{prefix}. {body}",
        f"{prefix}.{body}\n",
    ]
    if standard != body:  # "+" or "/" where base64url has "-" or "_"
        variants.append(f"{prefix}.{standard}")
    tail = len(raw) % 3
    if tail:  # the last significant character with its unused low bits set
        i = len(body) - 4 + tail
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        bumped = alphabet[alphabet.index(body[i]) + 1]
        variants.append(f"{prefix}.{body[:i]}{bumped}{body[i + 1 :]}")
    return [v for v in variants if v != token]


@pytest.mark.parametrize("value", ["x", "xy", "xyz", "x" * 64])
async def test_non_canonical_base64_is_rejected_by_the_sync_core(
    service: EncryptionService, value: str
) -> None:
    keyring = await started_keyring(service, KeyType.PII)
    for _ in range(20):  # random nonces: some bodies have "-" / "_", some do not
        token = keyring.encrypt(value, KeyType.PII, "t.c")
        variants = non_canonical_variants(token)
        assert variants
        for bad in variants:
            with pytest.raises(DecryptionError):
                keyring.decrypt(bad, KeyType.PII, "t.c")
            with pytest.raises(DecryptionError):
                keyring.decrypt_bytes(bad, KeyType.PII, "t.c")
        assert keyring.decrypt(token, KeyType.PII, "t.c") == value


async def test_compressed_and_deterministic_tokens_take_the_general_path(
    service: EncryptionService,
) -> None:
    keyring = await started_keyring(service, KeyType.PII)
    text = "note " * 50
    zipped = keyring.encrypt(text, KeyType.PII, "t.c", compression_level=3)
    assert keyring.decrypt(zipped, KeyType.PII, "t.c") == text
    fixed = keyring.encrypt_deterministic(text, KeyType.PII, "t.c")
    assert fixed == keyring.encrypt_deterministic(text, KeyType.PII, "t.c")
    assert keyring.decrypt(fixed, KeyType.PII, "t.c") == text
    with pytest.raises(DecryptionError):
        keyring.decrypt(fixed, KeyType.PII, "t.d")


async def test_encrypt_many_and_decrypt_many_round_trip(service: EncryptionService) -> None:
    values = ["a", "é" * 10, 5, None, {"x": [1]}] * 30
    contexts = [f"t.c:{i}" for i in range(len(values))]
    tokens = await service.encrypt_many(values, KeyType.PII, contexts=contexts)
    assert len({nonce_of(t) for t in tokens}) == len(tokens)
    assert await service.decrypt_many(tokens, KeyType.PII, contexts=contexts) == values
    with pytest.raises(DecryptionError):
        await service.decrypt_many(tokens, KeyType.PII, contexts=contexts[::-1])
