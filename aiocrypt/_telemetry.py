"""Optional OpenTelemetry spans and metrics around key operations (extra ``aiocrypt[otel]``).

What is traced: KEK provider (KMS) calls, key loads, rotations, cleanup and
retirement, master-key rewraps, re-encryption runs and batches, subject
erasure. Never a field encrypt or decrypt: those run in microseconds, and a span
each would cost more than the work (docs/observability.md has the numbers).

Attributes are key ids, key types, provider names, table names, counts and
outcomes only: never a value, a token, key material or a subject id. An
exception is recorded by its type name alone (``error.type``), with the span's
status set to ERROR and ``aiocrypt.outcome`` to ``"error"``: an exception's
message may quote data, so it is left out, and so is its traceback.

``opentelemetry`` is imported on the first traced operation, not with
``aiocrypt``: processes that never trace pay nothing at import, and the first
key operation (normally the first keyring load, at start-up) pays the import
once. Without ``opentelemetry-api`` every call here is a no-op costing a
function call and a check; with the API but no SDK configured the API's no-op
providers answer, and spans are never filled in (``is_recording()`` is false).
The tracer and meter come from the global providers (``trace.get_tracer``),
through the API's proxies, so a provider installed after the first span still
receives the next ones.

Attribute names are written here without their namespace (``key_type=``) and
recorded as ``aiocrypt.key_type``; the span and metric names and what each
carries are listed in docs/observability.md.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import Counter, Histogram, Meter
    from opentelemetry.trace import Span, Tracer

__all__ = ["Operation", "annotate", "count", "span", "traced"]

AttributeValue = str | int | float | bool | tuple[str, ...]

#: The attributes that also label metrics. Every one has a few values at most; key
#: ids, counts and the like stay on spans (a label per key id would make a series
#: per key version, forever).
METRIC_ATTRIBUTES: Final = frozenset(
    {"key_type", "provider", "operation", "outcome", "reason", "table"}
)
#: Histogram buckets in seconds: a local KEK answers in microseconds, a cloud KMS in
#: milliseconds, a re-encryption run in minutes.
DURATION_BUCKETS: Final = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
)
_NAMESPACE: Final = "aiocrypt."

logger = logging.getLogger("aiocrypt.telemetry")

P = ParamSpec("P")
T = TypeVar("T")


class Operation:
    """The handle of one span: attributes set while it runs (e.g. the outcome)."""

    __slots__ = ("attributes",)

    def __init__(self, attributes: dict[str, AttributeValue]) -> None:
        self.attributes = attributes

    def set(self, **attributes: AttributeValue) -> None:
        self.attributes.update(attributes)


class _Discarded(Operation):
    """What ``span`` hands out when nothing is traced: it keeps nothing."""

    __slots__ = ()

    def set(self, **attributes: AttributeValue) -> None:
        pass


_DISCARDED: Final = _Discarded({})
#: The innermost operation being traced in this context, for ``annotate``.
_current: contextvars.ContextVar[Operation | None] = contextvars.ContextVar(
    "aiocrypt_operation", default=None
)


def _named(attributes: Mapping[str, AttributeValue]) -> dict[str, AttributeValue]:
    return {_NAMESPACE + name: value for name, value in attributes.items()}


class _Otel:
    """The tracer, the meter and the instruments made so far (one per process)."""

    def __init__(self) -> None:
        from opentelemetry import context, metrics, trace

        from . import __version__

        self.context = context
        self.trace = trace
        self.error = trace.Status(trace.StatusCode.ERROR)
        self.tracer: Tracer = trace.get_tracer("aiocrypt", __version__)
        self.meter: Meter = metrics.get_meter("aiocrypt", __version__)
        self.histograms: dict[str, Histogram] = {}
        self.counters: dict[str, Counter] = {}

    def histogram(self, name: str) -> Histogram:
        histogram = self.histograms.get(name)
        if histogram is None:
            description = f"duration of {name} operations"
            try:
                histogram = self.meter.create_histogram(
                    name,
                    unit="s",
                    description=description,
                    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
                )
            # opentelemetry-api before 1.23 (the dev extra installs a newer one): the SDK's
            # default buckets
            except TypeError:  # pragma: no cover - opentelemetry-api < 1.23 only
                histogram = self.meter.create_histogram(name, unit="s", description=description)
            self.histograms[name] = histogram
        return histogram

    def counter(self, name: str) -> Counter:
        counter = self.counters.get(name)
        if counter is None:
            counter = self.counters[name] = self.meter.create_counter(name)
        return counter


_otel: _Otel | None = None
_resolved = False


def _backend() -> _Otel | None:
    """OpenTelemetry if ``opentelemetry-api`` imports, else None (decided once)."""
    global _otel, _resolved
    if not _resolved:
        try:
            _otel = _Otel()
        except ImportError:
            _otel = None
        except Exception as exc:  # a broken install must not break key operations
            logger.warning(
                "OpenTelemetry is installed but failed to load (%s): aiocrypt does not trace",
                type(exc).__name__,
            )
            _otel = None
        _resolved = True
    return _otel


def _error_type(exc: BaseException) -> str:
    kind = type(exc)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


class _Traced:
    """One traced operation: a span, the current operation, a duration measured."""

    __slots__ = (
        "_attributes",
        "_context",
        "_name",
        "_op",
        "_operation",
        "_otel",
        "_span",
        "_start",
    )

    def __init__(self, name: str, attributes: dict[str, AttributeValue]) -> None:
        self._name = name
        self._attributes = attributes

    def __enter__(self) -> Operation:
        otel = _backend()
        self._otel = otel
        if otel is None:
            return _DISCARDED
        self._op = op = Operation(dict(self._attributes))
        self._span: Span = otel.tracer.start_span(
            self._name,
            attributes=_named(self._attributes),
            record_exception=False,
            set_status_on_exception=False,
        )
        context: Context = otel.trace.set_span_in_context(self._span)
        self._context = otel.context.attach(context)
        self._operation = _current.set(op)
        self._start = time.perf_counter()
        return op

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        otel = self._otel
        if otel is None:
            return
        seconds = time.perf_counter() - self._start
        op, span = self._op, self._span
        _current.reset(self._operation)
        otel.context.detach(self._context)
        attributes = op.attributes
        if exc is not None:
            # The type only: a message or a traceback may hold what spans must not.
            attributes["outcome"] = "error" if isinstance(exc, Exception) else "cancelled"
            if isinstance(exc, Exception):
                error_type = _error_type(exc)
                span.set_attribute("error.type", error_type)
                span.add_event("exception", {"exception.type": error_type})
                span.set_status(otel.error)
        else:
            attributes.setdefault("outcome", "ok")
        if span.is_recording():  # what the span did not start with (checked once is enough)
            started = self._attributes
            span.set_attributes(
                _named({k: v for k, v in attributes.items() if k not in started or started[k] != v})
            )
        span.end()
        otel.histogram(self._name + ".duration").record(
            seconds, _named({k: v for k, v in attributes.items() if k in METRIC_ATTRIBUTES})
        )


def span(name: str, **attributes: AttributeValue) -> _Traced:
    """Trace one operation named ``aiocrypt.<area>.<operation>``.

    ``with span(name, key_type="pii") as op: ...; op.set(rows=n)``. The outcome
    is ``"ok"`` unless the body sets another or raises (``"error"``); the
    duration goes to the histogram ``<name>.duration``.
    """
    return _Traced(name, attributes)


def annotate(**attributes: AttributeValue) -> None:
    """Set attributes on the innermost operation being traced (none: nothing happens)."""
    op = _current.get()
    if op is not None:
        op.attributes.update(attributes)


def traced(
    name: str, **attributes: AttributeValue
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """Trace every call of an async function as ``span(name, **attributes)``; the body
    adds attributes with :func:`annotate`."""

    def decorate(function: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(function)
        async def call(*args: P.args, **kwargs: P.kwargs) -> T:
            if _backend() is None:
                return await function(*args, **kwargs)
            with span(name, **attributes):
                return await function(*args, **kwargs)

        return call

    return decorate


def count(name: str, value: int = 1, **attributes: AttributeValue) -> None:
    """Add ``value`` to the counter ``name`` (attributes label it: few values each)."""
    otel = _backend()
    if otel is not None:
        otel.counter(name).add(value, _named(attributes))
