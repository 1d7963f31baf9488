"""The ``aiocrypt reencrypt`` runs: a table in this process, or its ranges over processes.

With ``--jobs N`` each table is cut into ``RANGES_PER_JOB * N`` primary-key ranges
(:meth:`ReencryptionEngine.plan_shards`), worked by N processes: this one and
``N - 1`` started with ``spawn`` (a fresh interpreter: no state of this one, no
forked event loop or threads), so the crypto of each runs on its own core; Postgres
applies the writes on whatever cores are left. Each process takes the next range
not yet taken when it finishes one, so none waits idle while another still has a
long range ahead (a static split into N halves left the first process idle at the
end while the late-started one finished its half). The other processes are started
first, before the ranges are planned; a spawned process needs about half a second
to import: this process works the first ranges meanwhile, with the keys it already
holds. Each range has its own checkpoint; this process follows their progress by
reading them. A spawned process reads the same settings as this one (the
environment and the config file); what the command line chose travels in a
:class:`ShardTask`, which holds identifiers only, never key material.

A rerun with another ``--jobs`` plans other ranges, so their checkpoints are new,
but nothing is redone: every batch selects only rows that are not yet on the
target keys.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._cli_base import describe, exit_code_for
from ._errors import AiocryptError
from .reencrypt import (
    KeyRange,
    ReencryptionEngine,
    ReencryptionProgress,
    ReencryptionResult,
    TableSpec,
)

if TYPE_CHECKING:
    from ._legacy import LegacyReader
    from ._manager import KeyManager

__all__ = [
    "RANGES_PER_JOB",
    "ShardTask",
    "reencrypt_sharded",
    "reencrypt_table",
    "result_dict",
    "run_shard",
]

#: How often the parent reads the shards' checkpoints for its progress line.
_POLL_SECONDS = 0.5

#: Ranges per process with ``--jobs``: enough that the processes finish close together
#: (the last range is a quarter of a process's share), few enough that each range's
#: checkpoint and the spawned process's key load stay a small part of its work.
RANGES_PER_JOB = 4


@dataclass(frozen=True)
class ShardTask:
    """One shard process's work: what the command line chose, for one range of one table."""

    spec: TableSpec
    shard: KeyRange
    dsn: str
    checkpoint_table: str
    batch_size: int
    rate: float | None
    skip_errors: bool
    max_batches: int | None
    #: ``--models``: the shard process imports it again for the columns' legacy readers
    #: (their keys stay in the application's module, out of the task)
    models: str | None = None


def result_dict(result: ReencryptionResult, stopped: str | None) -> dict[str, Any]:
    cp = result.checkpoint
    return {
        "table": result.table,
        "job_id": result.job_id,
        "targets": dict(result.targets),
        "complete": result.complete,
        "stopped": stopped,
        "resumed_from": result.resumed_from,
        "target_changed": result.target_changed,
        "run": {
            "batches": result.run_batches,
            "rows_read": result.run_rows_read,
            "rows_updated": result.run_rows_updated,
            "rows_conflicted": result.run_rows_conflicted,
            "rows_failed": result.run_rows_failed,
            "seconds": round(result.elapsed, 3),
        },
        "checkpoint": {
            "pass": cp.pass_no,
            "batches": cp.batches,
            "rows_read": cp.rows_read,
            "rows_updated": cp.rows_updated,
            "rows_conflicted": cp.rows_conflicted,
            "rows_failed": cp.rows_failed,
            "done": cp.done,
        },
        "failed_primary_keys": list(result.failed_primary_keys),
        "failures": [
            {
                "column": f.column,
                "primary_key": f.primary_key,
                "reason": None if f.reason is None else f.reason.value,
                "key_id": f.key_id,
            }
            for f in result.failures
        ],
    }


async def reencrypt_table(
    engine: ReencryptionEngine,
    spec: TableSpec,
    *,
    shard: KeyRange | None = None,
    on_progress: Callable[[ReencryptionProgress, int], None] | None = None,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Re-encrypt ``spec`` (or one ``shard`` of it) in this process; the result as a dict.

    ``on_progress(event, base)``: after each batch, with the rows the job had read
    before this run (counters are per job and cumulative).
    """
    key_range = shard if shard is not None else KeyRange()
    targets = await engine.targets(spec)
    job_id = engine.job_id_for(spec, targets, key_range)
    await engine.database.prepare(spec)
    before = await engine.database.load_checkpoint(job_id)
    base = before.rows_read if before is not None else 0
    if on_progress is not None:
        engine.progress = lambda event: on_progress(event, base)
    result = await engine.reencrypt(spec, job_id=job_id, shard=key_range, max_batches=max_batches)
    return result_dict(result, "max-batches" if result.stopped else None)


def run_shard(task: ShardTask) -> dict[str, Any]:
    """A shard process's entry point (picklable): the shard's result dict, or
    ``{"error": ..., "exit": ...}`` for an aiocrypt error (one line, no traceback)."""
    try:
        return asyncio.run(_run_shard(task))
    except AiocryptError as exc:
        return {"error": describe(exc), "exit": exit_code_for(exc)}


async def _run_shard(task: ShardTask) -> dict[str, Any]:
    from ._cli_base import load_config
    from ._cli_ops import legacy_readers_from_models  # it imports this module
    from ._factory import build_key_manager

    readers = legacy_readers_from_models(task.models)
    manager = build_key_manager(load_config(), watch=False)
    async with manager:
        return await _shard_here(manager, task, readers)


async def _shard_here(
    manager: KeyManager, task: ShardTask, readers: Iterable[LegacyReader]
) -> dict[str, Any]:
    """``task`` in this process, with its own database connections."""
    from ._cli_ops import _open_database  # it imports this module

    database = await _open_database(task.dsn, task.checkpoint_table)
    engine = ReencryptionEngine(
        manager,
        database,
        tables=[task.spec],
        batch_size=task.batch_size,
        rate_limit=task.rate,
        on_error="skip" if task.skip_errors else "raise",
        legacy_readers=readers,
    )
    try:
        return await reencrypt_table(
            engine, task.spec, shard=task.shard, max_batches=task.max_batches
        )
    finally:
        await database.close()


async def _first_shard(engine: ReencryptionEngine, task: ShardTask) -> dict[str, Any]:
    """A range in this process (as :func:`run_shard` does it in another)."""
    try:
        return await _shard_here(engine.key_manager, task, engine.legacy_readers.values())
    except AiocryptError as exc:
        return {"error": describe(exc), "exit": exit_code_for(exc)}


def _warm_up() -> None:
    """A spawned process's first call: the imports a range needs, done while this
    process plans the ranges and works the first ones."""
    from . import _cli_ops, _factory  # noqa: F401 - imported for their cost, not a name


async def reencrypt_sharded(
    engine: ReencryptionEngine,
    task: ShardTask,
    jobs: int,
    on_progress: Callable[[int, float], None],
) -> dict[str, Any]:
    """Re-encrypt ``task.spec`` in ``jobs`` processes (this one and ``jobs - 1`` spawned),
    over ``RANGES_PER_JOB * jobs`` ranges, each process taking the next one free; one
    merged result (``shards``: each range's, in key order).

    ``on_progress(rows_done, rows_per_second)`` about twice a second, from the ranges'
    checkpoints. A range that fails makes the whole an ``AiocryptError`` naming it, once
    every process stopped (each committed what it finished; no range is started after
    a failure).
    """
    spec = task.spec
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    with ProcessPoolExecutor(
        max_workers=max(1, jobs - 1), mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        ready = [loop.run_in_executor(pool, _warm_up) for _ in range(jobs - 1)]
        try:
            targets = await engine.targets(spec)
            shards = await engine.plan_shards(spec, RANGES_PER_JOB * jobs)
        except BaseException:
            for future in ready:
                future.cancel()
            raise
        job_ids = [engine.job_id_for(spec, targets, shard) for shard in shards]

        async def rows_read() -> int:
            checkpoints = [await engine.database.load_checkpoint(j) for j in job_ids]
            return sum(c.rows_read for c in checkpoints if c is not None)

        base = await rows_read()
        todo = collections.deque(enumerate(shards))
        outcomes: dict[int, dict[str, Any]] = {}

        async def work(run: Callable[[ShardTask], Awaitable[dict[str, Any]]]) -> None:
            budget = task.max_batches  # --max-batches: each process's, over its ranges
            while todo and not any("error" in o for o in outcomes.values()):
                if budget is not None and budget <= 0:
                    return
                index, shard = todo.popleft()
                outcome = await run(dataclasses.replace(task, shard=shard, max_batches=budget))
                outcomes[index] = outcome
                if budget is not None and "error" not in outcome:
                    budget -= outcome["run"]["batches"]

        async def in_child(ready_: asyncio.Future[None]) -> None:
            await ready_  # the range is taken once a process can start it at once
            await work(lambda t: loop.run_in_executor(pool, run_shard, t))

        workers = [asyncio.ensure_future(work(lambda t: _first_shard(engine, t)))]
        workers += [asyncio.ensure_future(in_child(r)) for r in ready]
        pending: set[asyncio.Future[None]] = set(workers)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=_POLL_SECONDS)
            done = await rows_read() - base
            on_progress(done, done / max(time.monotonic() - started, 1e-9))
        for worker in workers:
            worker.result()  # a spawned process that died: BrokenProcessPool, loudly
    return _finished(spec, targets, shards, outcomes, time.monotonic() - started)


def _finished(
    spec: TableSpec,
    targets: dict[str, str],
    shards: list[KeyRange],
    outcomes: dict[int, dict[str, Any]],
    elapsed: float,
) -> dict[str, Any]:
    """The merged result of the ranges that ran (``outcomes`` by range index), or the
    first failure as an ``AiocryptError`` naming its range."""
    ran = sorted(outcomes)
    failed = [(shards[i], outcomes[i]) for i in ran if "error" in outcomes[i]]
    if failed:
        shard, outcome = failed[0]
        raise AiocryptError(
            f"{spec.name}: the range after primary key {shard.after!r} stopped: {outcome['error']}"
        )
    merged = _merged(spec, targets, [outcomes[i] for i in ran], elapsed)
    if len(ran) < len(shards):  # --max-batches spent before every range was started
        merged["complete"] = False
        merged["stopped"] = "max-batches"
        merged["checkpoint"]["done"] = False
    return merged


def _merged(
    spec: TableSpec, targets: dict[str, str], outcomes: list[dict[str, Any]], elapsed: float
) -> dict[str, Any]:
    """One table's result from its shards' (the shape of :func:`result_dict`, plus them)."""
    run = {
        name: sum(o["run"][name] for o in outcomes)
        for name in ("batches", "rows_read", "rows_updated", "rows_conflicted", "rows_failed")
    }
    run["seconds"] = round(elapsed, 3)
    checkpoint = {
        name: sum(o["checkpoint"][name] for o in outcomes)
        for name in ("batches", "rows_read", "rows_updated", "rows_conflicted", "rows_failed")
    }
    checkpoint["pass"] = max(o["checkpoint"]["pass"] for o in outcomes)
    checkpoint["done"] = all(o["checkpoint"]["done"] for o in outcomes)
    stopped = next((o["stopped"] for o in outcomes if o["stopped"]), None)
    resumed = [o["resumed_from"] for o in outcomes if o["resumed_from"] is not None]
    return {
        "table": spec.name,
        "job_id": [o["job_id"] for o in outcomes],
        "targets": targets,
        "complete": all(o["complete"] for o in outcomes),
        "stopped": stopped,
        "resumed_from": resumed[0] if resumed else None,
        "target_changed": any(o["target_changed"] for o in outcomes),
        "run": run,
        "checkpoint": checkpoint,
        "failed_primary_keys": [pk for o in outcomes for pk in o["failed_primary_keys"]],
        "failures": [f for o in outcomes for f in o["failures"]],
        "shards": outcomes,
    }
