"""Hostile tokens: random and mutated input to every decryption entry point.

The promise (docs/format.md "Errors", aiocrypt/_errors.py): every failure to
decrypt a ``str`` token or a binary blob raises the one opaque
``DecryptionError``; nothing else escapes, nothing hangs, and no mutation of a
valid token decrypts. Entry points: ``EncryptionService.decrypt_field``,
``decrypt_many``, ``decrypt_session_data``, ``decrypt_cache_data``,
``decrypt_bulk_data``, ``decrypt_stream``, ``EncryptedData.from_bytes``, the sync
``Keyring.decrypt`` and the SQLAlchemy column types' ``process_result_value``;
blind-index digests of arbitrary values.

Run: .venv/bin/python -m pytest tests/security/test_fuzz_tokens.py -q -s
(``-s`` prints the figures: examples run and inputs checked per entry point).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import struct
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql

from aiocrypt import DecryptionError, EncryptedData, EncryptionService, KeyType
from aiocrypt._bulk import encrypt_bulk
from aiocrypt._format import MAX_TOKEN_CHARS, context_bytes
from aiocrypt.integrations.sqlalchemy import (
    BlindIndex,
    EncryptedDate,
    EncryptedInteger,
    EncryptedJSON,
    EncryptedString,
    normalize_digits,
    normalize_email,
    normalize_text,
)
from aiocrypt.testing import make_service

from ._helpers import LoopRunner

HANG_LIMIT = 30.0  # seconds one call may take before it counts as a hang
FIELD_CTX = "users.ssn"
SESSION_CTX = "session:abc"
BLOB_CTX = "files.blob"
DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]  # SQLAlchemy leaves it untyped
COUNTS: Counter[str] = Counter()


class Target:
    """What the fuzz tests attack (a plain class: no tokens in Hypothesis' failure reports)."""

    def __init__(self, runner: LoopRunner, service: EncryptionService) -> None:
        self.runner = runner
        self.service = service
        self.tokens: list[tuple[str, KeyType, str]] = []
        self.key_ids: list[str] = []
        self.cache_pair: tuple[str, str] = ("", "")
        self.blob = b""
        self.stream_blob = b""

    def __repr__(self) -> str:
        return "<Target>"

    def run(self, coro: Any) -> Any:
        return self.runner.run(asyncio.wait_for(coro, HANG_LIMIT))


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    runner = LoopRunner()
    service = make_service(
        preload=[KeyType.PII, KeyType.SESSION, KeyType.CACHE, KeyType.FINANCIAL_DATA]
    )
    t = Target(runner, service)

    async def setup() -> None:
        await service.start()
        await service.encrypt_field("old", KeyType.PII)
        await service.key_manager.rotate_key(KeyType.PII, force=True)  # two PII key ids
        t.tokens = [
            (
                await service.encrypt_field("123-45-6789", KeyType.PII, context=FIELD_CTX),
                KeyType.PII,
                FIELD_CTX,
            ),
            (
                await service.encrypt_field(
                    {"uid": 7, "role": "admin"}, KeyType.SESSION, context=SESSION_CTX
                ),
                KeyType.SESSION,
                SESSION_CTX,
            ),
            (
                await service.encrypt_field(75000.5, KeyType.FINANCIAL_DATA, context=FIELD_CTX),
                KeyType.FINANCIAL_DATA,
                FIELD_CTX,
            ),
            (
                service.keyring.encrypt_deterministic("det", KeyType.PII, FIELD_CTX),
                KeyType.PII,
                FIELD_CTX,
            ),
        ]
        t.key_ids = [dk.key_id for dk in service.keyring]
        t.cache_pair = await service.encrypt_cache_data("user:7", {"balance": 12})
        t.blob = (
            await service.encrypt_bulk_data(b"bulk payload " * 40, KeyType.PII, context=BLOB_CTX)
        ).to_bytes()
        dk = service.keyring.active(KeyType.PII)
        # a 5-segment stream of 1 KiB segments: the same bytes decrypt_stream reads
        t.stream_blob = encrypt_bulk(
            dk, os.urandom(4 * 1024 + 100), context_bytes(BLOB_CTX), segment_size=1024
        ).to_bytes()

    runner.run(setup())
    yield t
    runner.run(service.close())
    runner.close()
    print(f"\nFIGURES test_fuzz_tokens: {dict(sorted(COUNTS.items()))}")


# -- mutations -------------------------------------------------------------------

OTHER_KID = "pii-v9-0123abcd"


def mutate_text(data: st.DataObject, token: str, key_ids: list[str]) -> str:
    kind = data.draw(
        st.sampled_from(
            [
                "bitflip",
                "truncate",
                "extend",
                "alphabet",
                "padding",
                "prefix_case",
                "key_id",
                "wrong_prefix",
                "replace_char",
                "insert",
                "non_utf8",
                "dup_segment",
                "whitespace",
            ]
        )
    )
    n = len(token)
    kid_end = token.index(".", 4)
    if kind == "bitflip":
        i = data.draw(st.integers(0, n - 1))
        bit = data.draw(st.integers(0, 7))
        return token[:i] + chr(ord(token[i]) ^ (1 << bit)) + token[i + 1 :]
    if kind == "truncate":
        return token[: data.draw(st.integers(0, n - 1))]
    if kind == "extend":
        return token + data.draw(st.text(min_size=1, max_size=20))
    if kind == "alphabet":
        a, b = data.draw(
            st.sampled_from([("-", "+"), ("_", "/"), ("+", "-"), ("/", "_"), ("A", "a"), ("=", "")])
        )
        return (
            token[:kid_end] + token[kid_end:].replace(a, b)
            if a in token[kid_end:]
            else token[:kid_end] + token[kid_end:] + a
        )
    if kind == "padding":
        body = token.rstrip("=")
        return body + data.draw(st.sampled_from(["", "=", "==", "===", "===="]))
    if kind == "prefix_case":
        return data.draw(st.sampled_from(["AC2.", "Ac2.", "aC2.", "ac2:", "AC1."])) + token[4:]
    if kind == "key_id":
        kid = data.draw(
            st.sampled_from(
                [*key_ids, OTHER_KID, "x" * 64, "x" * 65, "", "pii-v1-zz..", "../../etc", "pii_v1"]
            )
        )
        return token[:4] + kid + token[kid_end:]
    if kind == "wrong_prefix":
        return (
            data.draw(st.sampled_from(["ac1.", "ac3.", "ac0.", "", "ac2", "ac2..", "AC2."]))
            + token[4:]
        )
    if kind == "replace_char":
        i = data.draw(st.integers(0, n - 1))
        return token[:i] + data.draw(st.characters()) + token[i + 1 :]
    if kind == "insert":
        i = data.draw(st.integers(0, n))
        return token[:i] + data.draw(st.text(min_size=1, max_size=8)) + token[i:]
    if kind == "non_utf8":
        i = data.draw(st.integers(0, n))
        raw = data.draw(st.binary(min_size=1, max_size=8))
        return token[:i] + raw.decode("utf-8", "surrogateescape") + token[i:]
    if kind == "dup_segment":
        i = data.draw(st.integers(kid_end + 1, n - 1))
        return token[:i] + token[kid_end + 1 :]
    # whitespace
    i = data.draw(st.integers(0, n))
    return token[:i] + data.draw(st.sampled_from([" ", "\n", "\t", "\r\n", "\x00"])) + token[i:]


random_tokens = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.binary(max_size=200).map(lambda b: "ac2." + base64.urlsafe_b64encode(b).decode()),
    st.builds(
        lambda kid, b: f"ac2.{kid}.{base64.urlsafe_b64encode(b).decode()}",
        st.sampled_from([OTHER_KID, "session-v1-00000000"]),
        st.binary(max_size=120),
    ),
)


def assert_decryption_error(target: Target, token: str, key_type: KeyType, ctx: str) -> None:
    """Every text entry point refuses ``token`` with DecryptionError, and nothing else."""
    service = target.service
    valid = target.tokens[0][0]
    calls: dict[str, Any] = {
        "decrypt_field": lambda: target.run(service.decrypt_field(token, key_type, context=ctx)),
        "decrypt_many": lambda: target.run(
            service.decrypt_many([valid, token], KeyType.PII, contexts=[FIELD_CTX, ctx])
        ),
        "decrypt_session_data": lambda: target.run(
            service.decrypt_session_data(token, context=ctx)
        ),
        "decrypt_cache_data.key": lambda: target.run(
            service.decrypt_cache_data(token, target.cache_pair[1])
        ),
        "decrypt_cache_data.value": lambda: target.run(
            service.decrypt_cache_data(target.cache_pair[0], token)
        ),
        "Keyring.decrypt": lambda: service.keyring.decrypt(token, key_type, ctx),
        "EncryptedString.process_result_value": lambda: EncryptedString(
            key_type, context=ctx, service=service
        ).process_result_value(token, DIALECT),
        "EncryptedJSON.process_result_value": lambda: EncryptedJSON(
            key_type, context=ctx, service=service
        ).process_result_value(token, DIALECT),
    }
    for name, call in calls.items():
        try:
            call()
        except DecryptionError:
            COUNTS[name] += 1
        except TimeoutError:
            pytest.fail(f"{name} hung on a hostile token")
        else:
            # only possible if the "mutation" left a token valid for this call
            if name == "decrypt_many" and token == valid:
                continue
            pytest.fail(f"{name} accepted a mutated token")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@example(data=None)  # see the body: the unmutated token must still decrypt
def test_mutated_text_tokens_raise_decryption_error(
    target: Target, data: st.DataObject | None
) -> None:
    if data is None:  # sanity: the unmutated tokens are valid, so the test can tell
        for token, kt, ctx in target.tokens:
            assert target.run(target.service.decrypt_field(token, kt, context=ctx)) is not None
        return
    token, key_type, ctx = data.draw(st.sampled_from(target.tokens))
    mutated = mutate_text(data, token, target.key_ids)
    if mutated == token:
        return
    COUNTS["mutated_text_tokens"] += 1
    assert_decryption_error(target, mutated, key_type, ctx)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token=random_tokens, key_type=st.sampled_from([KeyType.PII, KeyType.SESSION]))
@example(token="ac1.", key_type=KeyType.PII)
@example(token="ac1." + "A" * 70 + ".AAAA", key_type=KeyType.PII)
@example(token="ac1.pii-v1-00000000.\udcff", key_type=KeyType.PII)
def test_random_text_tokens_raise_decryption_error(
    target: Target, token: str, key_type: KeyType
) -> None:
    COUNTS["random_text_tokens"] += 1
    assert_decryption_error(target, token, key_type, FIELD_CTX)


@settings(max_examples=200, deadline=None)
@given(
    value=st.one_of(
        st.text(max_size=60),
        st.binary(max_size=60),
        st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
    ),
    legacy=st.sampled_from([EncryptedInteger, EncryptedDate, EncryptedJSON]),
)
@example(value="[" * 5000 + "]" * 5000, legacy=EncryptedJSON)
@example(value="9" * 5000, legacy=EncryptedInteger)
def test_column_plaintext_fallback_never_crashes(
    target: Target, value: Any, legacy: type[EncryptedJSON]
) -> None:
    """``allow_plaintext`` columns parse legacy plaintext or raise DecryptionError."""
    column = legacy(KeyType.PII, context=FIELD_CTX, service=target.service, allow_plaintext=True)
    COUNTS["column_plaintext_values"] += 1
    try:
        column.process_result_value(value, DIALECT)
    except DecryptionError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(
        st.text(max_size=80),
        st.binary(max_size=80),
        st.integers(),
        st.floats(),
        st.none(),
        st.booleans(),
        st.lists(st.integers(), max_size=5),
    ),
    normalizer=st.sampled_from([None, normalize_text, normalize_digits, normalize_email]),
)
@example(value="\udcff", normalizer=normalize_text)
@example(value=float("nan"), normalizer=None)
def test_blind_index_inputs(target: Target, value: Any, normalizer: Any) -> None:
    """A digest is produced (same input, same digest, 16 bytes) or TypeError/ValueError."""
    index = BlindIndex("ssn", context=FIELD_CTX, normalizer=normalizer, service=target.service)
    dk = (
        target.service.keyring.active(KeyType("blind_index"))
        if target.service.keyring.has_active("blind_index")
        else None
    )
    if dk is None:
        target.run(target.service.key_manager.ensure_active([KeyType("blind_index")]))
        dk = target.service.keyring.active(KeyType("blind_index"))
    COUNTS["blind_index_inputs"] += 1
    try:
        digest = index.digest(value, dk)
    except (TypeError, ValueError):  # documented caller errors (codec, unencodable text)
        COUNTS["blind_index_refused"] += 1
        return
    version, _, mac = digest.partition(":")
    assert version == str(dk.key.version)
    assert len(base64.urlsafe_b64decode(mac + "==")) == 16
    assert index.digest(value, dk) == digest
    assert digest in index.candidates(value, target.service.keyring)
    assert index.process_result_value(str(digest), DIALECT) == digest


# -- binary blobs and streams -----------------------------------------------------


def mutate_blob(data: st.DataObject, blob: bytes) -> bytes:
    kind = data.draw(
        st.sampled_from(
            ["bitflip", "truncate", "extend", "kid_len", "segment_size", "swap", "random_header"]
        )
    )
    b = bytearray(blob)
    if kind == "bitflip":
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        del b[data.draw(st.integers(0, len(b) - 1)) :]
    elif kind == "extend":
        b += data.draw(st.binary(min_size=1, max_size=2048))
    elif kind == "kid_len":
        b[3] = data.draw(st.sampled_from([0, 1, 63, 64, 65, 200, 255]))
    elif kind == "segment_size":
        off = 4 + blob[3]
        size = data.draw(
            st.sampled_from([0, 1, 1023, 1025, 2048, 64 * 2**20, 64 * 2**20 + 1, 2**32 - 1])
        )
        b[off : off + 4] = struct.pack(">I", size)  # a stream's segment size (a GCM nonce)
    elif kind == "swap":  # exchange two 1040-byte regions after the header (segment reorder)
        off = 4 + blob[3] + 27
        if len(b) > off + 2 * 1040:
            b[off : off + 1040], b[off + 1040 : off + 2080] = (
                b[off + 1040 : off + 2080],
                b[off : off + 1040],
            )
        else:
            b[-1] ^= 1
    else:
        b[:4] = data.draw(st.binary(min_size=4, max_size=4))
    return bytes(b)


async def _chunks(blob: bytes, sizes: list[int]) -> AsyncIterator[bytes]:
    pos = 0
    for size in sizes:
        yield blob[pos : pos + size]
        pos += size
    if pos < len(blob):
        yield blob[pos:]


async def _drain(
    service: EncryptionService, blob: bytes, sizes: list[int], ctx: str = BLOB_CTX
) -> bytes:
    out = bytearray()
    async for part in service.decrypt_stream(
        _chunks(blob, sizes), context=ctx, key_type=KeyType.PII
    ):
        out += part
    return bytes(out)


def assert_blob_refused(target: Target, blob: bytes, sizes: list[int]) -> None:
    service = target.service
    try:
        EncryptedData.from_bytes(blob)
    except DecryptionError:
        COUNTS["from_bytes_refused"] += 1
    COUNTS["blobs"] += 1
    call: Callable[[], object]
    for name, call in {
        "decrypt_bulk_data": lambda: target.run(
            service.decrypt_bulk_data(blob, context=BLOB_CTX, key_type=KeyType.PII)
        ),
        "decrypt_stream": lambda: target.run(_drain(service, blob, sizes)),
    }.items():
        try:
            call()
        except DecryptionError:
            COUNTS[name] += 1
        except TimeoutError:
            pytest.fail(f"{name} hung on a hostile blob")
        else:
            pytest.fail(f"{name} accepted a mutated blob")


def test_stream_fixture_is_valid(target: Target) -> None:
    """The unmutated blobs decrypt through both paths (so refusals below mean something)."""
    service = target.service
    assert (
        target.run(service.decrypt_bulk_data(target.blob, context=BLOB_CTX, key_type=KeyType.PII))
        == b"bulk payload " * 40
    )
    whole = bytes(
        target.run(
            service.decrypt_bulk_data(target.stream_blob, context=BLOB_CTX, key_type=KeyType.PII)
        )
    )
    assert len(whole) == 4 * 1024 + 100
    assert target.run(_drain(service, target.stream_blob, [7, 300, 1, 5000])) == whole


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), stream=st.booleans(), sizes=st.lists(st.integers(1, 3000), max_size=6))
def test_mutated_blobs_raise_decryption_error(
    target: Target, data: st.DataObject, stream: bool, sizes: list[int]
) -> None:
    original = target.stream_blob if stream else target.blob
    blob = mutate_blob(data, original)
    if blob == original:
        return
    assert_blob_refused(target, blob, sizes)


@settings(max_examples=300, deadline=None)
@given(
    blob=st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: b"\x01\x01\x00\x0fpii-v9-0123abcd" + b),
        st.binary(max_size=300).map(lambda b: b"\x01\x03\x00\x0fpii-v9-0123abcd" + b),
        st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=300)).map(
            lambda t: b"\x01\x03\x00\x0fpii-v9-0123abcd" + struct.pack(">I", t[0]) + t[1]
        ),
    ),
    sizes=st.lists(st.integers(1, 500), max_size=4),
)
@example(blob=b"\x01\x03\x00\xff" + b"a" * 400, sizes=[1] * 4)  # key id length 255
@example(blob=b"\x01\x03\x00\x0fpii-v9-0123abcd\xff\xff\xff\xff" + bytes(40), sizes=[])
@example(blob=b"\x01\x01\x00\x0fpii-v9-0123abcd" + bytes(28), sizes=[])
def test_random_blobs_raise_decryption_error(target: Target, blob: bytes, sizes: list[int]) -> None:
    assert_blob_refused(target, blob, sizes)


@pytest.mark.parametrize("size", [2**32 - 1, 64 * 2**20, 64 * 2**20 + 1, 0])
def test_oversized_segment_size_in_a_real_stream_header(target: Target, size: int) -> None:
    """A real key id and a huge claimed segment size: refused without allocating it."""
    blob = bytearray(target.stream_blob)
    off = 4 + blob[3]
    blob[off : off + 4] = struct.pack(">I", size)
    tracemalloc.start()
    try:
        assert_blob_refused(target, bytes(blob), [100, 100])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak} bytes allocated for a {len(blob)}-byte hostile blob"


# -- huge inputs --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random_key_id", "real_key_id", "non_ascii_tail", "over_limit"])
def test_huge_token_fails_without_memory_blowup(target: Target, kind: str) -> None:
    """A 64 MiB token (and one over MAX_TOKEN_CHARS) is refused with DecryptionError, and
    Python allocations stay within a small multiple of the input's own size."""
    size = 64 * 2**20
    kid = target.tokens[0][0].split(".")[1] if kind != "random_key_id" else OTHER_KID
    body_len = (MAX_TOKEN_CHARS + 8 if kind == "over_limit" else size) // 4 * 4
    token = f"ac2.{kid}." + "A" * body_len
    if kind == "non_ascii_tail":
        token = token[:-1] + "\u00e9"
    gc.collect()
    tracemalloc.start()
    try:
        with pytest.raises(DecryptionError):
            target.run(target.service.decrypt_field(token, KeyType.PII, context=FIELD_CTX))
        with pytest.raises(DecryptionError):
            target.service.keyring.decrypt(token, KeyType.PII, FIELD_CTX)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    COUNTS[f"huge_token_peak_MiB:{kind}"] = peak // 2**20
    # the token itself is already in memory; decoding it may need ~ its size again a few times
    limit = 4 * len(token) if kind != "over_limit" else 2**20
    assert peak < limit, f"{peak / 2**20:.0f} MiB allocated for a {len(token) >> 20} MiB token"


def test_regression_non_canonical_base64_is_refused(target: Target) -> None:
    """Found by the fuzzer: standard-alphabet '+' '/' in place of '-' '_', and '=' after
    a complete quad, decoded to the same bytes and were accepted (malleable tokens)."""
    service, found = target.service, {"-": False, "_": False, "unpadded": False}
    for i in range(400):
        token = target.run(service.encrypt_field(f"v{i}", KeyType.PII, context=FIELD_CTX))
        body = token.split(".", 2)[2]
        variants = []
        if "-" in body:
            variants.append(token.replace("-", "+"))
            found["-"] = True
        if "_" in body:
            variants.append(token.replace("_", "/"))
            found["_"] = True
        if not body.endswith("="):
            variants += [token + "=", token + "=="]
            found["unpadded"] = True
        for variant in variants:
            assert_decryption_error(target, variant, KeyType.PII, FIELD_CTX)
        if all(found.values()):
            break
    assert all(found.values()), found
