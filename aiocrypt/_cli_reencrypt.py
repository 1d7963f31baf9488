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
holds. The ranges are handed out by a counter the processes share
(``multiprocessing.Value``, given to each at its start); each process opens its keys
and its database connections once for all the ranges it takes. Each range has its
own checkpoint; this process follows their progress by reading them. A spawned
process reads the same settings as this one (the environment and the config
file); what the command line chose travels in a
:class:`ShardTask`, which holds identifiers only, never key material.

A rerun with another ``--jobs`` plans other ranges, so their checkpoints are new,
but nothing is redone: every batch selects only rows that are not yet on the
target keys.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._cli_base import CliError, describe, exit_code_for
from ._errors import AiocryptError
from .reencrypt import (
    KeyRange,
    ReencryptionDatabase,
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
    "run_ranges",
]

#: How often the parent reads the shards' checkpoints for its progress line.
_POLL_SECONDS = 0.5

#: Ranges per process with ``--jobs``: enough that the processes finish close together
#: (the last range is a quarter of a process's share), few enough that each range's
#: checkpoint and the spawned process's key load stay a small part of its work.
RANGES_PER_JOB = 4


@dataclass(frozen=True)
class ShardTask:
    """What the command line chose for one table's ``--jobs`` run, as each process gets it
    (the ranges it works come from the shared counter)."""

    spec: TableSpec
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


class _Ranges:
    """The ranges of one ``--jobs`` run, shared by its processes: each takes the next
    index under the lock of a shared counter (``multiprocessing.Value``); a failure
    moves the counter past the end, so no range starts after it."""

    def __init__(self, counter: Any, count: int) -> None:
        self._counter = counter
        self._count = count

    def take(self) -> int | None:
        with self._counter.get_lock():
            index: int = self._counter.value
            if index >= self._count:
                return None
            self._counter.value = index + 1
            return index

    def stop(self) -> None:
        with self._counter.get_lock():
            self._counter.value = self._count


#: A spawned process's shared counter, given at its start (``_init_process``).
_counter: Any = None


def _init_process(counter: Any) -> None:
    """A spawned process's start: the shared counter, and the imports a range needs,
    done while the command plans the ranges and works the first ones."""
    global _counter
    _counter = counter
    from . import _cli_ops, _factory  # noqa: F401 - imported for their cost, not a name


def _ready() -> None:
    """A no-op: done once a spawned process has started (its initializer ran)."""


def _failure(exc: AiocryptError | CliError) -> dict[str, Any]:
    """A range's or a process's error as its result: one line, and the exit code."""
    return {"error": describe(exc), "exit": exit_code_for(exc)}


def run_ranges(task: ShardTask, shards: list[KeyRange]) -> dict[int, dict[str, Any]]:
    """A spawned process's work (picklable): :func:`_ranges_with_own_database` under a key
    manager of its own; ``-1`` holds the error of a process that could not open it (its
    configuration, as the command reads it, included)."""
    ranges = _Ranges(_counter, len(shards))
    try:
        return asyncio.run(_run_ranges(task, shards, ranges))
    except (AiocryptError, CliError) as exc:
        ranges.stop()
        return {-1: _failure(exc)}


async def _run_ranges(
    task: ShardTask, shards: list[KeyRange], ranges: _Ranges
) -> dict[int, dict[str, Any]]:
    from ._cli_base import load_config
    from ._cli_ops import legacy_readers_from_models  # it imports this module
    from ._factory import build_key_manager

    readers = legacy_readers_from_models(task.models)
    manager = build_key_manager(load_config(), watch=False)
    async with manager:
        return await _ranges_with_own_database(manager, task, shards, ranges, readers)


async def _ranges_with_own_database(
    manager: KeyManager,
    task: ShardTask,
    shards: list[KeyRange],
    ranges: _Ranges,
    readers: Iterable[LegacyReader],
) -> dict[int, dict[str, Any]]:
    """Ranges taken in turn (:func:`_ranges_here`) over database connections opened once
    for all of them; ``-1`` holds the error if they cannot be opened (and no range starts).
    A spawned process's, and the command's own share (whose engine's connections follow
    the checkpoints meanwhile)."""
    from ._cli_ops import _open_database  # it imports this module

    try:
        database = await _open_database(task.dsn, task.checkpoint_table)
    except AiocryptError as exc:
        ranges.stop()
        return {-1: _failure(exc)}
    try:
        return await _ranges_here(manager, database, task, shards, ranges, readers)
    finally:
        await database.close()


async def _ranges_here(
    manager: KeyManager,
    database: ReencryptionDatabase,
    task: ShardTask,
    shards: list[KeyRange],
    ranges: _Ranges,
    readers: Iterable[LegacyReader],
) -> dict[int, dict[str, Any]]:
    """Ranges taken in turn, in this process; ``--max-batches`` is its budget over them."""
    engine = ReencryptionEngine(
        manager,
        database,
        tables=[task.spec],
        batch_size=task.batch_size,
        rate_limit=task.rate,
        on_error="skip" if task.skip_errors else "raise",
        legacy_readers=readers,
    )
    outcomes: dict[int, dict[str, Any]] = {}
    budget = task.max_batches
    while budget is None or budget > 0:
        index = ranges.take()
        if index is None:
            break
        try:
            outcome = await reencrypt_table(
                engine, task.spec, shard=shards[index], max_batches=budget
            )
        except AiocryptError as exc:
            ranges.stop()
            outcomes[index] = _failure(exc)
            break
        outcomes[index] = outcome
        if budget is not None:
            budget -= outcome["run"]["batches"]
    return outcomes


async def reencrypt_sharded(
    engine: ReencryptionEngine,
    task: ShardTask,
    jobs: int,
    on_progress: Callable[[int, float], None],
) -> dict[str, Any]:
    """Re-encrypt ``task.spec`` in ``jobs`` processes (this one and ``jobs - 1`` spawned),
    over ``RANGES_PER_JOB * jobs`` ranges, each process taking the next one free; one
    merged result (``shards``: each range's that ran, in key order).

    ``on_progress(rows_done, rows_per_second)`` about twice a second, from the ranges'
    checkpoints. A range that fails makes the whole an ``AiocryptError`` naming it, once
    every process stopped (each committed what it finished; no range is started after
    a failure).
    """
    spec = task.spec
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 0)
    with ProcessPoolExecutor(
        max_workers=max(1, jobs - 1),
        mp_context=context,
        initializer=_init_process,
        initargs=(counter,),
    ) as pool:
        ready = [loop.run_in_executor(pool, _ready) for _ in range(jobs - 1)]  # start them
        try:
            targets = await engine.targets(spec)
            shards = await engine.plan_shards(spec, RANGES_PER_JOB * jobs)
        except BaseException:  # the processes were started: none is left waiting
            for future in ready:
                future.cancel()
            raise
        job_ids = [engine.job_id_for(spec, targets, shard) for shard in shards]

        async def rows_read() -> int:
            checkpoints = [await engine.database.load_checkpoint(j) for j in job_ids]
            return sum(c.rows_read for c in checkpoints if c is not None)

        base = await rows_read()
        workers = [loop.run_in_executor(pool, run_ranges, task, shards) for _ in range(jobs - 1)]
        here = _ranges_with_own_database(
            engine.key_manager,
            task,
            shards,
            _Ranges(counter, len(shards)),
            engine.legacy_readers.values(),
        )
        workers.append(asyncio.ensure_future(here))
        pending: set[asyncio.Future[dict[int, dict[str, Any]]]] = set(workers)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=_POLL_SECONDS)
            done = await rows_read() - base
            on_progress(done, done / max(time.monotonic() - started, 1e-9))
        outcomes: dict[int, dict[str, Any]] = {}
        for worker in workers:
            outcomes.update(worker.result())  # a process that died: BrokenProcessPool
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
    if -1 in outcomes:  # a process that could not open the keys or the database
        raise AiocryptError(f"{spec.name}: a --jobs process stopped: {outcomes[-1]['error']}")
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
