"""A TCP proxy on loopback that can be told to fail like a network does.

``FaultProxy(upstream_host, upstream_port)`` listens on 127.0.0.1:<free port>
and forwards every connection to the upstream service. Between operations a
test switches it to:

* ``drop()``      -- close every open connection now (a service restart or a
  reset by a middlebox, as the client sees it);
* ``refuse()``    -- also refuse new connections (the service is down);
* ``blackhole()`` -- accept connections but never answer, and stop answering
  on the open ones (a partition: only a timeout gets the client out);
* ``heal()``      -- forward normally again.

It counts connections accepted and refused, so a test can say how many
faults it injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from dataclasses import dataclass, field


class Mode(enum.Enum):
    FORWARD = "forward"
    REFUSE = "refuse"
    BLACKHOLE = "blackhole"


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0
    blackholed: int = 0
    dropped: int = 0
    faults: list[str] = field(default_factory=list)


class FaultProxy:
    """An asyncio TCP proxy with fault switches. ``async with FaultProxy(...) as proxy``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = Mode.FORWARD
        self.stats = ProxyStats()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def host(self) -> str:
        return "127.0.0.1"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.mode = Mode.REFUSE  # ends the blackhole waits; the handlers see their peers gone
        self._close_all()
        # Handlers end on their own once their transports are aborted; cancelling them
        # would make asyncio log the cancelled connection callbacks as errors.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- switches -----------------------------------------------------------

    def _close_all(self) -> None:
        for writer in list(self._writers):
            self.stats.dropped += 1
            with contextlib.suppress(Exception):
                transport = writer.transport
                transport.abort()  # RST, as a dying peer or a middlebox would
        self._writers.clear()

    def drop(self) -> None:
        """Close every open connection (new ones are still forwarded)."""
        self.stats.faults.append("drop")
        self._close_all()

    def refuse(self) -> None:
        """Close every open connection and refuse new ones."""
        self.stats.faults.append("refuse")
        self.mode = Mode.REFUSE
        self._close_all()

    def blackhole(self) -> None:
        """Accept but never answer; open connections stop answering too."""
        self.stats.faults.append("blackhole")
        self.mode = Mode.BLACKHOLE

    def heal(self) -> None:
        """Forward normally again (blackholed connections are dropped)."""
        if self.mode is Mode.BLACKHOLE:
            self._close_all()
        self.mode = Mode.FORWARD

    # -- plumbing -----------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.mode is Mode.REFUSE:
                self.stats.refused += 1
                writer.transport.abort()
                return
            self.stats.accepted += 1
            self._writers.add(writer)
            if self.mode is Mode.BLACKHOLE:
                self.stats.blackholed += 1
                await self._swallow(reader)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                writer.transport.abort()
                return
            self._writers.add(up_writer)
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            finally:
                self._writers.discard(up_writer)
                up_writer.transport.abort()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                while self.mode is Mode.BLACKHOLE:  # hold the bytes: nothing gets through
                    await asyncio.sleep(0.05)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()
