"""Async streaming encryption: O(segment) memory for data of any size.

The output of :func:`seal_stream` is byte-for-byte the binary blob form of a
segmented ``EncryptedData`` (header, segment size, salt, nonce prefix, sealed
segments), so a stream can be decrypted as a whole with ``decrypt_bulk_data`` and
a blob can be streamed back through :func:`open_stream`. Segments larger than
the inline threshold are sealed in a worker thread.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Final, TypeVar

from ._bulk import MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, StreamDecryptor, StreamEncryptor
from ._crypto import STREAM_PREFIX_BYTES, STREAM_SALT_BYTES, TAG_BYTES, DataKey
from ._errors import DecryptionError
from ._format import ALG_AES_256_GCM_STREAM, FLAG_ZSTD, FormatError, parse_binary

__all__ = ["open_stream", "seal_stream", "stream_key_id"]

T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]
_U32: Final = struct.Struct(">I")
_MAX_HEADER: Final = 4 + 64 + 4 + STREAM_SALT_BYTES + STREAM_PREFIX_BYTES


async def _chunks(source: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        raise TypeError("pass an iterable of byte chunks, not a bytes object")
    if hasattr(source, "__aiter__"):
        async for chunk in source:
            yield bytes(chunk)
    else:
        for chunk in source:
            yield bytes(chunk)


async def seal_stream(dk: DataKey, source: AsyncIterable[bytes] | Iterable[bytes],
                      context: bytes, segment_size: int, run: Runner,
                      threshold: int) -> AsyncIterator[bytes]:
    """Yield the stream preamble, then each sealed segment as soon as it is full."""
    enc = StreamEncryptor(dk, context, segment_size)
    yield enc.preamble
    buffer = bytearray()
    pending: bytes | None = None  # a full segment held back until we know it is not last
    async for chunk in _chunks(source):
        buffer += chunk
        while len(buffer) >= segment_size:
            if pending is not None:
                yield await _seal(enc, pending, False, run, threshold)
            pending = bytes(buffer[:segment_size])
            del buffer[:segment_size]
    if pending is not None and buffer:
        yield await _seal(enc, pending, False, run, threshold)
        pending = None
    yield await _seal(enc, pending if pending is not None else bytes(buffer), True, run,
                      threshold)


async def _seal(enc: StreamEncryptor, data: bytes, last: bool, run: Runner,
                threshold: int) -> bytes:
    if len(data) > threshold:
        sealed: bytes = await run(enc.seal, data, last)
        return sealed
    return enc.seal(data, last)


def stream_key_id(preamble: bytes) -> tuple[str, int, int, bytes, int]:
    """(key id, flags, segment size, iv, preamble length) of a stream's first bytes."""
    try:
        header, header_bytes, rest = parse_binary(preamble)
    except FormatError:
        raise DecryptionError() from None
    if header.algorithm != ALG_AES_256_GCM_STREAM or header.flags & FLAG_ZSTD:
        raise DecryptionError()
    need = 4 + STREAM_SALT_BYTES + STREAM_PREFIX_BYTES
    if len(rest) < need:
        raise DecryptionError()
    (segment_size,) = _U32.unpack_from(rest)
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise DecryptionError()
    return header.key_id, header.flags, segment_size, bytes(rest[4:need]), \
        len(header_bytes) + need


async def open_stream(source: AsyncIterable[bytes] | Iterable[bytes],
                      find_key: Callable[[str], Awaitable[DataKey]], context: bytes,
                      run: Runner, threshold: int) -> AsyncIterator[bytes]:
    """Yield plaintext segment by segment; any tampering raises ``DecryptionError``.

    Plaintext of a segment is released only after that segment authenticated;
    a stream cut short fails at its end (its last segment lacks the final flag).
    """
    buffer = bytearray()
    decryptor: StreamDecryptor | None = None
    stride = 0
    async for chunk in _chunks(source):
        buffer += chunk
        if decryptor is None:
            if len(buffer) < 5 or len(buffer) < 4 + buffer[3] + 4 + STREAM_SALT_BYTES \
                    + STREAM_PREFIX_BYTES:
                if len(buffer) > _MAX_HEADER:
                    raise DecryptionError()
                continue
            key_id, flags, segment_size, iv, used = stream_key_id(bytes(buffer[:_MAX_HEADER]))
            dk = await find_key(key_id)
            decryptor = StreamDecryptor(dk, context, flags, segment_size, iv)
            stride = segment_size + TAG_BYTES
            del buffer[:used]
        # keep at least one byte beyond a segment: only the final one may end the input
        while len(buffer) > stride:
            sealed = bytes(buffer[:stride])
            del buffer[:stride]
            yield await _open(decryptor, sealed, False, run, threshold)
    if decryptor is None or len(buffer) < TAG_BYTES:
        raise DecryptionError()
    yield await _open(decryptor, bytes(buffer), True, run, threshold)


async def _open(dec: StreamDecryptor, sealed: bytes, last: bool, run: Runner,
                threshold: int) -> bytes:
    if len(sealed) > threshold:
        plaintext: bytes = await run(dec.open, sealed, last)
        return plaintext
    return dec.open(sealed, last)
