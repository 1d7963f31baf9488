"""Bulk and stream throughput, peak memory and event-loop lag, against raw AES-GCM.

    python bench/bench_bulk.py [--quick]          (run_all.py calls run())
    python bench/bench_bulk.py --case NAME --mib N [--file PATH] [--repeats R] [--lag]

Every case runs in a child process of its own (``--case``), so that its peak
memory (the kernel's RSS high-water mark, reset after setup) is its own. The
parent runs the cases in rounds, each round every case in turn, and reports
medians of the per-round figures and of the per-round ratios to the raw
baseline, so load on the machine cancels in the ratios.

In-memory cases (the plaintext, made before the clock starts, is a list of
1 MiB ``bytes`` chunks for the stream and segmented cases, one ``bytes`` for
the others). A stream is meant to feed a sink, so the stream and segmented
cases drop each sealed part as it comes (a socket or file write would) and
decrypt a ciphertext kept from an untimed run, dropping the plaintext parts:

* ``aiocrypt-stream``: ``encrypt_stream`` / ``decrypt_stream``;
* ``aiocrypt-bulk``: ``encrypt_bulk_data`` / ``decrypt_bulk_data``;
* ``aesgcm-segmented``: raw ``AESGCM.encrypt`` / ``decrypt`` per 1 MiB segment
  (counter nonces), inline;
* ``aesgcm-encrypt-into``: raw ``AESGCM.encrypt_into`` / ``decrypt_into`` per
  1 MiB segment into one fresh anonymous mmap (what ``encrypt_bulk_data`` does,
  minus the service, the format and the worker thread);
* ``aesgcm-oneshot``: one ``AESGCM.encrypt`` / ``decrypt`` call over everything;
* ``aiocrypt-bulk-out``: ``encrypt_bulk_data`` / ``decrypt_bulk_data`` with ``out=``
  buffers made (and touched) once before the clock starts and reused every repeat;
* ``aesgcm-into-reused``: raw ``encrypt_into`` / ``decrypt_into`` per 1 MiB segment
  into buffers made and touched once and reused (the baseline for ``out=``).

The parent also records whether the installed cryptography releases the GIL
during AES-GCM (``aiocrypt._gil.aead_releases_gil``: the answer the service acts on).

File cases (``--file``: an existing plaintext file; outputs go beside it and
are deleted): ``aiocrypt-file`` (``encrypt_file`` / ``decrypt_file``, or
``encrypt_stream`` / ``decrypt_stream`` over 1 MiB file reads where the service
has no file methods) and ``aesgcm-file`` (raw segmented AES-GCM inline, read
1 MiB, seal, write, and fsync at the end as the file methods do).

``--lag`` adds one more encrypt + decrypt while a 1 ms asyncio ticker runs and
reports the worst and the 99th-percentile lateness of its wake-ups, and the
same for a quarter second of the idle loop (what the machine alone causes).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import mmap
import os
import random
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _common import MiB, Ticker, current_rss, peak_rss, reset_peak_rss
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from aiocrypt import EncryptionService

HERE = Path(__file__).resolve().parent
SEGMENT = MiB
TAG = 16
MEMORY_CASES = (
    "aiocrypt-stream",
    "aiocrypt-bulk",
    "aesgcm-segmented",
    "aesgcm-encrypt-into",
    "aesgcm-oneshot",
    "aiocrypt-bulk-out",
    "aesgcm-into-reused",
)
FILE_CASES = ("aiocrypt-file", "aesgcm-file")
LAG_CASES = (
    "aiocrypt-stream",
    "aiocrypt-bulk",
    "aesgcm-oneshot",
    "aiocrypt-file",
    "aiocrypt-bulk-out",
)
LABELS = {
    "aiocrypt-stream": "aiocrypt encrypt_stream / decrypt_stream",
    "aiocrypt-bulk": "aiocrypt encrypt_bulk_data / decrypt_bulk_data",
    "aesgcm-segmented": "raw AESGCM, 1 MiB segments",
    "aesgcm-encrypt-into": "raw AESGCM encrypt_into, 1 MiB segments, one fresh buffer",
    "aesgcm-oneshot": "raw AESGCM, one-shot",
    "aiocrypt-bulk-out": "aiocrypt encrypt_bulk_data / decrypt_bulk_data, reused out= buffers",
    "aesgcm-into-reused": "raw AESGCM encrypt_into, 1 MiB segments, one reused buffer",
    "aiocrypt-file": "aiocrypt encrypt_file / decrypt_file",
    "aiocrypt-file-stream": "aiocrypt encrypt_stream / decrypt_stream over file reads",
    "aesgcm-file": "raw AESGCM, 1 MiB segments, file to file",
}
_NONCE = struct.Struct(">8sI")


# -- the cases (child process) --------------------------------------------------------


def _nonce(prefix: bytes, i: int) -> bytes:
    return _NONCE.pack(prefix, i)


def _segments(data: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(data), SEGMENT):
        yield data[start : start + SEGMENT]


def _fresh(size: int) -> memoryview:
    return memoryview(mmap.mmap(-1, max(size, 1)))


Op = Callable[[], Awaitable[Any]]


def _random_chunks(size: int) -> list[bytes]:
    """``size`` bytes in 1 MiB ``bytes`` chunks (pseudo-random: the content is irrelevant)."""
    rng = random.Random(size)
    return [rng.randbytes(min(SEGMENT, size - start)) for start in range(0, size, SEGMENT)]


async def _memory_case(  # noqa: C901 - one pair of closures per benchmark case, linear
    name: str, size: int, service: EncryptionService
) -> tuple[Op, Callable[[Any], Op]]:
    """(encrypt, decrypt-of-what-encrypt-returned) coroutine factories for one case.

    Stream and segmented cases get the plaintext as a list of 1 MiB ``bytes``
    chunks (what a reader yields), the others as one ``bytes``; either is made
    before the clock starts.
    """
    from aiocrypt import KeyType

    chunks = _random_chunks(size)
    if name in ("aiocrypt-stream", "aesgcm-segmented"):
        data = b""
    else:
        data, chunks = b"".join(chunks), []
    view = memoryview(data)
    aead = AESGCM(AESGCM.generate_key(256))
    prefix = os.urandom(8)

    if name == "aiocrypt-stream":
        sealed_parts = [part async for part in service.encrypt_stream(chunks, KeyType.PII)]

        async def encrypt() -> Any:
            async for _part in service.encrypt_stream(chunks, KeyType.PII):
                pass  # a sink: the part is dropped, as a socket or file write would

        def decrypt(sealed: Any) -> Op:
            async def run() -> Any:
                total = 0
                async for part in service.decrypt_stream(sealed_parts, key_type=KeyType.PII):
                    total += len(part)
                assert total == size

            return run

        return encrypt, decrypt

    if name == "aiocrypt-bulk":

        async def encrypt() -> Any:
            return await service.encrypt_bulk_data(view, KeyType.PII)

        def decrypt(sealed: Any) -> Op:
            async def run() -> Any:
                plaintext = await service.decrypt_bulk_data(sealed, key_type=KeyType.PII)
                assert len(plaintext) == size
                return plaintext

            return run

        return encrypt, decrypt

    if name == "aiocrypt-bulk-out":
        cipher_out = bytearray(service.bulk_output_size(size))
        plain_out = bytearray(size)

        async def encrypt() -> Any:
            return await service.encrypt_bulk_data(view, KeyType.PII, out=cipher_out)

        def decrypt(sealed: Any) -> Op:  # a view over cipher_out, read before the next encrypt
            async def run() -> Any:
                plaintext = await service.decrypt_bulk_data(
                    sealed, key_type=KeyType.PII, out=plain_out
                )
                assert len(plaintext) == size
                return plaintext

            return run

        return encrypt, decrypt

    if name == "aesgcm-segmented":
        kept = [aead.encrypt(_nonce(prefix, i), chunk, None) for i, chunk in enumerate(chunks)]

        async def encrypt() -> Any:
            for i, chunk in enumerate(chunks):
                aead.encrypt(_nonce(prefix, i), chunk, None)  # dropped, as by a sink

        def decrypt(sealed: Any) -> Op:
            async def run() -> Any:
                total = 0
                for i, part in enumerate(kept):
                    total += len(aead.decrypt(_nonce(prefix, i), part, None))
                assert total == size

            return run

        return encrypt, decrypt

    if name in ("aesgcm-encrypt-into", "aesgcm-into-reused"):
        count = max(1, -(-len(data) // SEGMENT))
        if name == "aesgcm-encrypt-into":  # a fresh mapping per call, as the service makes

            def cipher_buffer() -> memoryview:
                return _fresh(len(data) + TAG * count)

            def plain_buffer() -> memoryview:
                return _fresh(len(data))
        else:  # made and touched once, reused every call (out= buffers)
            reused_cipher = memoryview(bytearray(len(data) + TAG * count))
            reused_plain = memoryview(bytearray(len(data)))

            def cipher_buffer() -> memoryview:
                return reused_cipher

            def plain_buffer() -> memoryview:
                return reused_plain

        async def encrypt() -> Any:
            out = cipher_buffer()
            pos = 0
            for i, chunk in enumerate(_segments(view)):
                end = pos + len(chunk) + TAG
                aead.encrypt_into(_nonce(prefix, i), chunk, None, out[pos:end])
                pos = end
            return out

        def decrypt(sealed: Any) -> Op:  # read before the next encrypt reuses a buffer
            async def run() -> Any:
                out = plain_buffer()
                pos = 0
                for i, start in enumerate(range(0, len(sealed), SEGMENT + TAG)):
                    part = sealed[start : start + SEGMENT + TAG]
                    aead.decrypt_into(
                        _nonce(prefix, i), part, None, out[pos : pos + len(part) - TAG]
                    )
                    pos += len(part) - TAG
                assert pos == len(data)
                return out

            return run

        return encrypt, decrypt

    if name == "aesgcm-oneshot":
        nonce = os.urandom(12)

        async def encrypt() -> Any:
            return aead.encrypt(nonce, data, None)

        def decrypt(sealed: Any) -> Op:
            async def run() -> Any:
                return aead.decrypt(nonce, sealed, None)

            return run

        return encrypt, decrypt
    raise SystemExit(f"unknown case {name}")


def _size(path: Path) -> int:
    return path.stat().st_size


async def _read_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(SEGMENT):
            yield chunk


async def _file_case(name: str, src: Path, service: EncryptionService) -> tuple[str, Op, Op]:  # noqa: C901 - one pair of closures per benchmark case, linear
    from aiocrypt import KeyType

    sealed_path = src.with_name(f"{src.name}.{name}.sealed")
    opened_path = src.with_name(f"{src.name}.{name}.opened")
    size = _size(src)

    if name == "aiocrypt-file":
        if hasattr(service, "encrypt_file") and hasattr(service, "decrypt_file"):

            async def encrypt() -> Any:
                await service.encrypt_file(src, sealed_path, KeyType.PII)

            async def decrypt() -> Any:
                await service.decrypt_file(sealed_path, opened_path, key_type=KeyType.PII)
                assert _size(opened_path) == size

            return name, encrypt, decrypt

        async def encrypt_s() -> Any:
            with sealed_path.open("wb") as out:
                async for part in service.encrypt_stream(_read_chunks(src), KeyType.PII):
                    out.write(part)

        async def decrypt_s() -> Any:
            with opened_path.open("wb") as out:
                async for part in service.decrypt_stream(
                    _read_chunks(sealed_path), key_type=KeyType.PII
                ):
                    out.write(part)
            assert _size(opened_path) == size

        return "aiocrypt-file-stream", encrypt_s, decrypt_s

    if name == "aesgcm-file":
        aead = AESGCM(AESGCM.generate_key(256))
        prefix = os.urandom(8)

        async def encrypt_raw() -> Any:
            with src.open("rb") as fh, sealed_path.open("wb") as out:
                i = 0
                while chunk := fh.read(SEGMENT):
                    out.write(aead.encrypt(_nonce(prefix, i), chunk, None))
                    i += 1
                out.flush()
                os.fsync(out.fileno())  # as durable as encrypt_file's output

        async def decrypt_raw() -> Any:
            with sealed_path.open("rb") as fh, opened_path.open("wb") as out:
                i = 0
                while part := fh.read(SEGMENT + TAG):
                    out.write(aead.decrypt(_nonce(prefix, i), part, None))
                    i += 1
                out.flush()
                os.fsync(out.fileno())
            assert _size(opened_path) == size

        return name, encrypt_raw, decrypt_raw
    raise SystemExit(f"unknown case {name}")


async def run_case(
    name: str, mib: int, file: Path | None, repeats: int, lag: bool, warmup: bool
) -> dict[str, Any]:
    from aiocrypt import KeyType
    from aiocrypt.testing import make_service

    service = make_service(preload=[KeyType.PII])
    await service.start()
    label = name
    try:
        if file is not None:
            label, encrypt, decrypt_file = await _file_case(name, file, service)
            size = _size(file)

            def decrypt_op(_: Any, /) -> Op:
                return decrypt_file
        else:
            size = mib * MiB
            encrypt, decrypt_op = await _memory_case(name, size, service)
        if warmup:
            sealed = await encrypt()
            await decrypt_op(sealed)()
            del sealed
        gc.collect()
        reset_supported = reset_peak_rss()
        rss0 = current_rss()
        enc_times: list[float] = []
        dec_times: list[float] = []
        for _ in range(repeats):
            start = time.perf_counter()
            sealed = await encrypt()
            enc_times.append(time.perf_counter() - start)
            decrypt = decrypt_op(sealed)
            start = time.perf_counter()
            opened = await decrypt()
            dec_times.append(time.perf_counter() - start)
            del sealed, opened  # freeing hundreds of MiB holds the GIL: keep it off the clock
        peak = peak_rss() - rss0
        result: dict[str, Any] = {
            "case": label,
            "bytes": size,
            "encrypt_s": statistics.median(enc_times),
            "decrypt_s": statistics.median(dec_times),
            "peak_extra_mib": max(0, peak) / MiB,
            "peak_exact": reset_supported,
        }
        if lag:
            async with Ticker() as idle_ticker:
                await asyncio.sleep(0.25)
            async with Ticker() as enc_ticker:
                sealed = await encrypt()
            async with Ticker() as dec_ticker:
                opened = await decrypt_op(sealed)()
            del sealed, opened
            result["lag"] = {
                "encrypt": enc_ticker.summary(),
                "decrypt": dec_ticker.summary(),
                "idle": idle_ticker.summary(),
            }
        return result
    finally:
        await service.close()
        if file is not None:
            for suffix in ("sealed", "opened"):
                file.with_name(f"{file.name}.{name}.{suffix}").unlink(missing_ok=True)


# -- the parent ---------------------------------------------------------------------


def _child(
    case: str,
    mib: int = 0,
    file: Path | None = None,
    repeats: int = 1,
    lag: bool = False,
    warmup: bool = True,
) -> dict[str, Any]:
    args = [
        sys.executable,
        str(HERE / "bench_bulk.py"),
        "--case",
        case,
        "--mib",
        str(mib),
        "--repeats",
        str(repeats),
    ]
    if file is not None:
        args += ["--file", str(file)]
    if lag:
        args.append("--lag")
    if not warmup:
        args.append("--no-warmup")
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"case {case} ({mib} MiB) failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _summarise(samples: dict[str, list[dict[str, Any]]], *baselines: str) -> dict[str, Any]:
    """Medians over rounds of GB/s and of ratios to each baseline (same round); peaks."""
    out: dict[str, Any] = {}
    for case, runs in samples.items():
        row: dict[str, Any] = {
            "label": LABELS.get(runs[0]["case"], case),
            "rounds": len(runs),
            "peak_extra_mib": max(r["peak_extra_mib"] for r in runs),
        }
        for op in ("encrypt", "decrypt"):
            rates = [r["bytes"] / r[f"{op}_s"] / 1e9 for r in runs]
            row[f"{op}_gbps"] = statistics.median(rates)
        row["ratio_to"] = {
            baseline: {
                op: statistics.median(
                    b[f"{op}_s"] / r[f"{op}_s"]
                    for r, b in zip(runs, samples[baseline], strict=True)
                )
                for op in ("encrypt", "decrypt")
            }
            for baseline in baselines
            if baseline in samples
        }
        lags = [r["lag"] for r in runs if "lag" in r]
        if lags:
            row["lag"] = {
                op: {k: max(lag[op][k] for lag in lags) for k in ("max_ms", "p99_ms")}
                for op in ("encrypt", "decrypt", "idle")
            }
        out[case] = row
    return out


def openssl_speed(seconds: int = 1) -> dict[str, Any] | None:
    """``openssl speed -evp aes-256-gcm`` at 16 KiB blocks (GB/s), with the CLI's version."""
    try:
        done = subprocess.run(
            [
                "openssl",
                "speed",
                "-evp",
                "aes-256-gcm",
                "-seconds",
                str(seconds),
                "-bytes",
                "16384",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        version = subprocess.run(
            ["openssl", "version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^AES-256-GCM\s+([\d.]+)k\s*$", done.stdout, re.MULTILINE | re.IGNORECASE)
    if match is None:
        return None
    return {"gbps": float(match.group(1)) * 1000 / 1e9, "version": version}


def _make_file(directory: Path, size: int) -> Path:
    path = directory / "plaintext.bin"
    rng = random.Random(size)  # content is irrelevant
    with path.open("wb") as fh:
        for start in range(0, size, SEGMENT):
            fh.write(rng.randbytes(min(SEGMENT, size - start)))
    return path


def run(*, quick: bool = False, only: set[str] | None = None) -> dict[str, Any]:
    """Results of the ``streams`` (in-memory and file throughput, lag) section."""
    sizes = [1, 16, 32] if quick else [1, 64, 256]
    big = sizes[-1]  # the size the targets speak of (256 MiB)
    file_mib = 64 if quick else 1024
    rounds = 2 if quick else 5  # fresh-memory page faults vary a lot from run to run
    memory: dict[int, dict[str, list[dict[str, Any]]]] = {s: {} for s in sizes}
    for round_no in range(rounds):
        for mib in sizes:
            for case in MEMORY_CASES:
                repeats = 5 if mib <= 16 else 1
                lag = mib == big and case in LAG_CASES  # every round: the worst of 5
                result = _child(case, mib, repeats=repeats, lag=lag)
                memory[mib].setdefault(case, []).append(result)
        print(f"streams: round {round_no + 1}/{rounds} in memory done", flush=True)
    results: dict[str, Any] = {
        "sizes_mib": sizes,
        "big_mib": big,
        "file_mib": file_mib,
        "rounds": rounds,
        "memory": {
            str(mib): _summarise(cases, "aesgcm-segmented", "aesgcm-encrypt-into")
            for mib, cases in memory.items()
        },
    }
    files: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="aiocrypt-bench-") as tmp:
        src = _make_file(Path(tmp), file_mib * MiB)
        for case in FILE_CASES:  # one round: a GiB each way takes seconds
            files.setdefault(case, []).append(
                _child(case, file=src, lag=case in LAG_CASES, warmup=False)
            )
        src.unlink()
    results["file"] = _summarise(files, "aesgcm-file")
    print("streams: file done", flush=True)
    results["openssl"] = openssl_speed()
    import cryptography

    from aiocrypt._gil import aead_releases_gil

    results["aead_releases_gil"] = aead_releases_gil()
    results["cryptography"] = cryptography.__version__
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", choices=(*MEMORY_CASES, *FILE_CASES))
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--file", type=Path)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--lag", action="store_true")
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args()
    if args.case:
        print(
            json.dumps(
                asyncio.run(
                    run_case(
                        args.case, args.mib, args.file, args.repeats, args.lag, not args.no_warmup
                    )
                )
            )
        )
        return
    print(json.dumps(run(quick=args.quick), indent=1))


if __name__ == "__main__":
    main()
