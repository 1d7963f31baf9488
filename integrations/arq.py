"""ARQ workers for aiocrypt: scheduled and manual key rotation, re-encryption shared by
many workers, cleanup of expired keys.

Run the ready worker (settings from ``ENCRYPTION_*`` / ``ENCRYPTION_ARQ_*``)::

    arq aiocrypt.integrations.arq.WorkerSettings

or add aiocrypt's jobs to your own worker::

    from aiocrypt.integrations.arq import merge_into

    class WorkerSettings:
        functions = [send_invoice]
        on_startup = startup

    merge_into(WorkerSettings)           # functions, cron jobs, startup/shutdown chained

and enqueue from the application (identifiers only, never plaintext or keys)::

    redis = await create_job_pool(config)
    await enqueue_rotation(redis, "financial_data", force=True)
    status = await reencryption_status(redis, "reencrypt-financial_data-v1-1a2b3c4d")

Jobs: ``rotate_keys_scheduled`` (cron, daily at 02:00), ``cleanup_expired_keys``
(cron, Sundays at 03:00), ``rotate_key_manual(key_type, force=False)``,
``reencrypt_data_with_new_key(key_type, old_key_id, batch_size=1000)`` (plans
primary-key shards and enqueues ``reencrypt_shard`` jobs, one per shard, so every
worker on the queue takes a share). See docs/arq.md.

Jobs and results travel as JSON, never pickle (``job_serializer`` /
``job_deserializer``): a worker that would unpickle refuses to start, and the
enqueue functions refuse a pool that would pickle.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

try:
    import arq
    from arq import cron, func
    from arq.connections import ArqRedis
    from arq.cron import CronJob
    from arq.worker import Function
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aiocrypt.integrations.arq needs arq: pip install 'aiocrypt[arq]'") \
        from exc

from aiocrypt import ConfigurationError
from aiocrypt._types import KeyType, KeyTypeLike

from ._arq_codec import check_pool, codec_problem, codec_settings, job_deserializer, job_serializer
from ._arq_config import ArqWorkerConfig, Schedule
from ._arq_jobs import (
    STATE_KEY,
    JobFailedError,
    ShardIncompleteError,
    WorkerState,
    cleanup_expired_keys,
    enqueue_reencryption,
    reencrypt_data_with_new_key,
    reencrypt_shard,
    reencryption_job_id,
    rotate_key_manual,
    rotate_keys_scheduled,
    shutdown,
    startup,
)
from ._arq_status import ReencryptionStatus, ShardStatus, StatusStore

__all__ = [
    "STATE_KEY",
    "ArqWorkerConfig",
    "JobFailedError",
    "ReencryptionStatus",
    "Schedule",
    "ShardIncompleteError",
    "ShardStatus",
    "WorkerSettings",
    "WorkerState",
    "aiocrypt_worker_settings",
    "cleanup_expired_keys",
    "create_job_pool",
    "cron_jobs",
    "enqueue_cleanup",
    "enqueue_reencryption",
    "enqueue_rotation",
    "functions",
    "job_deserializer",
    "job_serializer",
    "merge_into",
    "reencrypt_data_with_new_key",
    "reencrypt_shard",
    "reencryption_job_id",
    "reencryption_status",
    "rotate_key_manual",
    "rotate_keys_scheduled",
]

Ctx = dict[str, Any]
Hook = Callable[[Ctx], Awaitable[None]]
S = TypeVar("S")


def functions(config: ArqWorkerConfig) -> list[Function]:
    """aiocrypt's job functions, each with its own timeout and tries (they hold in an
    application's worker too)."""
    return [func(coroutine, timeout=config.job_timeout, max_tries=config.max_tries,
                 keep_result=config.keep_result)
            for coroutine in (rotate_keys_scheduled, rotate_key_manual,
                              reencrypt_data_with_new_key, reencrypt_shard,
                              cleanup_expired_keys)]


def cron_jobs(config: ArqWorkerConfig) -> list[CronJob]:
    """The rotation check and the cleanup on their schedules (``"off"`` leaves one out).

    Named ``cron:<prefix>:<job>``: arq gives a cron run the job id
    ``<name>:<scheduled time>``, so workers that all run the cron enqueue it once.
    """
    jobs = []
    for name, coroutine, schedule in (
            ("rotation", rotate_keys_scheduled, config.rotation_schedule),
            ("cleanup", cleanup_expired_keys, config.cleanup_schedule)):
        if schedule is None:
            continue
        jobs.append(cron(coroutine, name=f"cron:{config.key_prefix}:{coroutine.__name__}",
                         run_at_startup=name in config.run_at_startup, unique=True,
                         timeout=config.job_timeout, max_tries=config.max_tries,
                         keep_result=config.keep_result, **schedule.cron_kwargs()))
    return jobs


def _startup_for(config: ArqWorkerConfig) -> Hook:
    async def on_startup(ctx: Ctx) -> None:
        await startup(ctx, config)

    on_startup.__qualname__ = on_startup.__name__ = "aiocrypt_startup"
    return on_startup


def aiocrypt_worker_settings(config: ArqWorkerConfig | None = None,
                             **overrides: Any) -> dict[str, Any]:
    """Settings of a worker running aiocrypt's jobs, as a dict ``arq.run_worker`` takes.

    ``config`` defaults to ``ArqWorkerConfig.from_env()``; ``overrides`` replace or
    add any ``arq.Worker`` argument (``max_jobs=2``, ``redis_settings=...``)::

        WorkerSettings = aiocrypt_worker_settings(queue_name="crypto")
        arq.run_worker(WorkerSettings)

    Jobs are JSON: overriding ``job_serializer`` / ``job_deserializer`` raises
    ``ConfigurationError`` (and a worker built without them refuses to start).
    """
    cfg = config if config is not None else ArqWorkerConfig.from_env()
    codec = {**codec_settings(), **{k: v for k, v in overrides.items()
                                    if k in ("job_serializer", "job_deserializer")}}
    problem = codec_problem(codec["job_serializer"], codec["job_deserializer"])
    if problem is not None:
        raise ConfigurationError(f"aiocrypt_worker_settings(): job_serializer / "
                                 f"job_deserializer must be aiocrypt's JSON codec: {problem}")
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
        return settings.get(name) if isinstance(settings, dict) else getattr(settings, name,
                                                                              None)

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
                f"drop it (or set it to aiocrypt.integrations.arq.{name})")
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


# -- enqueueing and status, for the application and the CLI ------------------------


async def create_job_pool(config: ArqWorkerConfig | None = None, **kwargs: Any) -> ArqRedis:
    """An arq pool that enqueues (and reads results) as JSON, on ``config``'s Redis and
    queue: what :func:`enqueue_rotation` and the other enqueue functions need.

    ``kwargs`` go to ``arq.create_pool`` (``retry=``, ``expires_extra_ms=``...).
    Close it with ``await pool.aclose()``.
    """
    cfg = config if config is not None else ArqWorkerConfig.from_env()
    kwargs.setdefault("default_queue_name", cfg.queue_name)
    return await arq.create_pool(cfg.redis_settings(), **kwargs, **codec_settings())


async def enqueue_rotation(redis: Any, key_type: KeyTypeLike, *, force: bool = False,
                           queue_name: str | None = None) -> str | None:
    """Enqueue ``rotate_key_manual``; return the arq job id (None if already queued).

    ``redis`` is a pool from :func:`create_job_pool` (or one made with aiocrypt's
    ``job_serializer``): another pool raises ``ConfigurationError``.
    """
    check_pool(redis)
    job = await redis.enqueue_job("rotate_key_manual", KeyType(key_type).value, force,
                                  _queue_name=queue_name)
    return None if job is None else str(job.job_id)


async def enqueue_cleanup(redis: Any, *, queue_name: str | None = None) -> str | None:
    """Enqueue ``cleanup_expired_keys`` now (besides its weekly cron run)."""
    check_pool(redis)
    job = await redis.enqueue_job("cleanup_expired_keys", _queue_name=queue_name)
    return None if job is None else str(job.job_id)


async def reencryption_status(redis: Any, job_or_key_id: str, *,
                              config: ArqWorkerConfig | None = None) \
        -> ReencryptionStatus | None:
    """The status of a re-encryption job, by its id or by the old key's id."""
    cfg = config if config is not None else ArqWorkerConfig.from_env()
    store = StatusStore(redis, cfg.key_prefix, ttl=cfg.status_ttl)
    job_id = await store.resolve(job_or_key_id)
    return None if job_id is None else await store.read(job_id)


_worker_settings: type | None = None

if TYPE_CHECKING:
    WorkerSettings: Any  # a class built from aiocrypt_worker_settings() on first use


def __getattr__(name: str) -> Any:
    # Built on first use, so that importing this module (to enqueue, or for the CLI)
    # never fails on a worker-only setting, and the worker reads its environment once.
    global _worker_settings
    if name == "WorkerSettings":
        if _worker_settings is None:
            _worker_settings = type("WorkerSettings", (), {
                "__doc__": "aiocrypt's ready worker: `arq aiocrypt.integrations.arq."
                           "WorkerSettings` (settings from the environment).",
                "__module__": __name__, **aiocrypt_worker_settings()})
        return _worker_settings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
