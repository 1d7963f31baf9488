"""Migrating off sqlalchemy-utils and Fernet online: rows/s while a writer keeps updating.

    .venv/bin/python bench/bench_legacy_migration.py                 # 100,000 rows per table
    .venv/bin/python bench/bench_legacy_migration.py --rows 20000 --dsn postgresql://...

Two tables of ``--rows`` rows on local Postgres (``test`` database), written the
way the old application wrote them:

* ``bench_legacy_su``: sqlalchemy-utils ``StringEncryptedType(sa.Unicode, key,
  AesGcmEngine)`` (``ssn``) and ``StringEncryptedType(sa.Integer, key,
  AesGcmEngine)`` (``balance``), inserted through sqlalchemy-utils itself (psycopg2);
* ``bench_legacy_fernet``: a text column of Fernet tokens (``body``).

Then the aiocrypt models over the same tables (``legacy=SqlalchemyUtilsReader`` /
``FernetReader``) are migrated by the re-encryption engine (``database_for``:
asyncpg, batches of ``--batch-size``), one table after the other, while a writer
task updates random rows of both tables through the aiocrypt ORM columns, as
fast as it can, until both runs are complete. Afterwards every row is read
through aiocrypt columns *without* legacy readers and compared with its latest
value, and the census must count no value outside aiocrypt form. The report
gives rows/s per table (rows rewritten / wall time of that run) and the writer's
updates. Tables are dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column  # noqa: E402
from sqlalchemy_utils import StringEncryptedType  # noqa: E402
from sqlalchemy_utils.types.encrypted.encrypted_type import AesGcmEngine  # noqa: E402

from aiocrypt import KeyType  # noqa: E402
from aiocrypt.integrations.sqlalchemy import (  # noqa: E402
    EncryptedInteger,
    EncryptedString,
    FernetReader,
    LegacyReader,
    SqlalchemyUtilsReader,
    reencryption_engine,
    set_encryption_service,
)
from aiocrypt.testing import make_service  # noqa: E402

SU_KEY = "bench: the sqlalchemy-utils key of the old application"
SU_TABLE, FERNET_TABLE = "bench_legacy_su", "bench_legacy_fernet"


def models(su: LegacyReader | None, fernet: LegacyReader | None) -> tuple[Any, Any, Any]:
    class Base(DeclarativeBase):
        pass

    class Customer(Base):
        __tablename__ = SU_TABLE
        id: Mapped[int] = mapped_column(primary_key=True)
        ssn: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII, legacy=su))
        balance: Mapped[int | None] = mapped_column(
            EncryptedInteger(KeyType.FINANCIAL_DATA, legacy=su)
        )

    class Note(Base):
        __tablename__ = FERNET_TABLE
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII, legacy=fernet))

    return Base, Customer, Note


def load(dsn: str, rows: int, fernet_key: bytes) -> float:
    """Write both tables as the old application did; returns the seconds it took."""
    started = time.perf_counter()
    metadata = sa.MetaData()
    customers = sa.Table(
        SU_TABLE,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ssn", StringEncryptedType(sa.Unicode, SU_KEY, AesGcmEngine)),
        sa.Column("balance", StringEncryptedType(sa.Integer, SU_KEY, AesGcmEngine)),
    )
    notes = sa.Table(
        FERNET_TABLE,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.Text),
    )
    fernet = Fernet(fernet_key)
    engine = sa.create_engine(dsn.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        metadata.drop_all(engine)
        metadata.create_all(engine)
        chunk = 20_000
        for start in range(1, rows + 1, chunk):
            ids = range(start, min(start + chunk, rows + 1))
            with engine.begin() as conn:
                conn.execute(
                    customers.insert(),
                    [{"id": i, "ssn": f"{i:09d}", "balance": i * 10} for i in ids],
                )
                conn.execute(
                    notes.insert(),
                    [{"id": i, "body": fernet.encrypt(f"note {i}".encode()).decode()} for i in ids],
                )
    finally:
        engine.dispose()
    return time.perf_counter() - started


async def writer(
    sessions: Any,
    customer: Any,
    note: Any,
    rows: int,
    latest: dict[tuple[str, int], Any],
    stop: asyncio.Event,
) -> int:
    rng = random.Random(16)
    writes = 0
    while not stop.is_set():
        if rows == 0:  # --no-writer
            await stop.wait()
            break
        i = rng.randint(1, rows)
        async with sessions() as session:
            row = await session.get(customer, i)
            row.balance += 1
            other = await session.get(note, i)
            other.body = f"edited {writes}"
            await session.commit()
        latest[("balance", i)] = row.balance
        latest[("body", i)] = other.body
        writes += 1
    return writes


async def run(
    *, dsn: str, rows: int, batch_size: int = 2000, with_writer: bool = True
) -> dict[str, Any]:
    """Migrate both legacy tables online; rows/s per table, writer updates, the checks.

    Raises ``SystemExit`` when a row is not at its latest value or a value is left in
    legacy form (a benchmark of a migration that loses data measures nothing)."""
    fernet_key = Fernet.generate_key()
    load_seconds = await asyncio.to_thread(load, dsn, rows, fernet_key)
    service = make_service()
    await service.start()
    set_encryption_service(service)
    engine = create_async_engine(dsn.replace("postgresql://", "postgresql+asyncpg://", 1))
    base, customer, note = models(
        SqlalchemyUtilsReader(SU_KEY, "aes_gcm"), FernetReader([fernet_key])
    )
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    reenc = reencryption_engine(
        service,
        engine,
        base.metadata,
        batch_size=batch_size,
        checkpoint_table="bench_legacy_checkpoints",
    )
    latest: dict[tuple[str, int], Any] = {}
    stop = asyncio.Event()
    try:
        task = asyncio.ensure_future(
            writer(sessions, customer, note, rows if with_writer else 0, latest, stop)
        )
        results = [await reenc.reencrypt(SU_TABLE), await reenc.reencrypt(FERNET_TABLE)]
        stop.set()
        writes = await task
        leftover = {}
        for table in (SU_TABLE, FERNET_TABLE):
            census = await reenc.census(table)
            leftover[table] = sum(by_key.get(None, 0) for by_key in census.counts.values())

        _, plain_customer, plain_note = models(None, None)  # no legacy reader any more
        checked = mismatched = 0
        async with sessions() as session:
            notes = {n.id: n.body for n in (await session.execute(sa.select(plain_note))).scalars()}
            for row in (await session.execute(sa.select(plain_customer))).scalars():
                checked += 1
                if (
                    row.ssn != f"{row.id:09d}"
                    or row.balance != latest.get(("balance", row.id), row.id * 10)
                    or notes[row.id] != latest.get(("body", row.id), f"note {row.id}")
                ):
                    mismatched += 1
        if mismatched or any(leftover.values()) or not all(r.complete for r in results):
            raise SystemExit(
                f"migration incomplete: {mismatched} rows not at their latest "
                f"value, left in legacy form: {leftover}"
            )
        return {
            "rows": rows,
            "batch_size": batch_size,
            "load_seconds": load_seconds,
            "writer": with_writer,
            "writer_updates": writes,
            "rows_checked": checked,
            "tables": {
                r.table: {
                    "rows_updated": r.run_rows_updated,
                    "conflicts": r.run_rows_conflicted,
                    "passes": r.passes,
                    "seconds": r.elapsed,
                    "rows_per_second": r.rows_per_second,
                }
                for r in results
            },
            "labels": {
                SU_TABLE: "sqlalchemy-utils StringEncryptedType, AesGcmEngine (two columns)",
                FERNET_TABLE: "Fernet tokens (one column)",
            },
        }
    finally:
        await reenc.database.close()
        async with engine.begin() as conn:
            await conn.run_sync(base.metadata.drop_all)
            await conn.execute(sa.text("DROP TABLE IF EXISTS bench_legacy_checkpoints"))
        await engine.dispose()
        await service.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument(
        "--no-writer",
        action="store_true",
        help="migrate without the concurrent writer (for comparison)",
    )
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "ENCRYPTION_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    args = parser.parse_args()
    result = await run(
        dsn=args.dsn, rows=args.rows, batch_size=args.batch_size, with_writer=not args.no_writer
    )
    print(
        f"python {platform.python_version()}, {args.rows:,} rows per table, "
        f"batch {args.batch_size}, legacy tables written in {result['load_seconds']:.1f} s"
    )
    for table, figures in result["tables"].items():
        print(
            f"{table:22s} {figures['rows_updated']:>8,} rows rewritten "
            f"({figures['conflicts']:,} conflicts, {figures['passes']} passes) in "
            f"{figures['seconds']:6.2f} s = {figures['rows_per_second']:>8,.0f} rows/s"
        )
    print(f"writer: {result['writer_updates']:,} updates of both tables during the runs")
    print(
        f"rows checked: {result['rows_checked']:,}, all at their latest value, none left "
        "in legacy form"
    )


if __name__ == "__main__":
    asyncio.run(main())
