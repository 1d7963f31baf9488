"""Streaming encryption: O(segment) memory, blob-compatible, tamper-evident."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from aiocrypt import DecryptionError, EncryptedData, EncryptionService, KeyType


async def collect(parts: AsyncIterator[bytes]) -> bytes:
    return b"".join([p async for p in parts])


async def agen(data: bytes, step: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i:i + step]


@pytest.mark.parametrize("size, step", [(0, 1), (10, 3), (1024 * 1024, 4096),
                                        (3 * 1024 * 1024 + 17, 700_001),
                                        (2 * 1024 * 1024, 1024 * 1024)])
async def test_stream_round_trip_and_blob_compatibility(service: EncryptionService, size: int,
                                                       step: int) -> None:
    data = os.urandom(size)
    sealed = await collect(service.encrypt_stream(agen(data, step), KeyType.AUDIT_LOGS,
                                                  context="exports/q3"))
    # the stream is exactly a segmented EncryptedData blob
    blob = EncryptedData.from_bytes(sealed)
    assert blob.algorithm == "AES_256_GCM_STREAM"
    assert await service.decrypt_bulk_data(sealed, context="exports/q3") == data
    # and decrypts as a stream, fed in odd-sized pieces
    for piece in (1, 1000, 1024 * 1024 + 5):
        out = await collect(service.decrypt_stream(agen(sealed, piece), context="exports/q3",
                                                   key_type=KeyType.AUDIT_LOGS))
        assert out == data


async def test_stream_tampering_and_truncation_fail(service: EncryptionService) -> None:
    data = os.urandom(2 * 1024 * 1024 + 100)
    sealed = await collect(service.encrypt_stream([data], context="c"))
    segment = service.config.performance.segment_size + 16
    for cut in (10, len(sealed) - segment, len(sealed) - 1):
        with pytest.raises(DecryptionError):
            await collect(service.decrypt_stream([sealed[:cut]], context="c"))
    flipped = bytearray(sealed)
    flipped[len(sealed) // 2] ^= 1
    with pytest.raises(DecryptionError):
        await collect(service.decrypt_stream([bytes(flipped)], context="c"))
    with pytest.raises(DecryptionError):
        await collect(service.decrypt_stream([sealed], context="other"))
    with pytest.raises(DecryptionError):
        await collect(service.decrypt_stream([sealed], context="c", key_type=KeyType.PII))
    with pytest.raises(TypeError):
        await collect(service.encrypt_stream(b"not chunks"))  # type: ignore[arg-type]
