"""The engine on real Postgres at scale: 200,000 rows with a concurrent writer, stops and
resumes, and a worker process killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from aiocrypt import DecryptionFailure, EncryptionService, KeyType
from aiocrypt.reencrypt import (
    AsyncpgDatabase,
    ColumnSpec,
    KeyRange,
    ReencryptionEngine,
    ReencryptionProgress,
    TableSpec,
)

pytestmark = pytest.mark.services


class Stop(Exception):
    pass


async def _make_table(conn: Any, service: EncryptionService, table: str, rows: int) -> None:
    await conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, income text, ssn text)")
    # encrypt_many, not the sync keyring: a sync loop on the event loop's thread cannot
    # reserve more than one usage block (tests/security/test_hard_limits.py)
    ids = range(1, rows + 1)
    incomes = await service.encrypt_many(
        [float(i) for i in ids], KeyType.FINANCIAL_DATA, context=f"{table}.income"
    )
    ssns = await service.encrypt_many(
        [f"{i:09d}" for i in ids], KeyType.PII, context=f"{table}.ssn"
    )
    records = list(zip(ids, incomes, ssns, strict=True))
    await conn.copy_records_to_table(table, records=records)


def _spec(table: str) -> TableSpec:
    return TableSpec(
        table, "id", (ColumnSpec("income", KeyType.FINANCIAL_DATA), ColumnSpec("ssn", KeyType.PII))
    )


@pytest.mark.scale
@pytest.mark.slow
async def test_200k_rows_with_concurrent_writer_stop_and_resume(
    service: EncryptionService, postgres_dsn: str, suffix: str
) -> None:
    rows, batch = 200_000, 5000
    table, checkpoints = f"big_{suffix}", f"ckpt_{suffix}"
    conn = await asyncpg.connect(postgres_dsn)
    database = AsyncpgDatabase(postgres_dsn, checkpoint_table=checkpoints)
    try:
        await _make_table(conn, service, table, rows)
        manager = service.key_manager
        await manager.rotate_key(KeyType.FINANCIAL_DATA, force=True)
        await manager.rotate_key(KeyType.PII, force=True)
        targets = {
            "income": manager.keyring.active(KeyType.FINANCIAL_DATA).key_id,
            "ssn": manager.keyring.active(KeyType.PII).key_id,
        }

        latest: dict[int, list[Any]] = {}
        stop = asyncio.Event()
        writes = 0

        async def writer() -> None:
            nonlocal writes
            wconn = await asyncpg.connect(postgres_dsn)
            rng = random.Random(1234)
            try:
                while not stop.is_set():
                    writes += 1
                    i = rng.randint(1, rows)
                    value = latest.setdefault(i, [float(i), f"{i:09d}"])
                    income = await service.encrypt_field(
                        -float(writes), KeyType.FINANCIAL_DATA, context=f"{table}.income"
                    )
                    ssn = await service.encrypt_field(
                        f"w{writes}", KeyType.PII, context=f"{table}.ssn"
                    )
                    if writes % 3 == 0:  # both columns
                        value[:] = [-float(writes), f"w{writes}"]
                        await wconn.execute(
                            f"UPDATE {table} SET income = $1, ssn = $2 WHERE id = $3",
                            income,
                            ssn,
                            i,
                        )
                    elif writes % 3 == 1:  # one column only: the other stays old
                        value[0] = -float(writes)
                        await wconn.execute(
                            f"UPDATE {table} SET income = $1 WHERE id = $2", income, i
                        )
                    else:
                        value[1] = f"w{writes}"
                        await wconn.execute(f"UPDATE {table} SET ssn = $1 WHERE id = $2", ssn, i)
            finally:
                await wconn.close()

        def stop_after_10(progress: ReencryptionProgress) -> None:
            if progress.run_batches == 10:
                raise Stop

        engine = ReencryptionEngine(
            manager, database, tables=[_spec(table)], batch_size=batch, progress=stop_after_10
        )
        writing = asyncio.create_task(writer())
        with pytest.raises(Stop):
            await engine.reencrypt(table)
        job = engine.job_id_for(_spec(table), targets, KeyRange())
        first = await database.load_checkpoint(job)
        assert first is not None and not first.done
        assert (first.batches, first.rows_read) == (10, 10 * batch)
        assert first.rows_updated + first.rows_conflicted == 10 * batch

        engine.progress = None
        result = await engine.reencrypt(table)
        stop.set()
        await writing
        assert result.complete and result.resumed_from == first.last_pk
        assert result.run_rows_read <= rows - first.last_pk  # nothing before it re-read
        assert first.rows_read + result.run_rows_read <= rows
        assert result.checkpoint.batches == 10 + result.run_batches
        assert writes > 100

        census = await engine.census(table)
        assert census.counts == {"income": {targets["income"]: rows}, "ssn": {targets["ssn"]: rows}}
        keyring = manager.keyring
        stored = await conn.fetch(f"SELECT id, income, ssn FROM {table} ORDER BY id")
        assert len(stored) == rows
        for row_id, income, ssn in stored:
            expected = latest.get(row_id, [float(row_id), f"{row_id:09d}"])
            assert keyring.decrypt(income, KeyType.FINANCIAL_DATA, f"{table}.income") == expected[0]
            assert keyring.decrypt(ssn, KeyType.PII, f"{table}.ssn") == expected[1]
    finally:
        await database.close()
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"DROP TABLE IF EXISTS {checkpoints}")
        await conn.close()


async def test_worker_killed_with_sigkill_resumes_from_checkpoint(
    file_service: EncryptionService,
    master_key_b64: str,
    key_path: Path,
    postgres_dsn: str,
    suffix: str,
) -> None:
    rows, batch = 30_000, 500
    table, checkpoints = f"kill_{suffix}", f"ckpt_{suffix}"
    service = file_service
    conn = await asyncpg.connect(postgres_dsn)
    database = AsyncpgDatabase(postgres_dsn, checkpoint_table=checkpoints)
    try:
        await _make_table(conn, service, table, rows)
        await service.key_manager.rotate_key(KeyType.FINANCIAL_DATA, force=True)
        await service.key_manager.rotate_key(KeyType.PII, force=True)
        env = dict(
            os.environ,
            AIOCRYPT_TEST_MASTER_KEY=master_key_b64,
            AIOCRYPT_TEST_KEY_PATH=str(key_path),
            AIOCRYPT_TEST_DSN=postgres_dsn,
            AIOCRYPT_TEST_SPEC=json.dumps(_spec(table).to_dict()),
            AIOCRYPT_TEST_CHECKPOINTS=checkpoints,
            AIOCRYPT_TEST_BATCH=str(batch),
            AIOCRYPT_TEST_RATE="5000",
        )
        worker = Path(__file__).with_name("reencrypt_worker.py")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(worker), env=env, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"started"
            for _ in range(600):
                batches = (
                    await conn.fetchval(f"SELECT max(batches) FROM {checkpoints}")
                    if await conn.fetchval("SELECT to_regclass($1)", checkpoints)
                    else None
                )
                if batches is not None and batches >= 6:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the worker made no progress")
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        # A statement the worker had in flight may still commit on the server (its data
        # and checkpoint together); wait until the dead worker's sessions are gone.
        for _ in range(200):
            if not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                "AND datname = current_database() AND strpos(query, $1) > 0",
                checkpoints,
            ):
                break
            await asyncio.sleep(0.05)

        engine = ReencryptionEngine(
            service.key_manager, database, tables=[_spec(table)], batch_size=batch
        )
        targets = await engine.targets(table)
        job = engine.job_id_for(_spec(table), targets, KeyRange())
        killed = await database.load_checkpoint(job)
        assert killed is not None and not killed.done and killed.batches >= 6
        assert killed.batches < rows // batch
        # Data and checkpoint committed together: the rows the checkpoint covers are
        # exactly the rows already moved.
        moved = await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE left(ssn, $1) = $2",
            len(f"ac2.{targets['ssn']}."),
            f"ac2.{targets['ssn']}.",
        )
        assert moved == killed.rows_updated == killed.last_pk == killed.batches * batch

        result = await engine.reencrypt(table)
        assert result.resumed_from == killed.last_pk
        assert result.run_rows_read == rows - killed.last_pk
        assert result.run_batches == (rows - killed.last_pk) // batch
        assert result.checkpoint.rows_updated == rows
        assert result.checkpoint.batches == rows // batch
        census = await engine.census(table)
        assert census.counts == {"income": {targets["income"]: rows}, "ssn": {targets["ssn"]: rows}}
    finally:
        await database.close()
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"DROP TABLE IF EXISTS {checkpoints}")
        await conn.close()


async def test_well_formed_tokens_take_the_fast_path_and_bad_ones_are_still_refused(
    service: EncryptionService, postgres_dsn: str, suffix: str
) -> None:
    """The engine opens tokens of loaded keys inline (``Keyring.decrypt_bytes``'s fast
    path: ``general_decrypts`` stays 0) and sends everything else the careful way: a
    forged token and a value of the wrong key type are reported, not moved."""
    table, checkpoints = f"fast_{suffix}", f"ckpt_{suffix}"
    conn = await asyncpg.connect(postgres_dsn)
    database = AsyncpgDatabase(postgres_dsn, checkpoint_table=checkpoints)
    try:
        await _make_table(conn, service, table, 500)
        manager = service.key_manager
        wrong_type = await service.encrypt_field(
            "123-45-6789", KeyType.PII, context=f"{table}.income"
        )
        forged = (
            await service.encrypt_field(7.5, KeyType.FINANCIAL_DATA, context=f"{table}.income")
        )[:-6] + "AAAAAA"
        await conn.execute(f"UPDATE {table} SET income = $1 WHERE id = 1", wrong_type)
        await conn.execute(f"UPDATE {table} SET income = $1 WHERE id = 2", forged)
        await manager.rotate_key(KeyType.FINANCIAL_DATA, force=True)
        await manager.rotate_key(KeyType.PII, force=True)
        engine = ReencryptionEngine(manager, database, tables=[_spec(table)], on_error="skip")
        await engine.census(table)
        keyring = manager.keyring
        result = await engine.reencrypt(table)
        assert manager.keyring is keyring  # the one snapshot counted every open
        # 998 well-formed tokens of the old keys, inline; the two bad ones in every
        # pass (each pass reads them again), twice each: the inline path's fallback,
        # then once more to say why
        assert result.passes == 2
        assert keyring.general_decrypts == 2 * 2 * result.passes
        assert result.run_rows_updated == 500 and result.run_rows_failed == 2
        assert sorted(result.failed_primary_keys) == [1, 2]
        reasons = {f.primary_key: f.reason for f in result.failures}
        assert reasons[1] is DecryptionFailure.WRONG_KEY_TYPE
        assert reasons[2] is DecryptionFailure.AUTHENTICATION_FAILED
        stored = dict(await conn.fetch(f"SELECT id, income FROM {table} WHERE id <= 2"))
        assert stored == {1: wrong_type, 2: forged}
        rows = await conn.fetch(f"SELECT id, income, ssn FROM {table} WHERE id > 2")
        for row in rows:
            assert await service.decrypt_field(
                row["income"], KeyType.FINANCIAL_DATA, context=f"{table}.income"
            ) == float(row["id"])
    finally:
        await database.close()
        await conn.execute(f"DROP TABLE IF EXISTS {table}, {checkpoints}")
        await conn.close()
