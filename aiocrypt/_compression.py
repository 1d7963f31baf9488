"""Optional zstd compression before encryption (the ``aiocrypt[zstd]`` extra).

Off by default for fields: compressed length leaks content (CRIME/BREACH).
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["MAX_DECOMPRESSED", "compress", "decompress"]

MAX_DECOMPRESSED: Final = 256 * 1024 * 1024


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "compression needs the zstandard package: pip install 'aiocrypt[zstd]'"
        ) from exc
    return zstandard


def compress(data: bytes, level: int) -> bytes:
    return bytes(_zstd().ZstdCompressor(level=level, write_content_size=True).compress(data))


def decompress(data: bytes, max_size: int = MAX_DECOMPRESSED) -> bytes:
    """Decompress with a hard output bound (no decompression bombs); ValueError on bad input."""
    zstd = _zstd()
    try:
        params = zstd.get_frame_parameters(data)
        if params.content_size > max_size:
            raise ValueError("decompressed size over the limit")
        return bytes(zstd.ZstdDecompressor().decompress(data, max_output_size=max_size))
    except zstd.ZstdError as exc:
        raise ValueError("bad compressed data") from exc
