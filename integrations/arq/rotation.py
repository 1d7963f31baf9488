"""Key rotation on ARQ workers: the scheduled policy check and manual rotation, each
followed by the re-encryption of the data on the keys they replaced."""

from __future__ import annotations

import logging
from typing import Any

from aiocrypt import KeyType
from aiocrypt.adapters import KeyTypeLike

from .codec import check_pool
from .failures import guarded, job_key_type
from .reencryption import enqueue_reencryption
from .state import WorkerState, worker_state
from .status import redis_lock

__all__ = ["enqueue_rotation", "rotate_key_manual", "rotate_keys_scheduled"]

logger = logging.getLogger("aiocrypt.arq")


async def enqueue_rotation(
    redis: Any, key_type: KeyTypeLike, *, force: bool = False, queue_name: str | None = None
) -> str | None:
    """Enqueue ``rotate_key_manual``; return the arq job id (None if already queued).

    ``redis`` is a pool from :func:`create_job_pool` (or one made with aiocrypt's
    ``job_serializer``): another pool raises ``ConfigurationError``.
    """
    check_pool(redis)
    job = await redis.enqueue_job(
        "rotate_key_manual", KeyType(key_type).value, force, _queue_name=queue_name
    )
    return None if job is None else str(job.job_id)


async def _enqueue_follow_up(
    state: WorkerState, key_type: KeyType, old_key_id: str
) -> dict[str, Any]:
    # Data subjects' keys move with the rotation (rewrapped, idempotent: a retry
    # finishes the rest); their data stays where it is (docs/subjects.md).
    subjects = await state.key_manager.rewrap_subjects(key_type)
    rewrapped = {"subject_keys_rewrapped": subjects.rewrapped}
    if subjects.rewrapped:
        logger.info(
            "rewrapped %d subject keys of %s under %s",
            subjects.rewrapped,
            key_type.value,
            subjects.wrapping_key_id,
        )
    gap = state.reencryption_gap(key_type)
    if gap is not None:
        logger.info("data on %s is not re-encrypted by this worker: %s", old_key_id, gap)
        return {"old_key_id": old_key_id, "skipped": gap, **rewrapped}
    job_id = await enqueue_reencryption(state.redis, key_type, old_key_id, config=state.config)
    return {"old_key_id": old_key_id, "job_id": job_id, **rewrapped}


async def rotate_keys_scheduled(ctx: dict[str, Any]) -> dict[str, Any]:
    """Rotate every key its policy says is due; re-encrypt the data of rotated and
    compromised keys. Single-flight: a second worker running it at once skips."""
    state = worker_state(ctx)
    cfg = state.config

    async def work() -> dict[str, Any]:
        async with redis_lock(
            state.redis,
            f"{cfg.key_prefix}:job-lock:rotation",
            ttl=cfg.job_timeout,
            owner=state.worker_name,
        ) as lock:
            if not lock.acquired:
                logger.info("rotation check skipped: %s is running it", lock.holder)
                return {"skipped": f"another worker ({lock.holder}) is running the check"}
            report = await state.key_manager.rotate_keys_due()
            follow_ups = []
            for key_id in report["reencrypt"]:
                key = await state.key_manager.get_key(key_id)
                follow_ups.append(await _enqueue_follow_up(state, key.key_type, key_id))
            for item in report["rotated"]:
                logger.info(
                    "rotated %s: %s -> %s (%s)",
                    item["key_type"],
                    item["old_key_id"],
                    item["new_key_id"],
                    item["reason"],
                )
            return {**report, "reencryption": follow_ups, "worker": state.worker_name}

    return await guarded(ctx, state, "rotate_keys_scheduled", work)


async def rotate_key_manual(
    ctx: dict[str, Any], key_type: str, force: bool = False
) -> dict[str, Any]:
    """Rotate ``key_type`` now if due by policy, or always with ``force``; then enqueue
    the re-encryption of the data on the key it replaced."""
    state = worker_state(ctx)

    async def work() -> dict[str, Any]:
        kt = job_key_type(key_type)
        manager = state.key_manager
        before = manager.keyring.active_keys.get(kt)
        old_id = None if before is None else before.key_id
        after = await manager.rotate_key(kt, force=force)
        result: dict[str, Any] = {
            "key_type": kt.value,
            "old_key_id": old_id,
            "new_key_id": after.key_id,
            "rotated": old_id is not None and after.key_id != old_id,
            "worker": state.worker_name,
        }
        if result["rotated"]:
            assert old_id is not None
            logger.info(
                "rotated %s: %s -> %s (manual%s)",
                kt.value,
                old_id,
                after.key_id,
                ", forced" if force else "",
            )
            result["reencryption"] = await _enqueue_follow_up(state, kt, old_id)
        return result

    return await guarded(ctx, state, f"rotate_key_manual({key_type})", work)
