"""Fault in a fresh output buffer's pages from a worker thread, ahead of the cipher.

Bulk data is sealed and opened on the event loop's thread, a MiB per step
(docs/performance.md). Into a fresh anonymous mapping, most of a step's time is
not the cipher but the first touch of each page: the kernel faults in and zeroes
4 KiB at a time, about ten times slower than writing memory touched before,
and the loop waits all the while. ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14
and later) does the same faulting without writing a byte of the buffer, so it
can run in a worker thread while the loop's thread seals what is already
populated: ctypes releases the GIL for the call, the two overlap on two cores,
and each step of the loop touches only memory that is ready.

Nothing here changes the buffer's contents: populating a page that the cipher
has already written leaves it as it is. Where the call does not exist (another
system, an older kernel), :func:`supported` says no and the loop faults the
pages itself, as before.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import sys
import threading
from typing import Final

__all__ = ["Prefaulter", "supported"]

#: From <linux/mman.h>: populate (prefault) page tables writable, without writing.
MADV_POPULATE_WRITE: Final = 23
#: Pages made ready per call: a couple of milliseconds of faulting, so a waiting
#: step is never far behind and a stop takes effect soon.
CHUNK: Final = 2 * 1024 * 1024

_madvise: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
_supported: bool | None = None


def _function() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    global _madvise
    if _madvise is None:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.madvise
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        function.restype = ctypes.c_int
        _madvise = function
    return _madvise


def supported() -> bool:
    """Whether this system populates pages on request (tried once per process)."""
    global _supported
    if _supported is None:
        _supported = False
        if sys.platform.startswith("linux"):  # pragma: no branch - tests run on Linux
            probe = mmap.mmap(-1, mmap.PAGESIZE)
            anchor = ctypes.c_char.from_buffer(probe)
            try:
                _supported = (
                    _function()(ctypes.addressof(anchor), mmap.PAGESIZE, MADV_POPULATE_WRITE) == 0
                )
            except (OSError, AttributeError):  # pragma: no cover - a libc without madvise
                _supported = False
            finally:
                del anchor
                probe.close()
    return _supported


class Prefaulter:
    """Populates ``view`` (a fresh anonymous mapping) front to back in a worker thread.

    :meth:`run` is the thread's work; :meth:`wait_for` lets a coroutine wait, without
    blocking its loop, until the first ``end`` bytes are ready (or the thread gave
    up: then the cipher faults the rest in itself); :meth:`stop` ends the thread
    after its current chunk.
    """

    def __init__(self, view: memoryview, loop: asyncio.AbstractEventLoop) -> None:
        self._view = view
        self._loop = loop
        self._progress = asyncio.Event()
        self._stopped = threading.Event()
        #: bytes from the start known to be populated; ``len(view)`` once the thread
        #: is done or gave up, so no waiter waits for it any longer
        self.ready = 0
        self.failed = False

    def run(self) -> None:
        size = len(self._view)
        try:
            anchor = ctypes.c_char.from_buffer(self._view)
        except (TypeError, ValueError):  # not a writable contiguous buffer
            self.failed = True
            self._publish(size)
            return
        try:
            base = ctypes.addressof(anchor)
            madvise = _function()
            for at in range(0, size, CHUNK):
                if self._stopped.is_set():
                    break
                if madvise(base + at, min(CHUNK, size - at), MADV_POPULATE_WRITE) != 0:
                    self.failed = True  # out of memory, or no such call: the cipher faults
                    break
                self._publish(min(size, at + CHUNK))
        finally:
            del anchor
            self._publish(size)

    def _publish(self, ready: int) -> None:
        self.ready = ready
        try:
            self._loop.call_soon_threadsafe(self._progress.set)
        except RuntimeError:  # pragma: no cover - the loop closed under a stray thread
            pass

    async def wait_for(self, end: int) -> None:
        """Until the first ``end`` bytes of the view are populated (or never will be)."""
        # No wake-up is lost: ``ready`` is raised before the thread schedules the set(),
        # and that callback cannot run between this check and the clear().
        while self.ready < end:
            self._progress.clear()
            await self._progress.wait()

    def stop(self) -> None:
        self._stopped.set()
