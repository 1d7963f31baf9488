"""The examples' background worker: aiocrypt's key jobs beside an application job.

One command runs it, from the repository root, with Redis and Postgres up::

    export ENCRYPTION_MASTER_KEY=...      # the apps' master key (aiocrypt new-master-key)
    export ENCRYPTION_KEY_STORAGE_PATH=$PWD/.aiocrypt/keys.json
    export ENCRYPTION_REDIS_URL=redis://127.0.0.1:6379/0
    export ENCRYPTION_POSTGRES_DSN=postgresql://postgres@127.0.0.1:5432/test

    python -m examples.arq_worker                    # or: arq examples.arq_worker.WorkerSettings

then, from anywhere with the same variables::

    aiocrypt jobs rotate financial_data --force      # rotate now; the worker re-encrypts
    aiocrypt jobs status                             # the re-encryption jobs and their progress
    aiocrypt jobs status reencrypt-<old key id> --watch

The worker runs aiocrypt's jobs (rotation by policy daily at 02:00, cleanup of
expired keys Sundays at 03:00, manual rotation, re-encryption in primary-key
shards: start several workers and they share it) and the application's own
``monthly_statement`` job, which encrypts with the service aiocrypt's startup
built (``ctx["aiocrypt"].service``). The encrypted tables are those of
``examples/sqlalchemy_models.py`` unless ``ENCRYPTION_ARQ_METADATA`` or
``ENCRYPTION_ARQ_TABLES`` names others. Queue ``encryption`` by default
(``ENCRYPTION_ARQ_QUEUE``). Jobs travel as JSON (``merge_into`` sets aiocrypt's
codec, and the worker refuses to start with pickle): enqueue ``monthly_statement``
through ``aiocrypt.integrations.arq.create_job_pool()``. See docs/arq.md.
"""

from __future__ import annotations

import argparse
import logging.config
from typing import Any

from arq.logs import default_log_config
from arq.worker import run_worker

from aiocrypt import KeyType
from aiocrypt.integrations.arq import ArqWorkerConfig, merge_into

CONFIG = ArqWorkerConfig.from_env()
if CONFIG.metadata is None and CONFIG.tables is None:
    CONFIG = CONFIG.replace(metadata="examples.sqlalchemy_models:Base.metadata")


async def monthly_statement(ctx: dict[str, Any], user_id: int, total: float) -> dict[str, Any]:
    """An application job: store a statement total encrypted (identifiers in, a token out)."""
    service = ctx["aiocrypt"].service
    token = await service.encrypt_field(total, KeyType.FINANCIAL_DATA, context="statements.total")
    # a real app would write the token to its statements table here
    return {"user_id": user_id, "stored": len(token)}


class WorkerSettings:
    """The application's worker; ``merge_into`` adds aiocrypt's jobs and startup."""

    functions = [monthly_statement]  # noqa: RUF012 (arq reads class attributes)
    queue_name = CONFIG.queue_name
    redis_settings = CONFIG.redis_settings()
    max_jobs = CONFIG.max_jobs
    poll_delay = CONFIG.poll_delay


merge_into(WorkerSettings, CONFIG)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--burst", action="store_true", help="exit once the queue is empty (tests, one-off runs)"
    )
    args = parser.parse_args(argv)
    logging.config.dictConfig(default_log_config(verbose=False))
    run_worker(WorkerSettings, burst=args.burst)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
