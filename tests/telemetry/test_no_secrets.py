"""No value, token, key material or error message in any span or metric.

One run of every traced operation (first keys, loads in a second process, an
unknown key id, rotations by force and by policy, a re-encryption on Postgres,
a refused and a granted retirement, cleanup, a master-key rotation, a failed
unwrap), with values, DEKs and the master keys known to the test. Then every
span of the run and every metric series of the session, serialised as an
exporter sends them, is searched for each of them in every encoding a careless
attribute would use.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

import pytest

from aiocrypt import (
    AsyncpgDatabase,
    ColumnSpec,
    DecryptionError,
    EncryptionService,
    KekProviderError,
    KeyStateError,
    KeyType,
    ReencryptionEngine,
    TableSpec,
)
from aiocrypt._dek_cache import wrap_context
from aiocrypt.kek import LocalKekProvider
from aiocrypt.testing import ManualClock

from .conftest import Telemetry
from .test_spans import file_service


def encodings(secret: bytes) -> Iterable[str]:
    """How bytes may show up in text: hex (both cases), base64, base64url, unpadded."""
    for text in (
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
    ):
        yield text
        yield text.rstrip("=")


class Secrets:
    """What the run must never let out, gathered as it goes."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def add(self, what: str, text: str) -> None:
        assert len(text) >= 8, what  # short strings would match by chance
        self.found.append((what, text))

    def add_bytes(self, what: str, secret: bytes) -> None:
        for text in encodings(secret):
            self.add(what, text)

    def add_deks(self, svc: EncryptionService) -> None:
        for dk in svc.key_manager.keyring:
            self.add_bytes(f"DEK of {dk.key_id}", dk._material)


async def test_no_value_token_or_key_material_in_any_span_or_metric(
    otel: Telemetry, tmp_path: Path, postgres_dsn: str
) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    leaks = Secrets()
    master_key, new_master_key = os.urandom(32), os.urandom(32)
    leaks.add_bytes("master key", master_key)
    leaks.add_bytes("new master key", new_master_key)
    values = [f"patient-{i}-{secrets.token_hex(8)}" for i in range(40)]
    for value in values:
        leaks.add("plaintext", value)
    path, clock = tmp_path / "keys.json", ManualClock()
    table = f"otel_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(postgres_dsn)
    database = AsyncpgDatabase(postgres_dsn)
    try:
        async with file_service(path, master_key, clock=clock) as svc:
            manager = svc.key_manager
            tokens = await svc.encrypt_many(values, KeyType.PII, context=f"{table}.secret")
            card = await svc.encrypt_field(b"4111111111111111", KeyType.FINANCIAL_DATA)
            leaks.add_bytes("bytes plaintext", b"4111111111111111")
            for token in [*tokens, card]:
                leaks.add("token", token)
                leaks.add("token body", token.split(".")[2])
            leaks.add_deks(svc)

            # a second process loads the keys; a forged token names an unknown key
            async with file_service(path, master_key, refresh_interval=3600) as other:
                assert (
                    await other.decrypt_many(tokens, KeyType.PII, context=f"{table}.secret")
                    == values
                )
                forged = f"ac2.pii-v7-{secrets.token_hex(4)}.{tokens[0].split('.')[2]}"
                with pytest.raises(DecryptionError):
                    await other.decrypt_field(forged, KeyType.PII)

            # rotations, then every row moved onto the new key in Postgres
            await conn.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, secret text)")
            await conn.copy_records_to_table(
                table, records=list(enumerate(tokens)), columns=["id", "secret"]
            )
            v1 = await manager.get_active_key(KeyType.PII)
            v2 = await manager.rotate_key(KeyType.PII, force=True)
            leaks.add_deks(svc)
            spec = TableSpec(table, "id", (ColumnSpec("secret", KeyType.PII),))
            engine = ReencryptionEngine(manager, database, tables=[spec], batch_size=15)
            assert (await engine.reencrypt(table)).complete
            for row in await conn.fetch(f"SELECT secret FROM {table}"):
                leaks.add("re-encrypted token", row["secret"])
            clock.advance(days=400)
            await manager.run_rotation_policy()
            leaks.add_deks(svc)

            # retirement refused by the census (the rows are on v2), then granted; cleanup
            with pytest.raises(KeyStateError):
                await manager.retire_key(v2.key_id, census=engine.key_usage)
            await manager.retire_key(v1.key_id, census=await engine.key_usage())
            clock.advance(days=3650)
            await manager.cleanup(census=await engine.key_usage())

            # a new master key; and an unwrap under the wrong one
            await manager.rotate_master_key(LocalKekProvider(new_master_key))
            leaks.add_deks(svc)
            active = await manager.get_active_key(KeyType.PII)
            assert active.wrapped_key is not None
            leaks.add_bytes("wrapped DEK", active.wrapped_key)
            with pytest.raises(KekProviderError) as caught:
                await LocalKekProvider(master_key).unwrap(active.wrapped_key, wrap_context(active))
            leaks.add("error message", str(caught.value))
    finally:
        await database.close()
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"DELETE FROM {database.checkpoint_table} WHERE table_name = $1", table)
        await conn.close()

    names = {s.name for s in otel.spans()}
    assert names >= {
        "aiocrypt.kms.wrap",
        "aiocrypt.kms.unwrap",
        "aiocrypt.keys.load",
        "aiocrypt.keys.load_key",
        "aiocrypt.key.rotate",
        "aiocrypt.key.rotation_policy",
        "aiocrypt.reencrypt.run",
        "aiocrypt.reencrypt.batch",
        "aiocrypt.key.retire",
        "aiocrypt.key.cleanup",
        "aiocrypt.kek.rotate",
        "aiocrypt.kek.rewrap",
    }, names
    exported = otel.dumps()
    assert v1.key_id in exported  # what may be there is there: the search is not blind
    assert len({what for what, _ in leaks.found}) >= 10
    found = [(what, text) for what, text in leaks.found if text in exported]
    assert not found, f"in the telemetry: {sorted({what for what, _ in found})}"
    assert "ac2." not in exported and "ac1." not in exported  # no token of any key
