"""Helpers shared by the benchmarks: machine facts, interleaved timing, loop lag, peak memory."""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

from aiocrypt._service import _aes_ni_available

MiB = 1024 * 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def aes_ni() -> bool | None:
    return _aes_ni_available()


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the figures: CPU, cores, versions, load, date."""
    import cryptography
    from cryptography.hazmat.backends.openssl import backend

    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "aes_ni": aes_ni(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "cryptography": cryptography.__version__,
        "openssl": backend.openssl_version_text(),
        "load_before": [round(x, 2) for x in load],
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# -- interleaved timing -------------------------------------------------------------

Loop = Callable[[int], None]


def calibrate(loop: Loop, seconds: float) -> int:
    """Iterations of ``loop`` that take about ``seconds`` (after a warm-up)."""
    loop(3)
    n = 4
    while True:
        start = time.perf_counter()
        loop(n)
        took = time.perf_counter() - start
        if took >= seconds / 4 or n >= 1 << 24:
            return max(1, int(n * seconds / max(took, 1e-9)))
        n *= 4


def interleaved(
    cases: dict[str, Loop], baseline: str, rounds: int, seconds: float
) -> dict[str, dict[str, float]]:
    """Run every case once per round, in turn; per case the median time per iteration
    and the median of its per-round ratios to ``baseline`` (so load that hits one round
    hits all cases of that round alike and cancels in the ratio)."""
    sizes = {name: calibrate(loop, seconds) for name, loop in cases.items()}
    per_op: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, loop in cases.items():
            start = time.perf_counter()
            loop(sizes[name])
            per_op[name].append((time.perf_counter() - start) / sizes[name])
    base = per_op[baseline]
    return {
        name: {
            "us": statistics.median(samples) * 1e6,
            "ratio": statistics.median(s / b for s, b in zip(samples, base, strict=True)),
            "best_ratio": min(samples) / min(base),
            "iterations": sizes[name],
        }
        for name, samples in per_op.items()
    }


# -- event-loop lag -------------------------------------------------------------------


class Ticker:
    """A task that sleeps 1 ms at a time and records how late each wake-up was."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop:
            await asyncio.sleep(self.interval)
            now = time.perf_counter()
            self.lags.append(max(0.0, now - last - self.interval))
            last = now

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.01)
        self.lags.clear()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        assert self._task is not None
        await self._task

    def summary(self) -> dict[str, float]:
        """Max and p99 lag in milliseconds."""
        if not self.lags:
            return {"max_ms": 0.0, "p99_ms": 0.0, "ticks": 0}
        ordered = sorted(self.lags)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return {"max_ms": ordered[-1] * 1000, "p99_ms": p99 * 1000, "ticks": len(ordered)}


# -- peak memory (Linux) ----------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:  # ru_maxrss is in KiB on Linux
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024
