"""Fresh bulk outputs populated by a worker thread ahead of the cipher (issue 19).

Sealing bulk data inline into a fresh anonymous mapping spends most of each
step faulting in pages on the event loop's thread; ``aiocrypt._prefault`` has a
worker thread populate them with ``madvise(MADV_POPULATE_WRITE)`` while the loop
seals what is ready. What is checked here is what can be checked without a
clock: the pages become resident, nothing in the buffer changes, the service
takes this path exactly where it should, and every way it can give up still
gives the right bytes. Its speed is measured in bench/ (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import platform
import sys
from collections.abc import AsyncIterator

import pytest

import aiocrypt._prefault as prefault
from aiocrypt import DecryptionError, EncryptionService, KeyType
from aiocrypt._prefault import Prefaulter
from aiocrypt.testing import make_key_manager

MiB = 1024 * 1024
KT = KeyType.PII
linux_5_14 = sys.platform.startswith("linux") and tuple(
    int(p) for p in platform.release().split("-")[0].split(".")[:2]
) >= (5, 14)


def resident_pages() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1])


@pytest.mark.skipif(not linux_5_14, reason="MADV_POPULATE_WRITE is Linux 5.14 and later")
def test_linux_populates_on_request() -> None:
    assert prefault.supported() is True


@pytest.mark.skipif(not linux_5_14, reason="MADV_POPULATE_WRITE is Linux 5.14 and later")
async def test_the_pages_become_resident_and_nothing_is_written() -> None:
    size = 64 * MiB
    view = memoryview(mmap.mmap(-1, size))
    view[MiB : MiB + 5] = b"hello"  # what the cipher already wrote stays
    before = resident_pages()
    worker = Prefaulter(view, asyncio.get_running_loop())
    thread = asyncio.ensure_future(asyncio.to_thread(worker.run))
    await worker.wait_for(size)
    await thread
    grown = (resident_pages() - before) * mmap.PAGESIZE
    assert grown >= size - 2 * MiB  # every page (but the one written before) is in
    assert worker.ready == size and worker.failed is False
    assert bytes(view[MiB : MiB + 5]) == b"hello"
    assert view[:MiB].tobytes().count(0) == MiB and view[-MiB:].tobytes().count(0) == MiB


async def test_stop_ends_the_thread_early_and_waiters_do_not_hang() -> None:
    view = memoryview(mmap.mmap(-1, 32 * MiB))
    worker = Prefaulter(view, asyncio.get_running_loop())
    worker.stop()
    await asyncio.to_thread(worker.run)
    await asyncio.wait_for(worker.wait_for(len(view)), 5)  # given up: ready for all
    assert worker.ready == len(view)


async def test_a_buffer_it_cannot_populate_is_given_up_not_waited_for() -> None:
    # a bytearray is not page-aligned: madvise refuses it, the cipher faults it itself
    view = memoryview(bytearray(8 * MiB + 1))[1:]
    worker = Prefaulter(view, asyncio.get_running_loop())
    await asyncio.to_thread(worker.run)
    await asyncio.wait_for(worker.wait_for(len(view)), 5)
    assert worker.failed is True and worker.ready == len(view)
    read_only = memoryview(b"x" * MiB)  # not writable: from_buffer refuses
    worker = Prefaulter(read_only, asyncio.get_running_loop())
    await asyncio.to_thread(worker.run)
    assert worker.failed is True and worker.ready == MiB


@pytest.fixture(params=[True, False], ids=["prefaulted", "plain"])
async def service(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[EncryptionService]:
    if not request.param:
        monkeypatch.setattr(prefault, "_supported", False)
    elif not prefault.supported():
        pytest.skip("this system does not populate pages on request")
    async with EncryptionService(make_key_manager(), parallel_bulk=False) as svc:
        yield svc


@pytest.mark.parametrize("size", [MiB, 2 * MiB, 3 * MiB - 1, 40 * MiB + 7])
async def test_bulk_data_round_trips_on_either_path(service: EncryptionService, size: int) -> None:
    data = os.urandom(size)
    sealed = await service.encrypt_bulk_data(data, KT, context="c")
    assert bytes(await service.decrypt_bulk_data(sealed, key_type=KT, context="c")) == data
    # only fresh outputs of more than two segments (1 MiB each here) are populated,
    # encrypt and decrypt alike; the sealing itself never leaves the loop's thread
    expected = 2 if size > 2 * MiB and prefault.supported() else 0
    assert service.counters["prefaulted_buffers"] == expected
    assert service.counters["threaded_operations"] == 0


async def test_out_buffers_are_not_populated(service: EncryptionService) -> None:
    data = os.urandom(12 * MiB)
    out = bytearray(service.bulk_output_size(len(data)))
    sealed = await service.encrypt_bulk_data(data, KT, out=out)
    opened = bytearray(len(data))
    assert bytes(await service.decrypt_bulk_data(sealed, key_type=KT, out=opened)) == data
    assert service.counters["prefaulted_buffers"] == 0


async def test_a_tampered_payload_fails_on_the_prefaulted_path(service: EncryptionService) -> None:
    data = os.urandom(10 * MiB)
    sealed = await service.encrypt_bulk_data(data, KT)
    raw = bytearray(sealed.to_bytes())
    raw[len(raw) // 2] ^= 1
    with pytest.raises(DecryptionError):
        await service.decrypt_bulk_data(bytes(raw), key_type=KT)
