"""aiocrypt's ARQ jobs: scheduled and manual rotation, sharded re-encryption, cleanup.

Every job argument is an identifier (key type, key id, table name, primary-key
bounds, counts): never plaintext, never key material. Jobs and results travel
as JSON (``_arq_codec``): :func:`startup` refuses a worker that would unpickle
them, and enqueueing refuses a pool that would pickle them. The worker's state
(key manager, asyncpg pool, table specs, status store) lives in
``ctx["aiocrypt"]``, built by :func:`startup` and closed by :func:`shutdown`.

Failures: an error that may pass (key store, KEK provider, database or Redis
unreachable, a lock held too long) is retried with exponential backoff
(``arq.Retry(defer=...)``) up to ``max_tries``, each retry logged and shown in
the status record; anything else (a missing table, an unknown key, a row that
does not decrypt, bad configuration) fails the job at once with
:class:`JobFailedError`, whose message says what to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from arq import Retry
from arq.constants import job_key_prefix, result_key_prefix

from aiocrypt import (
    AiocryptError,
    ConfigurationError,
    EncryptionConfig,
    EncryptionService,
    KekProviderError,
    KeyManager,
    KeyStoreError,
    KeyStoreIntegrityError,
    KeyType,
    ReencryptionError,
    build_key_manager,
)
from aiocrypt._format import text_prefix
from aiocrypt._types import KeyTypeLike
from aiocrypt.reencrypt import (
    AsyncpgDatabase,
    KeyRange,
    ReencryptionEngine,
    ReencryptionProgress,
    ReencryptionResult,
    TableSpec,
    pending_condition,
    quote_identifier,
)

from ._arq_codec import check_pool, check_worker
from ._arq_config import ArqWorkerConfig
from ._arq_status import ShardStatus, StatusStore, now_iso, redis_lock

__all__ = [
    "STATE_KEY",
    "JobFailedError",
    "ShardIncompleteError",
    "WorkerState",
    "cleanup_expired_keys",
    "enqueue_reencryption",
    "load_table_specs",
    "reencrypt_data_with_new_key",
    "reencrypt_shard",
    "reencryption_job_id",
    "rotate_key_manual",
    "rotate_keys_scheduled",
    "shutdown",
    "startup",
]

logger = logging.getLogger("aiocrypt.arq")

STATE_KEY: Final = "aiocrypt"
_PROGRESS_EVERY: Final = 0.5  # seconds between status writes while a shard runs
_MAX_TARGET_CHANGES: Final = 3
_MAX_SWEEPS: Final = 3


class JobFailedError(AiocryptError):
    """A job cannot proceed; the message says why and what to check. Not retried."""


# -- worker state ------------------------------------------------------------------


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
    pool: Any = None
    """asyncpg pool over ENCRYPTION_POSTGRES_DSN (None when it is not set)."""
    metadata: Any = None
    worker_name: str = ""

    def __repr__(self) -> str:
        return (f"<WorkerState worker={self.worker_name!r} queue={self.config.queue_name!r} "
                f"tables={sorted(self.tables)}>")

    @property
    def key_manager(self) -> KeyManager:
        return self.service.key_manager

    def tables_for(self, key_type: KeyTypeLike) -> list[TableSpec]:
        """Every registered table limited to its columns of ``key_type``."""
        kt = KeyType(key_type)
        return [t.select(key_type=kt) for t in self.tables.values()
                if any(c.key_type == kt for c in t.columns)]

    def reencryption_gap(self, key_type: KeyTypeLike) -> str | None:
        """Why this worker would not re-encrypt ``key_type`` data, or None if it would."""
        if not self.tables_for(key_type):
            return (f"no registered table has a column of key type "
                    f"{KeyType(key_type).value} (ENCRYPTION_ARQ_METADATA / ENCRYPTION_ARQ_TABLES)")
        if self.pool is None:
            return "ENCRYPTION_POSTGRES_DSN is not set"
        return None

    def database(self) -> AsyncpgDatabase:
        if self.pool is None:
            raise JobFailedError("ENCRYPTION_POSTGRES_DSN is not set: this worker cannot "
                                 "reach the data to re-encrypt or count")
        return AsyncpgDatabase(pool=self.pool, checkpoint_table=self.config.checkpoint_table)

    async def census(self) -> dict[str, int]:
        """Rows per key id over every registered column (and blind index, from metadata).

        A key of a type that no registered column uses is reported as referenced,
        so the worker never destroys it: this census cannot see its data.
        """
        db = self.database()
        try:
            usage = await ReencryptionEngine(self.key_manager, db,
                                             tables=self.tables.values()).key_usage()
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
            logger.info("census: key types %s are not stored in registered tables; their keys "
                        "are kept (confirm with `aiocrypt keys cleanup --confirm`)",
                        ", ".join(sorted(uncovered)))
        return usage

    async def _blind_index_usage(self, usage: dict[str, int]) -> set[KeyType]:
        if self.metadata is None:
            return set()
        from sqlalchemy.ext.asyncio import create_async_engine

        from aiocrypt.integrations.sqlalchemy import BlindIndex, blind_index_usage

        types = {c.type.key_type for t in self.metadata.sorted_tables for c in t.columns
                 if isinstance(c.type, BlindIndex)}
        if not types:
            return set()
        dsn = self.encryption_config.postgres_dsn or ""
        engine = create_async_engine(dsn.replace("postgres://", "postgresql://", 1)
                                     .replace("postgresql://", "postgresql+asyncpg://", 1))
        try:
            for key_id, rows in (await blind_index_usage(engine, self.metadata,
                                                         self.service)).items():
                usage[key_id] = usage.get(key_id, 0) + rows
        finally:
            await engine.dispose()
        return types


def _resolve(path: str) -> Any:
    module_name, _, attrs = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"ENCRYPTION_ARQ_METADATA: cannot import {module_name!r} "
                                 f"({exc})") from exc
    for attr in attrs.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigurationError(f"ENCRYPTION_ARQ_METADATA: {path!r} has no attribute "
                                     f"{attr!r}") from None
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
                raise ConfigurationError(f"ENCRYPTION_ARQ_TABLES: cannot read {text[1:]}: "
                                         f"{exc.strerror}") from None
        try:
            data = json.loads(text)
            items = data["tables"] if isinstance(data, dict) else data
            return [TableSpec.from_dict(item) for item in items], None
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError("ENCRYPTION_ARQ_TABLES must be a JSON list of table "
                                     f"specs (TableSpec.to_dict()): {exc}") from None
    return [], None


async def startup(ctx: dict[str, Any], config: ArqWorkerConfig | None = None) -> None:
    """Build the key manager, the asyncpg pool and the status store into ``ctx["aiocrypt"]``.

    First refuses (``ConfigurationError``) a worker whose jobs are not JSON, before
    any key is loaded: arq runs ``on_startup`` before it takes a job, so a worker
    that would unpickle one never starts.
    """
    check_worker(ctx)
    cfg = config if config is not None else ArqWorkerConfig.from_env()
    encryption_config = EncryptionConfig.from_env()
    specs, metadata = load_table_specs(cfg)
    if specs and not encryption_config.postgres_dsn:
        raise ConfigurationError("table specs are configured but ENCRYPTION_POSTGRES_DSN is "
                                 "not set: the worker could not reach the data")
    service = EncryptionService(build_key_manager(encryption_config))
    await service.start()
    pool = None
    try:
        if encryption_config.postgres_dsn:
            import asyncpg

            # min_size=0: a database that is down fails (and retries) the jobs that need
            # it, not the worker's start; rotation and cleanup need only the key store.
            pool = await asyncpg.create_pool(encryption_config.postgres_dsn, min_size=0,
                                             max_size=2 * cfg.max_jobs + 2)
    except BaseException:
        await service.close()
        raise
    state = WorkerState(
        config=cfg, encryption_config=encryption_config, service=service, redis=ctx["redis"],
        status=StatusStore(ctx["redis"], cfg.key_prefix, ttl=cfg.status_ttl),
        tables={t.name: t for t in specs}, pool=pool, metadata=metadata,
        worker_name=cfg.name_of_worker())
    ctx[STATE_KEY] = state
    logger.info("aiocrypt worker %s ready: key store %s, %d table(s) to re-encrypt%s",
                state.worker_name, service.key_manager.store.name, len(specs),
                "" if pool is not None else " (no ENCRYPTION_POSTGRES_DSN: no re-encryption)")


async def shutdown(ctx: dict[str, Any]) -> None:
    state: WorkerState | None = ctx.pop(STATE_KEY, None)
    if state is None:
        return
    try:
        if state.pool is not None:
            await asyncio.wait_for(state.pool.close(), timeout=10)
    finally:
        await state.service.close()


def _state(ctx: dict[str, Any]) -> WorkerState:
    state = ctx.get(STATE_KEY)
    if not isinstance(state, WorkerState):
        raise JobFailedError("aiocrypt's on_startup has not run in this worker: build its "
                             "settings with aiocrypt_worker_settings() or merge_into()")
    return state


# -- failures ----------------------------------------------------------------------


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass on its own (retry later) rather than need a fix."""
    if isinstance(exc, (JobFailedError, KeyStoreIntegrityError)):
        return False
    if isinstance(exc, ShardIncompleteError):
        return True
    if isinstance(exc, KeyStoreError):  # unreachable, lock timeout, lost write race
        return True
    if isinstance(exc, KekProviderError):
        return exc.retryable
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    module = type(exc).__module__
    if module.startswith("asyncpg"):
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate is None:  # InterfaceError: the connection went away under us
            return True
        # connection, transaction rollback (deadlock, serialization), resources,
        # operator intervention (shutdown), system error, lock not available
        return str(sqlstate)[:2] in ("08", "40", "53", "57", "58") or sqlstate == "55P03"
    if module.startswith("redis"):
        return type(exc).__name__ in ("ConnectionError", "TimeoutError", "BusyLoadingError")
    return False


def describe(exc: BaseException) -> str:
    """A one-line reason naming what failed (identifiers only)."""
    detail = f"{type(exc).__name__}: {str(exc)[:300]}".rstrip(": ")
    module = type(exc).__module__
    if isinstance(exc, KeyStoreError):
        return f"the key store failed ({detail})"
    if isinstance(exc, KekProviderError):
        return f"the KEK provider failed ({detail})"
    if isinstance(exc, ReencryptionError):
        return (f"{exc.table}.{exc.column}: the value of the row with primary key "
                f"{exc.primary_key!r} does not decrypt; fix or remove it, then enqueue the "
                "re-encryption again")
    if module.startswith("asyncpg"):
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        if sqlstate in ("42P01", "42703"):
            return f"a table or column is missing in the database ({detail})"
        return f"the database failed ({detail})"
    if module.startswith("redis"):
        return f"Redis failed ({detail})"
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return f"a connection failed ({detail})"
    return detail


async def _guarded(ctx: dict[str, Any], state: WorkerState, what: str,
                   work: Callable[[], Awaitable[dict[str, Any]]], *,
                   on_retry: Callable[[str, float], Awaitable[None]] | None = None,
                   on_failure: Callable[[str], Awaitable[None]] | None = None) -> dict[str, Any]:
    """Run ``work``; retry what may pass (bounded), fail clearly on anything else.

    The keyring is reloaded first: another worker may have rotated a key a moment
    ago, and this one must not plan or re-encrypt against an older active key.
    """
    try:
        await state.key_manager.refresh(force=True)
        return await work()
    except (Retry, asyncio.CancelledError):
        raise
    except Exception as exc:
        job_try = int(ctx.get("job_try") or 1)
        max_tries = state.config.max_tries
        reason = exc.args[0] if isinstance(exc, JobFailedError) and exc.args else describe(exc)
        if is_transient(exc) and job_try < max_tries:
            defer = state.config.retry_defer(job_try)
            logger.warning("%s: try %d of %d failed: %s; retrying in %.1f s", what, job_try,
                           max_tries, reason, defer)
            if on_retry is not None:
                await on_retry(reason, defer)
            raise Retry(defer=defer) from exc
        message = (f"{what}: gave up after {job_try} tries: {reason}" if is_transient(exc)
                   else f"{what}: cannot proceed: {reason}")
        logger.error("%s", message)
        if on_failure is not None:
            await on_failure(message)
        raise JobFailedError(message) from exc


def _key_type(value: KeyTypeLike) -> KeyType:
    try:
        return KeyType(value)
    except ValueError as exc:
        raise JobFailedError(f"unknown key type {value!r}: {exc}") from None


# -- enqueueing (also used from outside the worker) ---------------------------------


def reencryption_job_id(old_key_id: str) -> str:
    """The status id of the re-encryption of ``old_key_id``'s data (one per old key)."""
    return f"reencrypt-{old_key_id}"


def shard_job_id(config: ArqWorkerConfig, job_id: str, index: int) -> str:
    """The arq job id of one shard, also its checkpoint id: the same on every enqueue."""
    return config.job_id(job_id, str(index))


async def enqueue_reencryption(redis: Any, key_type: KeyTypeLike, old_key_id: str, *,
                               config: ArqWorkerConfig | None = None,
                               batch_size: int | None = None, shards: int | None = None,
                               queue_name: str | None = None) -> str:
    """Enqueue the re-encryption of ``old_key_id``'s data; return its status id.

    Idempotent: the arq job id is fixed per old key, so while one run is queued or
    running, enqueueing again joins it. A finished run's stored result is dropped
    first so a new run happens (it reuses the plan and skips shards already done).
    """
    check_pool(redis)
    cfg = config if config is not None else ArqWorkerConfig.from_env()
    job_id = reencryption_job_id(old_key_id)
    arq_id = cfg.job_id(job_id)
    if not await redis.exists(job_key_prefix + arq_id):
        await redis.delete(result_key_prefix + arq_id)
    await redis.enqueue_job("reencrypt_data_with_new_key", KeyType(key_type).value, old_key_id,
                            batch_size or cfg.batch_size, shards, _job_id=arq_id,
                            _queue_name=queue_name)
    return job_id


async def _enqueue_follow_up(state: WorkerState, key_type: KeyType,
                             old_key_id: str) -> dict[str, str]:
    gap = state.reencryption_gap(key_type)
    if gap is not None:
        logger.info("data on %s is not re-encrypted by this worker: %s", old_key_id, gap)
        return {"old_key_id": old_key_id, "skipped": gap}
    job_id = await enqueue_reencryption(state.redis, key_type, old_key_id, config=state.config)
    return {"old_key_id": old_key_id, "job_id": job_id}


# -- rotation ----------------------------------------------------------------------


async def rotate_keys_scheduled(ctx: dict[str, Any]) -> dict[str, Any]:
    """Rotate every key its policy says is due; re-encrypt the data of rotated and
    compromised keys. Single-flight: a second worker running it at once skips."""
    state = _state(ctx)
    cfg = state.config

    async def work() -> dict[str, Any]:
        async with redis_lock(state.redis, f"{cfg.key_prefix}:job-lock:rotation",
                              ttl=cfg.job_timeout, owner=state.worker_name) as lock:
            if not lock.acquired:
                logger.info("rotation check skipped: %s is running it", lock.holder)
                return {"skipped": f"another worker ({lock.holder}) is running the check"}
            report = await state.key_manager.rotate_keys_due()
            follow_ups = []
            for key_id in report["reencrypt"]:
                key = await state.key_manager.get_key(key_id)
                follow_ups.append(await _enqueue_follow_up(state, key.key_type, key_id))
            for item in report["rotated"]:
                logger.info("rotated %s: %s -> %s (%s)", item["key_type"], item["old_key_id"],
                            item["new_key_id"], item["reason"])
            return {**report, "reencryption": follow_ups, "worker": state.worker_name}

    return await _guarded(ctx, state, "rotate_keys_scheduled", work)


async def rotate_key_manual(ctx: dict[str, Any], key_type: str,
                            force: bool = False) -> dict[str, Any]:
    """Rotate ``key_type`` now if due by policy, or always with ``force``; then enqueue
    the re-encryption of the data on the key it replaced."""
    state = _state(ctx)

    async def work() -> dict[str, Any]:
        kt = _key_type(key_type)
        manager = state.key_manager
        before = manager.keyring.active_keys.get(kt)
        old_id = None if before is None else before.key_id
        after = await manager.rotate_key(kt, force=force)
        result: dict[str, Any] = {"key_type": kt.value, "old_key_id": old_id,
                                  "new_key_id": after.key_id,
                                  "rotated": old_id is not None and after.key_id != old_id,
                                  "worker": state.worker_name}
        if result["rotated"]:
            assert old_id is not None
            logger.info("rotated %s: %s -> %s (manual%s)", kt.value, old_id, after.key_id,
                        ", forced" if force else "")
            result["reencryption"] = await _enqueue_follow_up(state, kt, old_id)
        return result

    return await _guarded(ctx, state, f"rotate_key_manual({key_type})", work)


# -- re-encryption -------------------------------------------------------------------


def _count_sql(spec: TableSpec, bounds: int) -> str:
    """Rows still to move per shard: ``bounds`` inner boundaries make ``bounds + 1`` counts.

    Every column of ``spec`` has the same key type, hence one target prefix ($1).
    """
    tbl, pk = quote_identifier(spec.name), quote_identifier(spec.primary_key)
    counts = []
    for i in range(bounds + 1):
        parts = []
        if i > 0:
            parts.append(f"{pk} > ${i + 1}")
        if i < bounds:
            parts.append(f"{pk} <= ${i + 2}")
        counts.append(f"count(*) FILTER (WHERE {' AND '.join(parts)})" if parts else "count(*)")
    condition = pending_condition(spec, ["$1"] * len(spec.columns))
    return f"SELECT {', '.join(counts)} FROM {tbl} WHERE {condition}"  # noqa: S608


async def _pending_rows(state: WorkerState, spec: TableSpec, target: str,
                        ranges: Sequence[KeyRange]) -> list[int]:
    bounds = [r.until for r in ranges[:-1]]
    async with state.pool.acquire() as conn:
        row = await conn.fetchrow(_count_sql(spec, len(bounds)), text_prefix(target), *bounds)
    return [int(n) for n in row]


async def _plan(state: WorkerState, kt: KeyType, old_key_id: str, batch_size: int,
                shards: int | None, job_id: str) -> dict[str, Any]:
    cfg = state.config
    manager = state.key_manager
    keyring = await manager.ensure_active([kt])
    target = keyring.active(kt).key_id
    if target == old_key_id:
        raise JobFailedError(f"key {old_key_id} is still the active {kt.value} key: rotate "
                             "it first (rotate_key_manual), then re-encrypt its data")
    plan: list[dict[str, Any]] = []
    specs = state.tables_for(kt)
    if specs:
        db = state.database()
        engine = ReencryptionEngine(manager, db, tables=specs)
        try:
            for spec in specs:
                count = max(1, shards or cfg.shards)
                ranges = await engine.plan_shards(spec, count)
                rows = await _pending_rows(state, spec, target, ranges)
                needed = math.ceil(sum(rows) / cfg.max_shard_rows)
                if needed > count:  # bigger than planned for: more, smaller shards
                    ranges = await engine.plan_shards(spec, needed)
                    rows = await _pending_rows(state, spec, target, ranges)
                for key_range, pending in zip(ranges, rows, strict=True):
                    plan.append({"index": len(plan), "table": spec.name,
                                 "after": key_range.after, "until": key_range.until,
                                 "rows_total": pending})
        finally:
            await db.close()
    return {"kind": "reencrypt", "job_id": job_id, "key_type": kt.value,
            "old_key_id": old_key_id, "target_key_id": target, "batch_size": batch_size,
            "created_at": now_iso(), "planned_by": state.worker_name, "plan": plan}


async def reencrypt_data_with_new_key(ctx: dict[str, Any], key_type: str, old_key_id: str,
                                      batch_size: int = 1000,
                                      shards: int | None = None) -> dict[str, Any]:
    """Plan the re-encryption of ``key_type`` data off ``old_key_id`` as primary-key
    shards of every registered table and enqueue one job per shard, so that every
    worker on the queue takes a share. Idempotent: the plan is made once and kept in
    the status record; shards already done are not enqueued again."""
    state = _state(ctx)
    job_id = reencryption_job_id(old_key_id)
    status = state.status

    async def fail(message: str) -> None:
        if await status.meta(job_id) is None:  # failed before planning: say so anyway
            await status.create(job_id, {"kind": "reencrypt", "job_id": job_id,
                                         "key_type": str(key_type), "old_key_id": old_key_id,
                                         "target_key_id": None, "created_at": now_iso(),
                                         "plan": [], "unplanned": True})
        await status.put(job_id, "error", message)

    async def work() -> dict[str, Any]:
        kt = _key_type(key_type)
        key = await state.key_manager.get_key(old_key_id)
        if key.key_type != kt:
            raise JobFailedError(f"key {old_key_id} is a {key.key_type.value} key, not "
                                 f"{kt.value}")
        meta = await status.meta(job_id)
        if meta is None or meta.get("unplanned"):
            plan = await _plan(state, kt, old_key_id, batch_size, shards, job_id)
            if meta is not None:  # the record of an earlier failure before planning
                await status.delete(job_id)
            meta = await status.create(job_id, plan)
        enqueued = []
        for item in meta["plan"]:
            shard = await status.shard(job_id, item["index"])
            if shard is not None and shard.state == "done":
                continue
            arq_id = shard_job_id(state.config, job_id, item["index"])
            if shard is not None and shard.state == "failed":
                await state.redis.delete(result_key_prefix + arq_id)  # allow the new try
                await status.put_shard(job_id, dataclasses.replace(shard, state="queued",
                                                                   error=None))
            job = await state.redis.enqueue_job(
                "reencrypt_shard", job_id, meta["key_type"], item["table"], item["index"],
                item["after"], item["until"], meta.get("batch_size", batch_size),
                _job_id=arq_id)
            if job is not None:
                enqueued.append(arq_id)
        logger.info("re-encryption %s: %d shard(s) planned, %d enqueued, %d rows to move",
                    job_id, len(meta["plan"]), len(enqueued),
                    sum(i["rows_total"] for i in meta["plan"]))
        if not meta["plan"]:
            await _finish(state, job_id, meta)
        return {"job_id": job_id, "target_key_id": meta["target_key_id"],
                "shards": len(meta["plan"]), "enqueued": enqueued,
                "rows_total": sum(i["rows_total"] for i in meta["plan"])}

    return await _guarded(ctx, state, f"reencrypt_data_with_new_key({old_key_id})", work,
                          on_failure=fail)


async def _finish(state: WorkerState, job_id: str, meta: dict[str, Any]) -> None:
    """After the last shard: count what is left on the old key (the census).

    Rows can land on the old key after its shard went past them: a process that had
    not yet seen the rotation wrote them. Then the shards run again (a cheap pass
    reading only such rows), after ``sweep_delay`` seconds, up to three times.
    """
    status = await state.status.read(job_id)
    if status is None or not all(s.state == "done" for s in status.shards):
        return
    tables = [state.tables[name] for name in {i["table"] for i in meta["plan"]}
              if name in state.tables]
    left = 0
    if tables:
        db = state.database()
        try:
            usage = await ReencryptionEngine(state.key_manager, db,
                                             tables=tables).key_usage()
        finally:
            await db.close()
        left = usage.get(meta["old_key_id"], 0)
    sweeps = int((status.result or {}).get("sweeps", 0))
    if left and sweeps < _MAX_SWEEPS:
        logger.warning("re-encryption %s: %d row(s) were written on %s after their shard "
                       "passed; sweeping again in %.0f s", job_id, left, meta["old_key_id"],
                       state.config.sweep_delay)
        await state.status.put(job_id, "result", {"old_key_rows": left, "sweeps": sweeps + 1,
                                                  "sweep_at": now_iso()})
        for shard in status.shards:
            arq_id = shard_job_id(state.config, job_id, shard.index)
            await state.redis.delete(result_key_prefix + arq_id)
            await state.status.put_shard(job_id, dataclasses.replace(shard, state="queued"))
            await state.redis.enqueue_job(
                "reencrypt_shard", job_id, meta["key_type"], shard.table, shard.index,
                shard.after, shard.until, meta.get("batch_size", state.config.batch_size),
                _job_id=arq_id, _defer_by=state.config.sweep_delay)
        return
    await state.status.put(job_id, "result", {"old_key_rows": left, "sweeps": sweeps,
                                              "finished_at": now_iso(),
                                              "finished_by": state.worker_name})
    log = logger.warning if left else logger.info
    log("re-encryption %s finished: %d row(s) left on %s", job_id, left, meta["old_key_id"])


async def reencrypt_shard(ctx: dict[str, Any], job_id: str, key_type: str, table: str,
                          index: int, after: Any, until: Any,
                          batch_size: int = 1000) -> dict[str, Any]:
    """Re-encrypt one primary-key range (``after < pk <= until``) of one table.

    Resumes from the shard's checkpoint (its id is the arq job id), so a retry
    after a crash or an error continues after the last committed batch.
    """
    state = _state(ctx)
    cfg = state.config
    status = state.status
    job_try = int(ctx.get("job_try") or 1)
    checkpoint_id = shard_job_id(cfg, job_id, index)
    what = f"reencrypt_shard({job_id}#{index}, {table})"
    current = (await status.shard(job_id, index)
               or ShardStatus(index, table, after, until, rows_total=0))

    async def save(**changes: Any) -> None:
        nonlocal current
        attempt_changes = changes.pop("attempt", None)
        shard = dataclasses.replace(current, **changes, updated_at=now_iso(),
                                    updated_ts=time.time())
        if attempt_changes is not None:
            attempts = list(shard.attempts)
            attempts[-1] = {**attempts[-1], **attempt_changes}
            shard = dataclasses.replace(shard, attempts=tuple(attempts))
        current = shard
        await status.put_shard(job_id, shard)

    async def on_retry(reason: str, defer: float) -> None:
        await save(state="retrying", error=reason,
                   attempt={"outcome": f"retry in {defer:.1f} s: {reason}",
                            "ended_at": now_iso()})

    async def on_failure(message: str) -> None:
        await save(state="failed", error=message,
                   attempt={"outcome": "failed", "ended_at": now_iso()})

    async def work() -> dict[str, Any]:
        kt = _key_type(key_type)
        spec = state.tables.get(table)
        if spec is None:
            raise JobFailedError(f"table {table!r} is not registered in this worker "
                                 "(ENCRYPTION_ARQ_METADATA / ENCRYPTION_ARQ_TABLES)")
        meta = await status.meta(job_id) or {}
        await _require_target(state, kt, meta.get("target_key_id"))
        db = state.database()
        try:
            checkpoint = await db.load_checkpoint(checkpoint_id)
            resumed_from = (checkpoint.last_pk if checkpoint is not None and not checkpoint.done
                            else None)
            attempts = [dict(a, outcome="interrupted (worker lost)")
                        if a.get("outcome") == "running" else a for a in current.attempts]
            attempts.append({"try": job_try, "worker": state.worker_name,
                             "started_at": now_iso(), "resumed_from": resumed_from,
                             "outcome": "running"})
            await save(state="running", worker=state.worker_name, tries=job_try, error=None,
                       started_at=current.started_at or now_iso(), attempts=tuple(attempts))
            last_write = 0.0

            async def progress(p: ReencryptionProgress) -> None:
                nonlocal last_write
                now = time.monotonic()
                if now - last_write < _PROGRESS_EVERY:
                    return
                last_write = now
                await save(rows_done=p.rows_updated + p.rows_conflicted + p.rows_failed,
                           rows_updated=p.rows_updated, rows_conflicted=p.rows_conflicted,
                           rows_failed=p.rows_failed, rate=round(p.rows_per_second, 1))

            engine = ReencryptionEngine(state.key_manager, db, tables=[spec],
                                        batch_size=batch_size, rate_limit=cfg.rate_limit,
                                        progress=progress)
            result = await _run_shard(engine, spec, kt, KeyRange(after, until), checkpoint_id)
        finally:
            await db.close()
        cp = result.checkpoint
        counters = {"rows_done": cp.rows_updated + cp.rows_conflicted + cp.rows_failed,
                    "rows_updated": cp.rows_updated, "rows_conflicted": cp.rows_conflicted,
                    "rows_failed": cp.rows_failed}
        if not result.complete:
            await save(**counters)
            raise ShardIncompleteError(f"rows were still left after {result.passes} passes "
                                       "(concurrent writes keep adding old tokens)")
        await save(state="done", finished_at=now_iso(), rate=round(result.rows_per_second, 1),
                   **counters, attempt={"outcome": "done", "ended_at": now_iso(),
                                        "rows_updated": result.run_rows_updated})
        if meta:
            await _finish(state, job_id, meta)
        return {"job_id": job_id, "shard": index, "table": table,
                "rows_updated": result.run_rows_updated, "worker": state.worker_name}

    started = time.monotonic()
    try:
        return await _guarded(ctx, state, what, work, on_retry=on_retry,
                              on_failure=on_failure)
    except asyncio.CancelledError:
        # arq cancels a job at its timeout (and fails it) or when the worker stops (and
        # runs it again later): say which in the record, then let the cancel through.
        if time.monotonic() - started >= cfg.job_timeout - 1:
            message = (f"{what}: stopped by arq at the job timeout ({cfg.job_timeout:.0f} s, "
                       "ENCRYPTION_ARQ_JOB_TIMEOUT): use more shards or a longer timeout, "
                       "then enqueue the re-encryption again to resume")
            logger.error("%s", message)
            changes: dict[str, Any] = {"state": "failed", "error": message, "attempt": {
                "outcome": "stopped at the job timeout", "ended_at": now_iso()}}
        else:
            changes = {"state": "queued", "attempt": {
                "outcome": "interrupted (worker stopped)", "ended_at": now_iso()}}
        with contextlib.suppress(Exception):
            await save(**changes)
        raise


async def _require_target(state: WorkerState, kt: KeyType, target_key_id: str | None) -> None:
    """Refuse to run against an active key older than the planned target (a store
    that has not caught up): moving rows back onto an old key would undo work."""
    if target_key_id is None:
        return
    dk = await state.key_manager.load_key(target_key_id)
    active = state.key_manager.keyring.active_keys.get(kt)
    if dk is None or active is None or active.key.version < dk.key.version:
        raise ShardIncompleteError(f"this worker does not see the target key "
                                   f"{target_key_id} as active yet")


class ShardIncompleteError(AiocryptError):
    """A shard's passes left rows behind (concurrent writers): worth another try later."""


async def _run_shard(engine: ReencryptionEngine, spec: TableSpec, kt: KeyType,
                     key_range: KeyRange, checkpoint_id: str) -> ReencryptionResult:
    for _ in range(_MAX_TARGET_CHANGES):
        result = await engine.reencrypt(spec, key_type=kt, shard=key_range,
                                        job_id=checkpoint_id)
        if not result.target_changed:
            return result
        logger.info("%s: the %s key rotated during the run; continuing onto the new one",
                    checkpoint_id, kt.value)
    return result


# -- cleanup -------------------------------------------------------------------------


async def cleanup_expired_keys(ctx: dict[str, Any]) -> dict[str, Any]:
    """Destroy keys past max age + grace that the census says no row uses any more."""
    state = _state(ctx)
    cfg = state.config

    async def work() -> dict[str, Any]:
        async with redis_lock(state.redis, f"{cfg.key_prefix}:job-lock:cleanup",
                              ttl=cfg.job_timeout, owner=state.worker_name) as lock:
            if not lock.acquired:
                return {"skipped": f"another worker ({lock.holder}) is running the cleanup"}
            census = state.census if state.pool is not None and state.tables else None
            report = await state.key_manager.cleanup_report(census=census)
            for item in report["destroyed"]:
                logger.warning("key %s destroyed: %s", item["key_id"], item["reason"])
            return {**report, "census": census is not None, "worker": state.worker_name}

    return await _guarded(ctx, state, "cleanup_expired_keys", work)
