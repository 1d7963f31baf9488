"""``aiocrypt._streams``: the refusals and clean-ups the service-level tests do not reach."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from aiocrypt import DecryptionError
from aiocrypt._bulk import MAX_SEGMENT_SIZE, StreamEncryptor
from aiocrypt._errors import DecryptionFailure
from aiocrypt._format import ALG_AES_256_GCM, ALG_AES_256_SIV, FLAG_ZSTD, Header
from aiocrypt._format import ALG_AES_256_GCM_STREAM as STREAM
from aiocrypt._streams import (
    BATCH_BYTES,
    _settle,
    byte_chunks,
    read_file,
    seal_stream,
    stream_key_id,
    write_file_atomically,
)

from ._core_keys import data_key


async def run(func: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(func, *args)


def test_byte_chunks_wants_an_iterable_of_chunks() -> None:
    for single in (b"x", bytearray(b"x"), memoryview(b"x"), "x"):
        with pytest.raises(TypeError, match="not a single bytes or str object"):
            byte_chunks(single)  # type: ignore[arg-type]
    for wrong in (1, None, object()):
        with pytest.raises(TypeError, match="expected an iterable of byte chunks, not"):
            byte_chunks(wrong)  # type: ignore[arg-type]


async def test_the_compression_flag_and_level_go_together() -> None:
    plain, zstd = (StreamEncryptor(data_key(), b"", 1024, flags=f) for f in (0, FLAG_ZSTD))
    for enc, level in ((plain, 3), (zstd, None)):
        with pytest.raises(ValueError, match="FLAG_ZSTD and compression_level go together"):
            async for _ in seal_stream(enc, [b"x"], run, 1 << 20, level):
                pass


def _preamble(version: int, segment_size: int = 1024) -> bytes:
    return Header(STREAM, 0, "k1", version).to_bytes() + segment_size.to_bytes(4, "big") + bytes(23)


def test_version_1_streams_are_refused_when_asked() -> None:
    assert stream_key_id(_preamble(1)).version == 1
    with pytest.raises(DecryptionError, match="format version 1 streams") as exc:
        stream_key_id(_preamble(1), accept_v1=False)
    assert exc.value.reason is DecryptionFailure.MALFORMED
    assert stream_key_id(_preamble(2), accept_v1=False).version == 2


async def test_settle_waits_for_a_cancelled_hop() -> None:
    hop: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    hop.cancel()
    await _settle(hop)
    failed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    failed.set_exception(OSError("disk"))
    await _settle(failed)  # retrieved: no "exception was never retrieved" warning


async def test_read_file_aligned_keeps_reading_after_a_bad_preamble(tmp_path: Path) -> None:
    path = tmp_path / "not-a-stream"
    data = bytes(range(256)) * 40
    path.write_bytes(data)
    chunks = [c async for c in read_file(path, 1000, run, stream_aligned=True)]
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks[2:4]] == [1000, 1000]  # plain chunks after the preamble
    short = tmp_path / "short"
    short.write_bytes(b"ab")
    assert [c async for c in read_file(short, 1000, run, stream_aligned=True)] == [b"ab"]


async def test_a_failure_with_a_write_in_flight_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"before")

    async def parts() -> AsyncIterator[bytes]:
        yield bytes(BATCH_BYTES)  # one write hop starts
        await asyncio.sleep(0)
        raise DecryptionError()

    with pytest.raises(DecryptionError):
        await write_file_atomically(target, parts(), run)
    assert target.read_bytes() == b"before"
    assert os.listdir(tmp_path) == ["out"]


def test_stream_key_id_refusals() -> None:
    blob = Header(ALG_AES_256_GCM, 0, "k1").to_bytes() + bytes(40)
    with pytest.raises(DecryptionError, match="one-shot bulk blob") as exc:
        stream_key_id(blob)
    assert exc.value.reason is DecryptionFailure.WRONG_PURPOSE and exc.value.key_id == "k1"
    for bad in (
        Header(ALG_AES_256_SIV, 0, "k1").to_bytes() + bytes(40),
        _preamble(2)[:-1],
        b"not a stream at all",
    ):
        with pytest.raises(DecryptionError) as exc:
            stream_key_id(bad)
        assert exc.value.reason is DecryptionFailure.MALFORMED


@pytest.mark.parametrize(
    ("size", "limit", "ok"),
    [
        (1023, MAX_SEGMENT_SIZE, False),
        (1024, MAX_SEGMENT_SIZE, True),
        (MAX_SEGMENT_SIZE, MAX_SEGMENT_SIZE, True),
        (MAX_SEGMENT_SIZE + 1, 2**32 - 1, False),
        (4096, 4096, True),
        (4097, 4096, False),
    ],
)
def test_segment_size_limits(size: int, limit: int, ok: bool) -> None:
    if ok:
        assert stream_key_id(_preamble(2, size), max_segment_size=limit).segment_size == size
    else:
        with pytest.raises(DecryptionError, match="segment size is outside the limits"):
            stream_key_id(_preamble(2, size), max_segment_size=limit)
