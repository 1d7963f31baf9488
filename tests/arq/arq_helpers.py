"""Helpers of the ARQ tests: start and wait for worker processes, seed and check data."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from arq.connections import ArqRedis
from arq.jobs import Job

from aiocrypt import ColumnSpec, EncryptionConfig, KeyManager, KeyStateError, KeyType, TableSpec
from aiocrypt._format import text_prefix
from aiocrypt._keys import utcnow
from aiocrypt.integrations.arq.status import ReencryptionStatus, StatusStore
from aiocrypt.kek import LocalKekProvider
from aiocrypt.keystore import FileKeyStore

ROOT = Path(__file__).resolve().parents[2]
TWO_DAYS_AGO: Callable[[], dt.datetime] = lambda: utcnow() - dt.timedelta(days=2)  # noqa: E731

# financial_data keys live one day and have no grace period, so a key made "two
# days ago" (by the seeding manager's clock) is due for rotation, expired, and
# destroyable by cleanup once no row uses it.
SHORT_POLICY = {
    "key_type": "financial_data",
    "rotation_interval_days": 1,
    "max_key_age_days": 1,
    "grace_period_days": 0,
}


@dataclass
class ArqSetup:
    """What a test shares with its workers, and helpers to drive them."""

    env: dict[str, str]
    prefix: str
    queue: str
    dsn: str
    redis_url: str
    key_path: Path
    master_key: bytes
    checkpoint_table: str
    config: EncryptionConfig
    logs: Path
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    def worker_env(self, name: str, **extra: str) -> dict[str, str]:
        return {**self.env, "ENCRYPTION_ARQ_WORKER_NAME": name, **extra}

    async def start_worker(
        self, name: str, *, burst: bool = True, **extra: str
    ) -> asyncio.subprocess.Process:
        """``python -m arq aiocrypt.integrations.arq.WorkerSettings [--burst]``."""
        log = (self.logs / f"{name}.log").open("ab")
        args = [sys.executable, "-m", "arq", "aiocrypt.integrations.arq.WorkerSettings"]
        if burst:
            args.append("--burst")
        proc = await asyncio.create_subprocess_exec(
            *args, env=self.worker_env(name, **extra), cwd=str(ROOT), stdout=log, stderr=log
        )
        log.close()
        self.processes.append(proc)
        return proc

    async def wait(self, proc: asyncio.subprocess.Process, timeout: float = 120) -> int:
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail(f"worker still running after {timeout}s; logs:\n{self.log_text()}")

    async def run_burst(self, *names: str, timeout: float = 120, **extra: str) -> None:
        """Run workers in burst mode until the queue is empty; all must exit cleanly."""
        procs = [await self.start_worker(name, burst=True, **extra) for name in names]
        codes = [await self.wait(p, timeout) for p in procs]
        assert codes == [0] * len(codes), self.log_text()

    def log_text(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}"
            for p in sorted(self.logs.glob("*.log"))
        )

    def manager(self, clock: Callable[[], dt.datetime] = utcnow) -> KeyManager:
        kek = LocalKekProvider(self.master_key)
        return KeyManager(
            FileKeyStore(self.key_path, kek), kek, self.config, clock=clock, watch=False
        )

    async def status(self, redis: Any, job_id: str) -> ReencryptionStatus:
        found = await StatusStore(redis, self.prefix).read(job_id)
        assert found is not None, f"no status record for {job_id}"
        return found


def job(pool: ArqRedis, job_id: str) -> Job:
    """arq's handle on ``job_id``, reading its result with the pool's (JSON) codec:
    a bare ``Job(job_id, pool)`` would unpickle it."""
    return Job(job_id, pool, _deserializer=pool.job_deserializer)


def users_spec(table: str) -> TableSpec:
    return TableSpec(
        table,
        "id",
        (
            ColumnSpec("income", KeyType.FINANCIAL_DATA),
            ColumnSpec("savings", KeyType.FINANCIAL_DATA),
            ColumnSpec("ssn", KeyType.PII),
        ),
    )


def expected_row(i: int) -> tuple[float, float, str]:
    return float(i) * 1.5, float(i % 977), f"{i:09d}"


async def make_users(conn: asyncpg.Connection, manager: KeyManager, table: str, rows: int) -> None:
    """A table of ``rows`` users whose three columns hold tokens of the active keys."""
    await conn.execute(
        f"CREATE TABLE {table} (id bigint PRIMARY KEY, income text, savings text, ssn text)"
    )
    await manager.ensure_active([KeyType.FINANCIAL_DATA, KeyType.PII])

    async def seal(value: Any, key_type: KeyType, column: str) -> str:
        # The keyring's sync path stops at the allowance reserved from the store:
        # reserve the next block (the async API's way), then seal.
        for _ in range(3):
            try:
                return manager.keyring.encrypt(value, key_type, f"{table}.{column}")
            except KeyStateError:
                await manager.reserve_usage(key_type)
        raise AssertionError(f"no encryption allowance for {key_type.value}")

    records = []
    for i in range(1, rows + 1):
        income, savings, ssn = expected_row(i)
        records.append(
            (
                i,
                await seal(income, KeyType.FINANCIAL_DATA, "income"),
                await seal(savings, KeyType.FINANCIAL_DATA, "savings"),
                await seal(ssn, KeyType.PII, "ssn"),
            )
        )
    await conn.copy_records_to_table(table, records=records)


async def check_users(
    conn: asyncpg.Connection,
    manager: KeyManager,
    table: str,
    rows: int,
    financial_key: str,
    pii_key: str,
) -> None:
    """Every row decrypts to what was written, its financial columns on ``financial_key``
    and its ssn on ``pii_key``."""
    await manager.refresh(force=True)
    keyring = manager.keyring
    stored = await conn.fetch(f"SELECT id, income, savings, ssn FROM {table} ORDER BY id")
    assert len(stored) == rows
    fin, pii = text_prefix(financial_key), text_prefix(pii_key)
    for row_id, income, savings, ssn in stored:
        assert income.startswith(fin) and savings.startswith(fin) and ssn.startswith(pii)
        assert (
            keyring.decrypt(income, KeyType.FINANCIAL_DATA, f"{table}.income"),
            keyring.decrypt(savings, KeyType.FINANCIAL_DATA, f"{table}.savings"),
            keyring.decrypt(ssn, KeyType.PII, f"{table}.ssn"),
        ) == expected_row(row_id)
