"""File helpers: encrypt_file / decrypt_file stream through worker threads, atomically."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import tracemalloc
from pathlib import Path
from typing import TypedDict

import pytest

from aiocrypt import DecryptionError, EncryptedData, EncryptionConfig, EncryptionService
from aiocrypt.testing import make_service

SEG = 1024
MIB = 1024 * 1024


class _Where(TypedDict):
    """The decrypt_file arguments a damage case may change."""

    context: str
    key_type: str


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(directory: Path, *expected: Path) -> list[str]:
    """Files in ``directory`` other than ``expected`` (temporary files left behind)."""
    return sorted(p.name for p in directory.iterdir() if p not in expected)


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 50 * SEG + 3])
async def test_file_round_trip_small_segments(
    service: EncryptionService, tmp_path: Path, size: int
) -> None:
    src, enc, out = tmp_path / "report.csv", tmp_path / "report.csv.enc", tmp_path / "back.csv"
    data = write_random(src, size)
    written = await service.encrypt_file(src, enc, "pii", context="reports/q3", segment_size=SEG)
    sealed = enc.read_bytes()
    assert written == len(sealed) == sealed[3] + 31 + size + 16 * max(1, -(-size // SEG))
    assert EncryptedData.from_bytes(sealed).segment_size == SEG
    assert mode(enc) == 0o600
    # str paths as well as PathLike
    assert (
        await service.decrypt_file(str(enc), str(out), context="reports/q3", key_type="pii") == size
    )
    assert out.read_bytes() == data
    assert mode(out) == 0o600
    assert leftovers(tmp_path, src, enc, out) == []


async def test_file_round_trip_default_segments(service: EncryptionService, tmp_path: Path) -> None:
    src, enc, out = tmp_path / "a.bin", tmp_path / "a.bin.enc", tmp_path / "a.out"
    data = write_random(src, 2 * MIB + 5)
    await service.encrypt_file(src, enc, context="x")
    assert EncryptedData.from_bytes(enc.read_bytes()).segment_size == MIB
    # an encrypted file is a stream, is a blob
    assert (
        await service.decrypt_bulk_data(enc.read_bytes(), context="x", key_type="financial_data")
        == data
    )
    assert await service.decrypt_file(enc, out, context="x", key_type="financial_data") == len(data)
    assert out.read_bytes() == data


async def test_encrypting_a_file_in_place_and_overwriting(
    service: EncryptionService, tmp_path: Path
) -> None:
    path = tmp_path / "in-place"
    data = write_random(path, 5 * SEG)
    await service.encrypt_file(path, path, context="p", segment_size=SEG)
    assert path.read_bytes() != data
    await service.decrypt_file(path, path, context="p", key_type="financial_data")
    assert path.read_bytes() == data
    assert leftovers(tmp_path, path) == []


async def test_compressed_file_round_trip(tmp_path: Path) -> None:
    src, enc, out = tmp_path / "log.txt", tmp_path / "log.enc", tmp_path / "log.out"
    data = b"".join(b"2026-01-01 GET /accounts/%d 200\n" % i for i in range(50_000))
    src.write_bytes(data)
    async with make_service(EncryptionConfig(compression_enabled=True)) as service:
        await service.encrypt_file(src, enc, context="logs")
        assert EncryptedData.from_bytes(enc.read_bytes()).compressed
        assert enc.stat().st_size < len(data) // 4
        await service.decrypt_file(enc, out, context="logs", key_type="financial_data")
    assert out.read_bytes() == data


@pytest.mark.parametrize(
    "damage",
    [
        "flip-middle",
        "flip-last",
        "truncate",
        "drop-last",
        "wrong-context",
        "wrong-key-type",
        "empty",
    ],
)
async def test_failed_decrypt_leaves_no_plaintext(
    service: EncryptionService, tmp_path: Path, damage: str
) -> None:
    src, enc = tmp_path / "secret.txt", tmp_path / "secret.enc"
    write_random(src, 20 * SEG + 100)
    await service.encrypt_file(src, enc, "financial_data", context="f", segment_size=SEG)
    sealed = bytearray(enc.read_bytes())
    kwargs: _Where = {"context": "f", "key_type": "financial_data"}
    if damage == "flip-middle":
        sealed[len(sealed) // 2] ^= 1
    elif damage == "flip-last":
        sealed[-1] ^= 1
    elif damage == "truncate":
        del sealed[-300:]
    elif damage == "drop-last":
        del sealed[-(100 + 16) :]
    elif damage == "wrong-context":
        kwargs["context"] = "g"
    elif damage == "wrong-key-type":
        kwargs["key_type"] = "pii"
    else:
        sealed = bytearray()
    enc.write_bytes(sealed)
    fresh, existing = tmp_path / "fresh.txt", tmp_path / "existing.txt"
    existing.write_bytes(b"previous contents")
    for dst in (fresh, existing):
        with pytest.raises(DecryptionError):
            await service.decrypt_file(enc, dst, **kwargs)
    assert not fresh.exists()
    assert existing.read_bytes() == b"previous contents"
    assert leftovers(tmp_path, src, enc, existing) == []


async def test_missing_source_is_an_os_error(service: EncryptionService, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await service.encrypt_file(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        await service.decrypt_file(tmp_path / "nope", tmp_path / "out", key_type="financial_data")
    with pytest.raises(FileNotFoundError):  # the destination's directory must exist
        src = tmp_path / "src"
        src.write_bytes(b"x")
        await service.encrypt_file(src, tmp_path / "no-such-dir" / "out")
    assert leftovers(tmp_path, tmp_path / "src") == []


async def test_file_memory_stays_constant(service: EncryptionService, tmp_path: Path) -> None:
    """64 MiB through encrypt_file and decrypt_file: peak memory of a few segments."""
    src, enc, out = tmp_path / "big", tmp_path / "big.enc", tmp_path / "big.out"
    with src.open("wb") as fh:
        for _ in range(64):
            fh.write(os.urandom(MIB))
    segment = service.config.performance.segment_size
    tracemalloc.start()
    try:
        await service.encrypt_file(src, enc, context="m")
        _, encrypt_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        await service.decrypt_file(enc, out, context="m", key_type="financial_data")
        _, decrypt_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # one batch of segments (4 MiB) read ahead plus its sealed copy: about 10 MiB
    # measured, the same for 256 MiB; far from the file's 64 MiB
    assert encrypt_peak < 16 * segment, encrypt_peak
    assert decrypt_peak < 16 * segment, decrypt_peak
    assert out.stat().st_size == 64 * MIB
    with src.open("rb") as a, out.open("rb") as b:
        while block := a.read(MIB):
            assert block == b.read(MIB)


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 5, 8, 13, 21, 34])
async def test_cancelled_file_jobs_leave_nothing_behind(
    service: EncryptionService, tmp_path: Path, steps: int
) -> None:
    """Cancelled after ``steps`` turns of the loop: no temporary file, no partial output."""
    src, enc = tmp_path / "src", tmp_path / "src.enc"
    data = write_random(src, 3 * MIB + 5)
    await service.encrypt_file(src, enc, context="k")
    for job, dst in (
        (service.encrypt_file(src, tmp_path / "out.enc", context="k"), tmp_path / "out.enc"),
        (
            service.decrypt_file(enc, tmp_path / "out", context="k", key_type="financial_data"),
            tmp_path / "out",
        ),
    ):
        task = asyncio.ensure_future(job)
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # no temporary file left, and no partial output: none at all, or a whole one
        assert leftovers(tmp_path, src, enc, dst) == []
        if dst.exists():
            assert (
                await service.decrypt_bulk_data(
                    dst.read_bytes(), context="k", key_type="financial_data"
                )
                == data
                if dst.suffix == ".enc"
                else dst.read_bytes() == data
            )
