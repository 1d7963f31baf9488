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

from typing import TYPE_CHECKING, Any

try:
    import arq  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aiocrypt.integrations.arq needs arq: pip install 'aiocrypt[arq]'") from exc

from .cleanup import cleanup_expired_keys, enqueue_cleanup
from .codec import job_deserializer, job_serializer
from .config import ArqWorkerConfig, Schedule
from .failures import JobFailedError, ShardIncompleteError
from .reencryption import (
    enqueue_reencryption,
    reencrypt_data_with_new_key,
    reencrypt_shard,
    reencryption_job_id,
)
from .rotation import enqueue_rotation, rotate_key_manual, rotate_keys_scheduled
from .state import STATE_KEY, WorkerState
from .status import ReencryptionStatus, ShardStatus, reencryption_status
from .worker import (
    aiocrypt_worker_settings,
    create_job_pool,
    cron_jobs,
    functions,
    merge_into,
)

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

_worker_settings: type | None = None

if TYPE_CHECKING:
    WorkerSettings: Any  # a class built from aiocrypt_worker_settings() on first use


def __getattr__(name: str) -> Any:
    # Built on first use, so that importing this module (to enqueue, or for the CLI)
    # never fails on a worker-only setting, and the worker reads its environment once.
    global _worker_settings
    if name == "WorkerSettings":
        if _worker_settings is None:
            _worker_settings = type(
                "WorkerSettings",
                (),
                {
                    "__doc__": "aiocrypt's ready worker: `arq aiocrypt.integrations.arq."
                    "WorkerSettings` (settings from the environment).",
                    "__module__": __name__,
                    **aiocrypt_worker_settings(),
                },
            )
        return _worker_settings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
