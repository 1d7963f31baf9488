"""The whole story on embedded defaults: file key store, local master key, SQLite.

Run with ``./dev demo`` (or ``python -m aiocrypt.demo``). Everything lives in a
fresh temporary directory unless ``--dir`` is given; a master key is generated
for the run unless ENCRYPTION_MASTER_KEY is set. The master key is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sqlite3
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

from . import (
    DecryptionError,
    EncryptionConfig,
    EncryptionService,
    KeyType,
    build_key_manager,
)

FIELDS = {  # column -> key type
    "monthly_income": KeyType.FINANCIAL_DATA,
    "savings": KeyType.FINANCIAL_DATA,
    "ssn": KeyType.PII,
    "session": KeyType.SESSION,
}


def _say(title: str) -> None:
    print(f"\n== {title}")


async def _store_user(service: EncryptionService, db: sqlite3.Connection, user_id: int,
                      record: dict[str, Any]) -> None:
    values = [await service.encrypt_field(record[col], kt, context=f"users.{col}")
              for col, kt in FIELDS.items()]
    db.execute("INSERT OR REPLACE INTO users (id, monthly_income, savings, ssn, session) "
               "VALUES (?, ?, ?, ?, ?)", (user_id, *values))
    db.commit()


async def _load_user(service: EncryptionService, db: sqlite3.Connection,
                     user_id: int) -> dict[str, Any]:
    row = db.execute("SELECT monthly_income, savings, ssn, session FROM users WHERE id = ?",
                     (user_id,)).fetchone()
    return {col: await service.decrypt_field(token, kt, context=f"users.{col}")
            for (col, kt), token in zip(FIELDS.items(), row, strict=True)}


async def run(workdir: Path) -> None:
    master_key = os.environ.get("ENCRYPTION_MASTER_KEY")
    if not master_key:
        master_key = base64.b64encode(os.urandom(32)).decode("ascii")
        print("ENCRYPTION_MASTER_KEY not set: generated a fresh one for this run (not shown)")
    config = EncryptionConfig(master_key=master_key, storage_backend="file",
                              storage_path=str(workdir / "keys.json"))
    service = EncryptionService(build_key_manager(config))
    db = sqlite3.connect(workdir / "demo.sqlite3")
    db.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, monthly_income TEXT,"
               " savings TEXT, ssn TEXT, session TEXT)")
    async with service:
        manager = service.key_manager
        _say("1. one key per purpose, wrapped by the local master key, in a 0600 file")
        for key_type in KeyType.builtin():
            key = await manager.generate_key(key_type)
            print(f"  {key_type.value:<15} {key.key_id}  (version {key.version}, "
                  f"expires {key.expires_at:%Y-%m-%d})")
        mode = oct((workdir / "keys.json").stat().st_mode & 0o777)
        print(f"  key store: {workdir / 'keys.json'} mode {mode}")

        _say("2. encrypt a user record and store it in SQLite")
        record = {"monthly_income": 75000.0, "savings": Decimal("125000.50"),
                  "ssn": "123-45-6789",
                  "session": {"user_id": 1, "roles": ["customer"], "mfa": True}}
        await _store_user(service, db, 1, record)
        raw = db.execute("SELECT * FROM users WHERE id = 1").fetchone()
        for col, value in zip(("id", *FIELDS), raw, strict=True):
            print(f"  {col:<15} {str(value)[:72]}{'...' if len(str(value)) > 72 else ''}")

        _say("3. decrypt it back: values and types survive")
        loaded = await _load_user(service, db, 1)
        for col, value in loaded.items():
            print(f"  {col:<15} {value!r}")
        assert loaded == record

        _say("4. a ciphertext copied to another column does not decrypt")
        try:
            await service.decrypt_field(raw[1], KeyType.FINANCIAL_DATA, context="users.savings")
        except DecryptionError as exc:
            print(f"  users.monthly_income token read as users.savings -> {exc!r}")

        _say("5. rotate the financial key: new data uses v2, old data still decrypts")
        old = await manager.get_active_key(KeyType.FINANCIAL_DATA)
        new = await manager.rotate_key(KeyType.FINANCIAL_DATA, force=True)
        print(f"  {old.key_id} -> {new.key_id}")
        await _store_user(service, db, 2, {**record, "monthly_income": 82000.0})
        for user_id in (1, 2):
            token = db.execute("SELECT monthly_income FROM users WHERE id = ?",
                               (user_id,)).fetchone()[0]
            value = await service.decrypt_field(token, KeyType.FINANCIAL_DATA,
                                                context="users.monthly_income")
            print(f"  user {user_id}: key {token.split('.')[1]:<28} income {value!r}")
        counts = db.execute(
            "SELECT substr(monthly_income, 1, instr(substr(monthly_income, 5), '.') + 3) AS p,"
            " count(*) FROM users GROUP BY p").fetchall()
        print("  rows per key version, counted in SQL without decrypting:",
              {prefix.split(".")[1]: n for prefix, n in counts})

        _say("6. key statistics")
        stats = await manager.get_key_statistics()
        print(json.dumps({k: stats[k] for k in ("total_keys", "by_status", "active_keys",
                                                 "rotation_needed")}, indent=2))
        service_stats = await service.get_encryption_stats()
        print("  service:", service_stats["encryption_service"],
              "| counters:", service_stats["counters"])
    db.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, help="keep the key store and database here")
    args = parser.parse_args(argv)
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        asyncio.run(run(args.dir))
    else:
        with tempfile.TemporaryDirectory(prefix="aiocrypt-demo-") as tmp:
            asyncio.run(run(Path(tmp)))
    print("\ndemo finished")


if __name__ == "__main__":
    main()
