"""Streaming encryption: O(segment) memory, blob-compatible, tamper-evident."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiocrypt import (
    DecryptionError,
    EncryptedData,
    EncryptionConfig,
    EncryptionService,
    KeyType,
    PerformanceMode,
    _streams,
)
from aiocrypt._bulk import StreamEncryptor
from aiocrypt._compression import compress_record
from aiocrypt._format import FLAG_ZSTD, context_bytes
from aiocrypt.testing import make_service

SEG = 1024  # the smallest segment size: many segments from little data
STRIDE = SEG + 16


async def collect(parts: AsyncIterator[bytes]) -> bytes:
    return b"".join([p async for p in parts])


async def agen(data: bytes, step: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]


def preamble_length(sealed: bytes) -> int:
    return 4 + sealed[3] + 4 + 16 + 7


def split(sealed: bytes, stride: int = STRIDE) -> tuple[bytes, list[bytes]]:
    """(preamble, sealed segments) of a stream."""
    start = preamble_length(sealed)
    body = sealed[start:]
    return sealed[:start], [body[i : i + stride] for i in range(0, len(body), stride)]


async def decrypt_until_failure(
    service: EncryptionService, chunks: Iterable[bytes], **kwargs: Any
) -> tuple[bytes, BaseException | None]:
    """What ``decrypt_stream`` yielded before it raised, and what it raised."""
    yielded: list[bytes] = []
    try:
        async for part in service.decrypt_stream(chunks, **{"key_type": "pii", **kwargs}):
            yielded.append(part)
    except Exception as exc:
        return b"".join(yielded), exc
    return b"".join(yielded), None


@pytest.fixture(params=["one-segment-batches", "default-batches", "worker-thread"])
def batching(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with one segment per step (plaintext released segment by segment), with
    the default batching (many small segments per inline step), and with the AES in
    worker-thread hops (what segments over INLINE_SEGMENT_LIMIT get)."""
    if request.param == "one-segment-batches":
        monkeypatch.setattr(_streams, "BATCH_BYTES", 1)
        monkeypatch.setattr(_streams, "INLINE_BYTES", 1)
    elif request.param == "worker-thread":
        monkeypatch.setattr(_streams, "INLINE_SEGMENT_LIMIT", 0)
        monkeypatch.setattr(_streams, "BATCH_BYTES", 16 * SEG)
        for name in ("service", "zstd_service"):  # every batch above the threshold
            if name in request.fixturenames:
                monkeypatch.setattr(request.getfixturevalue(name), "_threshold", 0)
    return str(request.param)


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 37 * SEG + 5])
@pytest.mark.parametrize("step", [1, 333, SEG, 5000])
async def test_round_trip_small_segments(
    service: EncryptionService, batching: str, size: int, step: int
) -> None:
    if step == 1 and size > 4 * SEG:
        pytest.skip("byte-by-byte feeding of large inputs adds nothing but time")
    data = os.urandom(size)
    parts = [
        p
        async for p in service.encrypt_stream(
            agen(data, step), KeyType.PII, context="t.c", segment_size=SEG
        )
    ]
    assert all(type(p) is bytes for p in parts)  # immutable, valid after the consumer holds them
    sealed = b"".join(parts)
    segments = max(1, -(-size // SEG))
    assert len(sealed) == preamble_length(sealed) + size + 16 * segments
    blob = EncryptedData.from_bytes(sealed)
    assert (blob.algorithm, blob.segment_size, blob.compressed) == (
        "AES_256_GCM_STREAM",
        SEG,
        False,
    )
    assert bytes(await service.decrypt_bulk_data(sealed, context="t.c", key_type="pii")) == data
    for piece in (1, STRIDE, STRIDE + 1, len(sealed) or 1):
        out = [
            p
            async for p in service.decrypt_stream(
                agen(sealed, piece), context="t.c", key_type="pii"
            )
        ]
        assert all(type(p) is bytes for p in out)
        assert b"".join(out) == data


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(max_size=6 * SEG),
    cuts=st.lists(st.integers(1, 3 * SEG), max_size=6),
    compress=st.booleans(),
)
async def test_any_chunking_round_trips(data: bytes, cuts: list[int], compress: bool) -> None:
    """Whatever the chunk sizes on either side, the plaintext comes back whole."""

    def chunked(blob: bytes) -> list[bytes]:
        out, pos = [], 0
        for cut in cuts:
            out.append(blob[pos : pos + cut])
            pos += cut
        return [*out, blob[pos:]]

    async with make_service() as service:
        sealed = await collect(
            service.encrypt_stream(
                chunked(data), "pii", context="h", compress=compress, segment_size=SEG
            )
        )
        assert (
            await collect(service.decrypt_stream(chunked(sealed), context="h", key_type="pii"))
            == data
        )


@pytest.mark.parametrize(
    "size, step",
    [
        (0, 1),
        (10, 3),
        (1024 * 1024, 4096),
        (3 * 1024 * 1024 + 17, 700_001),
        (2 * 1024 * 1024, 1024 * 1024),
    ],
)
async def test_stream_round_trip_default_segments(
    service: EncryptionService, size: int, step: int
) -> None:
    data = os.urandom(size)
    sealed = await collect(
        service.encrypt_stream(agen(data, step), KeyType.AUDIT_LOGS, context="exports/q3")
    )
    # the stream is exactly a segmented EncryptedData blob
    blob = EncryptedData.from_bytes(sealed)
    assert blob.algorithm == "AES_256_GCM_STREAM"
    assert blob.segment_size == service.config.performance.segment_size
    assert (
        await service.decrypt_bulk_data(sealed, context="exports/q3", key_type="audit_logs") == data
    )
    # and decrypts as a stream, fed in odd-sized pieces
    for piece in (1000, 1024 * 1024 + 5, 1024 * 1024 + 16):
        out = await collect(
            service.decrypt_stream(
                agen(sealed, piece), context="exports/q3", key_type=KeyType.AUDIT_LOGS
            )
        )
        assert out == data


async def segments(chunks: list[bytes]) -> list[tuple[bytes | memoryview, bool]]:
    """The (piece, last) pairs the stream pipeline cuts ``chunks`` into."""
    batches = _streams.Segmenter(_streams.byte_chunks(chunks)).batches(
        SEG, _streams.batch_count(SEG)
    )
    return [pair async for batch in batches for pair in batch]


async def test_segment_sized_chunks_pass_through_uncopied() -> None:
    chunks = [os.urandom(SEG) for _ in range(3)]
    pieces = [piece for piece, _ in await segments(chunks)]
    assert len(pieces) == 3
    assert all(
        isinstance(p, memoryview) and p.obj is c for p, c in zip(pieces, chunks, strict=True)
    )
    # a piece spanning chunks is joined once; only the final piece is flagged last
    spanning = [(bytes(p), last) for p, last in await segments([b"a" * 700] * 2)]
    assert spanning == [(b"a" * SEG, False), (b"a" * (1400 - SEG), True)]


async def test_inline_work_yields_to_the_loop(
    service: EncryptionService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source that never suspends (a list) cannot hold the loop for a whole stream."""
    monkeypatch.setattr(_streams, "INLINE_BYTES", 4 * SEG)  # small inline steps
    hops = 0
    real_run = service._run

    async def counting_run(func: Any, *args: Any) -> Any:
        nonlocal hops
        hops += 1
        return await real_run(func, *args)

    monkeypatch.setattr(service, "_run", counting_run)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    data = os.urandom(64 * SEG)
    try:
        before = ticks
        sealed = await collect(service.encrypt_stream([data], context="y", segment_size=SEG))
        during_encrypt = ticks - before
        before = ticks
        assert (
            await collect(service.decrypt_stream([sealed], context="y", key_type="financial_data"))
            == data
        )
        during_decrypt = ticks - before
    finally:
        task.cancel()
    assert during_encrypt >= 8 and during_decrypt >= 8
    assert hops == 0  # AES holds the GIL: a worker thread would only add hand-offs


async def test_segment_size_follows_the_performance_mode() -> None:
    config = EncryptionConfig(performance_mode=PerformanceMode.SECURITY)
    async with make_service(config) as service:
        data = os.urandom(3 * config.performance.segment_size + 1)
        sealed = await collect(service.encrypt_stream([data], context="m"))
        assert EncryptedData.from_bytes(sealed).segment_size == 256 * 1024
        assert (
            await collect(service.decrypt_stream([sealed], context="m", key_type="financial_data"))
            == data
        )


async def test_bulk_data_above_the_threshold_is_the_same_segmented_stream(
    service: EncryptionService,
) -> None:
    data = os.urandom(service.config.performance.inline_threshold * 40 + 3)
    encrypted = await service.encrypt_bulk_data(data, KeyType.PII, context="b")
    assert encrypted.algorithm == "AES_256_GCM_STREAM"
    assert encrypted.segment_size == service.config.performance.segment_size
    assert (
        await collect(service.decrypt_stream([encrypted.to_bytes()], context="b", key_type="pii"))
        == data
    )
    small = await service.encrypt_bulk_data(b"small", KeyType.PII, context="b")
    assert small.algorithm == "AES_256_GCM"


async def test_large_bulk_data_is_sealed_and_opened_in_steps(service: EncryptionService) -> None:
    segment = service.config.performance.segment_size
    data = os.urandom(9 * segment + 3)  # several worker-thread steps of a few segments
    encrypted = await service.encrypt_bulk_data(data, KeyType.PII, context="s")
    blob = encrypted.to_bytes()
    assert len(blob) == preamble_length(blob) + len(data) + 16 * 10
    assert await service.decrypt_bulk_data(encrypted, context="s", key_type="pii") == data
    assert (
        await collect(service.decrypt_stream(agen(blob, 3 * segment), context="s", key_type="pii"))
        == data
    )
    for index in (0, 4, 9):  # a segment of the first, a middle and the last step
        flipped = bytearray(blob)
        flipped[preamble_length(blob) + index * (segment + 16) + 7] ^= 4
        with pytest.raises(DecryptionError):
            await service.decrypt_bulk_data(bytes(flipped), context="s", key_type="pii")
    with pytest.raises(DecryptionError):
        await service.decrypt_bulk_data(blob[: -(segment + 16)], context="s", key_type="pii")


# -- tampering ----------------------------------------------------------------

DATA_SEGMENTS = 6


@pytest.fixture
async def stream(service: EncryptionService) -> tuple[bytes, bytes]:
    """(plaintext of 5.5 segments, its stream under pii / context "c")."""
    data = os.urandom(SEG * (DATA_SEGMENTS - 1) + SEG // 2)
    sealed = await collect(service.encrypt_stream([data], "pii", context="c", segment_size=SEG))
    return data, sealed


def assert_released_prefix(yielded: bytes, data: bytes, bad_segment: int, batching: str) -> None:
    """Only whole authenticated segments before the bad one were released."""
    assert len(yielded) % SEG == 0
    assert len(yielded) <= bad_segment * SEG
    assert yielded == data[: len(yielded)]
    if batching == "one-segment-batches":  # every good segment before it was released
        assert len(yielded) == bad_segment * SEG


@pytest.mark.parametrize(
    "case",
    [
        "drop-last",
        "cut-mid-segment",
        "cut-mid-tag",
        "reorder",
        "duplicate",
        "splice",
        "flip-body",
        "flip-last-tag",
        "append-garbage",
        "append-segment",
    ],
)
async def test_tampered_segments_are_rejected_without_releasing_later_plaintext(
    service: EncryptionService, stream: tuple[bytes, bytes], batching: str, case: str
) -> None:
    data, sealed = stream
    preamble, segments = split(sealed)
    assert len(segments) == DATA_SEGMENTS
    if case == "drop-last":  # truncation at a segment boundary
        chunks, bad = [preamble, *segments[:-1]], DATA_SEGMENTS - 2
    elif case == "cut-mid-segment":
        chunks, bad = [preamble, *segments[:3], segments[3][: SEG // 2]], 3
    elif case == "cut-mid-tag":
        chunks, bad = [preamble, *segments[:-1], segments[-1][:-5]], DATA_SEGMENTS - 1
    elif case == "reorder":
        chunks, bad = [preamble, segments[0], segments[2], segments[1], *segments[3:]], 1
    elif case == "duplicate":
        chunks, bad = [preamble, *segments[:3], segments[2], *segments[3:]], 3
    elif case == "splice":  # same key, same context, another stream
        other = await collect(
            service.encrypt_stream([os.urandom(len(data))], "pii", context="c", segment_size=SEG)
        )
        assert split(other)[0][:-23] == preamble[:-23]  # same header and key id
        chunks, bad = [preamble, *segments[:2], split(other)[1][2], *segments[3:]], 2
    elif case == "flip-body":
        flipped = bytearray(segments[4])
        flipped[100] ^= 0x80
        chunks, bad = [preamble, *segments[:4], bytes(flipped), *segments[5:]], 4
    elif case == "flip-last-tag":
        chunks, bad = (
            [preamble, *segments[:-1], segments[-1][:-1] + bytes([segments[-1][-1] ^ 1])],
            DATA_SEGMENTS - 1,
        )
    elif case == "append-garbage":
        chunks, bad = [preamble, *segments, b"\x00" * 20], DATA_SEGMENTS - 1
    else:  # a whole extra segment after the last one
        chunks, bad = [preamble, *segments, segments[-1]], DATA_SEGMENTS - 1
    yielded, error = await decrypt_until_failure(service, chunks, context="c")
    assert isinstance(error, DecryptionError)
    assert_released_prefix(yielded, data, bad, batching)
    # the same bytes fed in one piece, and as one blob, fail too
    joined = b"".join(chunks)
    yielded, error = await decrypt_until_failure(service, [joined], context="c")
    assert isinstance(error, DecryptionError)
    assert_released_prefix(yielded, data, bad, batching)
    with pytest.raises(DecryptionError):
        await service.decrypt_bulk_data(joined, context="c", key_type="pii")


async def test_every_flipped_preamble_bit_is_rejected(
    service: EncryptionService, stream: tuple[bytes, bytes]
) -> None:
    _, sealed = stream
    preamble, segments = split(sealed)
    # version, algorithm, flags, key id length, key id, segment size, salt, nonce prefix
    for index in range(len(preamble)):
        for bit in (0x01, 0x80):
            flipped = bytearray(preamble)
            flipped[index] ^= bit
            yielded, error = await decrypt_until_failure(
                service, [bytes(flipped), *segments], context="c"
            )
            assert isinstance(error, DecryptionError), (index, bit)
            assert yielded == b""


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 10])
@pytest.mark.parametrize("relative_to_preamble", [False, True])
async def test_streams_cut_before_the_first_tag_are_rejected(
    service: EncryptionService, stream: tuple[bytes, bytes], cut: int, relative_to_preamble: bool
) -> None:
    _, sealed = stream
    end = preamble_length(sealed) - 1 + cut if relative_to_preamble else cut
    with pytest.raises(DecryptionError):
        await collect(service.decrypt_stream([sealed[:end]], context="c", key_type="pii"))


async def test_wrong_context_or_key_type_is_rejected(
    service: EncryptionService, stream: tuple[bytes, bytes]
) -> None:
    _, sealed = stream
    for kwargs in (
        {"context": "other"},
        {"context": ""},
        {"context": "c", "key_type": KeyType.SESSION},
    ):
        yielded, error = await decrypt_until_failure(service, [sealed], **kwargs)
        assert isinstance(error, DecryptionError) and yielded == b""
    # a key of the right type, another service's: the key is unknown here
    async with make_service() as other:
        yielded, error = await decrypt_until_failure(other, [sealed], context="c")
        assert isinstance(error, DecryptionError) and yielded == b""
    stats = await service.get_encryption_stats()
    assert stats["counters"]["decrypt_failures"] >= 3


async def test_bad_arguments(service: EncryptionService) -> None:
    for source in (b"not chunks", "text"):
        with pytest.raises(TypeError):
            await collect(service.encrypt_stream(source))  # type: ignore[arg-type]
    for size in (SEG - 1, 64 * 1024 * 1024 + 1):
        with pytest.raises(ValueError):
            await collect(service.encrypt_stream([b"x"], segment_size=size))


async def test_mutable_chunks_are_copied_before_the_producer_reuses_them(
    service: EncryptionService,
) -> None:
    data = os.urandom(10 * SEG + 7)
    buffer = bytearray(700)

    async def reusing() -> AsyncIterator[bytearray]:
        view = memoryview(data)
        for i in range(0, len(data), 700):
            piece = view[i : i + 700]
            buffer[: len(piece)] = piece
            yield buffer if len(piece) == 700 else bytearray(piece)

    # bytearray chunks, which the stream takes though its signature says bytes
    sealed = await collect(service.encrypt_stream(reusing(), context="m", segment_size=SEG))  # type: ignore[arg-type]
    assert (
        await collect(service.decrypt_stream([sealed], context="m", key_type="financial_data"))
        == data
    )


# -- compression ----------------------------------------------------------------

COMPRESSIBLE = b"".join(b"row %06d: balance 1234.56 EUR\n" % i for i in range(20_000))


@pytest.fixture
async def zstd_service() -> AsyncIterator[EncryptionService]:
    async with make_service(EncryptionConfig(compression_enabled=True)) as service:
        yield service


@pytest.mark.parametrize("size", [0, 1, SEG, SEG + 1, len(COMPRESSIBLE)])
async def test_compressed_stream_round_trip(
    zstd_service: EncryptionService, batching: str, size: int
) -> None:
    data = COMPRESSIBLE[:size]
    sealed = await collect(
        zstd_service.encrypt_stream(agen(data, 5000), "audit_logs", context="z", segment_size=SEG)
    )
    assert sealed[2] == FLAG_ZSTD  # the header's flags byte
    blob = EncryptedData.from_bytes(sealed)
    assert blob.compressed and blob.segment_size == SEG
    if size == len(COMPRESSIBLE):
        assert len(sealed) < size // 4
    for piece in (7, STRIDE, len(sealed)):
        assert (
            await collect(
                zstd_service.decrypt_stream(agen(sealed, piece), context="z", key_type="audit_logs")
            )
            == data
        )
    assert (
        bytes(await zstd_service.decrypt_bulk_data(sealed, context="z", key_type="audit_logs"))
        == data
    )


async def test_compression_per_call(
    service: EncryptionService, zstd_service: EncryptionService
) -> None:
    on = await collect(service.encrypt_stream([COMPRESSIBLE], context="z", compress=True))
    off = await collect(zstd_service.encrypt_stream([COMPRESSIBLE], context="z", compress=False))
    assert on[2] == FLAG_ZSTD and off[2] == 0
    assert len(on) < len(COMPRESSIBLE) // 4 < len(off)
    assert (
        await collect(service.decrypt_stream([on], context="z", key_type="financial_data"))
        == COMPRESSIBLE
    )
    assert (
        await collect(zstd_service.decrypt_stream([off], context="z", key_type="financial_data"))
        == COMPRESSIBLE
    )


async def test_compression_per_key_type() -> None:
    """``compressed_key_types`` compresses those key types' fields, bulk data and streams
    only; every other key type stays uncompressed (compressed length leaks content)."""
    config = EncryptionConfig(compressed_key_types=["audit_logs"])
    async with make_service(config) as service:
        for key_type, compressed in (("audit_logs", True), ("pii", False)):
            sealed = await collect(service.encrypt_stream([COMPRESSIBLE], key_type, context="k"))
            assert (sealed[2] == FLAG_ZSTD) is compressed
            assert (
                await collect(service.decrypt_stream([sealed], context="k", key_type=key_type))
                == COMPRESSIBLE
            )
            bulk = await service.encrypt_bulk_data(COMPRESSIBLE, key_type, context="k")
            assert bulk.compressed is compressed
            assert (
                bytes(await service.decrypt_bulk_data(bulk, context="k", key_type=key_type))
                == COMPRESSIBLE
            )
            text = COMPRESSIBLE[:20_000].decode()
            token = await service.encrypt_field(text, key_type, context="k")
            assert (len(token) < len(text) // 4) is compressed
            assert await service.decrypt_field(token, key_type, context="k") == text
            tokens = await service.encrypt_many([text, text], key_type, context="k")
            assert all((len(t) < len(text) // 4) is compressed for t in tokens)
            assert await service.decrypt_many(tokens, key_type, context="k") == [text, text]
        stats = await service.get_encryption_stats()
        assert stats["compressed_key_types"] == ["audit_logs"]
        assert stats["compression_enabled"] is False


async def test_compressed_stream_tampering_is_rejected(
    zstd_service: EncryptionService, batching: str
) -> None:
    data = os.urandom(4 * SEG) + COMPRESSIBLE[: 8 * SEG]  # some segments do not shrink
    sealed = await collect(zstd_service.encrypt_stream([data], context="z", segment_size=SEG))
    preamble, segments = split(sealed)
    assert len(segments) >= 4
    for chunks in (
        [preamble, *segments[:-1]],
        [preamble, segments[1], segments[0], *segments[2:]],
        [preamble, *segments[:2], segments[1], *segments[2:]],
    ):
        yielded, error = await decrypt_until_failure(
            zstd_service, chunks, context="z", key_type="financial_data"
        )
        assert isinstance(error, DecryptionError)
        assert yielded == data[: len(yielded)] and len(yielded) % SEG == 0
    cleared = bytearray(sealed)
    cleared[2] = 0  # claim the stream is not compressed: the flags are authenticated
    with pytest.raises(DecryptionError):
        await collect(
            zstd_service.decrypt_stream([bytes(cleared)], context="z", key_type="financial_data")
        )


async def test_decompression_is_bounded_by_the_segment_size(
    zstd_service: EncryptionService,
) -> None:
    # a record that inflates past one segment, sealed with the real key (as only a
    # key holder could): refused instead of inflated
    dk = (await zstd_service._keyring(KeyType.PII)).active(KeyType.PII)
    enc = StreamEncryptor(dk, context_bytes("z"), SEG, flags=FLAG_ZSTD)
    records = compress_record(b"\x00" * (SEG + 1), 3)
    assert len(records) < SEG
    sealed = enc.preamble + enc.seal(records, True)
    with pytest.raises(DecryptionError):
        await collect(zstd_service.decrypt_stream([sealed], context="z", key_type="pii"))
    # while a record of exactly one segment is fine
    enc = StreamEncryptor(dk, context_bytes("z"), SEG, flags=FLAG_ZSTD)
    sealed = enc.preamble + enc.seal(compress_record(b"\x00" * SEG, 3), True)
    assert (
        await collect(zstd_service.decrypt_stream([sealed], context="z", key_type="pii"))
        == b"\x00" * SEG
    )


async def test_compressed_bulk_blobs_old_and_new(zstd_service: EncryptionService) -> None:
    from aiocrypt._bulk import encrypt_bulk
    from aiocrypt._compression import compress

    # large compressed bulk data uses the compressed stream layout (one record per segment)
    data = COMPRESSIBLE * 3
    encrypted = await zstd_service.encrypt_bulk_data(data, KeyType.PII, context="b")
    assert encrypted.compressed and encrypted.algorithm == "AES_256_GCM_STREAM"
    assert (
        bytes(await zstd_service.decrypt_bulk_data(encrypted, context="b", key_type="pii")) == data
    )
    assert (
        await collect(
            zstd_service.decrypt_stream([encrypted.to_bytes()], context="b", key_type="pii")
        )
        == data
    )
    # blobs written before (one zstd frame, then segmented) still decrypt
    dk = (await zstd_service._keyring(KeyType.PII)).active(KeyType.PII)
    legacy = encrypt_bulk(dk, compress(data, 3), b"b", flags=FLAG_ZSTD, segment_size=SEG)
    assert (
        bytes(await zstd_service.decrypt_bulk_data(legacy.to_bytes(), context="b", key_type="pii"))
        == data
    )
