"""The re-encryption engine on SQLite (SQLAlchemyDatabase) and Postgres (asyncpg):
discovery from metadata, census, resume after a stop, shards, errors, rotation mid-run."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from aiocrypt import EncryptionConfig, EncryptionService, KeyType
from aiocrypt._format import FLAG_ZSTD, b64decode_canonical
from aiocrypt.integrations.sqlalchemy import (
    EncryptedFloat,
    EncryptedString,
    SQLAlchemyDatabase,
    database_for,
    reencryption_engine,
    set_encryption_service,
    table_specs,
)
from aiocrypt.reencrypt import (
    ColumnSpec,
    KeyRange,
    ReencryptionEngine,
    ReencryptionError,
    ReencryptionProgress,
    TableSpec,
)
from aiocrypt.testing import make_service


class Stop(Exception):
    pass


def make_models(suffix: str) -> tuple[Any, Any]:
    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = f"acct_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        income: Mapped[float | None] = mapped_column(EncryptedFloat(KeyType.FINANCIAL_DATA))
        ssn: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII))
        email: Mapped[str | None] = mapped_column(EncryptedString(KeyType.PII, deterministic=True))

    class Plain(Base):  # no encrypted column: not discovered
        __tablename__ = f"plain_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)

    return Base, Account


async def _setup(engine: AsyncEngine, suffix: str, rows: int) -> tuple[Any, Any]:
    base, account = make_models(suffix)
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.create_all)
    async with async_sessionmaker(engine)() as session:
        session.add_all(
            [
                account(
                    id=i,
                    income=float(i),
                    ssn=f"{i:09d}",
                    email=None if i % 7 == 0 else f"u{i}@x.org",
                )
                for i in range(1, rows + 1)
            ]
        )
        await session.commit()
    return base, account


async def _teardown(
    engine: AsyncEngine, base: Any, eng: ReencryptionEngine | None, suffix: str
) -> None:
    if eng is not None:
        await eng.database.close()
    async with engine.begin() as conn:
        await conn.run_sync(base.metadata.drop_all)
        await conn.execute(sa.text(f"DROP TABLE IF EXISTS ckpt_{suffix}"))


async def _check_all(engine: AsyncEngine, account: Any, rows: int) -> None:
    async with async_sessionmaker(engine)() as session:
        loaded = (await session.execute(sa.select(account).order_by(account.id))).scalars().all()
    assert [(a.income, a.ssn, a.email) for a in loaded] == [
        (float(i), f"{i:09d}", None if i % 7 == 0 else f"u{i}@x.org") for i in range(1, rows + 1)
    ]


async def test_discovery_census_and_full_run(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    rows = 1200
    base, account = await _setup(engine, suffix, rows)
    eng = None
    try:
        specs = table_specs(base.metadata)
        assert [s.name for s in specs] == [f"acct_{suffix}"]
        spec = specs[0]
        assert spec.primary_key == "id"
        assert [(c.name, c.key_type, c.context, c.deterministic) for c in spec.columns] == [
            ("income", "financial_data", f"acct_{suffix}.income", False),
            ("ssn", "pii", f"acct_{suffix}.ssn", False),
            ("email", "pii", f"acct_{suffix}.email", True),
        ]
        assert TableSpec.from_dict(spec.to_dict()) == spec

        manager = bound_service.key_manager
        old = {kt: manager.keyring.active(kt).key_id for kt in ("financial_data", "pii")}
        await manager.rotate_key("financial_data", force=True)
        await manager.rotate_key("pii", force=True)
        new = {kt: manager.keyring.active(kt).key_id for kt in ("financial_data", "pii")}
        batches: list[ReencryptionProgress] = []
        eng = reencryption_engine(
            bound_service,
            engine,
            base.metadata,
            batch_size=250,
            progress=batches.append,
            checkpoint_table=f"ckpt_{suffix}",
        )
        census = await eng.census(f"acct_{suffix}")
        assert census.counts == {
            "income": {old["financial_data"]: rows},
            "ssn": {old["pii"]: rows},
            "email": {old["pii"]: rows - rows // 7},
        }

        result = await eng.reencrypt(f"acct_{suffix}")
        assert result.complete and result.passes == 2  # the second pass finds nothing
        assert result.run_rows_updated == rows and result.run_batches == rows // 250 + 1
        assert result.run_rows_conflicted == 0 and result.run_rows_failed == 0
        assert len(batches) == result.run_batches
        assert batches[-1].rows_updated == rows
        census = await eng.census(f"acct_{suffix}")
        assert census.counts == {
            "income": {new["financial_data"]: rows},
            "ssn": {new["pii"]: rows},
            "email": {new["pii"]: rows - rows // 7},
        }
        assert census.rows_for(old["pii"]) == 0
        usage = await eng.key_usage()
        # old keys are listed with an explicit 0: that is what lets cleanup destroy them
        assert usage == {
            new["financial_data"]: rows,
            new["pii"]: 2 * rows - rows // 7,
            old["financial_data"]: 0,
            old["pii"]: 0,
        }
        await _check_all(engine, account, rows)

        # Deterministic tokens were rewritten with the new key: == still finds them.
        async with async_sessionmaker(engine)() as session:
            assert (
                await session.execute(sa.select(account.id).where(account.email == "u5@x.org"))
            ).scalars().all() == [5]

        again = await eng.reencrypt(f"acct_{suffix}")
        assert again.complete and again.run_rows_read == 0 and again.job_id == result.job_id
    finally:
        await _teardown(engine, base, eng, suffix)


async def test_stop_after_n_batches_then_resume(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    rows, batch = 2000, 150
    base, account = await _setup(engine, suffix, rows)
    eng = None
    try:
        await bound_service.key_manager.rotate_key("pii", force=True)

        def stop_after_4(progress: ReencryptionProgress) -> None:
            if progress.run_batches == 4:
                raise Stop

        eng = reencryption_engine(
            bound_service,
            engine,
            base.metadata,
            batch_size=batch,
            progress=stop_after_4,
            checkpoint_table=f"ckpt_{suffix}",
        )
        with pytest.raises(Stop):
            await eng.reencrypt(f"acct_{suffix}", key_type="pii")
        spec = eng.table(f"acct_{suffix}").select(key_type="pii")
        targets = await eng.targets(spec)
        job = ReencryptionEngine.job_id_for(spec, targets, KeyRange())
        checkpoint = await eng.database.load_checkpoint(job)
        assert checkpoint is not None and not checkpoint.done
        assert (checkpoint.batches, checkpoint.rows_read, checkpoint.rows_updated) == (
            4,
            4 * batch,
            4 * batch,
        )
        assert checkpoint.last_pk == 4 * batch
        census = await eng.census(spec)
        assert census.counts["ssn"][targets["ssn"]] == 4 * batch

        eng.progress = None
        result = await eng.reencrypt(f"acct_{suffix}", key_type="pii")
        assert result.resumed_from == 4 * batch
        # Nothing before the checkpoint was read again.
        assert result.run_rows_read == rows - 4 * batch
        assert result.run_batches == -(-(rows - 4 * batch) // batch)
        assert result.checkpoint.batches == 4 + result.run_batches
        assert result.checkpoint.rows_updated == rows and result.complete
        census = await eng.census(spec)
        assert census.counts["ssn"] == {targets["ssn"]: rows}
        # The financial column was not part of the job: still on its only key.
        assert len((await eng.census(f"acct_{suffix}")).counts["income"]) == 1
        await _check_all(engine, account, rows)
    finally:
        await _teardown(engine, base, eng, suffix)


async def test_max_batches_stops_a_run_which_the_next_resumes(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    """max_batches= stops after exactly that many committed batches (pipelined or not),
    says so in the result, and leaves the checkpoint the next run resumes from."""
    rows, batch = 1000, 120
    base, account = await _setup(engine, suffix, rows)
    eng = None
    try:
        await bound_service.key_manager.rotate_key("pii", force=True)
        eng = reencryption_engine(
            bound_service,
            engine,
            base.metadata,
            batch_size=batch,
            checkpoint_table=f"ckpt_{suffix}",
        )
        with pytest.raises(ValueError, match="at least 1"):
            await eng.reencrypt(f"acct_{suffix}", key_type="pii", max_batches=0)
        first = await eng.reencrypt(f"acct_{suffix}", key_type="pii", max_batches=3)
        assert first.stopped and not first.complete
        assert (first.run_batches, first.run_rows_updated) == (3, 3 * batch)
        assert first.checkpoint.last_pk == 3 * batch and not first.checkpoint.done
        rest = await eng.reencrypt(f"acct_{suffix}", key_type="pii")
        assert not rest.stopped and rest.complete and rest.resumed_from == 3 * batch
        assert rest.run_rows_updated == rows - 3 * batch
        await _check_all(engine, account, rows)
    finally:
        await _teardown(engine, base, eng, suffix)


async def test_cancelled_task_resumes(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    rows, batch = 1500, 100
    base, account = await _setup(engine, suffix, rows)
    eng = None
    try:
        await bound_service.key_manager.rotate_key("financial_data", force=True)
        reached = asyncio.Event()

        async def slow(progress: ReencryptionProgress) -> None:
            if progress.run_batches >= 3:
                reached.set()
                await asyncio.sleep(3600)

        eng = reencryption_engine(
            bound_service,
            engine,
            base.metadata,
            batch_size=batch,
            progress=slow,
            checkpoint_table=f"ckpt_{suffix}",
        )
        task = asyncio.create_task(eng.reencrypt(f"acct_{suffix}", columns=["income"]))
        await reached.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        eng.progress = None
        result = await eng.reencrypt(f"acct_{suffix}", columns=["income"])
        assert result.resumed_from == 3 * batch
        assert result.run_rows_updated == rows - 3 * batch
        assert result.checkpoint.rows_updated == rows
        await _check_all(engine, account, rows)
    finally:
        await _teardown(engine, base, eng, suffix)


async def test_shards_in_parallel(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    rows = 1000
    base, account = await _setup(engine, suffix, rows)
    engines: list[ReencryptionEngine] = []
    try:
        await bound_service.key_manager.rotate_key("pii", force=True)
        await bound_service.key_manager.rotate_key("financial_data", force=True)
        specs = table_specs(base.metadata)
        planner = ReencryptionEngine(
            bound_service.key_manager,
            database_for(engine, checkpoint_table=f"ckpt_{suffix}"),
            tables=specs,
        )
        engines.append(planner)
        shards = await planner.plan_shards(f"acct_{suffix}", 3)
        assert len(shards) == 3 and shards[0].after is None and shards[-1].until is None
        assert shards[0].until == shards[1].after and shards[1].until == shards[2].after

        async def worker(shard: KeyRange) -> Any:
            eng = ReencryptionEngine(
                bound_service.key_manager,
                database_for(engine, checkpoint_table=f"ckpt_{suffix}"),
                tables=specs,
                batch_size=64,
            )
            engines.append(eng)
            return await eng.reencrypt(f"acct_{suffix}", shard=(shard.after, shard.until))

        results = await asyncio.gather(*(worker(s) for s in shards))
        assert len({r.job_id for r in results}) == 3
        assert sum(r.run_rows_updated for r in results) == rows
        assert all(r.run_rows_updated > 200 for r in results)
        census = await planner.census(f"acct_{suffix}")
        targets = await planner.targets(f"acct_{suffix}")
        assert census.off_target(targets) == 0
        await _check_all(engine, account, rows)
    finally:
        for eng in engines[1:]:
            await eng.database.close()
        await _teardown(engine, base, engines[0] if engines else None, suffix)


async def test_undecryptable_value_raises_or_is_skipped(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    rows = 50
    base, _ = await _setup(engine, suffix, rows)
    eng = None
    try:
        async with engine.begin() as conn:  # a token moved to another row's column
            await conn.execute(
                sa.text(
                    f"UPDATE acct_{suffix} SET ssn = (SELECT income FROM acct_{suffix} "
                    "WHERE id = 1) WHERE id = 20"
                )
            )
        await bound_service.key_manager.rotate_key("pii", force=True)
        eng = reencryption_engine(
            bound_service, engine, base.metadata, batch_size=10, checkpoint_table=f"ckpt_{suffix}"
        )
        with pytest.raises(ReencryptionError) as info:
            await eng.reencrypt(f"acct_{suffix}", columns=["ssn"])
        assert info.value.primary_key == 20 and info.value.column == "ssn"
        assert "ac2." not in str(info.value)

        eng.on_error = "skip"
        result = await eng.reencrypt(f"acct_{suffix}", columns=["ssn"])
        assert not result.complete and result.failed_primary_keys[0] == 20
        assert result.run_rows_failed == 1  # once, not once per pass (issue 17)
        census = await eng.census(f"acct_{suffix}")
        assert sum(census.counts["ssn"].values()) == rows
        assert census.counts["ssn"][bound_service.keyring.active("pii").key_id] == rows - 1
    finally:
        await _teardown(engine, base, eng, suffix)


async def test_target_key_rotating_mid_run_stops(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    rows = 600
    base, account = await _setup(engine, suffix, rows)
    eng = None
    try:
        manager = bound_service.key_manager
        await manager.rotate_key("pii", force=True)

        async def rotate_once(progress: ReencryptionProgress) -> None:
            if progress.run_batches == 2:
                await manager.rotate_key("pii", force=True)

        eng = reencryption_engine(
            bound_service,
            engine,
            base.metadata,
            batch_size=100,
            progress=rotate_once,
            checkpoint_table=f"ckpt_{suffix}",
        )
        first = await eng.reencrypt(f"acct_{suffix}", key_type="pii")
        assert first.target_changed and not first.complete
        eng.progress = None
        second = await eng.reencrypt(f"acct_{suffix}", key_type="pii")
        assert second.complete and second.job_id != first.job_id
        census = await eng.census(f"acct_{suffix}")
        active = manager.keyring.active("pii").key_id
        assert census.counts["ssn"] == {active: rows}
        await _check_all(engine, account, rows)
    finally:
        await _teardown(engine, base, eng, suffix)


async def test_explicit_spec_with_row_bound_context(
    engine: AsyncEngine, service: EncryptionService, suffix: str
) -> None:
    """No ORM: a table spec by hand, contexts that include the primary key."""
    table = f"raw_{suffix}"
    keyring = await service.key_manager.ensure_active(["pii"])
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(f"CREATE TABLE {table} (pk VARCHAR(20) PRIMARY KEY, secret TEXT, amount TEXT)")
        )
        await conn.execute(
            sa.text(f"INSERT INTO {table} VALUES (:pk, :s, :a)"),
            [
                {
                    "pk": f"k{i:04d}",
                    "s": keyring.encrypt(f"s{i}", "pii", f"app.secret#k{i:04d}"),
                    "a": str(i * 1.5) if i % 2 else None,
                }
                for i in range(300)
            ],
        )
    spec = TableSpec(
        table,
        "pk",
        (
            ColumnSpec("secret", KeyType.PII, context="app.secret", row_bound=True),
            ColumnSpec("amount", KeyType.PII, legacy_type="float"),
        ),
    )
    eng = ReencryptionEngine(
        service.key_manager,
        database_for(engine, checkpoint_table=f"ckpt_{suffix}"),
        tables=[spec],
        batch_size=64,
    )
    try:
        await service.key_manager.rotate_key("pii", force=True)
        census = await eng.census(table)
        assert census.counts["amount"] == {None: 150}  # plaintext, not tokens yet
        result = await eng.reencrypt(table)
        assert result.complete and result.run_rows_updated == 300
        keyring = service.keyring
        async with engine.connect() as conn:
            stored = (
                await conn.execute(sa.text(f"SELECT pk, secret, amount FROM {table} ORDER BY pk"))
            ).all()
        for i, (pk, secret, amount) in enumerate(stored):
            assert keyring.decrypt(secret, "pii", f"app.secret#{pk}") == f"s{i}"
            if i % 2:
                assert keyring.decrypt(amount, "pii", f"{table}.amount") == i * 1.5
            else:
                assert amount is None
    finally:
        await eng.database.close()
        async with engine.begin() as conn:
            await conn.execute(sa.text(f"DROP TABLE {table}"))
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS ckpt_{suffix}"))


async def test_generic_sqlalchemy_adapter(
    engine: AsyncEngine, bound_service: EncryptionService, suffix: str
) -> None:
    """SQLAlchemyDatabase itself, on both databases (database_for picks asyncpg on Postgres)."""
    rows = 300
    base, account = await _setup(engine, suffix, rows)
    database = SQLAlchemyDatabase(engine, checkpoint_table=f"ckpt_{suffix}")
    eng = ReencryptionEngine(
        bound_service.key_manager, database, tables=table_specs(base.metadata), batch_size=64
    )
    try:
        await bound_service.key_manager.rotate_key("pii", force=True)
        assert len(await eng.plan_shards(f"acct_{suffix}", 2)) == 2
        result = await eng.reencrypt(f"acct_{suffix}", key_type="pii")
        assert result.complete and result.run_rows_updated == rows
        assert result.checkpoint.rows_updated == rows
        census = await eng.census(f"acct_{suffix}")
        assert census.counts["ssn"] == {bound_service.keyring.active("pii").key_id: rows}
        await _check_all(engine, account, rows)
    finally:
        await _teardown(engine, base, eng, suffix)


def _zstd_flags(tokens: list[str]) -> set[bool]:
    """For each token, whether its header says zstd (flags byte of the decoded body)."""
    return {bool(b64decode_canonical(t, t.rindex(".") + 1)[1] & FLAG_ZSTD) for t in tokens}


async def test_column_types_and_reencryption_compress_by_key_type(
    engine: AsyncEngine, suffix: str
) -> None:
    """``compressed_key_types=["pii"]``: PII columns are written compressed, by the column
    types and again by the engine; financial data is never compressed."""
    async with make_service(EncryptionConfig(compressed_key_types=["pii"])) as service:
        set_encryption_service(service)
        base, account = await _setup(engine, suffix, 30)
        eng = None
        try:

            async def stored() -> tuple[list[str], list[str]]:
                async with engine.connect() as conn:
                    rows = (
                        await conn.execute(sa.text(f"SELECT income, ssn FROM acct_{suffix}"))
                    ).all()
                return [r[0] for r in rows], [r[1] for r in rows]

            income, ssn = await stored()
            assert _zstd_flags(income) == {False} and _zstd_flags(ssn) == {True}
            manager = service.key_manager
            await manager.rotate_key("financial_data", force=True)
            await manager.rotate_key("pii", force=True)
            eng = reencryption_engine(
                service, engine, base.metadata, checkpoint_table=f"ckpt_{suffix}"
            )
            result = await eng.reencrypt(f"acct_{suffix}")
            assert result.complete and result.run_rows_updated == 30
            new_income, new_ssn = await stored()
            assert not set(new_income) & set(income) and not set(new_ssn) & set(ssn)
            assert _zstd_flags(new_income) == {False} and _zstd_flags(new_ssn) == {True}
            await _check_all(engine, account, 30)
        finally:
            await _teardown(engine, base, eng, suffix)
            set_encryption_service(None)
