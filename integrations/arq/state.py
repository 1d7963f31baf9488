"""The state aiocrypt's ARQ jobs share in one worker: built by :func:`startup`, closed
by :func:`shutdown`, kept in ``ctx["aiocrypt"]``.

The worker reaches the data through the re-encryption engine's database protocol
(:class:`~aiocrypt.reencrypt.PendingRowsDatabase`), opened per job by
``WorkerState.open_database``; :func:`startup` builds it over an asyncpg pool on
``ENCRYPTION_POSTGRES_DSN``, the one database the worker's settings name.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aiocrypt import (
    ConfigurationError,
    EncryptionConfig,
    EncryptionService,
    KeyManager,
    KeyType,
    build_key_manager,
)
from aiocrypt.adapters import KeyTypeLike
from aiocrypt.reencrypt import (
    AsyncpgDatabase,
    PendingRowsDatabase,
    ReencryptionEngine,
    TableSpec,
)

from .codec import check_worker
from .config import ArqWorkerConfig
from .failures import JobFailedError
from .status import StatusStore

__all__ = [
    "STATE_KEY",
    "WorkerState",
    "load_table_specs",
    "shutdown",
    "startup",
    "worker_state",
]

logger = logging.getLogger("aiocrypt.arq")

STATE_KEY: Final = "aiocrypt"


@dataclass(eq=False)
class WorkerState:
    """What aiocrypt's jobs share in one worker process (``ctx["aiocrypt"]``).

    ``service`` is usable by the application's own jobs too.
    """

    config: ArqWorkerConfig
    encryption_config: EncryptionConfig
    service: EncryptionService
    redis: Any
    """arq's ``ArqRedis`` (``ctx["redis"]``): enqueues follow-up jobs on the worker's queue."""
    status: StatusStore
    tables: dict[str, TableSpec] = field(default_factory=dict)
    open_database: Callable[[], PendingRowsDatabase] | None = None
    """Opens the engine's database for one job (None without ENCRYPTION_POSTGRES_DSN)."""
    metadata: Any = None
    worker_name: str = ""
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Run by :func:`shutdown` (the database pool)."""

    def __repr__(self) -> str:
        return (
            f"<WorkerState worker={self.worker_name!r} queue={self.config.queue_name!r} "
            f"tables={sorted(self.tables)}>"
        )

    @property
    def key_manager(self) -> KeyManager:
        return self.service.key_manager

    def tables_for(self, key_type: KeyTypeLike) -> list[TableSpec]:
        """Every registered table limited to its columns of ``key_type``."""
        kt = KeyType(key_type)
        return [
            t.select(key_type=kt)
            for t in self.tables.values()
            if any(c.key_type == kt for c in t.columns)
        ]

    def reencryption_gap(self, key_type: KeyTypeLike) -> str | None:
        """Why this worker would not re-encrypt ``key_type`` data, or None if it would."""
        if not self.tables_for(key_type):
            return (
                f"no registered table has a column of key type "
                f"{KeyType(key_type).value} (ENCRYPTION_ARQ_METADATA / ENCRYPTION_ARQ_TABLES)"
            )
        if self.open_database is None:
            return "ENCRYPTION_POSTGRES_DSN is not set"
        return None

    def database(self) -> PendingRowsDatabase:
        """The data's database for one job; close it after the job."""
        if self.open_database is None:
            raise JobFailedError(
                "ENCRYPTION_POSTGRES_DSN is not set: this worker cannot "
                "reach the data to re-encrypt or count"
            )
        return self.open_database()

    async def census(self) -> dict[str, int]:
        """Rows per key id over every registered column (and blind index, from metadata).

        A key of a type that no registered column uses is reported as referenced,
        so the worker never destroys it: this census cannot see its data.
        """
        db = self.database()
        try:
            usage = await ReencryptionEngine(
                self.key_manager, db, tables=self.tables.values()
            ).key_usage()
        finally:
            await db.close()
        covered = {c.key_type for t in self.tables.values() for c in t.columns}
        covered |= await self._blind_index_usage(usage)
        uncovered = set()
        for key in await self.key_manager.list_keys():
            if key.key_type not in covered:
                uncovered.add(key.key_type.value)
                usage[key.key_id] = max(usage.get(key.key_id, 0), 1)
        if uncovered:
            logger.info(
                "census: key types %s are not stored in registered tables; their keys "
                "are kept (confirm with `aiocrypt keys cleanup --confirm`)",
                ", ".join(sorted(uncovered)),
            )
        return usage

    async def _blind_index_usage(self, usage: dict[str, int]) -> set[KeyType]:
        if self.metadata is None:
            return set()
        from sqlalchemy.ext.asyncio import create_async_engine

        from aiocrypt.integrations.sqlalchemy import BlindIndex, blind_index_usage

        types = {
            c.type.key_type
            for t in self.metadata.sorted_tables
            for c in t.columns
            if isinstance(c.type, BlindIndex)
        }
        if not types:
            return set()
        dsn = self.encryption_config.postgres_dsn or ""
        engine = create_async_engine(
            dsn.replace("postgres://", "postgresql://", 1).replace(
                "postgresql://", "postgresql+asyncpg://", 1
            )
        )
        try:
            for key_id, rows in (
                await blind_index_usage(engine, self.metadata, self.service)
            ).items():
                usage[key_id] = usage.get(key_id, 0) + rows
        finally:
            await engine.dispose()
        return types


def _resolve(path: str) -> Any:
    module_name, _, attrs = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"ENCRYPTION_ARQ_METADATA: cannot import {module_name!r} ({exc})"
        ) from exc
    for attr in attrs.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigurationError(
                f"ENCRYPTION_ARQ_METADATA: {path!r} has no attribute {attr!r}"
            ) from None
    return obj


def load_table_specs(config: ArqWorkerConfig) -> tuple[list[TableSpec], Any]:
    """The tables to re-encrypt and census: (specs, SQLAlchemy metadata or None)."""
    if config.metadata is not None:
        from aiocrypt.integrations.sqlalchemy import table_specs

        metadata = _resolve(config.metadata)
        metadata = getattr(metadata, "metadata", metadata)  # a declarative base will do
        return table_specs(metadata), metadata
    if config.tables is not None:
        text = config.tables
        if text.startswith("@"):
            try:
                text = Path(text[1:]).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(
                    f"ENCRYPTION_ARQ_TABLES: cannot read {text[1:]}: {exc.strerror}"
                ) from None
        try:
            data = json.loads(text)
            items = data["tables"] if isinstance(data, dict) else data
            return [TableSpec.from_dict(item) for item in items], None
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                "ENCRYPTION_ARQ_TABLES must be a JSON list of table "
                f"specs (TableSpec.to_dict()): {exc}"
            ) from None
    return [], None


async def startup(ctx: dict[str, Any], config: ArqWorkerConfig | None = None) -> None:
    """Build the key manager, the data's database and the status store into
    ``ctx["aiocrypt"]``.

    First refuses (``ConfigurationError``) a worker whose jobs are not JSON, before
    any key is loaded: arq runs ``on_startup`` before it takes a job, so a worker
    that would unpickle one never starts.
    """
    check_worker(ctx)
    cfg = config if config is not None else ArqWorkerConfig.from_env()
    encryption_config = EncryptionConfig.from_env()
    specs, metadata = load_table_specs(cfg)
    if specs and not encryption_config.postgres_dsn:
        raise ConfigurationError(
            "table specs are configured but ENCRYPTION_POSTGRES_DSN is "
            "not set: the worker could not reach the data"
        )
    service = EncryptionService(build_key_manager(encryption_config))
    await service.start()
    open_database, closers = None, []
    try:
        if encryption_config.postgres_dsn:
            open_database, close = await _postgres(encryption_config.postgres_dsn, cfg)
            closers.append(close)
    # asyncpg.create_pool(min_size=0) opens no connection: a bad or unreachable DSN
    # does not fail it, so only a cancel of the start mid-await reaches this.
    except BaseException:  # pragma: no cover - create_pool(min_size=0) does not connect
        await service.close()
        raise
    state = WorkerState(
        config=cfg,
        encryption_config=encryption_config,
        service=service,
        redis=ctx["redis"],
        status=StatusStore(ctx["redis"], cfg.key_prefix, ttl=cfg.status_ttl),
        tables={t.name: t for t in specs},
        open_database=open_database,
        metadata=metadata,
        worker_name=cfg.name_of_worker(),
        closers=closers,
    )
    ctx[STATE_KEY] = state
    logger.info(
        "aiocrypt worker %s ready: key store %s, %d table(s) to re-encrypt%s",
        state.worker_name,
        service.key_manager.store.name,
        len(specs),
        "" if open_database is not None else " (no ENCRYPTION_POSTGRES_DSN: no re-encryption)",
    )


async def _postgres(
    dsn: str, cfg: ArqWorkerConfig
) -> tuple[Callable[[], PendingRowsDatabase], Callable[[], Awaitable[None]]]:
    """The engine's Postgres adapter over one asyncpg pool for the worker's jobs."""
    import asyncpg

    # min_size=0: a database that is down fails (and retries) the jobs that need it,
    # not the worker's start; rotation and cleanup need only the key store.
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2 * cfg.max_jobs + 2)

    def open_database() -> PendingRowsDatabase:
        return AsyncpgDatabase(pool=pool, checkpoint_table=cfg.checkpoint_table)

    async def close() -> None:
        await asyncio.wait_for(pool.close(), timeout=10)

    return open_database, close


async def shutdown(ctx: dict[str, Any]) -> None:
    state: WorkerState | None = ctx.pop(STATE_KEY, None)
    if state is None:
        return
    try:
        for close in state.closers:
            await close()
    finally:
        await state.service.close()


def worker_state(ctx: dict[str, Any]) -> WorkerState:
    """The state :func:`startup` built in this worker; a job without it fails at once."""
    state = ctx.get(STATE_KEY)
    if not isinstance(state, WorkerState):
        raise JobFailedError(
            "aiocrypt's on_startup has not run in this worker: build its "
            "settings with aiocrypt_worker_settings() or merge_into()"
        )
    return state
