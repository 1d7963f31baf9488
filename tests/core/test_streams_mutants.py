"""``aiocrypt._streams``: the pipeline's cuts, batches, hops and bounds, as numbers.

Issue 21's mutation run of ``_streams.py``: a stream round-trips whatever its
segmenter, batcher or scheduler gets wrong by one, so these tests pin each of
them on its own (the pieces a ``Segmenter`` cuts, the batches it hands out, the
parts ``_steps`` works inline and the hops it sends to a worker thread, where
it yields to the loop, the reads and writes of the file helpers), and the
reader's bounds (the default segment-size limit, the first segment read alone).
"""

from __future__ import annotations

import array
import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio.lowlevel
import pytest

from aiocrypt import DecryptionError
from aiocrypt._bulk import StreamEncryptor
from aiocrypt._crypto import DataKey
from aiocrypt._errors import DecryptionFailure
from aiocrypt._format import ALG_AES_256_GCM_STREAM as STREAM
from aiocrypt._format import FLAG_ZSTD, Header
from aiocrypt._streams import (
    _COPY_PIECE,
    _IV_BYTES,
    BATCH_BYTES,
    DEFAULT_MAX_SEGMENT,
    INLINE_BYTES,
    INLINE_SEGMENT_LIMIT,
    Segmenter,
    _copies,
    _steps,
    batch_count,
    byte_chunks,
    open_stream,
    read_file,
    seal_stream,
    stream_key_id,
    write_file_atomically,
)

from ._core_keys import data_key

MiB = 1 << 20
Batch = list[tuple[bytes | memoryview, bool]]


class Runner:
    """A worker-thread runner that records what it was handed."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    async def __call__(self, func: Callable[..., Any], *args: Any) -> Any:
        self.calls.append(getattr(func, "__name__", func))
        return await asyncio.to_thread(func, *args)


async def _chunks(data: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in data:
        yield chunk


def test_the_tuning_constants_as_numbers() -> None:
    assert (BATCH_BYTES, INLINE_BYTES, INLINE_SEGMENT_LIMIT, DEFAULT_MAX_SEGMENT, _COPY_PIECE) == (
        4 * MiB,
        MiB,
        4 * MiB,
        4 * MiB,
        MiB,
    )
    assert _IV_BYTES == 4 + 16 + 7


@pytest.mark.parametrize(
    ("segment_size", "count"),
    [
        (1024, 4096),
        (MiB, 4),
        (2 * MiB, 2),
        (3 * MiB, 1),
        (4 * MiB, 1),
        (4 * MiB + 1, 1),
        (64 * MiB, 1),
    ],
)
def test_batch_count(segment_size: int, count: int) -> None:
    assert batch_count(segment_size) == count


# -- chunks and copies ------------------------------------------------------------------


def test_mutable_chunks_are_copied_a_mib_at_a_time() -> None:
    chunk = bytearray(b"\x01" * (2 * MiB + 1))
    pieces = list(_copies(chunk))
    assert [len(p) for p in pieces] == [MiB, MiB, 1]
    assert all(type(p) is bytes for p in pieces) and b"".join(pieces) == chunk
    assert list(_copies(bytearray())) == []
    words = array.array("I", [1, 2])  # any buffer: copied as its bytes
    assert b"".join(_copies(memoryview(words))) == words.tobytes()


async def test_bytes_pass_uncopied_and_the_rest_is_copied() -> None:
    data, mutable = b"immutable", bytearray(b"mutable")
    source: list[Any] = [data, mutable, b"", memoryview(b"view")]
    out = [c async for c in byte_chunks(source)]
    assert out[0] is data
    assert out[1:] == [b"mutable", b"", b"view"] and type(out[1]) is bytes
    assert [c async for c in byte_chunks(_chunks([data]))] == [data]


# -- the Segmenter ----------------------------------------------------------------------


async def test_fill_buffers_at_least_the_size_and_skips_empty_chunks() -> None:
    seg = Segmenter(_chunks([b"ab", b"", b"cde", b"f"]))
    assert await seg.fill(0) and seg.buffered == 0
    assert await seg.fill(2) and seg.buffered == 2  # exactly enough: no chunk more
    assert await seg.fill(3) and seg.buffered == 5
    assert len(seg._pieces) == 2  # the empty chunk left no piece
    assert await seg.fill(6) and seg.buffered == 6
    assert not await seg.fill(7)
    assert seg.buffered == 6


async def test_take_slices_within_a_chunk_and_joins_across_chunks() -> None:
    first, second = b"abcdef", b"ghij"
    seg = Segmenter(_chunks([first, second, b"k"]))
    await seg.fill(11)
    assert seg.take(0) == b"" and seg.buffered == 11
    piece = seg.take(2)
    assert isinstance(piece, memoryview) and piece.obj is first and bytes(piece) == b"ab"
    whole = seg.take(4)  # the rest of the first chunk exactly
    assert isinstance(whole, memoryview) and bytes(whole) == b"cdef" and seg.buffered == 5
    joined = seg.take(5)  # across two chunks: one joined copy
    assert type(joined) is bytes and joined == b"ghijk" and seg.buffered == 0
    seg = Segmenter(_chunks([b"ab", b"cd", b"ef"]))
    await seg.fill(6)
    assert seg.take(3) == b"abc" and seg.take(2) == b"de" and seg.take(1) == b"f"


async def _batches(
    data: bytes, chunk: int, size: int, count: int, first: int | None = None
) -> list[list[tuple[bytes, bool]]]:
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    return [
        [(bytes(p), last) for p, last in batch]
        async for batch in Segmenter(_chunks(pieces)).batches(size, count, first)
    ]


@pytest.mark.parametrize(
    ("total", "shape"),
    [
        (0, [[(0, True)]]),
        (4, [[(4, True)]]),
        (5, [[(4, False)], [(1, True)]]),
        (8, [[(4, False)], [(4, True)]]),
        (12, [[(4, False)], [(4, False), (4, True)]]),
        (13, [[(4, False)], [(4, False), (4, False)], [(1, True)]]),
        (23, [[(4, False)], [(4, False), (4, False)], [(4, False), (4, False)], [(3, True)]]),
    ],
)
async def test_batches_release_a_piece_only_once_a_byte_beyond_it_came(
    total: int, shape: list[list[tuple[int, bool]]]
) -> None:
    data = bytes(range(total))
    batches = await _batches(data, 10, 4, 2, first=1)
    assert [[(len(p), last) for p, last in b] for b in batches] == shape
    assert b"".join(p for b in batches for p, _ in b) == data


async def test_batches_without_a_first_size_are_all_count_long() -> None:
    shape = [[(len(p), last) for p, last in b] for b in await _batches(bytes(9), 3, 2, 2)]
    assert shape == [[(2, False), (2, False)], [(2, False), (2, False)], [(1, True)]]


# -- _steps: inline parts, worker-thread hops, yields to the loop --------------------------


async def _run_steps(
    batches: list[Batch], threshold: int, holds_gil: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[int], Runner, list[int], int]:
    parts: list[int] = []
    checkpoints = 0
    real = anyio.lowlevel.checkpoint

    async def counting() -> None:
        nonlocal checkpoints
        checkpoints += 1
        await real()

    monkeypatch.setattr(anyio.lowlevel, "checkpoint", counting)

    def step(batch: Batch) -> list[int]:
        parts.append(len(batch))
        return [len(segment) for segment, _ in batch]

    async def source() -> AsyncIterator[Batch]:
        for batch in batches:
            yield batch

    runner = Runner()
    out = [n async for n in _steps(source(), step, runner, threshold, holds_gil=holds_gil)]
    return parts, runner, out, checkpoints


async def test_inline_work_is_cut_into_parts_of_a_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    batch: Batch = [(bytes(1024), False) for _ in range(3000)]
    batch.append((b"end", True))
    parts, runner, out, checkpoints = await _run_steps([batch], 0, True, monkeypatch)
    assert parts == [1024, 1024, 953]  # INLINE_BYTES of 1 KiB segments per part
    assert runner.calls == [] and out == [1024] * 3000 + [3]
    assert checkpoints == 2  # after each whole MiB of work


async def test_the_loop_gets_a_turn_after_every_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    batch: Batch = [(bytes(1024), False)] * 3072
    _, _, _, checkpoints = await _run_steps([batch], 0, True, monkeypatch)
    assert checkpoints == 3
    small: Batch = [(bytes(1024), False)] * 1023
    _, _, _, checkpoints = await _run_steps([small], 0, True, monkeypatch)
    assert checkpoints == 0


async def test_empty_segments_are_worked_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    parts, runner, out, _ = await _run_steps([[(b"", True)]], 0, True, monkeypatch)
    assert (parts, runner.calls, out) == ([1], [], [0])


@pytest.mark.parametrize(
    ("segment", "hops", "parts"),
    [
        (INLINE_SEGMENT_LIMIT, 0, [1, 1]),  # inline, one segment per part (each over a MiB)
        (INLINE_SEGMENT_LIMIT + 1, 1, [2]),  # the whole batch in one hop
    ],
)
async def test_only_segments_above_the_inline_limit_go_to_a_thread(
    segment: int, hops: int, parts: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch: Batch = [(bytes(segment), False), (b"", True)]
    worked, runner, out, _ = await _run_steps([batch], 0, True, monkeypatch)
    assert len(runner.calls) == hops and out == [segment, 0]
    assert worked == parts


@pytest.mark.parametrize("holds_gil", [True, False])
async def test_a_thread_hop_only_above_the_threshold(
    holds_gil: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = INLINE_SEGMENT_LIMIT + 1 if holds_gil else 1000
    batch: Batch = [(bytes(size), False), (bytes(10), True)]
    _, runner, out, _ = await _run_steps([list(batch)], size + 10, holds_gil, monkeypatch)
    assert runner.calls == [] and out == [size, 10]
    _, runner, out, _ = await _run_steps([list(batch)], size + 9, holds_gil, monkeypatch)
    assert len(runner.calls) == 1 and out == [size, 10]


async def test_work_that_releases_the_gil_yields_after_a_mib_inline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batches: list[Batch] = [[(bytes(MiB // 2), False)] for _ in range(4)]
    _, runner, _, checkpoints = await _run_steps(batches, MiB, False, monkeypatch)
    assert runner.calls == [] and checkpoints == 2


# -- the reader's bounds ------------------------------------------------------------------


async def _sealed(dk: DataKey, data: bytes, segment_size: int) -> list[bytes]:
    enc = StreamEncryptor(dk, b"c", segment_size)
    return [part async for part in seal_stream(enc, [data], Runner(), 1 << 30)]


async def _open(parts: Iterable[bytes], dk: DataKey, **kwargs: Any) -> bytes:
    async def find(key_id: str) -> DataKey:
        return dk

    return b"".join([p async for p in open_stream(parts, find, b"c", Runner(), 1 << 30, **kwargs)])


async def test_the_default_segment_limit_is_4_mib() -> None:
    dk = data_key()
    data = b"\x07" * (4 * MiB + 3)
    assert await _open(await _sealed(dk, data, 4 * MiB), dk) == data
    bigger = await _sealed(dk, data, 4 * MiB + 1)
    with pytest.raises(DecryptionError, match="segment size is outside the limits"):
        await _open(bigger, dk)
    assert await _open(bigger, dk, max_segment_size=4 * MiB + 1) == data


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (0, "no preamble"),
        (3, "no preamble"),
        (4, "preamble cut short"),
        (-1, "preamble cut short"),
        (None, "the stream is cut short"),
    ],
)
async def test_a_stream_cut_in_its_preamble(cut: int | None, message: str) -> None:
    dk = data_key()
    parts = await _sealed(dk, b"data", 1024)
    preamble = parts[0]
    head = preamble if cut is None else preamble[:cut]
    with pytest.raises(DecryptionError, match=message) as exc:
        await _open([head], dk)
    assert exc.value.reason is DecryptionFailure.MALFORMED


async def test_the_shortest_stream_opens() -> None:
    dk = data_key()
    parts = await _sealed(dk, b"", 1024)
    assert [len(p) for p in parts[1:]] == [16]
    assert await _open(parts, dk) == b""
    with pytest.raises(DecryptionError, match="cut short"):
        await _open([b"".join(parts)[:-1]], dk)


async def test_a_forged_preamble_fails_before_a_batch_is_read_ahead() -> None:
    dk = data_key()
    parts = await _sealed(dk, bytes(1024 * 20), 1024)
    preamble = bytearray(parts[0])
    preamble[-1] ^= 1  # the nonce prefix: every segment fails
    pulled = 0

    def source() -> Iterable[bytes]:
        nonlocal pulled
        for part in [bytes(preamble), *parts[1:]]:
            pulled += 1
            yield part

    with pytest.raises(DecryptionError):
        await _open(source(), dk)
    assert pulled == 3  # the preamble, the first segment and one chunk to know it's not last


def test_stream_key_id_reads_the_preamble_exactly() -> None:
    header = Header(STREAM, FLAG_ZSTD, "key-1").to_bytes()
    iv = bytes(range(23))
    preamble = header + (2048).to_bytes(4, "big") + iv
    parsed = stream_key_id(preamble + b"segments follow")
    assert parsed == ("key-1", FLAG_ZSTD, 2048, iv, len(header) + 27, 2)
    assert stream_key_id(preamble).length == len(preamble)
    with pytest.raises(DecryptionError):
        stream_key_id(preamble[:-1])


# -- files -------------------------------------------------------------------------------


async def test_writes_go_in_hops_of_4_mib(tmp_path: Path) -> None:
    async def parts(count: int) -> AsyncIterator[bytes]:
        for i in range(count):
            yield bytes([i]) * MiB

    for count, hops in ((4, 1), (5, 2), (8, 2), (9, 3), (3, 1)):
        runner = Runner()
        target = tmp_path / f"out{count}"
        assert await write_file_atomically(target, parts(count), runner) == count * MiB
        assert runner.calls.count("_write_all") == hops, count
        assert target.read_bytes() == b"".join(bytes([i]) * MiB for i in range(count))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{c}" for c in (3, 4, 5, 8, 9)]


async def test_an_aligned_read_hands_over_whole_sealed_segments(tmp_path: Path) -> None:
    dk = data_key()
    parts = await _sealed(dk, bytes(5000), 1024)
    path = tmp_path / "stream"
    path.write_bytes(b"".join(parts))
    chunks = [c async for c in read_file(path, 100, Runner(), stream_aligned=True)]
    assert b"".join(chunks[:2]) == parts[0] and len(chunks[0]) == 4
    assert [len(c) for c in chunks[2:]] == [1040] * 4 + [904 + 16]
    plain = [c async for c in read_file(path, 1000, Runner())]
    assert [len(c) for c in plain][:2] == [1000, 1000] and b"".join(plain) == path.read_bytes()


# -- the first full run's survivors ---------------------------------------------------------


async def test_fill_says_false_and_take_leaves_no_empty_piece() -> None:
    seg = Segmenter(_chunks([b"ab", b"cd"]))
    assert await seg.fill(4) is True
    assert seg.take(4) == b"abcd"  # ends exactly at a chunk's end
    assert len(seg._pieces) == 0
    assert await seg.fill(1) is False


@pytest.mark.parametrize(
    ("sizes", "holds_gil", "expected"),
    [
        ([INLINE_BYTES - 1], True, 0),
        ([INLINE_BYTES], True, 1),
        ([INLINE_BYTES, INLINE_BYTES - 1], True, 1),
        ([INLINE_BYTES, INLINE_BYTES], True, 2),
        ([INLINE_BYTES - 1], False, 0),
        ([INLINE_BYTES], False, 1),
        ([INLINE_BYTES, INLINE_BYTES - 1], False, 1),
    ],
)
async def test_yields_to_the_loop_at_exactly_a_mib(
    sizes: list[int], holds_gil: bool, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[Batch] = [[(bytes(size), False)] for size in sizes]
    _, runner, _, checkpoints = await _run_steps(batches, 1 << 30, holds_gil, monkeypatch)
    assert runner.calls == [] and checkpoints == expected


async def test_batches_are_emptied_once_worked(monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[Batch] = [[(bytes(10), False), (bytes(5), True)]]
    kept = list(batches)
    _, runner, out, _ = await _run_steps(batches, 0, False, monkeypatch)
    assert len(runner.calls) == 1 and out == [10, 5] and kept[0] == []


async def test_aes_is_inline_and_zstd_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    dk = data_key()
    data = bytes(range(256)) * 40
    runner = Runner()
    parts = [p async for p in seal_stream(StreamEncryptor(dk, b"c", 1024), [data], runner, 0)]
    assert runner.calls == []  # AES holds the GIL: inline even above the threshold
    assert await _open(parts, dk) == data
    zstd = Runner()
    enc = StreamEncryptor(dk, b"c", 1024, flags=FLAG_ZSTD)
    parts = [p async for p in seal_stream(enc, [data], zstd, 0, 3)]
    assert zstd.calls and all(call == "step" for call in zstd.calls)
    assert await _open(parts, dk) == data
    assert sum(len(p) for p in parts[1:]) < len(data)  # compressed
    empty = StreamEncryptor(dk, b"c", 1024, flags=FLAG_ZSTD)
    parts = [p async for p in seal_stream(empty, [b""], Runner(), 1 << 30, 3)]
    assert [len(p) for p in parts[1:]] == [16] and await _open(parts, dk) == b""


async def test_a_compressed_stream_whose_records_do_not_decode_is_refused() -> None:
    from aiocrypt import _compression

    dk = data_key()
    record = _compression.compress_record(b"x" * 500, 3)
    for plaintext in (b"not a zstd record", record[: len(record) // 2]):
        enc = StreamEncryptor(dk, b"c", 1024, flags=FLAG_ZSTD)
        parts = [enc.preamble, enc.seal(plaintext, True)]
        with pytest.raises(DecryptionError, match="does not decompress") as exc:
            await _open(parts, dk)
        assert exc.value.reason is DecryptionFailure.MALFORMED
    enc = StreamEncryptor(dk, b"c", 1024, flags=FLAG_ZSTD)
    assert await _open([enc.preamble, enc.seal(record, True)], dk) == b"x" * 500


async def test_version_1_streams_open_by_default() -> None:
    from aiocrypt._crypto import stream_nonce
    from aiocrypt._format import Purpose

    dk = data_key()
    salt, prefix = bytes(range(16)), bytes(7)
    aad = dk.aad(STREAM, 0, b"c", purpose=Purpose.STREAM, version=1)
    cipher = dk.stream_cipher(salt)
    pieces = [bytes(1024), b"tail"]
    parts = [Header(STREAM, 0, dk.key_id, 1).to_bytes() + (1024).to_bytes(4, "big") + salt + prefix]
    parts += [cipher.encrypt(stream_nonce(prefix, i, i == 1), p, aad) for i, p in enumerate(pieces)]
    assert await _open(parts, dk) == b"".join(pieces)
    with pytest.raises(DecryptionError, match="format version 1"):
        await _open(parts, dk, accept_v1=False)


async def test_an_aligned_read_of_three_bytes(tmp_path: Path) -> None:
    path = tmp_path / "three"
    path.write_bytes(b"abc")
    assert [c async for c in read_file(path, 100, Runner(), stream_aligned=True)] == [b"abc"]


async def test_write_hops_count_the_bytes_from_zero(tmp_path: Path) -> None:
    async def parts(sizes: list[int]) -> AsyncIterator[bytes]:
        for size in sizes:
            yield bytes(size)

    for sizes, hops in (([4 * MiB - 1, 1], 1), ([4 * MiB, 4 * MiB - 1, 1], 2)):
        runner = Runner()
        await write_file_atomically(tmp_path / "out", parts(sizes), runner)
        assert runner.calls.count("_write_all") == hops, sizes


def test_write_all_lets_go_of_the_parts(tmp_path: Path) -> None:
    from aiocrypt._streams import _write_all

    parts = [b"ab", b"cd"]
    with open(tmp_path / "f", "wb") as fh:
        assert _write_all(fh, parts) == 4
    assert parts == [] and (tmp_path / "f").read_bytes() == b"abcd"


def test_commit_closes_the_directory_it_syncs(tmp_path: Path) -> None:
    import os

    from aiocrypt._streams import _commit, _create_temporary

    before = len(os.listdir("/proc/self/fd"))
    target, directory, fh, tmp = _create_temporary(str(tmp_path / "f"))
    fh.write(b"data")
    _commit(fh, tmp, target, directory)
    assert fh.closed and (tmp_path / "f").read_bytes() == b"data"
    assert len(os.listdir("/proc/self/fd")) == before


async def test_a_cancelled_hop_is_waited_for_and_the_cancellation_goes_on() -> None:
    import threading

    from aiocrypt._streams import _complete, _start

    release, started = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        return "done"

    hop = _start(Runner(), slow)
    waiter = asyncio.ensure_future(_complete(hop))
    await asyncio.to_thread(started.wait, 10)
    waiter.cancel()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiter.done()  # waiting for the thread, not abandoning it
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert hop.done() and hop.result() == "done"


async def test_settle_retrieves_the_failure() -> None:
    import gc

    from aiocrypt._streams import _settle

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        failed: asyncio.Future[int] = loop.create_future()
        failed.set_exception(OSError("disk"))
        await _settle(failed)
        del failed
        gc.collect()
        assert reported == []
    finally:
        loop.set_exception_handler(None)


# -- _parallel_steps: batches in worker threads, results in order ----------------------------


class Gauge(Runner):
    """A runner that counts the hops in flight (started, not finished)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = self.most = 0

    async def __call__(self, func: Callable[..., Any], *args: Any) -> Any:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            return await super().__call__(func, *args)
        finally:
            self.in_flight -= 1


async def _parallel(
    count: int, workers: int, runner: Runner, pulled: list[int]
) -> AsyncIterator[int]:
    from aiocrypt._streams import _parallel_steps

    async def batches() -> AsyncIterator[Batch]:
        for i in range(count):
            pulled.append(i)
            yield [(bytes([i]), i == count - 1)]

    claimed: list[int] = []

    def claim(segment: bytes | memoryview, last: bool) -> int:
        claimed.append(len(claimed))
        return claimed[-1]

    def work(jobs: list[tuple[int, bytes | memoryview, bool]]) -> list[int]:
        return [index for index, _, _ in jobs]

    return _parallel_steps(batches(), claim, work, runner, workers)


@pytest.mark.parametrize("workers", [2, 3])
async def test_parallel_steps_keep_workers_batches_in_flight(workers: int) -> None:
    gauge, pulled = Gauge(), list[int]()
    results: list[int] = []
    async for index in await _parallel(8, workers, gauge, pulled):
        if not results:
            assert pulled == [0]  # the first batch is done before another is read
        results.append(index)
    assert results == list(range(8))  # in order
    assert gauge.most == workers and gauge.in_flight == 0
    assert gauge.calls == ["work"] * 8


async def test_parallel_steps_wait_for_their_threads_when_the_consumer_stops() -> None:
    import threading

    from aiocrypt._streams import _parallel_steps

    release = threading.Event()
    gauge = Gauge()

    async def batches() -> AsyncIterator[Batch]:
        for i in range(4):
            yield [(bytes([i]), i == 3)]

    def work(jobs: list[tuple[int, bytes | memoryview, bool]]) -> list[int]:
        if jobs[0][0] >= 2:  # batches 2 and 3 stay in flight
            release.wait(10)
        return [jobs[0][0]]

    steps = _parallel_steps(batches(), lambda s, last: s[0], work, gauge, 3)
    assert await anext(steps) == 0
    assert await anext(steps) == 1
    closing = asyncio.ensure_future(steps.aclose())  # type: ignore[attr-defined]
    for _ in range(20):
        await asyncio.sleep(0)
    assert not closing.done() and gauge.in_flight > 0
    release.set()
    await closing
    assert gauge.in_flight == 0


async def test_more_than_one_worker_takes_the_parallel_path() -> None:
    dk = data_key()
    data = bytes(range(256)) * 40
    for workers, hops in ((1, 0), (2, 1)):
        runner = Runner()
        enc = StreamEncryptor(dk, b"c", 1024)
        parts = [p async for p in seal_stream(enc, [data], runner, 1 << 30, workers=workers)]
        assert runner.calls.count("work") == hops and runner.calls.count("step") == 0
        assert await _open(parts, dk) == data
    opening = Runner()

    async def find(key_id: str) -> DataKey:
        return dk

    opened = [p async for p in open_stream(parts, find, b"c", opening, 0)]
    assert b"".join(opened) == data and opening.calls == []  # one worker by default


class Holding(Gauge):
    """A runner whose calls of ``name`` after the first ``free`` wait for :attr:`release`."""

    def __init__(self, name: str, free: int) -> None:
        super().__init__()
        self.name, self.free = name, free
        self.release = threading.Event()

    async def __call__(self, func: Callable[..., Any], *args: Any) -> Any:
        if getattr(func, "__name__", None) == self.name:
            self.free -= 1
            if self.free < 0:

                def held(*args: Any) -> Any:
                    self.release.wait(10)
                    return func(*args)

                held.__name__ = self.name
                return await super().__call__(held, *args)
        return await super().__call__(func, *args)


async def _not_done_until_released(task: asyncio.Future[Any], runner: Holding) -> None:
    # the held call starts once the hops before it are done (creating the file is one, in
    # a thread: a slow disk takes more than a few turns of the loop)
    async with asyncio.timeout(5):
        while runner.in_flight == 0 and not task.done():
            await asyncio.sleep(0.001)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done() and runner.in_flight == 1  # waiting for the thread
    runner.release.set()


async def test_read_file_closed_early_waits_for_its_read_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(bytes(100))
    runner = Holding("read", 1)
    chunks = read_file(path, 10, runner)
    assert await anext(chunks) == bytes(10)  # the next read is in flight, held
    closing = asyncio.ensure_future(chunks.aclose())
    await _not_done_until_released(closing, runner)
    await closing
    assert runner.in_flight == 0


async def test_a_failed_write_waits_for_its_write_in_flight(tmp_path: Path) -> None:
    runner = Holding("_write_all", 0)

    async def parts() -> AsyncIterator[bytes]:
        yield bytes(BATCH_BYTES)  # one write hop starts, held
        raise DecryptionError()

    writing = asyncio.ensure_future(write_file_atomically(tmp_path / "out", parts(), runner))
    await _not_done_until_released(writing, runner)
    with pytest.raises(DecryptionError):
        await writing
    assert runner.in_flight == 0 and list(tmp_path.iterdir()) == []
