"""Re-encryption rows per second on local Postgres: the engine vs a naive per-row loop.

    python bench/bench_reencrypt.py                  # Postgres on 127.0.0.1:5432/test
    python bench/bench_reencrypt.py --rows 200000 --naive-rows 10000 --rounds 3

Both sides do the same work per row: decrypt two text tokens (``income``,
``ssn``) written under the old keys of two key types, encrypt them under the
new active keys and write them back only if they are still the tokens that
were read (compare-and-swap), everything committed as it goes.

* ``engine``: ``ReencryptionEngine`` + ``AsyncpgDatabase`` (keyset pagination,
  one ``UPDATE ... FROM unnest(...)`` plus checkpoint per batch, reads and writes
  overlapped on two connections).
* ``naive``: for each row one ``SELECT`` and one compare-and-swap ``UPDATE`` in
  autocommit (two round trips, one commit per row);
* ``naive, transaction per row``: ``BEGIN``, ``SELECT ... FOR UPDATE``, ``UPDATE``,
  ``COMMIT`` (the textbook read-modify-write, four round trips);
* ``engine, --jobs N``: what ``aiocrypt reencrypt --jobs N`` does: the table cut
  into N primary-key ranges, each re-encrypted by a process of its own (started
  with ``spawn``; the time includes starting them). The processes share a file
  key store, so the whole bench runs on one (the keys are cached in memory either
  way).

The naive loops run on ``--naive-rows`` rows of tables of their own (a full
table would take minutes).

Each round re-creates both tables, rotates both key types, runs the naive loop
then the engine. The report gives each round, the medians and their ratio.
Tables are named ``bench_reencrypt_*`` and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import bench_copy_vs_unnest  # noqa: E402

from aiocrypt import EncryptionConfig, KeyManager, KeyType, build_key_manager  # noqa: E402
from aiocrypt._cli_reencrypt import ShardTask, reencrypt_sharded  # noqa: E402
from aiocrypt.reencrypt import (  # noqa: E402
    AsyncpgDatabase,
    ColumnSpec,
    ReencryptionEngine,
    TableSpec,
)

FIN, PII = KeyType.FINANCIAL_DATA, KeyType.PII


async def load_table(conn: Any, manager: KeyManager, table: str, rows: int) -> None:
    await conn.execute(f"DROP TABLE IF EXISTS {table}")
    await conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, income text, ssn text)")
    keyring = await manager.ensure_active([FIN, PII])
    chunk = 50_000
    for start in range(1, rows + 1, chunk):
        records = [
            (
                i,
                keyring.encrypt(float(i) * 1.25, FIN, f"{table}.income"),
                keyring.encrypt(f"{i:09d}", PII, f"{table}.ssn"),
            )
            for i in range(start, min(start + chunk, rows + 1))
        ]
        await conn.copy_records_to_table(table, records=records)
    await conn.execute(f"VACUUM ANALYZE {table}")


async def naive_loop(conn: Any, manager: KeyManager, table: str, rows: int) -> float:
    keyring = await manager.ensure_active([FIN, PII])  # with a usage block reserved
    started = time.perf_counter()
    for i in range(1, rows + 1):
        income, ssn = await conn.fetchrow(f"SELECT income, ssn FROM {table} WHERE id = $1", i)
        new_income = keyring.encrypt(
            keyring.decrypt(income, FIN, f"{table}.income", for_reencryption=True),
            FIN,
            f"{table}.income",
        )
        new_ssn = keyring.encrypt(
            keyring.decrypt(ssn, PII, f"{table}.ssn", for_reencryption=True), PII, f"{table}.ssn"
        )
        await conn.execute(
            f"UPDATE {table} SET income = $1, ssn = $2 WHERE id = $3 AND income = $4 AND ssn = $5",
            new_income,
            new_ssn,
            i,
            income,
            ssn,
        )
    return rows / (time.perf_counter() - started)


async def naive_transaction_loop(conn: Any, manager: KeyManager, table: str, rows: int) -> float:
    """The textbook read-modify-write: a transaction per row, the row locked while it runs."""
    keyring = await manager.ensure_active([FIN, PII])  # with a usage block reserved
    started = time.perf_counter()
    for i in range(1, rows + 1):
        async with conn.transaction():
            income, ssn = await conn.fetchrow(
                f"SELECT income, ssn FROM {table} WHERE id = $1 FOR UPDATE", i
            )
            new_income = keyring.encrypt(
                keyring.decrypt(income, FIN, f"{table}.income", for_reencryption=True),
                FIN,
                f"{table}.income",
            )
            new_ssn = keyring.encrypt(
                keyring.decrypt(ssn, PII, f"{table}.ssn", for_reencryption=True),
                PII,
                f"{table}.ssn",
            )
            await conn.execute(
                f"UPDATE {table} SET income = $1, ssn = $2 WHERE id = $3", new_income, new_ssn, i
            )
    return rows / (time.perf_counter() - started)


async def engine_run(
    dsn: str, manager: KeyManager, table: str, rows: int, batch_size: int
) -> float:
    spec = TableSpec(table, "id", (ColumnSpec("income", FIN), ColumnSpec("ssn", PII)))
    database = AsyncpgDatabase(dsn, checkpoint_table="bench_reencrypt_checkpoints")
    engine = ReencryptionEngine(manager, database, tables=[spec], batch_size=batch_size)
    try:
        await engine.census(table)  # connects and creates the checkpoint table
        started = time.perf_counter()
        result = await engine.reencrypt(table)
        elapsed = time.perf_counter() - started
        census = await engine.census(table)
    finally:
        await database.close()
    if result.run_rows_updated != rows or census.off_target(result.targets) != 0:
        raise SystemExit(f"engine left work undone: {result}")
    return rows / elapsed


async def engine_jobs_run(
    dsn: str, manager: KeyManager, table: str, rows: int, batch_size: int, jobs: int
) -> float:
    spec = TableSpec(table, "id", (ColumnSpec("income", FIN), ColumnSpec("ssn", PII)))
    database = AsyncpgDatabase(dsn, checkpoint_table="bench_reencrypt_checkpoints")
    engine = ReencryptionEngine(manager, database, tables=[spec], batch_size=batch_size)
    task = ShardTask(spec, dsn, "bench_reencrypt_checkpoints", batch_size, None, False, None)
    try:
        await engine.census(table)
        started = time.perf_counter()
        result = await reencrypt_sharded(engine, task, jobs, lambda done, rate: None)
        elapsed = time.perf_counter() - started
        census = await engine.census(table)
    finally:
        await database.close()
    if result["run"]["rows_updated"] != rows or census.off_target(result["targets"]) != 0:
        raise SystemExit(f"engine --jobs {jobs} left work undone: {result['run']}")
    return rows / elapsed


def _shared_key_store() -> tempfile.TemporaryDirectory[str]:
    """A file key store and master key in the environment, for the --jobs processes."""
    directory = tempfile.TemporaryDirectory(prefix="aiocrypt-bench-keys-")
    os.environ["ENCRYPTION_MASTER_KEY"] = base64.b64encode(os.urandom(32)).decode()
    os.environ["ENCRYPTION_KEY_STORAGE_PATH"] = os.path.join(directory.name, "keys.json")
    os.environ["ENCRYPTION_KEY_STORAGE_BACKEND"] = "file"
    os.environ.pop("ENCRYPTION_MASTER_KEY_FILE", None)
    return directory


async def run(
    *, dsn: str, rows: int, naive_rows: int, batch_size: int, rounds: int, jobs: int = 2
) -> dict[str, Any]:
    """Rows per second of every round for the engine (in this process and over ``jobs``
    processes) and the two naive loops."""
    keys = _shared_key_store()
    # sync encryption (loading tables, the naive loops) takes one usage block per key:
    # one large enough for a whole round
    manager = build_key_manager(EncryptionConfig.from_env(), watch=False, usage_block=1 << 21)
    await manager.open()
    conn = await asyncpg.connect(dsn)
    engine_rates: list[float] = []
    jobs_rates: list[float] = []
    naive_rates: list[float] = []
    naive_tx_rates: list[float] = []
    try:
        for round_no in range(1, rounds + 1):
            await load_table(conn, manager, "bench_reencrypt_naive", naive_rows)
            await load_table(conn, manager, "bench_reencrypt_naive_tx", naive_rows)
            await load_table(conn, manager, "bench_reencrypt_engine", rows)
            await conn.execute("DROP TABLE IF EXISTS bench_reencrypt_checkpoints")
            await manager.rotate_key(FIN, force=True)
            await manager.rotate_key(PII, force=True)
            naive = await naive_loop(conn, manager, "bench_reencrypt_naive", naive_rows)
            naive_tx = await naive_transaction_loop(
                conn, manager, "bench_reencrypt_naive_tx", naive_rows
            )
            engine = await engine_run(dsn, manager, "bench_reencrypt_engine", rows, batch_size)
            await load_table(conn, manager, "bench_reencrypt_jobs", rows)
            await manager.rotate_key(FIN, force=True)
            await manager.rotate_key(PII, force=True)
            sharded = await engine_jobs_run(
                dsn, manager, "bench_reencrypt_jobs", rows, batch_size, jobs
            )
            naive_rates.append(naive)
            naive_tx_rates.append(naive_tx)
            engine_rates.append(engine)
            jobs_rates.append(sharded)
            print(
                f"round {round_no}: engine {engine:8,.0f} rows/s | --jobs {jobs} "
                f"{sharded:8,.0f} rows/s | naive {naive:6,.0f} rows/s"
                f" ({engine / naive:4.1f}x, --jobs {sharded / naive:4.1f}x) | naive, "
                f"transaction per row {naive_tx:6,.0f} rows/s ({engine / naive_tx:4.1f}x)",
                flush=True,
            )
    finally:
        for table in (
            "bench_reencrypt_naive",
            "bench_reencrypt_naive_tx",
            "bench_reencrypt_engine",
            "bench_reencrypt_jobs",
            "bench_reencrypt_checkpoints",
        ):
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()
        await manager.close()
        keys.cleanup()
    # the write step with binary COPY instead of unnest (bench_copy_vs_unnest.py)
    write_step = await bench_copy_vs_unnest.run(dsn, min(rows, 100_000), batch_size, 1)
    return {
        "rows": rows,
        "naive_rows": naive_rows,
        "batch_size": batch_size,
        "engine": engine_rates,
        "naive": naive_rates,
        "naive_tx": naive_tx_rates,
        "jobs": jobs,
        "engine_jobs": jobs_rates,
        "write_step": write_step,
        "server": await _server_version(dsn),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "ENCRYPTION_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--naive-rows", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    result = await run(
        dsn=args.dsn,
        rows=args.rows,
        naive_rows=args.naive_rows,
        batch_size=args.batch_size,
        rounds=args.rounds,
        jobs=args.jobs,
    )
    engine_median = statistics.median(result["engine"])
    naive_median = statistics.median(result["naive"])
    naive_tx_median = statistics.median(result["naive_tx"])
    print()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {result['server']}")
    print(
        f"rows: engine {args.rows:,} (batch {args.batch_size}), naive {args.naive_rows:,}; "
        "two encrypted columns (two key types)"
    )
    print(
        f"median engine {engine_median:,.0f} rows/s; naive {naive_median:,.0f} rows/s "
        f"(ratio {engine_median / naive_median:.1f}x); naive with a transaction per row "
        f"{naive_tx_median:,.0f} rows/s (ratio {engine_median / naive_tx_median:.1f}x)"
    )


async def _server_version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return "PostgreSQL " + str(await conn.fetchval("SHOW server_version")).split()[0]
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
