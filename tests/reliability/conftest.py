"""Fixtures of the reliability tests: private services to kill, a fault proxy, a summary log.

The shared Redis (6379) and PostgreSQL (5432) are never stopped or reconfigured:
a test that needs a service to die gets its own redis-server / PostgreSQL
cluster on a free port (``private_redis``, ``private_postgres``), or reaches a
service through a :class:`FaultProxy` it can cut (``fault_proxy``).

Every test ends by calling ``summary(name, **figures)``: one line printed
(run with ``-s`` to see it) and appended to a JSON-lines file
(``$AIOCRYPT_RELIABILITY_REPORT``, default ``/tmp/aiocrypt-reliability.jsonl``)
from which docs/reliability.md takes its figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from ._proxy import FaultProxy

REPORT_PATH = Path(os.environ.get("AIOCRYPT_RELIABILITY_REPORT", "/tmp/aiocrypt-reliability.jsonl"))


@pytest.fixture
async def fault_proxy() -> AsyncIterator[Callable[[str, int], Any]]:
    """``await fault_proxy(host, port)`` gives a started :class:`FaultProxy` (stopped after)."""
    proxies: list[FaultProxy] = []

    async def make(host: str, port: int) -> FaultProxy:
        proxy = await FaultProxy(host, port).start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            await proxy.stop()


@pytest.fixture
def summary(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``summary(**figures)``: print one line and append it to the JSON-lines report."""

    def record(**figures: Any) -> None:
        entry = {"test": request.node.nodeid, **figures}
        print(f"\n[reliability] {json.dumps(entry, sort_keys=True, default=str)}")
        with REPORT_PATH.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True, default=str) + "\n")

    return record
