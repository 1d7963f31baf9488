"""``aiocrypt jobs``: the status of re-encryption jobs, and enqueueing aiocrypt's jobs.

Loaded by the core CLI only when ``aiocrypt jobs`` is used (the core never
imports arq or redis). Settings come from the same ``ENCRYPTION_*`` /
``ENCRYPTION_ARQ_*`` variables the worker reads; the Redis URL is never printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from aiocrypt import AiocryptError, ConfigurationError, KeyType
from aiocrypt.adapters import redact_url
from aiocrypt.cli import key_type_param

from .config import ArqWorkerConfig
from .status import ReencryptionStatus, ShardStatus, StatusStore

__all__ = ["jobs", "plain_jobs", "render_job", "render_jobs"]

T = TypeVar("T")
# Piped output is not cut at 80 columns (ids must stay copyable); COLUMNS still wins.
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)
_STYLES = {
    "done": "green",
    "failed": "bold red",
    "running": "cyan",
    "retrying": "yellow",
    "incomplete": "yellow",
    "queued": "dim",
}


def _config() -> ArqWorkerConfig:
    # Errors propagate: the root ``aiocrypt`` group turns them into one line and the
    # documented exit code (3 for configuration, 4 for an unreachable Redis).
    cfg = ArqWorkerConfig.from_env()
    if not cfg.redis_url:
        raise ConfigurationError(
            "ENCRYPTION_REDIS_URL (or ENCRYPTION_ARQ_REDIS_URL) is not "
            "set: it names the Redis the workers use"
        )
    return cfg


def _url_variable() -> str:
    """The variable the queue's Redis URL came from (as ``ArqWorkerConfig.from_env`` reads)."""
    if os.environ.get("ENCRYPTION_ARQ_REDIS_URL", "").strip():
        return "ENCRYPTION_ARQ_REDIS_URL"
    return "ENCRYPTION_REDIS_URL"


@asynccontextmanager
async def _queue_redis(cfg: ArqWorkerConfig) -> AsyncIterator[None]:
    """Connection failures of the queue's Redis as one error naming the variable and the
    (redacted) URL; the cause is kept, so the CLI exits 4 (unreachable)."""
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError as exc:
        raise ImportError(f"{exc}: pip install 'aiocrypt[arq]'") from None
    try:
        yield
    except (OSError, RedisConnectionError, RedisTimeoutError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AiocryptError(
            f"cannot reach the job queue's Redis at {redact_url(cfg.redis_url or '')} "
            f"(check {_url_variable()}): {reason or type(exc).__name__}"
        ) from exc


async def _ping(cfg: ArqWorkerConfig) -> None:
    """One quick PING first, so that a Redis that is down is one line, not arq's five
    retries of a second each."""
    from redis.asyncio import Redis

    client = Redis.from_url(cfg.redis_url or "", socket_connect_timeout=3)
    try:
        await client.ping()
    finally:
        await client.aclose()


def _with_redis(work: Callable[[Any, ArqWorkerConfig], Awaitable[T]]) -> T:
    cfg = _config()

    async def main() -> T:
        try:
            from redis.asyncio import Redis
        except ImportError as exc:
            raise ImportError(f"{exc}: pip install 'aiocrypt[arq]'") from None
        async with _queue_redis(cfg):
            redis = Redis.from_url(cfg.redis_url or "", socket_connect_timeout=3)
            try:
                return await work(redis, cfg)
            finally:
                await redis.aclose()

    return asyncio.run(main())


def _with_arq(work: Callable[[Any, ArqWorkerConfig], Awaitable[T]]) -> T:
    cfg = _config()

    async def main() -> T:
        from .worker import create_job_pool

        async with _queue_redis(cfg):
            await _ping(cfg)
            redis = await create_job_pool(cfg)  # JSON jobs: the workers refuse pickled ones
            try:
                return await work(redis, cfg)
            finally:
                await redis.aclose()

    return asyncio.run(main())


# -- rendering ---------------------------------------------------------------------


def _state(state: str) -> Text:
    return Text(state, style=_STYLES.get(state, ""))


def _bar(done: int, total: int, width: int = 30) -> ProgressBar:
    return ProgressBar(total=max(total, 1), completed=min(done, total) if total else 1, width=width)


def _pct(done: int, total: int) -> str:
    return "100%" if total == 0 else f"{100 * min(done, total) / total:.0f}%"


def _range(shard: ShardStatus) -> str:
    after = "-inf" if shard.after is None else str(shard.after)
    until = "+inf" if shard.until is None else str(shard.until)
    return f"({after}, {until}]"


def _eta(status: ReencryptionStatus) -> str:
    rate = status.rate
    if status.state != "running" or rate <= 0:
        return "-"
    seconds = status.rows_left / rate
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def render_job(status: ReencryptionStatus) -> RenderableType:
    """One job: a summary, an overall progress bar and one bar per shard."""
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("job", status.job_id)
    summary.add_row("key type", status.key_type)
    summary.add_row("keys", f"{status.old_key_id} -> {status.target_key_id or '?'}")
    summary.add_row("state", _state(status.state))
    summary.add_row(
        "rows", f"{status.rows_done:,} done, {status.rows_left:,} left of {status.rows_total:,}"
    )
    summary.add_row("rate", f"{status.rate:,.0f} rows/s (ETA {_eta(status)})")
    summary.add_row("workers", ", ".join(status.workers) or "-")
    summary.add_row("created", status.created_at or "-")
    if status.started_at:
        summary.add_row("started", status.started_at)
    if status.finished_at:
        summary.add_row("finished", status.finished_at)
    if status.result is not None:
        summary.add_row(
            "census", f"{status.result.get('old_key_rows', '?')} row(s) left on {status.old_key_id}"
        )
    if status.error:
        summary.add_row("error", Text(status.error, style="red"))
    overall = Table.grid(padding=(0, 1))
    overall.add_row(
        _bar(status.rows_done, status.rows_total, 50), _pct(status.rows_done, status.rows_total)
    )
    shards = Table(
        "shard",
        "table",
        "range",
        "state",
        "worker",
        "tries",
        "progress",
        "rows",
        "rows/s",
        title="shards",
        title_justify="left",
    )
    for shard in status.shards:
        done = shard.rows_total if shard.state == "done" else shard.rows_done
        shards.add_row(
            str(shard.index),
            shard.table,
            _range(shard),
            _state(shard.state),
            shard.worker or "-",
            str(shard.tries),
            _bar(done, shard.rows_total, 20),
            f"{min(done, shard.rows_total):,}/{shard.rows_total:,}",
            f"{shard.rate:,.0f}" if shard.state == "running" else "-",
        )
        if shard.error:
            shards.add_row("", "", "", "", Text(shard.error, style="red"), "", "", "", "")
    return Group(summary, overall, shards)


_JOB_COLUMNS = ("job", "key type", "state", "progress", "rows", "rows/s", "shards", "created")


def _job_row(status: ReencryptionStatus) -> list[str]:
    done = sum(s.state == "done" for s in status.shards)
    return [
        status.job_id,
        status.key_type,
        status.state,
        _pct(status.rows_done, status.rows_total),
        f"{status.rows_done:,}/{status.rows_total:,}",
        f"{status.rate:,.0f}",
        f"{done}/{len(status.shards)}",
        status.created_at,
    ]


def render_jobs(found: list[ReencryptionStatus]) -> RenderableType:
    table = Table(*_JOB_COLUMNS)
    table.columns[0].no_wrap = True  # a job id is copied, never cut
    for status in found:
        row: list[RenderableType] = list(_job_row(status))
        row[2] = _state(status.state)
        table.add_row(*row)
    return table


def plain_jobs(found: list[ReencryptionStatus]) -> str:
    """The job list as plain aligned columns, every value whole (output that is not a
    terminal: scripts and ``grep`` read the full job ids)."""
    rows = [list(_JOB_COLUMNS), *(_job_row(s) for s in found)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_JOB_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# -- commands ----------------------------------------------------------------------


@click.group()
def jobs() -> None:
    """aiocrypt's background jobs on ARQ workers: status, rotation, re-encryption, cleanup."""


@jobs.command("status")
@click.argument("job_id", required=False)
@click.option("--watch", is_flag=True, help="follow the job live until it ends")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--limit", default=20, show_default=True, help="jobs listed without JOB_ID")
def status(job_id: str | None, watch: bool, as_json: bool, limit: int) -> None:
    """Progress of re-encryption JOB_ID (or an old key id); recent jobs without it."""

    async def work(redis: Any, cfg: ArqWorkerConfig) -> None:
        store = StatusStore(redis, cfg.key_prefix, ttl=cfg.status_ttl)
        if job_id is None:
            found = await store.recent(limit)
            if as_json:
                click.echo(json.dumps([s.to_dict() for s in found], indent=2, default=str))
            elif not found:
                click.echo("no re-encryption jobs recorded")
            elif console.is_terminal:
                console.print(render_jobs(found))
            else:
                click.echo(plain_jobs(found))
            return
        resolved = await store.resolve(job_id)
        current = None if resolved is None else await store.read(resolved)
        if resolved is None or current is None:
            raise AiocryptError(
                f"no re-encryption job {job_id!r} (status records under prefix {cfg.key_prefix!r})"
            )
        if as_json:
            click.echo(json.dumps(current.to_dict(), indent=2, default=str))
            return
        if not watch:
            console.print(render_job(current))
            return
        with Live(render_job(current), console=console, refresh_per_second=4) as live:
            # Polls once a second until the job ends: tests stay well under a second
            # (an ended job's one frame is tested in test_arq_paths.py).
            while current.state not in ("done", "incomplete", "failed"):
                await asyncio.sleep(1.0)  # pragma: no cover - 1 s poll, see above
                current = await store.read(resolved) or current  # pragma: no cover - 1 s poll
                live.update(render_job(current))  # pragma: no cover - 1 s poll

    _with_redis(work)


def _json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="machine-readable output")(function)


def _enqueued(function: str, job_id: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    """Say what was enqueued (``human(job_id)`` as text).

    Each command calls it as ``_enqueued(name, _with_arq(...), ...)``, one statement:
    coverage on CPython 3.11 loses the calling frame's lines after redis-py's asyncio
    commands under ``asyncio.run``, and a line after ``_with_arq`` would show as never
    run (docs/testing.md)."""
    if as_json:
        click.echo(json.dumps({"enqueued": function, "job_id": job_id}))
    else:
        click.echo(human(job_id))


@jobs.command("rotate")
@click.argument("key_type", callback=key_type_param)
@click.option("--force", is_flag=True, help="rotate even if the policy says it is not due")
@_json_option
def rotate(key_type: KeyType, force: bool, as_json: bool) -> None:
    """Enqueue rotate_key_manual(KEY_TYPE): rotate, then re-encrypt the old key's data."""
    from .rotation import enqueue_rotation

    _enqueued(
        "rotate_key_manual",
        _with_arq(lambda redis, cfg: enqueue_rotation(redis, key_type, force=force)),
        as_json,
        lambda job: (
            f"enqueued rotate_key_manual({key_type.value}{', force' if force else ''}) as {job}"
        ),
    )


@jobs.command("reencrypt")
@click.argument("key_type", callback=key_type_param)
@click.argument("old_key_id")
@click.option("--batch-size", type=int, default=None, help="rows per batch")
@click.option("--shards", type=int, default=None, help="shards per table")
@_json_option
def reencrypt(
    key_type: KeyType,
    old_key_id: str,
    batch_size: int | None,
    shards: int | None,
    as_json: bool = False,
) -> None:
    """Enqueue the re-encryption of KEY_TYPE data off OLD_KEY_ID (resumes a failed one)."""
    from .reencryption import enqueue_reencryption

    _enqueued(
        "reencrypt_data_with_new_key",
        _with_arq(
            lambda redis, cfg: enqueue_reencryption(
                redis, key_type, old_key_id, config=cfg, batch_size=batch_size, shards=shards
            )
        ),
        as_json,
        lambda job_id: f"enqueued {job_id}; follow it with: aiocrypt jobs status {job_id} --watch",
    )


@jobs.command("rotate-due")
@_json_option
def rotate_due(as_json: bool) -> None:
    """Enqueue the rotation check now (what the daily cron job runs)."""

    async def work(redis: Any, cfg: ArqWorkerConfig) -> str | None:
        job = await redis.enqueue_job("rotate_keys_scheduled")
        return None if job is None else str(job.job_id)

    _enqueued(
        "rotate_keys_scheduled",
        _with_arq(work),
        as_json,
        lambda job_id: f"enqueued rotate_keys_scheduled as {job_id}",
    )


@jobs.command("cleanup")
@_json_option
def cleanup(as_json: bool) -> None:
    """Enqueue cleanup_expired_keys now (what the weekly cron job runs)."""
    from .cleanup import enqueue_cleanup

    _enqueued(
        "cleanup_expired_keys",
        _with_arq(lambda redis, cfg: enqueue_cleanup(redis)),
        as_json,
        lambda job_id: f"enqueued cleanup_expired_keys as {job_id}",
    )
