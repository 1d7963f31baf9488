"""Cleanup on ARQ workers: destroy the keys past max age + grace that the census says
no row uses any more."""

from __future__ import annotations

import logging
from typing import Any

from .codec import check_pool
from .failures import guarded
from .state import worker_state
from .status import redis_lock

__all__ = ["cleanup_expired_keys", "enqueue_cleanup"]

logger = logging.getLogger("aiocrypt.arq")


async def enqueue_cleanup(redis: Any, *, queue_name: str | None = None) -> str | None:
    """Enqueue ``cleanup_expired_keys`` now (besides its weekly cron run)."""
    check_pool(redis)
    job = await redis.enqueue_job("cleanup_expired_keys", _queue_name=queue_name)
    return None if job is None else str(job.job_id)


async def cleanup_expired_keys(ctx: dict[str, Any]) -> dict[str, Any]:
    """Destroy keys past max age + grace that the census says no row uses any more."""
    state = worker_state(ctx)
    cfg = state.config

    async def work() -> dict[str, Any]:
        async with redis_lock(
            state.redis,
            f"{cfg.key_prefix}:job-lock:cleanup",
            ttl=cfg.job_timeout,
            owner=state.worker_name,
        ) as lock:
            if not lock.acquired:
                return {"skipped": f"another worker ({lock.holder}) is running the cleanup"}
            census = state.census if state.open_database is not None and state.tables else None
            report = await state.key_manager.cleanup_report(census=census)
            for item in report["destroyed"]:
                logger.warning("key %s destroyed: %s", item["key_id"], item["reason"])
            return {**report, "census": census is not None, "worker": state.worker_name}

    return await guarded(ctx, state, "cleanup_expired_keys", work)
