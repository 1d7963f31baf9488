"""What one aiocrypt span costs, beside a field round trip measured in the same run.

    .venv/bin/python bench/telemetry_overhead.py none   # opentelemetry not importable
    .venv/bin/python bench/telemetry_overhead.py api    # the API alone: its no-op providers
    .venv/bin/python bench/telemetry_overhead.py sdk    # the SDK, a batch span processor

Run each in its own process (the mode decides what is importable). The medians of
seven rounds are printed; docs/observability.md has the figures. Not part of
``./dev bench``: it measures the tracing, not the library.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable


def install(mode: str) -> None:
    if mode == "none":
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]  # import fails
    elif mode == "sdk":
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        provider = TracerProvider()
        provider.add_span_processor(
            BatchSpanProcessor(InMemorySpanExporter(), max_queue_size=1 << 20)
        )
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    elif mode != "api":
        raise SystemExit("mode: none, api or sdk")


def median_seconds(function: Callable[[], object], calls: int, rounds: int = 7) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


async def main(mode: str) -> None:
    from aiocrypt import KeyType
    from aiocrypt._telemetry import span
    from aiocrypt.testing import make_service

    def one_span() -> None:
        with span("aiocrypt.bench.op", key_type="pii", key_id="pii-v1-0011aabb") as op:
            op.set(rows=3)

    one_span()  # the first one imports opentelemetry
    per_span = median_seconds(one_span, 20_000)
    async with make_service() as service:
        await service.encrypt_field("warm", KeyType.PII)

        async def round_trips(count: int = 2000) -> float:
            start = time.perf_counter()
            for _ in range(count):
                token = await service.encrypt_field(
                    "ada@example.com", KeyType.PII, context="users.email"
                )
                await service.decrypt_field(token, KeyType.PII, context="users.email")
            return (time.perf_counter() - start) / count

        per_round_trip = statistics.median([await round_trips() for _ in range(7)])
    print(
        f"{mode}: one span {per_span * 1e6:.2f} us; "
        f"a field round trip {per_round_trip * 1e6:.2f} us"
    )


if __name__ == "__main__":
    install(sys.argv[1] if len(sys.argv) > 1 else "api")
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "api"))
