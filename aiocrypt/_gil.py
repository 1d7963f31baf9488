"""Whether the installed cryptography releases the GIL during AES-GCM (probed once).

Bulk data and streams are sealed segment by segment. When cryptography holds the
GIL for a call (50.0 and earlier do), a worker thread buys no parallelism, only a
hand-off, and the event loop's thread waits for the GIL behind the cipher: the
service then seals inline, yielding to the loop every MiB. When a release lets
go of the GIL during AEAD calls (pyca/cryptography pull requests 15359 and 15361,
merged in July 2026), segments spread over the service's worker threads run on
several cores at once.

Which of the two holds is measured, not read from a version number: two threads
each seal the same amount, once one after the other and once at the same time.
The answer is cached for the process; the measurement takes about 100 ms of one
worker thread: five rounds, and the median round decides, so one lucky round on a
busy machine does not flip it (when in doubt the answer is "holds the GIL", the
safe one: inline work is never slower than a thread hop that buys nothing).
"""

from __future__ import annotations

import functools
import os
import statistics
import threading
import time
from typing import Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["aead_releases_gil", "usable_cores"]

_PROBE_BYTES: Final = 4 * 1024 * 1024
_CALLS: Final = 2
_ROUNDS: Final = 5
_SPEEDUP: Final = 1.5
"""In the median round, two threads must finish at least this much sooner together
than one after the other (2.0 would be perfect parallelism; a GIL-holding cipher
gives about 1.0; single rounds on a busy machine swing from 0.9 to 1.4)."""


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS and Windows have no affinity call
        return os.cpu_count() or 1


@functools.cache
def aead_releases_gil() -> bool:
    """True when two threads sealing AES-GCM run in parallel here (cached)."""
    if usable_cores() < 2:
        return False
    aead = AESGCM(os.urandom(32))
    data = bytes(_PROBE_BYTES)
    nonce = os.urandom(12)  # probe output is discarded; the key is never used again

    def work() -> None:
        for _ in range(_CALLS):
            aead.encrypt(nonce, data, None)

    work()  # warm up (page faults of the first outputs, the cipher context)
    speedups = []
    for _ in range(_ROUNDS):
        start = time.perf_counter()
        work()
        work()
        serial = time.perf_counter() - start
        threads = [threading.Thread(target=work) for _ in range(2)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        speedups.append(serial / max(time.perf_counter() - start, 1e-9))
    return statistics.median(speedups) >= _SPEEDUP
