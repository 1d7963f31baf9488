"""Prometheus metrics for an ``EncryptionService`` (extra ``aiocrypt[metrics]``).

>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> metrics = instrument(service, registry)
>>> body, content_type = render(registry)

The field path is not touched: the service already counts what it does in
plain ints (per key on the loaded data keys, per event in
``service.counters``), and the collector reads those numbers when Prometheus
scrapes. Only KEK provider calls, which are rare, are timed as they happen
(``aiocrypt.kek`` reports every ``wrap`` / ``unwrap`` to registered observers).
Metric names, labels and meaning: docs/metrics.md.

This module imports without prometheus-client; using it without raises an
``ImportError`` that names the extra.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

from ._policy import rotation_due
from ._service import EncryptionService
from ._types import KeyStatus
from .kek._base import observe_kek_calls, unobserve_kek_calls
from .reencrypt import TableCensus

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "CONTENT_TYPE",
    "KMS_BUCKETS",
    "ServiceCollector",
    "generate_latest",
    "instrument",
    "metrics_app",
    "render",
    "route_registry",
    "uninstrument",
]

#: The Prometheus text exposition format (what ``render`` returns with the body).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: Histogram buckets of KEK provider calls: the local provider answers in
#: microseconds, a cloud KMS in milliseconds, a struggling one in seconds.
KMS_BUCKETS: Final = (
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
)
_FAILURES: Final = "decrypt_failures"
_HINT: Final = "aiocrypt.metrics needs prometheus-client: pip install 'aiocrypt[metrics]'"


def _prometheus(module: str = "prometheus_client") -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(_HINT) from exc


class ServiceCollector:
    """A Prometheus collector that reads a service's counters at scrape time.

    Build it with :func:`instrument`. It keeps, per key id, the last count it
    saw, so the per-key-type encryption counters never go backwards when a
    key leaves the keyring or the service is closed and started again.
    """

    def __init__(self, service: EncryptionService, *, namespace: str = "aiocrypt") -> None:
        prometheus = _prometheus()
        self.service = service
        self.namespace = namespace
        self._lock = threading.Lock()
        # key id -> [key type, last count seen, counts of earlier lives of the key]
        self._seen: dict[str, list[Any]] = {}
        self._kms = prometheus.Histogram(
            "kms_call_duration_seconds",
            "KEK provider (KMS) wrap/unwrap calls: count and duration in seconds",
            ["provider", "operation", "outcome"],
            namespace=namespace,
            registry=None,
            buckets=KMS_BUCKETS,
        )

    def __repr__(self) -> str:
        return f"<ServiceCollector namespace={self.namespace}>"

    # -- hooks ----------------------------------------------------------------

    def kek_call_finished(self, backend: str, operation: str, outcome: str, seconds: float) -> None:
        self._kms.labels(backend, operation, outcome).observe(seconds)

    def record_census(
        self, census: Mapping[str, int] | TableCensus | Iterable[TableCensus]
    ) -> None:
        """Publish rows per key id from a census you ran (``ReencryptionEngine.census`` or
        ``key_usage``). Census runs through ``KeyManager.census`` are picked up by themselves.
        Pass every table of interest at once: a new census replaces the last one.
        """
        if isinstance(census, TableCensus):
            census = [census]
        if isinstance(census, Mapping):
            rows = {str(k): int(v) for k, v in census.items()}
        else:
            rows = {}
            for table in census:
                for key_id in table.key_ids():
                    rows[key_id] = rows.get(key_id, 0) + table.rows_for(key_id)
        manager = self.service.key_manager
        manager.last_census, manager.last_census_at = rows, manager._clock()

    # -- the collector protocol -----------------------------------------------

    def describe(self) -> Iterator[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        return self._families(fill=True)

    def _families(self, fill: bool = False) -> Iterator[Metric]:
        core = _prometheus("prometheus_client.core")
        counter, gauge = core.CounterMetricFamily, core.GaugeMetricFamily
        ns = self.namespace
        service = self.service
        manager = service.key_manager
        operations = counter(
            f"{ns}_operations",
            "Field and blob encryptions (by key type) and decryptions, by outcome",
            labels=["operation", "key_type", "outcome"],
        )
        failures = counter(
            f"{ns}_decrypt_failures",
            "Decryptions that failed (tampered, truncated or misplaced ciphertext, unknown key)",
            labels=["key_type"],
        )
        events = counter(
            f"{ns}_service_events",
            "Other service operations (bulk, stream, cache, thread hops)",
            labels=["event"],
        )
        hits = counter(f"{ns}_dek_cache_hits", "Keyring rebuilds that reused an unwrapped DEK")
        misses = counter(
            f"{ns}_dek_cache_misses",
            "Keyring rebuilds that had to unwrap a DEK with the KEK provider",
        )
        loaded = gauge(f"{ns}_keys_loaded", "Data keys loaded in this process")
        age = gauge(
            f"{ns}_key_age_seconds",
            "Age of each key version that is not destroyed",
            labels=["key_type", "version", "status"],
        )
        rotation = gauge(
            f"{ns}_key_rotation_due_seconds",
            "Seconds until the active key of a "
            "type is due for rotation by policy (negative: overdue)",
            labels=["key_type", "version"],
        )
        census_rows = gauge(
            f"{ns}_census_rows",
            "Rows left per key version in the last census",
            labels=["key_type", "version", "key_id"],
        )
        census_time = gauge(
            f"{ns}_census_timestamp_seconds", "When the last census ran (Unix time)"
        )
        if fill:
            counters = dict(service.counters)  # one atomic copy: the loop may be writing
            for key_type, n in sorted(self._encryptions_by_type().items()):
                operations.add_metric(["encrypt", key_type, "ok"], n)
            operations.add_metric(["decrypt", "all", "ok"], service._decryptions)
            by_type = {
                name.split(":", 1)[1]: n
                for name, n in counters.items()
                if name.startswith(_FAILURES + ":")
            }
            by_type["unknown"] = counters.get(_FAILURES, 0) - sum(by_type.values())
            for key_type, n in sorted(by_type.items()):
                if n or key_type != "unknown":
                    operations.add_metric(["decrypt", key_type, "failure"], n)
                    failures.add_metric([key_type], n)
            for name, n in sorted(counters.items()):
                if not name.startswith(_FAILURES):
                    events.add_metric([name], n)
            hits.add_metric([], manager.dek_cache_hits)
            misses.add_metric([], manager.dek_cache_misses)
            loaded.add_metric([], len(manager.keyring))
            self._key_gauges(age, rotation, census_rows, census_time)
        yield from (
            operations,
            failures,
            events,
            hits,
            misses,
            loaded,
            age,
            rotation,
            census_rows,
            census_time,
        )
        yield from self._kms.collect() if fill else self._kms.describe()

    def _encryptions_by_type(self) -> dict[str, int]:
        with self._lock:  # scrapes may come from several threads at once
            for dk in self.service.key_manager.keyring:
                seen = self._seen.get(dk.key_id)
                if seen is None:
                    self._seen[dk.key_id] = [str(dk.key.key_type), dk.encryptions, 0]
                else:
                    if dk.encryptions < seen[1]:  # a new life of the key (service restarted)
                        seen[2] += seen[1]
                    seen[1] = dk.encryptions
            totals: dict[str, int] = {}
            for key_type, last, earlier in self._seen.values():
                totals[key_type] = totals.get(key_type, 0) + last + earlier
            return totals

    def _key_gauges(self, age: Any, rotation: Any, census_rows: Any, census_time: Any) -> None:
        manager = self.service.key_manager
        now = manager._clock()
        records = manager._records.keys
        versions = {}
        for key in records:
            versions[key.key_id] = (str(key.key_type), str(key.version))
            if key.status is KeyStatus.DESTROYED:
                continue
            age.add_metric(
                [str(key.key_type), str(key.version), key.status.value],
                key.age(now).total_seconds(),
            )
        for key_type, dk in sorted(manager.keyring.active_keys.items()):
            key = dk.key
            policy = manager.config.rotation_policy(key.key_type)
            due = rotation_due(key, policy) - now
            rotation.add_metric([str(key_type), str(key.version)], due.total_seconds())
        census = manager.last_census
        if census is None and isinstance(manager.census, Mapping):
            census = manager.census
        if census is not None:
            for key_id, rows in sorted(census.items()):
                key_type, version = versions.get(key_id, ("unknown", ""))
                census_rows.add_metric([key_type, version, key_id], rows)
        if manager.last_census_at is not None:
            census_time.add_metric([], manager.last_census_at.timestamp())


def instrument(
    service: EncryptionService,
    registry: CollectorRegistry | None = None,
    *,
    namespace: str = "aiocrypt",
) -> ServiceCollector:
    """Register ``service``'s metrics on ``registry`` (default: prometheus-client's global one).

    Also starts timing KEK provider calls into the ``kms_call_duration_seconds``
    histogram (every provider of the process). ``uninstrument`` undoes it all.
    """
    prometheus = _prometheus()
    target = registry if registry is not None else prometheus.REGISTRY
    collector = ServiceCollector(service, namespace=namespace)
    target.register(collector)
    observe_kek_calls(collector)  # weakly held: the registry keeps the collector alive
    return collector


def route_registry(
    service: EncryptionService, registry: CollectorRegistry | None = None
) -> CollectorRegistry | None:
    """The registry a web app's ``/metrics`` route serves: ``registry`` as given, else a
    new one holding ``service``'s metrics alone; None without prometheus-client
    (the web integrations then serve health only)."""
    try:
        prometheus = _prometheus()
    except ImportError:
        return None
    if registry is None:
        registry = prometheus.CollectorRegistry()
        instrument(service, registry)
    return registry


def uninstrument(collector: ServiceCollector, registry: CollectorRegistry | None = None) -> None:
    """Remove what :func:`instrument` registered."""
    unobserve_kek_calls(collector)
    target = registry if registry is not None else _prometheus().REGISTRY
    target.unregister(collector)


def generate_latest(registry: CollectorRegistry | None = None) -> bytes:
    """The registry's metrics in the Prometheus text format."""
    prometheus = _prometheus()
    return bytes(
        prometheus.generate_latest(registry if registry is not None else prometheus.REGISTRY)
    )


def render(registry: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """``(body, content_type)`` for a ``/metrics`` response."""
    return generate_latest(registry), CONTENT_TYPE


def metrics_app(registry: CollectorRegistry | None = None) -> Any:
    """An ASGI app serving the registry (mount it at ``/metrics`` in any ASGI server)."""
    prometheus = _prometheus()
    return prometheus.make_asgi_app(registry if registry is not None else prometheus.REGISTRY)
