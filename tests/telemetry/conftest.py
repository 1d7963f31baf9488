"""The OpenTelemetry SDK with in-memory exporters, installed once per test session.

OpenTelemetry's global tracer and meter providers can be set only once per process,
so the session installs one of each: spans go to an ``InMemorySpanExporter`` through
a processor that passes them on only while a test of this folder runs (the rest of
a session's tests would otherwise fill it), metrics to an ``InMemoryMetricReader``.
aiocrypt takes its tracer and meter from the API's global proxies, so the order in
which a session first traces and installs does not matter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)


class _WhileTesting(SpanProcessor):
    """Passes finished spans on only while ``on`` (a test of this folder is running)."""

    def __init__(self, inner: SpanProcessor) -> None:
        self.inner = inner
        self.on = False

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self.on:
            self.inner.on_end(span)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


@dataclass
class Telemetry:
    """What aiocrypt traced and measured since the test began."""

    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    switch: _WhileTesting
    baseline: dict[tuple[str, str], float] = field(default_factory=dict)

    def reset(self) -> None:
        self.exporter.clear()
        self.baseline = {key: value for key, value in self._points()}

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert len(found) == 1, f"{len(found)} spans named {name}: {[s.name for s in self.spans()]}"
        return found[0]

    def _points(self) -> Iterator[tuple[tuple[str, str], float]]:
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        if value is None:  # a histogram: how many were measured
                            value = point.count  # type: ignore[union-attr]
                        attributes = json.dumps(dict(point.attributes or {}), sort_keys=True)
                        yield (metric.name, attributes), float(value)

    def metric(self, name: str, **attributes: Any) -> float:
        """The sum since the test began of the points of ``name`` whose attributes include
        ``aiocrypt.<k>=v`` for every ``k=v`` given (histograms: the number measured)."""
        wanted = {f"aiocrypt.{k}": v for k, v in attributes.items()}
        total = 0.0
        for (metric, labels), value in self._points():
            if metric == name and wanted.items() <= json.loads(labels).items():
                total += value - self.baseline.get((metric, labels), 0.0)
        return total

    def metric_labels(self) -> list[tuple[str, Mapping[str, Any]]]:
        """(metric name, attributes) of every series recorded in this session."""
        return [(metric, json.loads(labels)) for (metric, labels), _ in self._points()]

    def dumps(self) -> str:
        """Every span of the test and every metric of the session, as exporters see them."""
        data = self.reader.get_metrics_data()
        return "\n".join(
            [*(s.to_json() for s in self.spans()), data.to_json() if data is not None else ""]
        )


@pytest.fixture(scope="session")
def _installed() -> Telemetry:
    exporter = InMemorySpanExporter()
    switch = _WhileTesting(SimpleSpanProcessor(exporter))
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(switch)
    trace.set_tracer_provider(tracer_provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return Telemetry(exporter, reader, switch)


@pytest.fixture
def otel(_installed: Telemetry) -> Iterator[Telemetry]:
    """The SDK's in-memory exporter and reader, emptied for this test."""
    _installed.reset()
    _installed.switch.on = True
    try:
        yield _installed
    finally:
        _installed.switch.on = False
        _installed.exporter.clear()
