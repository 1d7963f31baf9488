"""Async streaming encryption: O(segment) memory for data of any size.

The output of :func:`seal_stream` is byte-for-byte the binary blob form of a
segmented ``EncryptedData`` (header, segment size, salt, nonce prefix, sealed
segments), so a stream can be decrypted as a whole with ``decrypt_bulk_data`` and
a blob can be streamed back through :func:`open_stream`.

Speed comes from not copying: input chunks are cut into segments with
memoryview slices (a copy is made only for a segment that spans two chunks), so
a source that yields segment-sized chunks, such as the ciphertext of another
stream or a file read segment by segment, passes straight through to the
cipher. Each sealed or opened segment is a fresh, immutable ``bytes`` that stays
valid after the consumer holds it.

The AES work is done inline, in the coroutine, yielding to the loop after every
INLINE_BYTES of it: cryptography holds the GIL during a call, so a worker thread
would run no AES in parallel with the loop, and would add a hand-off and a loop
wake-up per hop (measured: inline 0.8-0.98x of raw segmented AES-GCM with 1-1.6 ms
of loop lag, against 0.5-0.86x for 4 MiB per thread hop, for a 256 MiB stream).
What bounds the loop's lag is the size of one call, which segmenting bounds.
Only segments larger than INLINE_SEGMENT_LIMIT go to a worker thread (in
batches of about BATCH_BYTES), and so does zstd, which releases the GIL.

With ``FLAG_ZSTD`` in the header, the authenticated plaintext is a sequence of
zstd records, one per input segment (see :mod:`aiocrypt._compression`); each
decompresses with a hard bound of one segment.

Over 500 lines on purpose: the sealing and the opening side of one stream format,
with the segment buffering both share, change together or not at all; the module
is pure core, held to 100 % coverage and mutation-tested as one unit.

What a reader buffers before its first authentication is bounded: the header's
segment size must not exceed the reader's ``max_segment_size`` (DEFAULT_MAX_SEGMENT
unless the caller raises it), and the first segment is opened on its own, before
a batch of them is read. Format version 2 binds the segment size, salt and
nonce prefix into every segment's associated data, so a rewritten preamble
fails at that first segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import struct
import tempfile
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from typing import Any, Final, NamedTuple, TypeVar

import anyio.lowlevel

from . import _compression
from ._bulk import MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, StreamDecryptor, StreamEncryptor
from ._crypto import STREAM_PREFIX_BYTES, STREAM_SALT_BYTES, TAG_BYTES, DataKey
from ._errors import DecryptionError, DecryptionFailure, decryption_failed
from ._format import (
    ALG_AES_256_GCM,
    ALG_AES_256_GCM_STREAM,
    FLAG_ZSTD,
    FORMAT_V1,
    FormatError,
    parse_binary,
)

__all__ = [
    "DEFAULT_MAX_SEGMENT",
    "Segmenter",
    "StreamPreamble",
    "byte_chunks",
    "open_stream",
    "read_file",
    "seal_stream",
    "stream_key_id",
    "write_file_atomically",
]

T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]
#: Work handed to a worker thread per hop (see :func:`batch_count`).
BATCH_BYTES: Final = 4 * 1024 * 1024
#: Inline AES work between two yields to the loop (about 0.15 ms with AES-NI).
INLINE_BYTES: Final = 1024 * 1024
#: Segments up to this size are sealed and opened inline.
INLINE_SEGMENT_LIMIT: Final = 4 * 1024 * 1024
#: Largest segment size a reader accepts unless told otherwise: the largest any
#: performance mode writes. What a hostile header can make a reader buffer before
#: its first authentication is one segment of at most this size.
DEFAULT_MAX_SEGMENT: Final = 4 * 1024 * 1024
Source = AsyncIterable[bytes] | Iterable[bytes]
_U32: Final = struct.Struct(">I")
_COPY_PIECE: Final = 1024 * 1024
_IV_BYTES: Final = 4 + STREAM_SALT_BYTES + STREAM_PREFIX_BYTES
_MALFORMED: Final = DecryptionFailure.MALFORMED


def byte_chunks(source: Source) -> AsyncIterator[bytes]:
    """The chunks of a sync or async iterable as immutable bytes (bytes pass uncopied)."""
    if isinstance(source, (bytes, bytearray, memoryview, str)):
        raise TypeError("pass an iterable of byte chunks, not a single bytes or str object")
    if not hasattr(source, "__aiter__") and not hasattr(source, "__iter__"):
        raise TypeError(f"expected an iterable of byte chunks, not {type(source).__name__}")
    return _byte_chunks(source)


async def _byte_chunks(source: Source) -> AsyncIterator[bytes]:
    chunks = source if isinstance(source, AsyncIterable) else _as_async(source)
    async for chunk in chunks:
        if type(chunk) is bytes:
            yield chunk
        else:
            for piece in _copies(chunk):
                yield piece


async def _as_async(source: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in source:
        yield chunk


def _copies(chunk: bytes | bytearray | memoryview) -> Iterator[bytes]:
    """Copies of a mutable chunk (its producer may reuse it), a piece at a time.

    A large chunk is copied in pieces between which the pipeline gets to hand
    work to a thread, so no single copy holds the loop for long.
    """
    view = memoryview(chunk).cast("B")
    for start in range(0, len(view), _COPY_PIECE):
        yield bytes(view[start : start + _COPY_PIECE])


class Segmenter:
    """Cuts a stream of byte chunks into pieces of exact sizes.

    A piece inside one chunk is a memoryview slice of it (no copy); only a
    piece that spans chunks is joined. At most the requested size plus one
    chunk is buffered.
    """

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._pieces: deque[memoryview] = deque()
        self.buffered = 0

    async def fill(self, size: int) -> bool:
        """Buffer at least ``size`` bytes; False if the input ended first."""
        while self.buffered < size:
            chunk = await anext(self._chunks, None)
            if chunk is None:
                return False
            if chunk:
                self._pieces.append(memoryview(chunk))
                self.buffered += len(chunk)
        return True

    def take(self, size: int) -> bytes | memoryview:
        """The next ``size`` buffered bytes (``size`` <= :attr:`buffered`)."""
        pieces = self._pieces
        self.buffered -= size
        if not size:
            return b""
        first = pieces[0]
        if len(first) >= size:
            if len(first) == size:
                pieces.popleft()
            else:
                pieces[0] = first[size:]
            return first[:size]
        parts: list[memoryview] = []
        need = size
        while need:
            piece = pieces[0]
            if len(piece) <= need:
                parts.append(pieces.popleft())
                need -= len(piece)
            else:
                parts.append(piece[:need])
                pieces[0] = piece[need:]
                need = 0
        return b"".join(parts)

    async def batches(
        self, size: int, count: int, first: int | None = None
    ) -> AsyncIterator[list[tuple[bytes | memoryview, bool]]]:
        """Up to ``count`` (piece, last) pairs at a time (``first`` in the first batch):
        pieces of exactly ``size`` bytes, then a last one of 0..size bytes flagged True.

        A piece is released only once a byte beyond it arrived (or the input ended),
        so the last flag is always right.
        """
        n = count if first is None else first
        while await self.fill(size * n + 1):
            yield [(self.take(size), False) for _ in range(n)]
            n = count
        batch: list[tuple[bytes | memoryview, bool]] = []
        while self.buffered > size:
            batch.append((self.take(size), False))
        batch.append((self.take(self.buffered), True))
        yield batch


def batch_count(segment_size: int) -> int:
    """Segments handed to a worker thread at once: about BATCH_BYTES of work per hop.

    A hop costs about 70 us here, the AES for 1 MiB about 130 us: one segment
    per hop would spend a third of the time hopping. The loop waits at most one
    batch's AES work (under 1 ms for 4 MiB).
    """
    return max(1, BATCH_BYTES // segment_size)


async def _steps(
    batches: AsyncIterator[list[tuple[bytes | memoryview, bool]]],
    step: Callable[[list[tuple[bytes | memoryview, bool]]], list[T]],
    run: Runner,
    threshold: int,
    *,
    holds_gil: bool = True,
) -> AsyncIterator[T]:
    """Apply ``step`` to each batch, in order.

    A step that ``holds_gil`` (the AES) runs inline, a part of at most
    INLINE_BYTES at a time with a yield to the loop after each, unless its
    segments exceed INLINE_SEGMENT_LIMIT; a step that releases the GIL (zstd)
    runs in a worker thread above ``threshold`` bytes. Inline work always yields
    to the loop, so a source that never suspends (a list of chunks) cannot hold
    the loop for the whole stream.
    """
    inline = 0
    async for batch in batches:
        largest = max((len(segment) for segment, _ in batch), default=0)
        if holds_gil and largest <= INLINE_SEGMENT_LIMIT:
            per_part = max(1, INLINE_BYTES // max(1, largest))
            while batch:
                part, batch[:per_part] = batch[:per_part], []
                inline += sum(len(segment) for segment, _ in part)
                results: list[T] = step(part)
                part.clear()  # drop the input segments before the consumer asks for more
                results.reverse()
                while results:  # hand over each result without keeping a reference to it
                    yield results.pop()
                if inline >= INLINE_BYTES:
                    inline = 0
                    await anyio.lowlevel.checkpoint()
            continue
        size = sum(len(segment) for segment, _ in batch)
        if size > threshold:
            results = await run(step, batch)
        else:
            results = step(batch)
            inline += size
            if inline >= INLINE_BYTES:
                inline = 0
                await anyio.lowlevel.checkpoint()
        batch.clear()  # drop the input segments before the consumer asks for more
        results.reverse()
        while results:  # hand over each result without keeping a reference to it
            yield results.pop()


async def _parallel_steps(
    batches: AsyncIterator[list[tuple[bytes | memoryview, bool]]],
    claim: Callable[[bytes | memoryview, bool], int],
    work: Callable[[list[tuple[int, bytes | memoryview, bool]]], list[T]],
    run: Runner,
    workers: int,
) -> AsyncIterator[T]:
    """Each batch's ``work`` in a worker thread, up to ``workers`` batches at once, the
    results handed over in order: for a cipher that releases the GIL (:mod:`aiocrypt._gil`).

    The segments are claimed (numbered, checked) in order on the loop's thread, so a
    segment's place never depends on which thread got to it. As in :func:`_steps`,
    the first batch is finished before another is read from the source (a forged
    preamble fails before anything is read ahead), nothing after a failed batch is
    handed over, and threads still running when the consumer stops are waited for.
    """
    pending: deque[asyncio.Future[list[T]]] = deque()
    first = True
    try:
        async for batch in batches:
            jobs = [(claim(segment, last), segment, last) for segment, last in batch]
            batch.clear()  # drop the input segments: the jobs hold them until done
            pending.append(_start(run, work, jobs))
            del jobs
            while pending and (first or len(pending) >= workers):
                first = False
                results = await _complete(pending.popleft())
                results.reverse()
                while results:  # hand over each result without keeping a reference to it
                    yield results.pop()
        while pending:
            results = await _complete(pending.popleft())
            results.reverse()
            while results:
                yield results.pop()
    finally:
        while pending:
            await _settle(pending.popleft())


def _compressed(
    chunks: AsyncIterator[bytes], segment_size: int, level: int, run: Runner, threshold: int
) -> AsyncIterator[bytes]:
    """One zstd record per ``segment_size`` bytes of plaintext (none for empty input)."""

    def step(batch: list[tuple[bytes | memoryview, bool]]) -> list[bytes]:
        return [_compression.compress_record(segment, level) for segment, _ in batch if segment]

    batches = Segmenter(chunks).batches(segment_size, batch_count(segment_size))
    return _steps(batches, step, run, threshold, holds_gil=False)  # zstd releases the GIL


async def seal_stream(
    enc: StreamEncryptor,
    source: Source,
    run: Runner,
    threshold: int,
    compression_level: int | None = None,
    *,
    workers: int = 1,
) -> AsyncIterator[bytes]:
    """Yield the stream preamble, then each sealed segment as soon as it is known.

    ``enc`` must carry ``FLAG_ZSTD`` exactly when ``compression_level`` is set.
    ``workers`` > 1: the cipher releases the GIL, so that many batches of segments
    are sealed at once in worker threads (:func:`_parallel_steps`).
    """
    if bool(enc.flags & FLAG_ZSTD) != (compression_level is not None):
        raise ValueError("FLAG_ZSTD and compression_level go together")
    segment_size = enc.segment_size
    chunks = byte_chunks(source)
    if compression_level is not None:
        chunks = _compressed(chunks, segment_size, compression_level, run, threshold)
    yield enc.preamble
    seal = enc.seal
    batches = Segmenter(chunks).batches(segment_size, batch_count(segment_size))
    if workers > 1:
        seal_at = enc.seal_at

        def work(jobs: list[tuple[int, bytes | memoryview, bool]]) -> list[bytes]:
            return [seal_at(index, segment, last) for index, segment, last in jobs]

        async for sealed in _parallel_steps(batches, enc.claim, work, run, workers):
            yield sealed
        return

    def step(batch: list[tuple[bytes | memoryview, bool]]) -> list[bytes]:
        return [seal(segment, last) for segment, last in batch]

    async for sealed in _steps(batches, step, run, threshold):
        yield sealed


class StreamPreamble(NamedTuple):
    """What a stream's first bytes say (nothing of it is authenticated yet)."""

    key_id: str
    flags: int
    segment_size: int
    iv: bytes  # salt || nonce prefix
    length: int  # of the preamble, in bytes
    version: int


def stream_key_id(
    preamble: bytes | memoryview,
    *,
    max_segment_size: int = MAX_SEGMENT_SIZE,
    accept_v1: bool = True,
) -> StreamPreamble:
    """Parse a stream's preamble; ``DecryptionError`` for anything a reader must refuse
    (a segment size above ``max_segment_size``, version 1 unless ``accept_v1``)."""
    try:
        header, header_bytes, rest = parse_binary(preamble)
    except FormatError:
        raise decryption_failed(_MALFORMED, None, "not a stream") from None
    if header.algorithm == ALG_AES_256_GCM:
        raise decryption_failed(
            DecryptionFailure.WRONG_PURPOSE,
            header.key_id,
            f"a one-shot bulk blob, not a stream (decrypt_bulk_data reads it; key {header.key_id})",
        )
    if header.algorithm != ALG_AES_256_GCM_STREAM or len(rest) < _IV_BYTES:
        raise decryption_failed(_MALFORMED, header.key_id)
    if header.version == FORMAT_V1 and not accept_v1:
        raise decryption_failed(
            _MALFORMED,
            header.key_id,
            "format version 1 streams are no longer read (accept_format_v1=False)",
        )
    (segment_size,) = _U32.unpack_from(rest)
    if not MIN_SEGMENT_SIZE <= segment_size <= min(max_segment_size, MAX_SEGMENT_SIZE):
        raise decryption_failed(
            _MALFORMED,
            header.key_id,
            "the stream's segment size is outside the limits (see max_segment_size)",
        )
    return StreamPreamble(
        header.key_id,
        header.flags,
        segment_size,
        bytes(rest[4:_IV_BYTES]),
        len(header_bytes) + _IV_BYTES,
        header.version,
    )


def _whole_segment(sealed: bytes | memoryview) -> None:
    """Refuse a segment cut inside its tag (or nothing after a full segment)."""
    if len(sealed) < TAG_BYTES:
        raise decryption_failed(_MALFORMED, None, "the stream is cut short")


class _Opener:
    """Opens one segment and, for compressed streams, decompresses the records it completes."""

    def __init__(self, dec: StreamDecryptor, compressed: bool) -> None:
        self._dec = self.decryptor = dec
        self._records = _compression.RecordDecoder(dec.segment_size) if compressed else None

    def open(self, sealed: bytes | memoryview, last: bool) -> list[bytes]:
        _whole_segment(sealed)
        plaintext = self._dec.open(sealed, last)
        if self._records is None:
            return [plaintext]
        try:
            parts = self._records.feed(plaintext)
            if last:
                self._records.finish()
        except ValueError:
            raise decryption_failed(
                _MALFORMED, None, "a decrypted segment does not decompress within the limits"
            ) from None
        return parts


async def open_stream(
    source: Source,
    find_key: Callable[[str], Awaitable[DataKey]],
    context: bytes,
    run: Runner,
    threshold: int,
    *,
    max_segment_size: int = DEFAULT_MAX_SEGMENT,
    accept_v1: bool = True,
    workers: int = 1,
) -> AsyncIterator[bytes]:
    """Yield plaintext segment by segment; any tampering raises ``DecryptionError``.

    ``workers`` > 1: batches of an uncompressed stream's segments are opened that
    many at once in worker threads (the cipher releases the GIL); plaintext is
    still handed over in order and only once its segment authenticated.

    Plaintext of a segment is released only after that segment authenticated;
    a stream cut short fails at its end (its last segment lacks the final flag).
    Before the first segment authenticated, at most the preamble and one segment
    of at most ``max_segment_size`` bytes (plus one source chunk) are buffered.
    """
    reader = Segmenter(byte_chunks(source))
    # the preamble: 4 header bytes, the key id, segment size, salt and prefix
    if not await reader.fill(4):
        raise decryption_failed(_MALFORMED, None, "not a stream (no preamble)")
    head = bytes(reader.take(4))
    if not await reader.fill(head[3] + _IV_BYTES):
        raise decryption_failed(_MALFORMED, None, "not a stream (preamble cut short)")
    preamble = stream_key_id(
        head + bytes(reader.take(head[3] + _IV_BYTES)),
        max_segment_size=max_segment_size,
        accept_v1=accept_v1,
    )
    flags, segment_size = preamble.flags, preamble.segment_size
    dk = await find_key(preamble.key_id)
    opener = _Opener(
        StreamDecryptor(dk, context, flags, segment_size, preamble.iv, preamble.version),
        bool(flags & FLAG_ZSTD),
    )
    open_ = opener.open

    def step(batch: list[tuple[bytes | memoryview, bool]]) -> list[bytes]:
        # a batch fails as a whole: nothing of it is released before the bad segment
        return [part for sealed, last in batch for part in open_(sealed, last) if part]

    stride = segment_size + TAG_BYTES
    # the first segment alone: a forged preamble fails before a batch is read ahead
    batches = reader.batches(stride, batch_count(stride), first=1)
    if workers > 1 and not flags & FLAG_ZSTD:
        dec = opener.decryptor
        open_at = dec.open_at

        def claim(sealed: bytes | memoryview, last: bool) -> int:
            _whole_segment(sealed)
            return dec.claim(last)

        def work(jobs: list[tuple[int, bytes | memoryview, bool]]) -> list[bytes]:
            # a batch fails as a whole: nothing of it is released before the bad segment
            return [part for index, sealed, last in jobs if (part := open_at(index, sealed, last))]

        async for part in _parallel_steps(batches, claim, work, run, workers):
            yield part
        return
    async for part in _steps(batches, step, run, threshold):
        yield part


# -- files --------------------------------------------------------------------


def _start(run: Runner, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Start a worker-thread hop now; await it with :func:`_complete`."""
    return asyncio.ensure_future(run(func, *args))


async def _complete(hop: asyncio.Future[T]) -> T:
    """Await a hop and, if cancelled, let it finish first.

    A thread cannot be interrupted: a cancelled hop's file operation goes on
    running. Waiting for it means the cleanup that follows the cancellation
    sees every file it created and never closes a file under it.
    """
    try:
        return await asyncio.shield(hop)
    except asyncio.CancelledError:
        await _settle(hop)
        raise


async def _settle(hop: asyncio.Future[Any]) -> None:
    """Wait until ``hop`` is done, whatever it raised (for cleanup after a failure)."""
    while not hop.done():  # anyio cancel scopes cancel again at every await
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([hop])
    if not hop.cancelled():
        hop.exception()  # retrieved: the failure that matters is already propagating


async def _to_completion(run: Runner, func: Callable[..., T], *args: Any) -> T:
    """Run a file operation in a worker thread (see :func:`_complete`)."""
    return await _complete(_start(run, func, *args))


async def read_file(
    path: str | os.PathLike[str],
    chunk_size: int,
    run: Runner,
    *,
    stream_aligned: bool = False,
    max_segment_size: int = DEFAULT_MAX_SEGMENT,
) -> AsyncGenerator[bytes, None]:
    """The bytes of a file in ``chunk_size`` reads, each in a worker thread.

    The next read is started before a chunk is handed over, so the disk (or
    page-cache copy, which releases the GIL) overlaps the consumer's cipher work.
    With ``stream_aligned`` the preamble is read first and then whole sealed
    segments (of a segment size up to ``max_segment_size``), so every ciphertext
    segment passes to the cipher uncopied.
    """
    opened: list[io.BufferedReader] = []  # filled even if we are cancelled during the hop
    ahead: asyncio.Future[bytes] | None = None
    try:
        await _to_completion(run, lambda: opened.append(open(os.fspath(path), "rb")))
        fh = opened[0]
        if stream_aligned:
            head = await _to_completion(run, fh.read, 4)
            yield head
            if len(head) < 4:
                return
            rest = await _to_completion(run, fh.read, head[3] + _IV_BYTES)
            yield rest
            try:
                chunk_size = (
                    stream_key_id(head + rest, max_segment_size=max_segment_size).segment_size
                    + TAG_BYTES
                )
            except DecryptionError:
                pass  # open_stream will say so; keep reading plain chunks
        ahead = _start(run, fh.read, chunk_size)
        while True:
            chunk = await _complete(ahead)
            ahead = None
            if not chunk:
                return
            ahead = _start(run, fh.read, chunk_size)
            yield chunk
    finally:
        if ahead is not None:  # closed or cancelled with a read in flight
            await _settle(ahead)
        for fh in opened:
            fh.close()


async def write_file_atomically(
    path: str | os.PathLike[str], parts: AsyncIterable[bytes], run: Runner
) -> int:
    """Write ``parts`` to a mode-0600 temporary file beside ``path``, then rename it over.

    Parts are written about BATCH_BYTES per worker-thread hop, one hop in flight
    while the next parts are produced. If ``parts`` raises (a segment failed to
    authenticate) or the task is cancelled, the temporary file is removed and
    ``path`` is left as it was, so a failed decryption never leaves partial
    plaintext behind (a cancellation that arrives while the finished file is
    being renamed lets the rename complete: ``path`` is then whole). Returns the
    bytes written.
    """
    created: list[tuple[str, str, io.BufferedWriter, str]] = []  # even if cancelled
    written = 0
    pending: list[bytes] = []  # one write hop per batch of parts, not per part
    pending_bytes = 0
    writing: asyncio.Future[int] | None = None
    try:
        await _to_completion(run, lambda: created.append(_create_temporary(os.fspath(path))))
        target, directory, fh, tmp = created[0]
        async for part in parts:
            pending.append(part)
            pending_bytes += len(part)
            if pending_bytes >= BATCH_BYTES:
                if writing is not None:
                    written += await _complete(writing)
                writing = _start(run, _write_all, fh, pending)
                pending, pending_bytes = [], 0
        if writing is not None:
            written += await _complete(writing)
            writing = None
        if pending:
            written += await _to_completion(run, _write_all, fh, pending)
        await _to_completion(run, _commit, fh, tmp, target, directory)
    except BaseException:
        if writing is not None:
            await _settle(writing)
        for _, _, fh, tmp in created:
            fh.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return written


def _write_all(fh: io.BufferedWriter, parts: list[bytes]) -> int:
    written = 0
    for part in parts:
        written += fh.write(part)
    parts.clear()
    return written


def _create_temporary(path: str) -> tuple[str, str, io.BufferedWriter, str]:
    target = os.path.abspath(path)
    directory, name = os.path.split(target)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")  # mode 0600
    return target, directory, os.fdopen(fd, "wb"), tmp


def _commit(fh: io.BufferedWriter, tmp: str, target: str, directory: str) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    os.replace(tmp, target)
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
