"""A worker built from aiocrypt's settings but decoding jobs with pickle, the ways a user
might get there; each must refuse to start. Run by test_arq_no_pickle.py as
``python tests/arq/pickle_worker.py MODE`` with the test's environment:

* ``default``: aiocrypt's settings with ``job_serializer`` / ``job_deserializer``
  removed (arq's default, pickle), run as ``arq`` runs a settings class;
* ``pickle``: the same with ``pickle.dumps`` / ``pickle.loads`` set explicitly;
* ``pool``: arq's ``Worker`` given a JSON pool (``redis_pool=``) but decoding its
  jobs with pickle, which the pool's codec does not change.
"""

from __future__ import annotations

import asyncio
import pickle
import sys

from arq.worker import Worker, run_worker

from aiocrypt.integrations.arq import ArqWorkerConfig, aiocrypt_worker_settings, create_job_pool


def main(mode: str) -> None:
    config = ArqWorkerConfig.from_env()
    settings = aiocrypt_worker_settings(config, burst=True)
    for name in ("job_serializer", "job_deserializer"):
        settings.pop(name, None)
    if mode == "default":
        run_worker(settings)
    elif mode == "pickle":
        run_worker({**settings, "job_serializer": pickle.dumps, "job_deserializer": pickle.loads})
    elif mode == "pool":
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        pool = loop.run_until_complete(create_job_pool(config))
        Worker(**settings, redis_pool=pool).run()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1])
