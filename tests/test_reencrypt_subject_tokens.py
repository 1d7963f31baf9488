"""Re-encryption leaves data subjects' tokens where they are (issues 19 and 20).

A value under a data subject's key (``ac2.S-...``) is moved to a new version
key by rewrapping the subject's key (``rewrap_subjects``), never by rewriting
the value: the engine must neither select such a row as pending, nor try to
open it, nor count it as off target, nor list one key id per subject in the
census. Checked on real Postgres (asyncpg adapter) with a column mixing plain
and subject tokens.
"""

from __future__ import annotations

import asyncpg
import pytest

from aiocrypt import DecryptionError, DecryptionFailure, EncryptionService, KeyType
from aiocrypt.reencrypt import (
    SUBJECT_KEYS,
    AsyncpgDatabase,
    ColumnSpec,
    ReencryptionEngine,
    TableSpec,
)

pytestmark = pytest.mark.services
KT = KeyType.PII


async def test_subject_tokens_are_neither_pending_nor_moved_nor_off_target(
    service: EncryptionService, postgres_dsn: str
) -> None:
    table, checkpoints = "subject_mix_t", "subject_mix_ckpt"
    conn = await asyncpg.connect(postgres_dsn)
    database = AsyncpgDatabase(postgres_dsn, checkpoint_table=checkpoints)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}, {checkpoints}")
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, ssn text)")
        ctx = f"{table}.ssn"
        rows = []
        for i in range(1, 301):
            subject = f"user:{i % 7}" if i % 3 == 0 else None  # a third under subjects
            rows.append(
                (i, await service.encrypt_field(f"{i:09d}", KT, context=ctx, subject=subject))
            )
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", rows)
        subject_tokens = {i: t for i, t in rows if t.startswith("ac2.S-")}
        assert len(subject_tokens) == 100
        old = service.key_manager.keyring.active(KT).key_id
        await service.key_manager.rotate_key(KT, force=True)
        new = service.key_manager.keyring.active(KT).key_id
        spec = TableSpec(table, "id", (ColumnSpec("ssn", KT),))
        engine = ReencryptionEngine(service.key_manager, database, tables=[spec], batch_size=40)

        before = await engine.census(table)
        assert before.counts["ssn"] == {old: 200, SUBJECT_KEYS: 100}  # one bucket
        assert before.key_ids() == {old} and before.subject_rows() == 100
        result = await engine.reencrypt(table)
        assert result.complete and result.run_rows_updated == 200
        assert result.run_rows_failed == 0 and result.run_rows_read == 200  # never read
        assert result.passes == 2  # the moving pass, then a sweep that finds nothing

        after = await engine.census(table)
        assert after.counts["ssn"] == {new: 200, SUBJECT_KEYS: 100}
        assert after.off_target(result.targets) == 0
        stored = dict(await conn.fetch(f"SELECT id, ssn FROM {table}"))
        assert {i: stored[i] for i in subject_tokens} == subject_tokens  # untouched
        for i, token in stored.items():
            assert await service.decrypt_field(token, KT, context=ctx) == f"{i:09d}"
        # a forgotten subject's values are left as they are too: nothing to open
        await service.forget_subject("user:3")
        again = await engine.reencrypt(table)
        assert again.complete and again.run_rows_read == 0 and again.run_rows_failed == 0
        with pytest.raises(DecryptionError) as exc:
            await service.decrypt_field(stored[3], KT, context=ctx)
        assert exc.value.reason is DecryptionFailure.SUBJECT_FORGOTTEN
    finally:
        await database.close()
        await conn.execute(f"DROP TABLE IF EXISTS {table}, {checkpoints}")
        await conn.close()
