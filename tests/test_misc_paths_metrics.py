"""The rarer paths of the Prometheus metrics and of the demo.

Each test reaches one branch the rest of the suite leaves alone (issue 21) and
checks what it does there: the samples a scrape returns, the registry handed
back, the error and the state left behind.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from aiocrypt import ConfigurationError, EncryptionService, KeyStatus, KeyType, TableCensus
from aiocrypt.metrics import instrument, metrics_app, route_registry, uninstrument
from aiocrypt.testing import make_service


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


def census_rows(registry: CollectorRegistry) -> dict[str, float]:
    return {
        sample.labels["key_id"]: sample.value
        for family in registry.collect()
        if family.name == "aiocrypt_census_rows"
        for sample in family.samples
    }


def age_versions(registry: CollectorRegistry) -> dict[str, str]:
    """version -> status of every key the key age gauge shows."""
    return {
        sample.labels["version"]: sample.labels["status"]
        for family in registry.collect()
        if family.name == "aiocrypt_key_age_seconds"
        for sample in family.samples
    }


async def test_the_census_set_on_the_manager_is_published(
    registry: CollectorRegistry, instrumented: EncryptionService
) -> None:
    manager = instrumented.key_manager
    await instrumented.encrypt_field("x", KeyType.PII)
    key_id = manager.keyring.active(KeyType.PII).key_id
    assert census_rows(registry) == {}
    manager.census = {key_id: 3, "gone-key": 1}  # set, not run yet: shown as it is
    assert census_rows(registry) == {key_id: 3.0, "gone-key": 1.0}
    assert registry.get_sample_value("aiocrypt_census_timestamp_seconds") is None


async def test_record_census_takes_one_table_or_a_mapping(registry: CollectorRegistry) -> None:
    service = make_service()
    collector = instrument(service, registry)
    try:
        assert repr(collector) == "<ServiceCollector namespace=aiocrypt>"
        async with service:
            await service.encrypt_field("x", KeyType.PII)
            manager = service.key_manager
            key_id = manager.keyring.active(KeyType.PII).key_id
            collector.record_census(TableCensus("users", {"email": {key_id: 4, None: 2}}))
            assert manager.last_census == {key_id: 4}
            assert census_rows(registry) == {key_id: 4.0}
            collector.record_census({key_id: 7})  # a census replaces the last one
            assert manager.last_census == {key_id: 7}
            assert census_rows(registry) == {key_id: 7.0}
    finally:
        uninstrument(collector, registry)


async def test_a_destroyed_key_has_no_age(
    registry: CollectorRegistry, instrumented: EncryptionService
) -> None:
    manager = instrumented.key_manager
    await instrumented.encrypt_field("x", KeyType.PII)
    old = manager.keyring.active(KeyType.PII).key
    await manager.rotate_key(KeyType.PII, force=True)
    assert age_versions(registry) == {"1": "decrypt_only", "2": "active"}
    await manager.retire_key(old.key_id, census={old.key_id: 0})
    assert [k.status for k in await manager.list_keys(KeyType.PII)] == [
        KeyStatus.DESTROYED,
        KeyStatus.ACTIVE,
    ]
    assert age_versions(registry) == {"2": "active"}


async def test_route_registry_serves_the_registry_given(registry: CollectorRegistry) -> None:
    service = make_service()
    assert route_registry(service, registry) is registry
    assert list(registry.collect()) == []  # nothing registered on a registry given


def test_route_registry_without_prometheus_client_is_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "prometheus_client"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert route_registry(make_service()) is None


async def test_metrics_app_serves_the_registry_over_asgi(
    registry: CollectorRegistry, instrumented: EncryptionService
) -> None:
    await instrumented.encrypt_field("x", KeyType.PII)
    app = metrics_app(registry)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/metrics",
        "query_string": b"",
        "headers": [],
    }
    await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    assert 'aiocrypt_operations_total{key_type="pii",operation="encrypt",outcome="ok"} 1.0' in body


# -- the demo ----------------------------------------------------------------------


def test_the_demo_without_the_sqlalchemy_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from aiocrypt.demo import run

    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(SystemExit, match=r"pip install 'aiocrypt\[sqlalchemy\]'"):
        asyncio.run(run(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_the_demo_refuses_a_bad_master_key_and_leaves_no_temporary_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from aiocrypt.demo import main

    monkeypatch.setenv("ENCRYPTION_MASTER_KEY", "dGhpcyBpcyBub3QgMzIgYnl0ZXM=")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"base64 of 32 bytes \(it decodes to 20 bytes\)"):
        main([])
    assert list(tmp_path.iterdir()) == []
