"""The whole story on embedded defaults: file key store, local master key, SQLite.

Run with ``./dev demo`` (or ``python -m aiocrypt.demo``). Everything lives in a
fresh temporary directory unless ``--dir`` is given; a master key is generated
for the run unless ENCRYPTION_MASTER_KEY is set. The master key is never printed.
The story: keys per purpose, an encrypted SQLAlchemy model on SQLite, what the
table really holds, a blind-index search, rotation, re-encryption of every row
with a census in SQL, sessions and cache entries, a year passing (expiry,
grace, safe cleanup), master-key rotation and the audit trail. It needs the
``sqlalchemy`` extra (``pip install 'aiocrypt[sqlalchemy]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import logging
import os
import tempfile
from decimal import Decimal
from pathlib import Path

from . import DecryptionError, EncryptionConfig, EncryptionService, KeyManager, KeyType
from ._keys import utcnow
from .audit import Auditor, MemoryAuditSink
from .kek import LocalKekProvider
from .keystore import FileKeyStore


class DemoClock:
    """Wall-clock time plus an offset the demo moves forward ("a year later")."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return utcnow() + self.offset


def _say(title: str) -> None:
    print(f"\n== {title}")


async def run(workdir: Path) -> None:
    try:
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
        from sqlalchemy.orm import DeclarativeBase, mapped_column

        from aiocrypt.integrations.sqlalchemy import (
            BlindIndex,
            EncryptedDecimal,
            EncryptedFloat,
            EncryptedString,
            normalize_digits,
            reencryption_engine,
            set_encryption_service,
        )
    except ImportError as exc:
        raise SystemExit(
            f"the demo needs the sqlalchemy extra: pip install 'aiocrypt[sqlalchemy]' ({exc})"
        ) from None

    class Base(DeclarativeBase):
        pass

    class User(Base):
        # Declared inside a function (the extra is imported lazily), so without
        # Mapped[...] annotations, which SQLAlchemy resolves at module level.
        __tablename__ = "users"
        id = mapped_column(sa.Integer, primary_key=True)
        username = mapped_column(sa.String(50))
        monthly_income_encrypted = mapped_column(EncryptedFloat(KeyType.FINANCIAL_DATA))
        savings_encrypted = mapped_column(EncryptedDecimal(KeyType.FINANCIAL_DATA))
        ssn_encrypted = mapped_column(EncryptedString(KeyType.PII))
        ssn_index = mapped_column(
            BlindIndex("ssn_encrypted", normalizer=normalize_digits), index=True
        )

    master_key = os.environ.get("ENCRYPTION_MASTER_KEY")
    if not master_key:
        master_key = base64.b64encode(os.urandom(32)).decode("ascii")
        print("ENCRYPTION_MASTER_KEY not set: generated a fresh one for this run (not shown)")
    config = EncryptionConfig(master_key=master_key, storage_path=str(workdir / "keys.json"))
    clock = DemoClock()
    events = MemoryAuditSink()
    kek = LocalKekProvider(config.master_key_bytes())
    manager = KeyManager(
        FileKeyStore(config.key_store_file(), kek),
        kek,
        config,
        clock=clock,
        auditor=Auditor([events]),
    )
    service = EncryptionService(manager, clock=clock)
    engine = create_async_engine(f"sqlite+aiosqlite:///{workdir / 'demo.sqlite3'}")
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    async with service:
        set_encryption_service(service)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

        _say("1. one key per purpose, wrapped by the local master key, in a 0600 file")
        for key_type in KeyType.builtin():
            key = await manager.generate_key(key_type)
            print(
                f"  {key_type.value:<15} {key.key_id}  (version {key.version}, "
                f"expires {key.expires_at:%Y-%m-%d})"
            )
        mode = oct((workdir / "keys.json").stat().st_mode & 0o777)
        print(f"  key store: {workdir / 'keys.json'} mode {mode}")

        _say("2. store a user through an encrypted SQLAlchemy model (SQLite)")
        async with sessions() as session:
            user = User(username="alice")
            user.monthly_income_encrypted = 75000.0
            user.savings_encrypted = Decimal("125000.50")
            user.ssn_encrypted = "123-45-6789"
            session.add_all(
                [
                    user,
                    User(
                        username="bob",
                        monthly_income_encrypted=4200.0,
                        savings_encrypted=Decimal("10.00"),
                        ssn_encrypted="987-65-4321",
                    ),
                ]
            )
            await session.commit()
        async with engine.connect() as conn:
            raw = (await conn.execute(sa.text("SELECT * FROM users WHERE id = 1"))).one()
        print("  what the table holds (plain SQL):")
        for column, value in zip(raw._fields, raw, strict=True):
            text = str(value)
            print(f"    {column:<25} {text[:64]}{'...' if len(text) > 64 else ''}")

        _say("3. read it back: values and types survive")
        async with sessions() as session:
            alice = await session.get(User, 1)
            assert alice is not None
            print(
                f"  income {alice.monthly_income_encrypted!r}, savings "
                f"{alice.savings_encrypted!r}, ssn {alice.ssn_encrypted!r}"
            )
            found = (
                (
                    await session.execute(
                        sa.select(User.username).where(User.ssn_index.matches("123 45 6789"))
                    )
                )
                .scalars()
                .all()
            )
            print(f"  blind-index search for SSN '123 45 6789' finds {list(found)}")

        _say("4. a token copied to another column does not decrypt")
        try:
            await service.decrypt_field(
                raw.monthly_income_encrypted,
                KeyType.FINANCIAL_DATA,
                context="users.savings_encrypted",
            )
        except DecryptionError as exc:
            print(f"  users.monthly_income_encrypted read as users.savings_encrypted -> {exc!r}")

        _say("5. sessions and cache entries get keys of their own")
        session_token = await service.encrypt_session_data(
            {"user_id": 1, "roles": ["customer"], "mfa": True}, context="session-id-hash"
        )
        print(f"  session  {session_token[:60]}...")
        cache_key, cache_value = await service.encrypt_cache_data(
            "report:alice:2026", {"total": Decimal("79200.00")}, ttl=300
        )
        print(f"  cache    {cache_key[:60]}...")
        print(f"  back     {await service.decrypt_cache_data(cache_key, cache_value)}")

        _say("6. rotate the financial key: old rows still decrypt, new writes use v2")
        old = await manager.get_active_key(KeyType.FINANCIAL_DATA)
        new = await manager.rotate_key(KeyType.FINANCIAL_DATA, force=True)
        print(f"  {old.key_id} -> {new.key_id}")
        async with sessions() as session:
            alice = await session.get(User, 1)
            assert alice is not None
            print(f"  alice's income (written under v1) reads {alice.monthly_income_encrypted!r}")

        _say("7. re-encrypt every row onto the new keys; census counted in SQL")
        reencryption = reencryption_engine(service, engine, Base.metadata)
        manager.census = reencryption.key_usage
        try:
            print("  census before:", (await reencryption.census("users")).counts)
            result = await reencryption.reencrypt("users")
            print(
                f"  {result.run_rows_updated} rows re-encrypted, resumable from checkpoint "
                f"{result.job_id}"
            )
            print("  census after: ", (await reencryption.census("users")).counts)

            _say("8. a year later: the policy rotates, rows move, cleanup checks the census")
            clock.offset = dt.timedelta(days=366)
            report = await manager.rotate_keys_due()
            print(
                f"  policy run rotated {len(report['rotated'])} key types; past max age "
                f"(still readable during the 30-day grace): {len(report['expired'])} keys"
            )
            result = await reencryption.reencrypt("users")
            print(f"  {result.run_rows_updated} rows re-encrypted onto the new keys")
            clock.offset = dt.timedelta(days=366 + 31)  # past the grace period
            cleanup = await manager.cleanup_report()
            for item in cleanup["destroyed"]:
                print(f"  destroyed {item['key_id']:<28} {item['reason']}")
            for item in cleanup["kept"]:
                print(f"  kept      {item['key_id']:<28} {item['reason']}")
        finally:
            await reencryption.database.close()
        async with sessions() as session:
            alice = await session.get(User, 1)
            assert alice is not None
            print(
                f"  alice's data reads as ever: income {alice.monthly_income_encrypted!r}, "
                f"ssn {alice.ssn_encrypted!r}"
            )

        _say("9. master-key rotation: every DEK rewrapped, no row touched")
        new_kek = LocalKekProvider(os.urandom(32))
        count = await manager.rotate_master_key(new_kek)
        print(
            f"  {count} keys rewrapped under {new_kek.kek_id}; the old master key no longer "
            "opens the key store"
        )

        _say("10. key statistics and the audit trail")
        stats = await manager.get_key_statistics()
        print(
            json.dumps(
                {k: stats[k] for k in ("total_keys", "by_status", "rotation_needed")}, indent=2
            )
        )
        service_stats = await service.get_encryption_stats()
        print(
            "  service:",
            service_stats["encryption_service"],
            "| counters:",
            service_stats["counters"],
        )
        print("  audit events:", ", ".join(sorted(set(events.names()))))
    await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dir", type=Path, help="keep the key store and database here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  [%(levelname)s %(name)s] %(message)s")
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        asyncio.run(run(args.dir))
    else:
        with tempfile.TemporaryDirectory(prefix="aiocrypt-demo-") as tmp:
            asyncio.run(run(Path(tmp)))
    # test_examples checks this line is printed, but coverage cannot see it on CPython
    # 3.11: KeyManager.close() awaits its cancelled watch task, and 3.11 then drops the
    # trace events of the frames above (coveragepy issue 2124, cpython gh-106749)
    print("\ndemo finished")  # pragma: no cover - unmeasurable on 3.11 (see above)


if __name__ == "__main__":
    main()
