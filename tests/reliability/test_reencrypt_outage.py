"""The re-encryption engine (AsyncpgDatabase) when PostgreSQL restarts or goes silent mid-run.

A table of 6000 rows on key v1 in a private PostgreSQL cluster; the key is
rotated to v2 and the engine moves the rows in batches of 300. After a few
committed batches the cluster is restarted (``pg_ctl restart -m fast``), or
the link to it blackholed through a :class:`FaultProxy`.

What must hold: the run fails with an error instead of hanging (the adapter's
``command_timeout`` cuts a silent server); the same engine and the same
``AsyncpgDatabase`` object, run again once the server is back, resume from the
checkpoint (``resumed_from`` is the last committed primary key) and finish;
every row is then on v2 and decrypts to its original value; the checkpoint
counts each row updated exactly once.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

import pytest

from aiocrypt import (
    AsyncpgDatabase,
    ColumnSpec,
    EncryptionService,
    KeyType,
    ReencryptionEngine,
    TableSpec,
)
from aiocrypt.testing import make_service

asyncpg = pytest.importorskip("asyncpg")

ROWS = 6000
BATCH = 300


async def _table(dsn: str, service: EncryptionService) -> tuple[str, dict[int, str]]:
    name = f"rel_reenc_{secrets.token_hex(4)}"
    values = {i: f"secret-{i}-{secrets.token_hex(4)}" for i in range(1, ROWS + 1)}
    tokens = await service.encrypt_many(
        list(values.values()), KeyType.PII, context=f"{name}.secret"
    )
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"CREATE TABLE {name} (id integer PRIMARY KEY, secret text)")
        await conn.copy_records_to_table(
            name, records=list(zip(values, tokens, strict=True)), columns=["id", "secret"]
        )
    finally:
        await conn.close()
    return name, values


async def _verify(
    dsn: str, name: str, values: dict[int, str], service: EncryptionService, target: str
) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT id, secret FROM {name} ORDER BY id")
    finally:
        await conn.close()
    assert len(rows) == len(values)
    plain = await service.decrypt_many(
        [r["secret"] for r in rows], KeyType.PII, context=f"{name}.secret"
    )
    for row, value in zip(rows, plain, strict=True):
        assert value == values[row["id"]]
        assert row["secret"].split(".")[1] == target
    return len(rows)


async def _drop(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {name}")
        await conn.execute("DROP TABLE IF EXISTS aiocrypt_reencrypt_checkpoints")
    finally:
        await conn.close()


@pytest.mark.parametrize("fault", ["restart", "blackhole"])
async def test_reencryption_resumes_after_postgres_outage(
    fault: str, private_postgres: Any, fault_proxy: Any, summary: Callable[..., None]
) -> None:
    """Postgres restarted / blackholed after 5 batches: the run fails, the rerun resumes from
    the checkpoint and every row ends on the new key and decrypts."""
    proxy = await fault_proxy("127.0.0.1", private_postgres.port)
    dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
    async with make_service() as service:
        name, values = await _table(private_postgres.dsn, service)
        try:
            await service.key_manager.rotate_key(KeyType.PII, force=True)
            target = (await service.key_manager.get_active_key(KeyType.PII)).key_id
            spec = TableSpec(name, "id", (ColumnSpec("secret", KeyType.PII),))
            injected = 0
            restarting: list[asyncio.Task[None]] = []

            async def progress(p: Any) -> None:
                nonlocal injected
                if p.batches == 5 and not injected:
                    injected += 1
                    if fault == "restart":  # while the engine goes on issuing statements
                        restarting.append(
                            asyncio.create_task(asyncio.to_thread(private_postgres.restart))
                        )
                        await asyncio.sleep(0.2)
                    else:
                        proxy.blackhole()

            database = AsyncpgDatabase(dsn, command_timeout=2.0)
            engine = ReencryptionEngine(
                service.key_manager, database, tables=[spec], batch_size=BATCH, progress=progress
            )
            failure = None
            async with asyncio.timeout(60):  # a hang guard, far above command_timeout
                try:
                    await engine.reencrypt(name)
                except Exception as exc:
                    failure = type(exc).__name__
            if restarting:
                await restarting[0]
            if fault == "blackhole":
                assert failure is not None  # cut by command_timeout, not hung
            proxy.heal()

            result = await engine.reencrypt(name)  # same engine, same database object
            await database.close()
            assert result.complete
            if failure is not None:  # resumed from the checkpoint, not from the start
                assert result.resumed_from is not None and result.resumed_from >= 5 * BATCH
            assert result.checkpoint.rows_updated == ROWS
            assert result.checkpoint.rows_failed == 0
            checked = await _verify(private_postgres.dsn, name, values, service, target)
        finally:
            await _drop(private_postgres.dsn, name)
    summary(
        fault=fault,
        faults_injected=injected,
        first_run_error=failure or "none (survived)",
        rows=ROWS,
        resumed_from_pk=result.resumed_from,
        rows_updated_total=result.checkpoint.rows_updated,
        rows_checked=checked,
        rows_undecryptable=0,
    )
