"""Streams and files sealed and opened over several worker threads (issue 19).

Where the installed cryptography releases the GIL (``aiocrypt._gil``), the service
seals and opens batches of a stream's segments in worker threads, several at
once, instead of inline. The cryptography here holds the GIL, so the service is
told to take that path (``parallel_bulk=True``, as a build that releases it
would decide); the result is one format either way: each path opens what the
other sealed, and tampering fails the same. Speed is measured in bench/.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest

from aiocrypt import DecryptionError, DecryptionFailure, EncryptionService, KeyType
from aiocrypt._streams import BATCH_BYTES
from aiocrypt.testing import make_key_manager

MiB = 1024 * 1024
KT = KeyType.PII
SEG = 64 * 1024  # segments per batch: BATCH_BYTES // SEG = 64
BATCH = BATCH_BYTES // SEG * SEG


@pytest.fixture
async def threads() -> AsyncIterator[EncryptionService]:
    async with EncryptionService(make_key_manager(), parallel_bulk=True) as svc:
        yield svc


@pytest.fixture
async def inline(threads: EncryptionService) -> AsyncIterator[EncryptionService]:
    async with EncryptionService(threads.key_manager, parallel_bulk=False) as svc:
        yield svc


async def chunks(data: bytes, size: int = 100_000) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def seal(service: EncryptionService, data: bytes, *, compress: bool | None = None) -> bytes:
    return b"".join(
        [
            p
            async for p in service.encrypt_stream(
                chunks(data), KT, context="c", segment_size=SEG, compress=compress
            )
        ]
    )


async def open_(service: EncryptionService, sealed: bytes) -> bytes:
    return b"".join(
        [p async for p in service.decrypt_stream(chunks(sealed, 77_777), key_type=KT, context="c")]
    )


@pytest.mark.parametrize(
    "size", [0, 1, SEG - 1, SEG, SEG + 1, BATCH, BATCH + 1, 3 * BATCH + SEG // 2]
)
async def test_round_trip_across_paths(
    threads: EncryptionService, inline: EncryptionService, size: int
) -> None:
    data = os.urandom(size)
    by_threads = await seal(threads, data)
    assert await open_(inline, by_threads) == data
    assert await open_(threads, by_threads) == data
    assert await open_(threads, await seal(inline, data)) == data
    # a batch per hop, and the first batch opens on its own: the hops are counted
    assert threads.counters["threaded_operations"] >= 2 * -(-max(size, 1) // BATCH)
    assert inline.counters["threaded_operations"] == 0


async def test_compressed_streams_seal_in_threads_and_open_in_order(
    threads: EncryptionService, inline: EncryptionService
) -> None:
    data = b"compressible " * 200_000
    sealed = await seal(threads, data, compress=True)
    assert len(sealed) < len(data) // 10
    assert await open_(threads, sealed) == data
    assert await open_(inline, sealed) == data


@pytest.mark.parametrize("segment", [0, 63, 64, 150, -1])
async def test_a_tampered_segment_fails_and_nothing_after_it_is_released(
    threads: EncryptionService, segment: int
) -> None:
    data = os.urandom(3 * BATCH + 100)
    sealed = bytearray(await seal(threads, data))
    preamble = len(sealed) - (len(data) + 16 * -(-len(data) // SEG))
    segments = -(-len(data) // SEG)
    index = segment % segments
    sealed[preamble + index * (SEG + 16) + 5] ^= 1
    released = bytearray()
    with pytest.raises(DecryptionError) as exc:
        async for part in threads.decrypt_stream(chunks(bytes(sealed)), key_type=KT, context="c"):
            released += part
    assert exc.value.reason is DecryptionFailure.AUTHENTICATION_FAILED
    assert len(released) <= index * SEG  # only segments before the bad one
    assert bytes(released) == data[: len(released)]


async def test_a_stream_cut_short_or_followed_by_more_fails(
    threads: EncryptionService, inline: EncryptionService
) -> None:
    data = os.urandom(2 * BATCH + 10)
    sealed = await seal(threads, data)
    for cut in (
        sealed[:-10],  # inside the last segment
        sealed[: -(10 + 16) - 5],  # the last segment gone, cut in a full one
        sealed[: -(10 + 16)],
    ):  # the last segment gone: a full one ends it
        with pytest.raises(DecryptionError):
            await open_(threads, cut)
    # more after the end: the last segment is last by position, so the real one, no
    # longer last, fails to authenticate, as on the inline path
    for service in (threads, inline):
        with pytest.raises(DecryptionError) as exc:
            await open_(service, sealed + sealed[-(10 + 16) :])
        assert exc.value.reason is DecryptionFailure.AUTHENTICATION_FAILED
    two = await seal(threads, os.urandom(SEG + 20))  # a full segment, then 20 bytes + tag
    with pytest.raises(DecryptionError, match="cut short"):  # cut inside the last tag
        await open_(threads, two[:-26])


async def test_a_forged_preamble_fails_before_more_is_read(threads: EncryptionService) -> None:
    data = os.urandom(4 * BATCH)
    sealed = await seal(threads, data)
    pulled = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal pulled
        for at in range(0, len(sealed), 16 * 1024):
            pulled += 16 * 1024
            yield sealed[at : at + 16 * 1024]

    with pytest.raises(DecryptionError):
        async for _ in threads.decrypt_stream(counted(), key_type=KT, context="other"):
            pass
    assert pulled <= 2 * (SEG + 16) + 16 * 1024 + 200  # the first segment, not a batch


async def test_a_consumer_that_stops_early_leaves_no_thread_behind(
    threads: EncryptionService,
) -> None:
    data = os.urandom(6 * BATCH)
    parts = threads.encrypt_stream(chunks(data), KT, context="c", segment_size=SEG)
    assert isinstance(parts, AsyncGenerator)
    taken = 0
    async for _ in parts:
        taken += 1
        if taken == 2 * (BATCH // SEG) + 2:  # inside the second batch, the third in flight
            break
    await parts.aclose()
    sealed = await seal(threads, data)
    opened = threads.decrypt_stream(chunks(sealed), key_type=KT, context="c")
    assert isinstance(opened, AsyncGenerator)
    async for part in opened:
        assert part == data[: len(part)]
        break
    await opened.aclose()


async def test_files_take_the_same_path(
    threads: EncryptionService, inline: EncryptionService, tmp_path: Path
) -> None:
    data = os.urandom(5 * MiB + 3)
    src, sealed, opened = tmp_path / "in", tmp_path / "sealed", tmp_path / "out"
    src.write_bytes(data)
    await threads.encrypt_file(src, sealed, KT, context="f", segment_size=SEG)
    await inline.decrypt_file(sealed, opened, key_type=KT, context="f")
    assert opened.read_bytes() == data
    opened.unlink()
    await threads.decrypt_file(sealed, opened, key_type=KT, context="f")
    assert opened.read_bytes() == data
    assert threads.counters["threaded_operations"] > 2 * 5 * MiB // BATCH_BYTES
