"""Bulk data sealed inline or by several worker threads, and ``out=`` buffers (issue 19).

The cryptography installed here holds the GIL during AES-GCM, so the service seals
inline; ``parallel_bulk=True`` forces the worker-thread path a release that lets go
of the GIL would take, so both are run on every machine. Whatever the path, the
result is one format: each opens what the other sealed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio
import pytest

from aiocrypt import DecryptionError, DecryptionFailure, EncryptedData, EncryptionService, KeyType
from aiocrypt._gil import aead_releases_gil
from aiocrypt.testing import make_key_manager

MiB = 1024 * 1024
KT = KeyType.FINANCIAL_DATA
CTX = "reports.body"


@pytest.fixture(params=[False, True], ids=["inline", "threads"])
async def service(request: pytest.FixtureRequest) -> AsyncIterator[EncryptionService]:
    async with EncryptionService(make_key_manager(), parallel_bulk=request.param) as svc:
        yield svc


@pytest.fixture
async def other(service: EncryptionService) -> AsyncIterator[EncryptionService]:
    """The same keys, the other path (inline for threads, threads for inline)."""
    async with EncryptionService(
        service.key_manager, parallel_bulk=not await service.parallel_bulk()
    ) as svc:
        yield svc


@pytest.mark.parametrize("size", [0, 1, MiB - 1, MiB, MiB + 1, 8 * MiB + 3])
async def test_round_trip_across_paths(
    service: EncryptionService, other: EncryptionService, size: int
) -> None:
    data = os.urandom(size)
    sealed = await service.encrypt_bulk_data(data, KT, context=CTX)
    assert bytes(await other.decrypt_bulk_data(sealed, key_type=KT, context=CTX)) == data
    again = await other.encrypt_bulk_data(data, KT, context=CTX)
    assert (
        bytes(await service.decrypt_bulk_data(again.to_bytes(), key_type=KT, context=CTX)) == data
    )
    threaded = service.counters["threaded_operations"]
    if size > 2 * MiB:  # the path taken is the one asked for
        assert threaded >= 4 if await service.parallel_bulk() else threaded == 0


@pytest.mark.parametrize("where", ["first", "middle", "last"])
async def test_a_tampered_segment_fails_and_out_is_scrubbed(
    service: EncryptionService, where: str
) -> None:
    data = os.urandom(6 * MiB + 100)
    sealed = await service.encrypt_bulk_data(data, KT, context=CTX)
    body = bytearray(sealed.encrypted_data)
    at = {"first": 10, "middle": 3 * (MiB + 16) + 5, "last": len(body) - 3}[where]
    body[at] ^= 1
    forged = EncryptedData(bytes(body), sealed.key_id, sealed.algorithm, sealed.iv, sealed.tag)
    out = bytearray(b"\xaa" * sealed.plaintext_size)
    with pytest.raises(DecryptionError) as info:
        await service.decrypt_bulk_data(forged, key_type=KT, context=CTX, out=out)
    assert info.value.reason is DecryptionFailure.AUTHENTICATION_FAILED
    assert out == bytes(len(out))  # neither plaintext of the segments that opened nor junk


async def test_truncation_and_reordering_fail(service: EncryptionService) -> None:
    data = os.urandom(4 * MiB)
    sealed = await service.encrypt_bulk_data(data, KT, context=CTX)
    stride = MiB + 16
    body = bytes(sealed.encrypted_data)
    dropped = body[:stride] + body[2 * stride :]  # segment 1 removed
    swapped = body[stride : 2 * stride] + body[:stride] + body[2 * stride :]
    for edited in (dropped, swapped, body[: 3 * stride - 16]):
        forged = EncryptedData(edited, sealed.key_id, sealed.algorithm, sealed.iv, sealed.tag)
        with pytest.raises(DecryptionError):
            await service.decrypt_bulk_data(forged, key_type=KT, context=CTX)


@pytest.mark.parametrize("size", [100, 3 * MiB + 7])
async def test_out_buffers(service: EncryptionService, size: int) -> None:
    data = os.urandom(size)
    needed = service.bulk_output_size(size)
    cipher_out = bytearray(needed + 5)  # larger is fine: the first bytes are used
    sealed = await service.encrypt_bulk_data(data, KT, context=CTX, out=cipher_out)
    assert isinstance(sealed.encrypted_data, memoryview)
    assert sealed.encrypted_data.obj is cipher_out  # a view, not a copy
    assert bytes(cipher_out[: len(sealed.encrypted_data)]) == bytes(sealed.encrypted_data)
    assert sealed.plaintext_size == size
    plain_out = bytearray(size)
    opened = await service.decrypt_bulk_data(sealed, key_type=KT, context=CTX, out=plain_out)
    assert bytes(opened) == data and plain_out == data
    assert (
        bytes(await service.decrypt_bulk_data(sealed.to_bytes(), key_type=KT, context=CTX)) == data
    )

    with pytest.raises(
        ValueError, match=f"out= holds {needed - 1} bytes; the result needs {needed}"
    ):
        await service.encrypt_bulk_data(data, KT, context=CTX, out=bytearray(needed - 1))
    with pytest.raises(ValueError, match="the plaintext needs"):
        await service.decrypt_bulk_data(sealed, key_type=KT, context=CTX, out=bytearray(size - 1))
    with pytest.raises(TypeError, match="writable"):
        await service.encrypt_bulk_data(data, KT, context=CTX, out=bytes(needed))
    with pytest.raises(TypeError, match="writable buffer"):
        await service.encrypt_bulk_data(data, KT, context=CTX, out="x" * needed)


async def test_out_refuses_compressed_data() -> None:
    manager = make_key_manager()
    manager.config = manager.config.replace(compressed_key_types=frozenset({KT}))
    async with EncryptionService(manager) as service:
        data = b"a" * (2 * MiB)
        with pytest.raises(ValueError, match="compressed"):
            await service.encrypt_bulk_data(data, KT, out=bytearray(4 * MiB))
        sealed = await service.encrypt_bulk_data(data, KT)
        assert sealed.compressed
        with pytest.raises(ValueError, match="compressed"):
            await service.decrypt_bulk_data(sealed, key_type=KT, out=bytearray(4 * MiB))
        assert bytes(await service.decrypt_bulk_data(sealed, key_type=KT)) == data


async def test_inline_sealing_lets_other_tasks_run() -> None:
    """Inline, 16 MiB are sealed a MiB at a time with a yield to the loop between:
    a task that only counts its turns gets many of them meanwhile."""
    async with EncryptionService(make_key_manager(), parallel_bulk=False) as service:
        data = os.urandom(16 * MiB)
        turns = 0
        done = False

        async def count() -> None:
            nonlocal turns
            while not done:
                turns += 1
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as group:
            group.start_soon(count)
            await anyio.lowlevel.checkpoint()
            start = turns
            sealed = await service.encrypt_bulk_data(data, KT)
            during_seal = turns - start
            start = turns
            await service.decrypt_bulk_data(sealed, key_type=KT)
            during_open = turns - start
            done = True
        assert during_seal >= 15 and during_open >= 15
        assert service.counters["threaded_operations"] == 0


async def test_the_probe_decides_when_not_told() -> None:
    answer = aead_releases_gil()
    hits = aead_releases_gil.cache_info().hits
    async with EncryptionService(make_key_manager()) as service:
        assert await service.parallel_bulk() is answer
        assert await service.parallel_bulk() is answer
    assert aead_releases_gil.cache_info().hits == hits + 1  # measured once per process
