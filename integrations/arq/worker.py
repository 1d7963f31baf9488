"""aiocrypt's jobs as arq worker settings: its functions and cron jobs, a ready
settings dict, merging into an application's worker, and the JSON pool that
enqueues them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import arq
from arq import cron, func
from arq.connections import ArqRedis
from arq.cron import CronJob
from arq.worker import Function

from aiocrypt import ConfigurationError

from .cleanup import cleanup_expired_keys
from .codec import codec_problem, codec_settings
from .config import ArqWorkerConfig
from .reencryption import reencrypt_data_with_new_key, reencrypt_shard
from .rotation import rotate_key_manual, rotate_keys_scheduled
from .state import shutdown, startup

__all__ = [
    "aiocrypt_worker_settings",
    "create_job_pool",
    "cron_jobs",
    "functions",
    "merge_into",
]

Ctx = dict[str, Any]
Hook = Callable[[Ctx], Awaitable[None]]
S = TypeVar("S")


def functions(config: ArqWorkerConfig) -> list[Function]:
    """aiocrypt's job functions, each with its own timeout and tries (they hold in an
    application's worker too)."""
    return [
        func(
            coroutine,
            timeout=config.job_timeout,
            max_tries=config.max_tries,
            keep_result=config.keep_result,
        )
        for coroutine in (
            rotate_keys_scheduled,
            rotate_key_manual,
            reencrypt_data_with_new_key,
            reencrypt_shard,
            cleanup_expired_keys,
        )
    ]


def cron_jobs(config: ArqWorkerConfig) -> list[CronJob]:
    """The rotation check and the cleanup on their schedules (``"off"`` leaves one out).

    Named ``cron:<prefix>:<job>``: arq gives a cron run the job id
    ``<name>:<scheduled time>``, so workers that all run the cron enqueue it once.
    """
    jobs = []
    for name, coroutine, schedule in (
        ("rotation", rotate_keys_scheduled, config.rotation_schedule),
        ("cleanup", cleanup_expired_keys, config.cleanup_schedule),
    ):
        if schedule is None:
            continue
        jobs.append(
            cron(
                coroutine,
                name=f"cron:{config.key_prefix}:{coroutine.__name__}",
                run_at_startup=name in config.run_at_startup,
                unique=True,
                timeout=config.job_timeout,
                max_tries=config.max_tries,
                keep_result=config.keep_result,
                **schedule.cron_kwargs(),
            )
        )
    return jobs


def _startup_for(config: ArqWorkerConfig) -> Hook:
    async def on_startup(ctx: Ctx) -> None:
        await startup(ctx, config)

    on_startup.__qualname__ = on_startup.__name__ = "aiocrypt_startup"
    return on_startup


def aiocrypt_worker_settings(
    config: ArqWorkerConfig | None = None, **overrides: Any
) -> dict[str, Any]:
    """Settings of a worker running aiocrypt's jobs, as a dict ``arq.run_worker`` takes.

    ``config`` defaults to ``ArqWorkerConfig.from_env()``; ``overrides`` replace or
    add any ``arq.Worker`` argument (``max_jobs=2``, ``redis_settings=...``)::

        WorkerSettings = aiocrypt_worker_settings(queue_name="crypto")
        arq.run_worker(WorkerSettings)

    Jobs are JSON: overriding ``job_serializer`` / ``job_deserializer`` raises
    ``ConfigurationError`` (and a worker built without them refuses to start).
    """
    cfg = config if config is not None else ArqWorkerConfig.from_env()
    codec = {
        **codec_settings(),
        **{k: v for k, v in overrides.items() if k in ("job_serializer", "job_deserializer")},
    }
    problem = codec_problem(codec["job_serializer"], codec["job_deserializer"])
    if problem is not None:
        raise ConfigurationError(
            f"aiocrypt_worker_settings(): job_serializer / "
            f"job_deserializer must be aiocrypt's JSON codec: {problem}"
        )
    settings: dict[str, Any] = {
        "functions": functions(cfg),
        "cron_jobs": cron_jobs(cfg),
        "queue_name": cfg.queue_name,
        "redis_settings": cfg.redis_settings(),
        "on_startup": _startup_for(cfg),
        "on_shutdown": shutdown,
        "max_jobs": cfg.max_jobs,
        "poll_delay": cfg.poll_delay,
        "job_timeout": cfg.job_timeout,
        "max_tries": cfg.max_tries,
        **codec_settings(),
    }
    if cfg.timezone is not None:
        settings["timezone"] = cfg.tzinfo()
    settings.update(overrides)
    return settings


def _chain(first: Hook | None, second: Hook | None) -> Hook | None:
    if first is None or second is None:
        return first or second

    async def both(ctx: Ctx) -> None:
        await first(ctx)
        await second(ctx)

    return both


def merge_into(settings: S, config: ArqWorkerConfig | None = None) -> S:
    """Add aiocrypt's functions, cron jobs and startup/shutdown to an application's
    ``WorkerSettings`` (a class, changed in place, or a dict); return it.

    aiocrypt's startup runs before the application's (whose jobs may then use
    ``ctx["aiocrypt"].service``) and its shutdown after. The application keeps its
    queue, Redis settings and limits: aiocrypt's follow-up jobs go to the queue of
    the worker that runs them. Set ``ENCRYPTION_ARQ_QUEUE`` to that queue so that
    ``aiocrypt jobs`` and :func:`enqueue_rotation` enqueue there too.

    The worker decodes every job as JSON from then on, the application's too
    (enqueue those through :func:`create_job_pool` as well); settings that name
    another ``job_serializer`` / ``job_deserializer`` raise ``ConfigurationError``.
    """
    cfg = config if config is not None else ArqWorkerConfig.from_env()
    ours = aiocrypt_worker_settings(cfg)

    def get(name: str) -> Any:
        return settings.get(name) if isinstance(settings, dict) else getattr(settings, name, None)

    def put(name: str, value: Any) -> None:
        if isinstance(settings, dict):
            settings[name] = value
        else:
            setattr(settings, name, value)

    for name, value in codec_settings().items():
        if get(name) not in (None, value):
            raise ConfigurationError(
                f"merge_into: the settings name their own {name} ({get(name)!r}); aiocrypt's "
                "jobs need its JSON codec, and a worker has one codec for all its jobs: "
                f"drop it (or set it to aiocrypt.integrations.arq.{name})"
            )
    for name, value in codec_settings().items():
        put(name, value)
    theirs = list(get("functions") or ())
    taken = {getattr(f, "name", getattr(f, "__qualname__", None)) for f in theirs}
    put("functions", theirs + [f for f in ours["functions"] if f.name not in taken])
    their_cron = list(get("cron_jobs") or ())
    taken = {c.name for c in their_cron}
    put("cron_jobs", their_cron + [c for c in ours["cron_jobs"] if c.name not in taken])
    put("on_startup", _chain(ours["on_startup"], get("on_startup")))
    put("on_shutdown", _chain(get("on_shutdown"), ours["on_shutdown"]))
    if "timezone" in ours and get("timezone") is None:
        put("timezone", ours["timezone"])
    return settings


async def create_job_pool(config: ArqWorkerConfig | None = None, **kwargs: Any) -> ArqRedis:
    """An arq pool that enqueues (and reads results) as JSON, on ``config``'s Redis and
    queue: what :func:`enqueue_rotation` and the other enqueue functions need.

    ``kwargs`` go to ``arq.create_pool`` (``retry=``, ``expires_extra_ms=``...).
    Close it with ``await pool.aclose()``.
    """
    cfg = config if config is not None else ArqWorkerConfig.from_env()
    kwargs.setdefault("default_queue_name", cfg.queue_name)
    return await arq.create_pool(cfg.redis_settings(), **kwargs, **codec_settings())
