"""Prometheus metrics (aiocrypt.metrics) and the health report (aiocrypt.health).

Every test scrapes a fresh CollectorRegistry after real operations and reads
exact sample values from it.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import AsyncIterator, Iterator, Mapping

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from aiocrypt import (
    DecryptionError,
    EncryptionService,
    KeyManager,
    KeyType,
    TableCensus,
    health,
)
from aiocrypt.kek import LocalKekProvider
from aiocrypt.metrics import ServiceCollector, instrument, render, uninstrument
from aiocrypt.testing import FakeKekProvider, ManualClock, MemoryKeyStore, make_service

try:
    from tests.kms_servers import start_vault_server
except ImportError:  # plain `pytest` with tests/ itself on sys.path
    from kms_servers import start_vault_server  # type: ignore[no-redef]

DAY = 86400.0


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def instrumented(registry: CollectorRegistry) -> AsyncIterator[EncryptionService]:
    service = make_service()
    collector = instrument(service, registry)
    async with service:
        yield service
    uninstrument(collector, registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def tamper(token: str) -> str:
    last = "A" if token[-1] != "A" else "B"
    return token[:-1] + last


async def test_field_operations_by_key_type_and_outcome(
    registry: CollectorRegistry, instrumented: EncryptionService
) -> None:
    service = instrumented
    tokens = [
        await service.encrypt_field(f"person-{i}", KeyType.PII, context="users.name")
        for i in range(3)
    ]
    await service.encrypt_many([1, 2], KeyType.FINANCIAL_DATA, context="accounts.balance")
    assert await service.decrypt_field(tokens[0], KeyType.PII, context="users.name") == "person-0"
    assert await service.decrypt_field(tokens[1], KeyType.PII, context="users.name") == "person-1"
    with pytest.raises(DecryptionError):
        await service.decrypt_field(tamper(tokens[2]), KeyType.PII, context="users.name")
    with pytest.raises(DecryptionError):  # right token, wrong column
        await service.decrypt_field(tokens[2], KeyType.PII, context="users.email")

    ops = "aiocrypt_operations_total"
    assert value(registry, ops, operation="encrypt", key_type="pii", outcome="ok") == 3
    assert value(registry, ops, operation="encrypt", key_type="financial_data", outcome="ok") == 2
    assert value(registry, ops, operation="decrypt", key_type="all", outcome="ok") == 2
    assert value(registry, ops, operation="decrypt", key_type="pii", outcome="failure") == 2
    assert value(registry, "aiocrypt_decrypt_failures_total", key_type="pii") == 2
    assert value(registry, "aiocrypt_keys_loaded") == 2
    # the text a scraper sees parses and carries the same numbers
    body, content_type = render(registry)
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    encrypt_pii = [
        s.value
        for s in families["aiocrypt_operations"].samples
        if s.labels == {"operation": "encrypt", "key_type": "pii", "outcome": "ok"}
    ]
    assert encrypt_pii == [3]


async def test_bulk_and_cache_events_and_dek_cache(
    registry: CollectorRegistry, instrumented: EncryptionService
) -> None:
    service = instrumented
    blob = await service.encrypt_bulk_data(b"x" * 1000)
    assert await service.decrypt_bulk_data(blob, key_type="financial_data") == b"x" * 1000
    await service.encrypt_cache_data("report:1", {"n": 1})
    events = "aiocrypt_service_events_total"
    assert value(registry, events, event="bulk_encryptions") == 1
    assert value(registry, events, event="bulk_decryptions") == 1
    assert value(registry, events, event="cache_encryptions") == 1
    manager = service.key_manager
    hits, misses = manager.dek_cache_hits, manager.dek_cache_misses
    assert hits + misses > 0
    assert value(registry, "aiocrypt_dek_cache_hits_total") == hits
    assert value(registry, "aiocrypt_dek_cache_misses_total") == misses
    await manager.refresh(force=True)  # a rebuild reuses the unwrapped DEKs
    assert value(registry, "aiocrypt_dek_cache_hits_total") == hits + len(manager.keyring)


async def test_encryption_counter_survives_a_restart(registry: CollectorRegistry) -> None:
    service = make_service()
    instrument(service, registry)
    labels = {"operation": "encrypt", "key_type": "pii", "outcome": "ok"}
    async with service:
        for i in range(3):
            await service.encrypt_field(i, KeyType.PII)
        assert registry.get_sample_value("aiocrypt_operations_total", labels) == 3
    async with service:  # keys reloaded: the per-key counts start again at 0
        await service.encrypt_field(3, KeyType.PII)
        assert registry.get_sample_value("aiocrypt_operations_total", labels) == 4


async def test_key_age_and_rotation_gauges() -> None:
    clock = ManualClock()
    registry = CollectorRegistry()
    service = make_service(clock=clock)
    instrument(service, registry)
    async with service:
        await service.encrypt_field("x", KeyType.PII)
        clock.advance(days=10)
        assert (
            value(
                registry, "aiocrypt_key_age_seconds", key_type="pii", version="1", status="active"
            )
            == 10 * DAY
        )
        # pii rotates every 180 days by default
        assert (
            value(registry, "aiocrypt_key_rotation_due_seconds", key_type="pii", version="1")
            == 170 * DAY
        )
        await service.key_manager.rotate_key(KeyType.PII, force=True)
        clock.advance(days=1)
        assert (
            value(
                registry,
                "aiocrypt_key_age_seconds",
                key_type="pii",
                version="1",
                status="decrypt_only",
            )
            == 11 * DAY
        )
        assert (
            value(
                registry, "aiocrypt_key_age_seconds", key_type="pii", version="2", status="active"
            )
            == 1 * DAY
        )
        assert (
            value(registry, "aiocrypt_key_rotation_due_seconds", key_type="pii", version="2")
            == 179 * DAY
        )


async def test_census_rows_per_key_version(
    registry: CollectorRegistry, instrumented: EncryptionService
) -> None:
    service = instrumented
    manager = service.key_manager
    await service.encrypt_field("x", KeyType.PII)
    old = manager.keyring.active(KeyType.PII).key
    new = await manager.rotate_key(KeyType.PII, force=True)
    assert (
        value(registry, "aiocrypt_census_rows", key_type="pii", version="1", key_id=old.key_id)
        is None
    )  # no census has run yet
    # a census run by the key manager (here: during cleanup) is published by itself
    manager.census = {old.key_id: 7, new.key_id: 2}
    await manager.cleanup_expired_keys()
    assert (
        value(registry, "aiocrypt_census_rows", key_type="pii", version="1", key_id=old.key_id) == 7
    )
    assert (
        value(registry, "aiocrypt_census_rows", key_type="pii", version="2", key_id=new.key_id) == 2
    )
    assert value(registry, "aiocrypt_census_timestamp_seconds") is not None
    # an engine's per-table census, recorded explicitly, replaces it
    collector = _collector(registry)
    collector.record_census(
        [
            TableCensus("users", {"email": {old.key_id: 1, new.key_id: 4, None: 2}}),
            TableCensus("orders", {"note": {new.key_id: 5}}),
        ]
    )
    assert (
        value(registry, "aiocrypt_census_rows", key_type="pii", version="1", key_id=old.key_id) == 1
    )
    assert (
        value(registry, "aiocrypt_census_rows", key_type="pii", version="2", key_id=new.key_id) == 9
    )


def _collector(registry: CollectorRegistry) -> ServiceCollector:
    for collector in list(registry._collector_to_names):
        if isinstance(collector, ServiceCollector):
            return collector
    raise AssertionError("no ServiceCollector registered")


@pytest.fixture
def vault_server() -> Iterator[object]:
    with start_vault_server() as server:
        yield server


async def test_kms_histogram_through_vault_transit(
    vault_server: object, registry: CollectorRegistry
) -> None:
    from aiocrypt.kek._retry import RetryPolicy
    from aiocrypt.kek.vault import VaultTransitKekProvider

    server = vault_server
    provider = VaultTransitKekProvider(
        "metrics-kek",
        url=server.url,  # type: ignore[attr-defined]
        token=server.token,  # type: ignore[attr-defined]
        retry=RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.02),
    )
    await provider.ensure_key()
    service = EncryptionService(KeyManager(MemoryKeyStore(), provider, watch=False))
    collector = instrument(service, registry)
    server.calls.reset()  # type: ignore[attr-defined]
    count = "aiocrypt_kms_call_duration_seconds_count"
    async with service:
        await service.encrypt_field("a", KeyType.PII)
        await service.encrypt_field("b", KeyType.FINANCIAL_DATA)
        calls = server.calls  # type: ignore[attr-defined]
        # one wrap per new DEK and one for the store's keyset seal key, none per field
        assert calls["encrypt"] == 3
        assert value(registry, count, provider="vault", operation="wrap", outcome="ok") == 3
        await service.key_manager.health()  # the probe wraps and unwraps once
        assert value(registry, count, provider="vault", operation="wrap", outcome="ok") == 4
        assert (
            value(registry, count, provider="vault", operation="unwrap", outcome="ok")
            == calls["decrypt"]
            == 1
        )
        seconds = value(
            registry,
            "aiocrypt_kms_call_duration_seconds_sum",
            provider="vault",
            operation="wrap",
            outcome="ok",
        )
        assert seconds is not None and seconds > 0
        server.access_denied = True  # type: ignore[attr-defined]
        report = await health(service)
        assert report.status == "failing"
        assert report.checks["kek_provider"].detail["error"] == "KekProviderError"
        assert (
            value(registry, count, provider="vault", operation="wrap", outcome="error") == 1
        )  # access denied is not retried
        server.access_denied = False  # type: ignore[attr-defined]
    uninstrument(collector, registry)


async def test_kms_histogram_local_provider_counts_each_call_once(
    registry: CollectorRegistry,
) -> None:
    class Subclassed(LocalKekProvider):  # a subclass calling super() is still one call
        async def wrap(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
            return await super().wrap(plaintext, context)

    service = EncryptionService(KeyManager(MemoryKeyStore(), Subclassed.generate(), watch=False))
    instrument(service, registry)
    async with service:
        for key_type in (KeyType.PII, KeyType.SESSION, KeyType.API_KEYS):
            await service.encrypt_field("v", key_type)
    # three DEKs and the keyset seal key
    assert (
        value(
            registry,
            "aiocrypt_kms_call_duration_seconds_count",
            provider="local",
            operation="wrap",
            outcome="ok",
        )
        == 4
    )


async def test_a_second_service_on_one_registry_is_refused(
    registry: CollectorRegistry, instrumented: EncryptionService
) -> None:
    with pytest.raises(ValueError, match="Duplicated"):
        instrument(make_service(), registry)
    other = CollectorRegistry()
    uninstrument(instrument(make_service(), other), other)


def test_without_prometheus_client_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "prometheus_client"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"aiocrypt\[metrics\]"):
        instrument(make_service(), None)


# -- health ------------------------------------------------------------------


async def test_health_ok_then_failing_when_the_kms_denies() -> None:
    kek = FakeKekProvider()
    service = EncryptionService(
        KeyManager(MemoryKeyStore(), kek, watch=False), preload=[KeyType.PII]
    )
    report = await health(service)
    assert report.status == "failing" and report.http_status == 503
    assert report.checks["service"].detail == {"state": "stopped"}
    async with service:
        report = await health(service)
        assert report.status == "ok" and report.http_status == 200
        body = report.to_dict()
        assert body["checks"]["key_store"] == {
            "status": "ok",
            "backend": "memory",
            "reachable": True,
        }
        pii = body["checks"]["active_keys"]["key_types"]["pii"]
        assert pii["status"] == "ok" and pii["version"] == 1
        assert pii["days_to_rotation"] == 180.0
        assert body["checks"]["dek_cache"]["loaded_keys"] == 1
        _assert_no_key_material(json.dumps(body), service)
        kek.deny()
        report = await health(service)
        assert report.status == "failing" and report.http_status == 503
        assert report.checks["kek_provider"].status == "failing"
        assert report.checks["kek_provider"].detail["error"] == "KekProviderError"
        assert report.checks["key_store"].status == "ok"
        kek.fail_with = None


async def test_health_degraded_when_rotation_is_overdue_or_a_key_is_missing() -> None:
    clock = ManualClock()
    service = make_service(clock=clock, preload=[KeyType.SESSION])
    async with service:
        clock.advance(days=31)  # sessions rotate every 30 days
        report = await health(service)
        assert report.status == "degraded" and report.http_status == 200
        session = report.to_dict()["checks"]["active_keys"]["key_types"]["session"]
        assert session["status"] == "degraded"
        assert session["problem"] == "rotation is overdue"
        assert session["days_to_rotation"] == -1.0
        report = await health(service, key_types=["audit_logs"])
        audit = report.to_dict()["checks"]["active_keys"]["key_types"]["audit_logs"]
        assert audit == {"status": "degraded", "problem": "no active key loaded"}


def _assert_no_key_material(text: str, service: EncryptionService) -> None:
    for dk in service.keyring:
        material = dk._material
        for form in (
            material.hex(),
            base64.b64encode(material).decode(),
            base64.urlsafe_b64encode(material).decode().rstrip("="),
        ):
            assert form not in text
