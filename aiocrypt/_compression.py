"""Optional zstd compression before encryption (the ``aiocrypt[zstd]`` extra).

Off by default for fields: compressed length leaks content (CRIME/BREACH).

Fields and small blobs hold one zstd frame. Compressed streams (and large
compressed blobs) hold a sequence of records, one per plaintext segment::

    u32 big-endian n || zstd frame of n bytes (content size written, <= segment size)

so each record decompresses on its own with a hard output bound, memory stays
O(segment), and the records are inside the authenticated plaintext. A record's
first byte is at most 0x04 (n < 64 MiB + bound), never 0x28, the first byte of
the zstd magic number: :func:`decompress_payload` tells the two forms apart.
"""

from __future__ import annotations

import struct
from typing import Any, Final

__all__ = [
    "MAX_DECOMPRESSED",
    "RecordDecoder",
    "compress",
    "compress_record",
    "compress_records",
    "decompress",
    "decompress_payload",
]

MAX_DECOMPRESSED: Final = 256 * 1024 * 1024
MAX_RECORD_PLAINTEXT: Final = 64 * 1024 * 1024
_RECORD: Final = struct.Struct(">I")
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "compression needs the zstandard package: pip install 'aiocrypt[zstd]'"
        ) from exc
    return zstandard


def compress(data: bytes | memoryview, level: int) -> bytes:
    return bytes(_zstd().ZstdCompressor(level=level, write_content_size=True).compress(data))


def decompress(data: bytes | memoryview, max_size: int = MAX_DECOMPRESSED) -> bytes:
    """Decompress with a hard output bound (no decompression bombs); ValueError on bad input."""
    zstd = _zstd()
    try:
        params = zstd.get_frame_parameters(data)
        if params.content_size > max_size:
            raise ValueError("decompressed size over the limit")
        return bytes(zstd.ZstdDecompressor().decompress(data, max_output_size=max_size))
    except zstd.ZstdError as exc:
        raise ValueError("bad compressed data") from exc


def _bound(max_size: int) -> int:
    """Largest compressed frame of ``max_size`` input (zstd's compress bound, rounded up)."""
    return max_size + max_size // 128 + 1024


def compress_record(data: bytes | memoryview, level: int) -> bytes:
    """One record (length || zstd frame) for one plaintext segment."""
    frame = compress(data, level)
    return _RECORD.pack(len(frame)) + frame


def compress_records(data: bytes | memoryview, level: int, segment_size: int) -> bytes:
    """Records for ``data`` cut into ``segment_size`` pieces (what a compressed stream holds)."""
    view = memoryview(data)
    return b"".join(
        compress_record(view[i : i + segment_size], level)
        for i in range(0, len(view), segment_size)
    )


class RecordDecoder:
    """Cuts authenticated plaintext into records and decompresses each (<= ``max_size``).

    Feed it plaintext as it is authenticated; :meth:`finish` raises if a record
    was cut short. Buffers at most one partial record.
    """

    def __init__(self, max_size: int) -> None:
        self._max = max_size
        self._max_record = _bound(max_size)
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        pos = 0
        view = memoryview(buffer)
        try:
            while len(buffer) - pos >= _RECORD.size:
                (size,) = _RECORD.unpack_from(buffer, pos)
                if size > self._max_record:
                    raise ValueError("compressed record over the limit")
                end = pos + _RECORD.size + size
                if end > len(buffer):
                    break
                out.append(decompress(view[pos + _RECORD.size : end], self._max))
                pos = end
        finally:
            view.release()
        del buffer[:pos]
        return out

    def finish(self) -> None:
        if self._buffer:
            raise ValueError("compressed data cut short")


def decompress_payload(data: bytes | memoryview, max_size: int = MAX_DECOMPRESSED) -> bytes:
    """Decompress a blob's plaintext: one zstd frame, or a sequence of records."""
    view = memoryview(data)
    if bytes(view[:4]) == _ZSTD_MAGIC:
        return decompress(view, max_size)
    parts: list[bytes] = []
    total = pos = 0
    while pos < len(view):
        if len(view) - pos < _RECORD.size:
            raise ValueError("compressed data cut short")
        (size,) = _RECORD.unpack_from(view, pos)
        end = pos + _RECORD.size + size
        if size > _bound(MAX_RECORD_PLAINTEXT) or end > len(view):
            raise ValueError("compressed data cut short")
        limit = min(MAX_RECORD_PLAINTEXT, max_size - total)
        if limit <= 0:  # zstd reads a bound of 0 as "no bound"
            raise ValueError("decompressed size over the limit")
        part = decompress(view[pos + _RECORD.size : end], limit)
        total += len(part)
        parts.append(part)
        pos = end
    return b"".join(parts)
