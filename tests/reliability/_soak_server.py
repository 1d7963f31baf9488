"""The Quart example app (examples/quart_app.py) served by hypercorn, for test_soak_quart.

Run as ``python _soak_server.py <json settings>`` with the repository root on
PYTHONPATH and ``ENCRYPTION_MASTER_KEY`` in the environment. The example keeps
its users in SQLite and sessions / the report cache in Redis; it has no
setting for a Postgres key store, so this runner swaps the example's
``build_service`` for one over a ``PostgresKeyStore`` (the real PostgreSQL, a
schema of its own) with a ``PostgresAuditSink`` (hash-chained audit table):
everything else is the example as shipped. SIGTERM stops it gracefully.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any


def main(settings: dict[str, Any]) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    import examples.quart_app as quart_app
    from aiocrypt import EncryptionService, KeyManager
    from aiocrypt.audit import Auditor, LoggingAuditSink
    from aiocrypt.audit.postgres import PostgresAuditSink
    from aiocrypt.kek import LocalKekProvider
    from aiocrypt.keystore.postgres import PostgresKeyStore

    def build_service(data_dir: Path) -> EncryptionService:
        kek = LocalKekProvider(base64.b64decode(os.environ["ENCRYPTION_MASTER_KEY"]))
        store = PostgresKeyStore(settings["dsn"], schema=settings["schema"])
        auditor = Auditor(
            [LoggingAuditSink(), PostgresAuditSink(settings["dsn"], table=settings["audit_table"])]
        )
        return EncryptionService(KeyManager(store, kek, auditor=auditor, refresh_interval=2.0))

    quart_app.build_service = build_service  # type: ignore[attr-defined]  # the example's import
    app = quart_app.create_app(
        {
            "EXAMPLE_DATA_DIR": settings["data_dir"],
            "AIOCRYPT_REDIS_URL": settings["redis_url"],
            "AIOCRYPT_SESSION_PREFIX": settings["prefix"] + "session:",
            "AIOCRYPT_CACHE_PREFIX": settings["prefix"] + "cache:",
            "AIOCRYPT_COOKIE_SECURE": False,  # plain HTTP on loopback
            "REPORT_CACHE_TTL": 1,  # entries expire during the soak: hits, misses, recomputes
        }
    )
    config = Config()
    config.bind = [f"127.0.0.1:{settings['port']}"]
    config.graceful_timeout = 2.0
    config.accesslog = None

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await serve(app, config, shutdown_trigger=stop.wait)

    asyncio.run(run())


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
