"""The spans and metrics of each traced operation, through the SDK's in-memory exporter.

Real stores (file, memory, the Postgres re-encryption adapter), the local KEK and the
loop-back Vault test server. Each test names the span it expects, its attributes and
its parent, and the metrics the operation added.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from aiocrypt import (
    AsyncpgDatabase,
    ColumnSpec,
    DecryptionError,
    EncryptionConfig,
    EncryptionService,
    KekProviderError,
    KeyManager,
    KeyStateError,
    KeyStatus,
    KeyStoreIntegrityError,
    KeyType,
    ReencryptionEngine,
    TableSpec,
)
from aiocrypt._dek_cache import wrap_context
from aiocrypt._telemetry import METRIC_ATTRIBUTES
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore, MemoryKeyStore
from aiocrypt.testing import ManualClock

from .conftest import Telemetry

try:  # rootdir on sys.path (python -m pytest)
    from tests import kms_servers
except ImportError:  # plain `pytest`: tests/ itself is on sys.path
    import kms_servers  # type: ignore[no-redef, unused-ignore]


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return span.parent is not None and span.parent.span_id == parent.context.span_id


def file_service(
    path: Path,
    master_key: bytes,
    *,
    clock: ManualClock | None = None,
    refresh_interval: float = 0.0,
) -> EncryptionService:
    """A service over the file store at ``path``: a fresh one is what a second process has."""
    kek = LocalKekProvider(master_key)
    config = EncryptionConfig(
        master_key=base64.b64encode(master_key).decode(), storage_path=str(path)
    )
    manager = KeyManager(
        FileKeyStore(path, kek),
        kek,
        config,
        watch=False,
        refresh_interval=refresh_interval,
        clock=clock or ManualClock(),
    )
    return EncryptionService(manager)


def assert_error(span: ReadableSpan, error: type[Exception]) -> None:
    """Failed, by type name alone: no message in the status, the attributes or the event."""
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description is None
    assert attributes(span)["aiocrypt.outcome"] == "error"
    assert attributes(span)["error.type"] == f"{error.__module__}.{error.__qualname__}"
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        ("exception", {"exception.type": f"{error.__module__}.{error.__qualname__}"})
    ]


async def test_kms_wrap_and_key_loads_with_the_local_kek(otel: Telemetry, tmp_path: Path) -> None:
    path, master_key = tmp_path / "keys.json", os.urandom(32)
    kek_id = LocalKekProvider(master_key).kek_id
    async with file_service(path, master_key) as first:
        token = await first.encrypt_field("ada", KeyType.PII, context="users.name")
    key_id = token.split(".")[1]

    created = otel.one("aiocrypt.key.rotate")  # the first key of the type
    assert attributes(created) == {
        "aiocrypt.key_type": "pii",
        "aiocrypt.reason": "first use",
        "aiocrypt.outcome": "created",
        "aiocrypt.new_key_id": key_id,
        "aiocrypt.version": 1,
    }
    wraps = [s for s in otel.spans("aiocrypt.kms.wrap") if child_of(s, created)]
    assert wraps and all(
        attributes(s)
        == {
            "aiocrypt.provider": "local",
            "aiocrypt.operation": "wrap",
            "aiocrypt.kek_id": kek_id,
            "aiocrypt.outcome": "ok",
        }
        for s in wraps
    )
    assert otel.metric("aiocrypt.keys.created", key_type="pii", reason="first use") == 1
    assert otel.metric(
        "aiocrypt.kms.wrap.duration", provider="local", operation="wrap", outcome="ok"
    ) == len(otel.spans("aiocrypt.kms.wrap"))

    otel.reset()
    async with file_service(path, master_key) as second:  # another process: unwraps it
        assert await second.decrypt_field(token, KeyType.PII, context="users.name") == "ada"
        load = [s for s in otel.spans("aiocrypt.keys.load") if attributes(s)["aiocrypt.unwrapped"]]
        assert len(load) == 1
        assert attributes(load[0]) == {
            "aiocrypt.revision": attributes(load[0])["aiocrypt.revision"],
            "aiocrypt.keys": 1,
            "aiocrypt.unwrapped": 1,
            "aiocrypt.cache_hits": 0,
            "aiocrypt.key_ids": (key_id,),
            "aiocrypt.key_types": ("pii",),
            "aiocrypt.outcome": "ok",
        }
        unwraps = [s for s in otel.spans("aiocrypt.kms.unwrap") if child_of(s, load[0])]
        assert [attributes(s)["aiocrypt.kek_id"] for s in unwraps] == [kek_id]

        otel.reset()
        await second.key_manager.refresh(force=True)  # the DEK cache answers
        assert attributes(otel.one("aiocrypt.keys.load"))["aiocrypt.cache_hits"] == 1
        assert attributes(otel.one("aiocrypt.keys.load"))["aiocrypt.key_ids"] == ()
        assert not otel.spans("aiocrypt.kms.unwrap")
        assert otel.metric("aiocrypt.dek_cache.hits") == 1
        assert otel.metric("aiocrypt.keys.unwrapped") == 0


async def test_load_key_records_ids_of_keys_only(otel: Telemetry, tmp_path: Path) -> None:
    path, master_key = tmp_path / "keys.json", os.urandom(32)
    async with (
        file_service(path, master_key) as writer,
        file_service(path, master_key, refresh_interval=3600) as reader,
    ):
        await writer.encrypt_field("x", KeyType.PII)
        await reader.encrypt_field("y", KeyType.PII)  # the reader holds v1 and stays there
        v2 = await writer.key_manager.rotate_key(KeyType.PII, force=True)
        token = await writer.encrypt_field("bob", KeyType.PII)
        otel.reset()
        assert await reader.decrypt_field(token, KeyType.PII) == "bob"  # rotated elsewhere
        assert attributes(otel.one("aiocrypt.keys.load_key")) == {
            "aiocrypt.outcome": "loaded",
            "aiocrypt.key_id": v2.key_id,
            "aiocrypt.key_type": "pii",
        }

        otel.reset()
        forged = f"ac2.pii-v9-{secrets.token_hex(4)}.{token.split('.')[2]}"
        with pytest.raises(DecryptionError):
            await reader.decrypt_field(forged, KeyType.PII)
        assert attributes(otel.one("aiocrypt.keys.load_key")) == {"aiocrypt.outcome": "unknown"}
        with pytest.raises(DecryptionError):  # within the second: no reload, no span
            await reader.decrypt_field(forged, KeyType.PII)
        assert len(otel.spans("aiocrypt.keys.load_key")) == 1


async def test_a_failed_unwrap_is_an_error_span_without_its_message(
    otel: Telemetry, tmp_path: Path
) -> None:
    async with file_service(tmp_path / "keys.json", os.urandom(32)) as svc:
        key = await svc.key_manager.generate_key(KeyType.PII)
    assert key.wrapped_key is not None
    otel.reset()
    wrong = LocalKekProvider(os.urandom(32))
    with pytest.raises(KekProviderError) as caught:
        await wrong.unwrap(key.wrapped_key, wrap_context(key))
    assert_error(otel.one("aiocrypt.kms.unwrap"), KekProviderError)
    message = str(caught.value)
    assert "cannot unwrap" in message and message not in otel.dumps()
    assert otel.metric("aiocrypt.kms.unwrap.duration", provider="local", outcome="error") == 1


@pytest.fixture(scope="module")
def vault_server() -> Iterator[Any]:
    pytest.importorskip("hvac")
    with kms_servers.start_vault_server() as server:
        yield server


async def test_kms_calls_over_the_vault_protocol(otel: Telemetry, vault_server: Any) -> None:
    from aiocrypt.kek._retry import RetryPolicy
    from aiocrypt.kek.vault import VaultTransitKekProvider

    name = f"kek-{secrets.token_hex(4)}"
    vault = VaultTransitKekProvider(
        name,
        url=vault_server.url,
        token=vault_server.token,
        retry=RetryPolicy(attempts=1, call_timeout=5.0),
    )
    await vault.ensure_key()
    store = MemoryKeyStore()
    try:
        async with KeyManager(store, vault, watch=False) as manager:
            await manager.generate_key(KeyType.PII)
        wraps = otel.spans("aiocrypt.kms.wrap")
        assert wraps and all(
            attributes(s)
            == {
                "aiocrypt.provider": "vault",
                "aiocrypt.operation": "wrap",
                "aiocrypt.kek_id": f"vault://transit/{name}",
                "aiocrypt.outcome": "ok",
            }
            for s in wraps
        )
        assert otel.metric("aiocrypt.kms.wrap.duration", provider="vault") == len(wraps)

        otel.reset()
        vault_server.access_denied = True
        with pytest.raises(KeyStoreIntegrityError):  # the keyset seal does not open
            async with KeyManager(store, vault, watch=False):
                pass
        failed = otel.spans("aiocrypt.kms.unwrap")
        assert failed
        for span in failed:
            assert_error(span, KekProviderError)
        assert vault_server.token not in otel.dumps()
    finally:
        vault_server.access_denied = False
        await vault.close()


async def test_rotations_by_force_and_by_policy(otel: Telemetry, tmp_path: Path) -> None:
    clock = ManualClock()
    async with file_service(tmp_path / "keys.json", os.urandom(32), clock=clock) as svc:
        manager = svc.key_manager
        v1 = await manager.generate_key(KeyType.PII)
        otel.reset()
        v2 = await manager.rotate_key(KeyType.PII, force=True)
        assert attributes(otel.one("aiocrypt.key.rotate")) == {
            "aiocrypt.key_type": "pii",
            "aiocrypt.reason": "forced",
            "aiocrypt.outcome": "rotated",
            "aiocrypt.new_key_id": v2.key_id,
            "aiocrypt.old_key_id": v1.key_id,
            "aiocrypt.version": 2,
        }
        assert otel.metric("aiocrypt.keys.created", key_type="pii", reason="forced") == 1
        assert (
            otel.metric(
                "aiocrypt.key.rotate.duration", key_type="pii", reason="forced", outcome="rotated"
            )
            == 1
        )

        otel.reset()
        await manager.rotate_key(KeyType.PII)  # by policy: not due
        assert attributes(otel.one("aiocrypt.key.rotate"))["aiocrypt.outcome"] == "unchanged"

        otel.reset()
        clock.advance(days=400)  # past the key's maximum age
        run = await manager.run_rotation_policy()
        assert len(run.rotated) == 1
        policy_run = otel.one("aiocrypt.key.rotation_policy")
        assert attributes(policy_run)["aiocrypt.rotated"] == 1
        rotation = otel.one("aiocrypt.key.rotate")
        assert child_of(rotation, policy_run)
        assert attributes(rotation)["aiocrypt.reason"] == run.rotated[0].reason
        assert attributes(rotation)["aiocrypt.old_key_id"] == v2.key_id
    for name, labels in otel.metric_labels():
        assert {label.removeprefix("aiocrypt.") for label in labels} <= METRIC_ATTRIBUTES, name


async def test_retire_and_cleanup(otel: Telemetry, tmp_path: Path) -> None:
    clock = ManualClock()
    async with file_service(tmp_path / "keys.json", os.urandom(32), clock=clock) as svc:
        manager = svc.key_manager
        v1 = await manager.generate_key(KeyType.PII)
        v2 = await manager.rotate_key(KeyType.PII, force=True)
        await manager.rotate_key(KeyType.PII, force=True)
        otel.reset()
        with pytest.raises(KeyStateError):
            await manager.retire_key(v1.key_id, census={v1.key_id: 5})
        assert_error(otel.one("aiocrypt.key.retire"), KeyStateError)

        otel.reset()
        await manager.retire_key(v1.key_id, census={v1.key_id: 0})
        assert attributes(otel.one("aiocrypt.key.retire")) == {
            "aiocrypt.key_type": "pii",
            "aiocrypt.dry_run": False,
            "aiocrypt.whole_type": False,
            "aiocrypt.census": True,
            "aiocrypt.key_ids": (v1.key_id,),
            "aiocrypt.min_decryption_version": 2,
            "aiocrypt.outcome": "ok",
        }
        assert otel.metric("aiocrypt.keys.destroyed", key_type="pii") == 1

        otel.reset()
        clock.advance(days=3650)  # v2 past its maximum age and grace
        report = await manager.cleanup(census={v2.key_id: 0})
        assert [d.key_id for d in report.destroyed] == [v2.key_id]
        assert attributes(otel.one("aiocrypt.key.cleanup")) == {
            "aiocrypt.destroyed": 1,
            "aiocrypt.kept": 0,
            "aiocrypt.forced": False,
            "aiocrypt.census": True,
            "aiocrypt.destroyed_key_ids": (v2.key_id,),
            "aiocrypt.outcome": "ok",
        }
        assert otel.metric("aiocrypt.keys.destroyed", key_type="pii") == 1
        assert (await manager.get_key(v2.key_id)).status is KeyStatus.DESTROYED


async def test_master_key_rotation_rewraps(otel: Telemetry, tmp_path: Path) -> None:
    old = LocalKekProvider(os.urandom(32))
    new = LocalKekProvider.generate()
    async with KeyManager(MemoryKeyStore(), old, watch=False) as manager:
        for key_type in (KeyType.PII, KeyType.FINANCIAL_DATA):
            await manager.generate_key(key_type)
        otel.reset()
        assert await manager.rotate_master_key(new) == 2
    rotation = otel.one("aiocrypt.kek.rotate")
    assert attributes(rotation) == {
        "aiocrypt.provider": "local",
        "aiocrypt.old_kek_id": old.kek_id,
        "aiocrypt.new_kek_id": new.kek_id,
        "aiocrypt.outcome": "ok",
    }
    rewrap = otel.one("aiocrypt.kek.rewrap")
    assert child_of(rewrap, rotation)
    assert attributes(rewrap) == {
        "aiocrypt.provider": "local",
        "aiocrypt.kek_id": new.kek_id,
        "aiocrypt.batch_size": 50,
        "aiocrypt.keys": 2,
        "aiocrypt.outcome": "ok",
    }
    assert otel.metric("aiocrypt.keys.rewrapped", provider="local") == 2
    # every DEK unwrapped by the old KEK and wrapped by the new one, inside the rewrap
    wraps = [
        s for s in otel.spans("aiocrypt.kms.wrap") if attributes(s)["aiocrypt.kek_id"] == new.kek_id
    ]
    assert len(wraps) >= 2


async def test_reencryption_run_and_batches_on_postgres(otel: Telemetry, postgres_dsn: str) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    table = f"otel_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(postgres_dsn)
    database = AsyncpgDatabase(postgres_dsn)
    try:
        async with KeyManager(
            MemoryKeyStore(), LocalKekProvider.generate(), watch=False
        ) as manager:
            svc = EncryptionService(manager)
            tokens = await svc.encrypt_many(
                [f"value-{i}" for i in range(50)], KeyType.PII, context=f"{table}.secret"
            )
            await conn.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, secret text)")
            await conn.copy_records_to_table(
                table, records=list(enumerate(tokens)), columns=["id", "secret"]
            )
            v2 = await manager.rotate_key(KeyType.PII, force=True)
            spec = TableSpec(table, "id", (ColumnSpec("secret", KeyType.PII),))
            engine = ReencryptionEngine(manager, database, tables=[spec], batch_size=20)
            otel.reset()
            result = await engine.reencrypt(table)
        assert result.complete and result.run_rows_updated == 50
        run = otel.one("aiocrypt.reencrypt.run")
        assert attributes(run) == {
            "aiocrypt.table": table,
            "aiocrypt.columns": 1,
            "aiocrypt.target_key_ids": (v2.key_id,),
            "aiocrypt.outcome": "complete",
            "aiocrypt.rows": 50,
            "aiocrypt.batches": 3,
            "aiocrypt.passes": result.passes,
        }
        batches = otel.spans("aiocrypt.reencrypt.batch")
        assert len(batches) == 3 and all(child_of(b, run) for b in batches)
        assert sorted(attributes(b)["aiocrypt.batch"] for b in batches) == [1, 2, 3]
        assert sum(attributes(b)["aiocrypt.rows_updated"] for b in batches) == 50
        assert {
            (
                attributes(b)["aiocrypt.table"],
                attributes(b)["aiocrypt.columns"],
                attributes(b)["aiocrypt.outcome"],
            )
            for b in batches
        } == {(table, 1, "ok")}
        assert otel.metric("aiocrypt.reencrypt.rows", table=table) == 50
        assert otel.metric("aiocrypt.reencrypt.batch.duration", table=table) == 3
    finally:
        await database.close()
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"DELETE FROM {database.checkpoint_table} WHERE table_name = $1", table)
        await conn.close()
