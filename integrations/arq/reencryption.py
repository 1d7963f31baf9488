"""Sharded re-encryption on ARQ workers: plan the shards, run each, count what is left.

``reencrypt_data_with_new_key`` plans primary-key shards of every registered table
(a :class:`ReencryptionPlan`, kept in the status record) and enqueues one
``reencrypt_shard`` job per shard (a :class:`ShardJob`), so every worker on the
queue takes a share; the last shard to finish runs the census of the old key.

Plans and job arguments (:mod:`.plans`) are identifiers, primary-key bounds and
counts, checked field by field when read back from Redis.

Just over 500 lines: planning, the shard job and the last shard's census are
one protocol over the status record; the plans themselves are in ``plans``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Final

from arq.constants import job_key_prefix, result_key_prefix

from aiocrypt import KeyType
from aiocrypt.adapters import KeyTypeLike, text_prefix
from aiocrypt.reencrypt import (
    KeyRange,
    PendingRowsDatabase,
    ReencryptionEngine,
    ReencryptionProgress,
    ReencryptionResult,
    TableSpec,
)

from .codec import check_pool
from .config import ArqWorkerConfig
from .failures import JobFailedError, ShardIncompleteError, guarded, job_key_type
from .plans import ReencryptionPlan, ShardJob, ShardPlan, count, typed
from .state import WorkerState, worker_state
from .status import ShardStatus, now_iso

__all__ = [
    "ReencryptionPlan",
    "ShardJob",
    "ShardPlan",
    "enqueue_reencryption",
    "reencrypt_data_with_new_key",
    "reencrypt_shard",
    "reencryption_job_id",
    "shard_job_id",
]

logger = logging.getLogger("aiocrypt.arq")

_PROGRESS_EVERY: Final = 0.5  # seconds between status writes while a shard runs
_MAX_TARGET_CHANGES: Final = 3
_MAX_SWEEPS: Final = 3


# -- enqueueing (also used from outside the worker) -----------------------------------


def reencryption_job_id(old_key_id: str) -> str:
    """The status id of the re-encryption of ``old_key_id``'s data (one per old key)."""
    return f"reencrypt-{old_key_id}"


def shard_job_id(config: ArqWorkerConfig, job_id: str, index: int) -> str:
    """The arq job id of one shard, also its checkpoint id: the same on every enqueue."""
    return config.job_id(job_id, str(index))


async def enqueue_reencryption(
    redis: Any,
    key_type: KeyTypeLike,
    old_key_id: str,
    *,
    config: ArqWorkerConfig | None = None,
    batch_size: int | None = None,
    shards: int | None = None,
    queue_name: str | None = None,
) -> str:
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
    await redis.enqueue_job(
        "reencrypt_data_with_new_key",
        KeyType(key_type).value,
        old_key_id,
        batch_size or cfg.batch_size,
        shards,
        _job_id=arq_id,
        _queue_name=queue_name,
    )
    return job_id


async def _enqueue_shard(
    state: WorkerState, job: ShardJob, *, defer_by: float | None = None
) -> bool:
    arq_id = shard_job_id(state.config, job.job_id, job.index)
    enqueued = await state.redis.enqueue_job(
        "reencrypt_shard", *job.to_args(), _job_id=arq_id, _defer_by=defer_by
    )
    return enqueued is not None


# -- planning -------------------------------------------------------------------------


async def _pending_rows(
    db: PendingRowsDatabase, spec: TableSpec, target: str, ranges: Sequence[KeyRange]
) -> list[int]:
    """Rows still to move per range (every column of ``spec`` has the same key type)."""
    prefix = text_prefix(target)
    return await db.count_pending(
        spec, [prefix] * len(spec.columns), [r.until for r in ranges[:-1]]
    )


async def _plan(
    state: WorkerState,
    kt: KeyType,
    old_key_id: str,
    batch_size: int,
    shards: int | None,
    job_id: str,
) -> ReencryptionPlan:
    cfg = state.config
    manager = state.key_manager
    keyring = await manager.ensure_active([kt])
    target = keyring.active(kt).key_id
    if target == old_key_id:
        raise JobFailedError(
            f"key {old_key_id} is still the active {kt.value} key: rotate "
            "it first (rotate_key_manual), then re-encrypt its data"
        )
    plan: list[ShardPlan] = []
    specs = state.tables_for(kt)
    if specs:
        db = state.database()
        engine = ReencryptionEngine(manager, db, tables=specs)
        try:
            for spec in specs:
                wanted = max(1, shards or cfg.shards)
                ranges = await engine.plan_shards(spec, wanted)
                rows = await _pending_rows(db, spec, target, ranges)
                needed = math.ceil(sum(rows) / cfg.max_shard_rows)
                if needed > wanted:  # bigger than planned for: more, smaller shards
                    ranges = await engine.plan_shards(spec, needed)
                    rows = await _pending_rows(db, spec, target, ranges)
                for key_range, pending in zip(ranges, rows, strict=True):
                    plan.append(
                        ShardPlan(len(plan), spec.name, key_range.after, key_range.until, pending)
                    )
        finally:
            await db.close()
    return ReencryptionPlan(
        job_id=job_id,
        key_type=kt.value,
        old_key_id=old_key_id,
        target_key_id=target,
        batch_size=batch_size,
        created_at=now_iso(),
        planned_by=state.worker_name,
        shards=tuple(plan),
    )


async def reencrypt_data_with_new_key(
    ctx: dict[str, Any],
    key_type: str,
    old_key_id: str,
    batch_size: int = 1000,
    shards: int | None = None,
) -> dict[str, Any]:
    """Plan the re-encryption of ``key_type`` data off ``old_key_id`` as primary-key
    shards of every registered table and enqueue one job per shard, so that every
    worker on the queue takes a share. Idempotent: the plan is made once and kept in
    the status record; shards already done are not enqueued again."""
    state = worker_state(ctx)
    job_id = reencryption_job_id(old_key_id)
    status = state.status

    async def fail(message: str) -> None:
        if await status.meta(job_id) is None:  # failed before planning: say so anyway
            await status.create(
                job_id,
                ReencryptionPlan(
                    job_id=job_id,
                    key_type=str(key_type),
                    old_key_id=str(old_key_id),
                    target_key_id=None,
                    created_at=now_iso(),
                    unplanned=True,
                ).to_dict(),
            )
        await status.put(job_id, "error", message)

    async def work() -> dict[str, Any]:
        kt = job_key_type(key_type)
        typed(old_key_id, str, "reencrypt_data_with_new_key's old key")
        size = count(batch_size, "reencrypt_data_with_new_key's batch size", minimum=1)
        per_table = (
            None
            if shards is None
            else count(shards, "reencrypt_data_with_new_key's shards", minimum=1)
        )
        key = await state.key_manager.get_key(old_key_id)
        if key.key_type != kt:
            raise JobFailedError(f"key {old_key_id} is a {key.key_type.value} key, not {kt.value}")
        stored = await status.meta(job_id)
        plan = None if stored is None else ReencryptionPlan.from_dict(stored)
        if plan is None or plan.unplanned:
            made = await _plan(state, kt, old_key_id, size, per_table, job_id)
            if plan is not None:  # the record of an earlier failure before planning
                await status.delete(job_id)
            plan = ReencryptionPlan.from_dict(await status.create(job_id, made.to_dict()))
        enqueued = []
        for item in plan.shards:
            shard = await status.shard(job_id, item.index)
            if shard is not None and shard.state == "done":
                continue
            arq_id = shard_job_id(state.config, job_id, item.index)
            if shard is not None and shard.state == "failed":
                await state.redis.delete(result_key_prefix + arq_id)  # allow the new try
                await status.put_shard(
                    job_id, dataclasses.replace(shard, state="queued", error=None)
                )
            if await _enqueue_shard(state, plan.shard_job(item, size)):
                enqueued.append(arq_id)
        logger.info(
            "re-encryption %s: %d shard(s) planned, %d enqueued, %d rows to move",
            job_id,
            len(plan.shards),
            len(enqueued),
            plan.rows_total,
        )
        if not plan.shards:
            await _finish(state, plan)
        return {
            "job_id": job_id,
            "target_key_id": plan.target_key_id,
            "shards": len(plan.shards),
            "enqueued": enqueued,
            "rows_total": plan.rows_total,
        }

    return await guarded(
        ctx, state, f"reencrypt_data_with_new_key({old_key_id})", work, on_failure=fail
    )


async def _finish(state: WorkerState, plan: ReencryptionPlan) -> None:
    """After the last shard: count what is left on the old key (the census).

    Rows can land on the old key after its shard went past them: a process that had
    not yet seen the rotation wrote them. Then the shards run again (a cheap pass
    reading only such rows), after ``sweep_delay`` seconds, up to three times.
    """
    job_id = plan.job_id
    status = await state.status.read(job_id)
    if status is None or not all(s.state == "done" for s in status.shards):
        return
    tables = [state.tables[name] for name in {s.table for s in plan.shards} if name in state.tables]
    left = 0
    if tables:
        db = state.database()
        try:
            usage = await ReencryptionEngine(state.key_manager, db, tables=tables).key_usage()
        finally:
            await db.close()
        left = usage.get(plan.old_key_id, 0)
    sweeps = int((status.result or {}).get("sweeps", 0))
    if left and sweeps < _MAX_SWEEPS:
        logger.warning(
            "re-encryption %s: %d row(s) were written on %s after their shard "
            "passed; sweeping again in %.0f s",
            job_id,
            left,
            plan.old_key_id,
            state.config.sweep_delay,
        )
        await state.status.put(
            job_id, "result", {"old_key_rows": left, "sweeps": sweeps + 1, "sweep_at": now_iso()}
        )
        for shard in status.shards:
            arq_id = shard_job_id(state.config, job_id, shard.index)
            await state.redis.delete(result_key_prefix + arq_id)
            await state.status.put_shard(job_id, dataclasses.replace(shard, state="queued"))
            again = ShardPlan(shard.index, shard.table, shard.after, shard.until, 0)
            await _enqueue_shard(
                state,
                plan.shard_job(again, state.config.batch_size),
                defer_by=state.config.sweep_delay,
            )
        return
    await state.status.put(
        job_id,
        "result",
        {
            "old_key_rows": left,
            "sweeps": sweeps,
            "finished_at": now_iso(),
            "finished_by": state.worker_name,
        },
    )
    log = logger.warning if left else logger.info
    log("re-encryption %s finished: %d row(s) left on %s", job_id, left, plan.old_key_id)


# -- one shard ------------------------------------------------------------------------


async def reencrypt_shard(  # noqa: C901 - the ARQ job's body: lock, plan, run, record, each outcome handled where it happens
    ctx: dict[str, Any],
    job_id: str,
    key_type: str,
    table: str,
    index: int,
    after: Any,
    until: Any,
    batch_size: int = 1000,
) -> dict[str, Any]:
    """Re-encrypt one primary-key range (``after < pk <= until``) of one table.

    Resumes from the shard's checkpoint (its id is the arq job id), so a retry
    after a crash or an error continues after the last committed batch.
    """
    state = worker_state(ctx)
    job = ShardJob.from_args(job_id, key_type, table, index, after, until, batch_size)
    cfg = state.config
    status = state.status
    job_try = int(ctx.get("job_try") or 1)
    checkpoint_id = shard_job_id(cfg, job.job_id, job.index)
    what = f"reencrypt_shard({job.job_id}#{job.index}, {job.table})"
    current = await status.shard(job.job_id, job.index) or ShardStatus(
        job.index, job.table, job.after, job.until, rows_total=0
    )

    async def save(**changes: Any) -> None:
        nonlocal current
        attempt_changes = changes.pop("attempt", None)
        shard = dataclasses.replace(
            current, **changes, updated_at=now_iso(), updated_ts=time.time()
        )
        if attempt_changes is not None:
            attempts = list(shard.attempts)
            last = attempts[-1] if attempts else {}
            if last.get("try") == job_try and last.get("outcome") == "running":
                attempts[-1] = {**last, **attempt_changes}
            else:  # this try ended before it started running: its own record
                attempts.append({"try": job_try, "worker": state.worker_name, **attempt_changes})
            shard = dataclasses.replace(shard, attempts=tuple(attempts))
        current = shard
        await status.put_shard(job.job_id, shard)

    async def on_retry(reason: str, defer: float) -> None:
        await save(
            state="retrying",
            error=reason,
            attempt={"outcome": f"retry in {defer:.1f} s: {reason}", "ended_at": now_iso()},
        )

    async def on_failure(message: str) -> None:
        await save(
            state="failed", error=message, attempt={"outcome": "failed", "ended_at": now_iso()}
        )

    async def work() -> dict[str, Any]:
        kt = job_key_type(job.key_type)
        spec = state.tables.get(job.table)
        if spec is None:
            raise JobFailedError(
                f"table {job.table!r} is not registered in this worker "
                "(ENCRYPTION_ARQ_METADATA / ENCRYPTION_ARQ_TABLES)"
            )
        stored = await status.meta(job.job_id)
        plan = ReencryptionPlan.from_dict(stored) if stored else None
        await _require_target(state, kt, None if plan is None else plan.target_key_id)
        db = state.database()
        try:
            checkpoint = await db.load_checkpoint(checkpoint_id)
            resumed_from = (
                checkpoint.last_pk if checkpoint is not None and not checkpoint.done else None
            )
            attempts = [
                dict(a, outcome="interrupted (worker lost)") if a.get("outcome") == "running" else a
                for a in current.attempts
            ]
            attempts.append(
                {
                    "try": job_try,
                    "worker": state.worker_name,
                    "started_at": now_iso(),
                    "resumed_from": resumed_from,
                    "outcome": "running",
                }
            )
            await save(
                state="running",
                worker=state.worker_name,
                tries=job_try,
                error=None,
                started_at=current.started_at or now_iso(),
                attempts=tuple(attempts),
            )
            last_write = 0.0

            async def progress(p: ReencryptionProgress) -> None:
                nonlocal last_write
                now = time.monotonic()
                if now - last_write < _PROGRESS_EVERY:
                    return
                last_write = now
                await save(
                    rows_done=p.rows_updated + p.rows_conflicted + p.rows_failed,
                    rows_updated=p.rows_updated,
                    rows_conflicted=p.rows_conflicted,
                    rows_failed=p.rows_failed,
                    rate=round(p.rows_per_second, 1),
                )

            engine = ReencryptionEngine(
                state.key_manager,
                db,
                tables=[spec],
                batch_size=job.batch_size,
                rate_limit=cfg.rate_limit,
                progress=progress,
            )
            result = await _run_shard(
                engine, spec, kt, KeyRange(job.after, job.until), checkpoint_id
            )
        finally:
            await db.close()
        cp = result.checkpoint
        counters = {
            "rows_done": cp.rows_updated + cp.rows_conflicted + cp.rows_failed,
            "rows_updated": cp.rows_updated,
            "rows_conflicted": cp.rows_conflicted,
            "rows_failed": cp.rows_failed,
        }
        if not result.complete:
            await save(**counters)
            raise ShardIncompleteError(
                f"rows were still left after {result.passes} passes "
                "(concurrent writes keep adding old tokens)"
            )
        await save(
            state="done",
            finished_at=now_iso(),
            rate=round(result.rows_per_second, 1),
            **counters,
            attempt={
                "outcome": "done",
                "ended_at": now_iso(),
                "rows_updated": result.run_rows_updated,
            },
        )
        if plan is not None:
            await _finish(state, plan)
        return {
            "job_id": job.job_id,
            "shard": job.index,
            "table": job.table,
            "rows_updated": result.run_rows_updated,
            "worker": state.worker_name,
        }

    started = time.monotonic()
    try:
        return await guarded(ctx, state, what, work, on_retry=on_retry, on_failure=on_failure)
    except asyncio.CancelledError:
        # arq cancels a job at its timeout (and fails it) or when the worker stops (and
        # runs it again later): say which in the record, then let the cancel through.
        if time.monotonic() - started >= cfg.job_timeout - 1:
            message = (
                f"{what}: stopped by arq at the job timeout ({cfg.job_timeout:.0f} s, "
                "ENCRYPTION_ARQ_JOB_TIMEOUT): use more shards or a longer timeout, "
                "then enqueue the re-encryption again to resume"
            )
            logger.error("%s", message)
            changes: dict[str, Any] = {
                "state": "failed",
                "error": message,
                "attempt": {"outcome": "stopped at the job timeout", "ended_at": now_iso()},
            }
        else:
            changes = {
                "state": "queued",
                "attempt": {"outcome": "interrupted (worker stopped)", "ended_at": now_iso()},
            }
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
        raise ShardIncompleteError(
            f"this worker does not see the target key {target_key_id} as active yet"
        )


async def _run_shard(
    engine: ReencryptionEngine,
    spec: TableSpec,
    kt: KeyType,
    key_range: KeyRange,
    checkpoint_id: str,
) -> ReencryptionResult:
    for _ in range(_MAX_TARGET_CHANGES):
        result = await engine.reencrypt(spec, key_type=kt, shard=key_range, job_id=checkpoint_id)
        if not result.target_changed:
            return result
        logger.info(
            "%s: the %s key rotated during the run; continuing onto the new one",
            checkpoint_id,
            kt.value,
        )
    # Three rotations of one key type within one shard run (one rotation mid-run is
    # test_a_rotation_during_a_shard_moves_its_rows_onto_the_newest_key).
    return result  # pragma: no cover - needs three rotations inside one shard run
