"""JSON jobs for aiocrypt's ARQ workers: a worker never unpickles.

arq serializes jobs and results with pickle unless told otherwise, and a worker
unpickles whatever sits under ``arq:job:<id>`` once ``<id>`` is in its queue.
Whoever can write to that Redis (a ``SET`` and a ``ZADD``) would run code in
the worker, which holds the master key (or the KMS credentials) and every
unwrapped data key. So aiocrypt's worker, its pools and every enqueue path use
:func:`job_serializer` / :func:`job_deserializer`: JSON in, plain data out
(dicts, lists, strings, numbers, booleans, None). A payload written by anyone
else can at most name one of the worker's functions with JSON arguments; one
that is not JSON fails its job before anything of it runs.

A failed job's result holds its exception: it travels as its class name and
message, and comes back as the same class for a few known classes (aiocrypt's
job errors, arq's and asyncio's), else as arq's ``JobExecutionFailed("<class
name>: <message>")``. No class is looked up by a name read from Redis.

:func:`codec_problem` is the one rule for a worker's or a pool's codec:
:func:`check_worker` (run by aiocrypt's ``on_startup``) makes a worker refuse
to start with another one, :func:`check_pool` makes enqueueing refuse a pool
that would pickle (the worker would refuse the job anyway, later and less
clearly).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import enum
import functools
import json
import pickle
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final

from arq.jobs import DeserializationError, SerializationError
from arq.worker import JobExecutionFailed, Worker

from aiocrypt import ConfigurationError

from .failures import JobFailedError, ShardIncompleteError

__all__ = [
    "check_pool",
    "check_worker",
    "codec_problem",
    "codec_settings",
    "job_deserializer",
    "job_serializer",
]

_ERROR_TAG: Final = "__aiocrypt_error__"
_NOT_JSON: Final = (
    "not a JSON payload: aiocrypt's job queue carries JSON only, so a "
    "pickled (or otherwise encoded) job is refused unread and runs nothing"
)


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


#: The names aiocrypt's job errors were sent under before the ARQ integration became a
#: package, still read back as those classes (a result written by an older worker).
_FORMER_NAMES: Final = {
    "aiocrypt.integrations._arq_jobs.JobFailedError": JobFailedError,
    "aiocrypt.integrations._arq_jobs.ShardIncompleteError": ShardIncompleteError,
}


@functools.cache
def _known_errors() -> Mapping[str, Callable[[str], BaseException]]:
    # The classes a failed job's exception comes back as, by the name it was sent
    # under; each is built with its message only: nothing read from Redis chooses
    # code to run.
    known: dict[str, Callable[[str], BaseException]] = dict(_FORMER_NAMES)
    known.update(
        {
            _name(cls): cls
            for cls in (
                JobFailedError,
                ShardIncompleteError,
                JobExecutionFailed,
                SerializationError,
                DeserializationError,
                asyncio.CancelledError,
                TimeoutError,
            )
        }
    )
    return known


def _plain(value: Any) -> Any:
    # json's ``default``: what else may travel, and how.
    if isinstance(value, BaseException):  # a failed job's result
        return {_ERROR_TAG: _name(type(value)), "message": str(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(
            "bytes do not travel through aiocrypt's job queue (they could be key "
            "material or plaintext): pass identifiers"
        )
    raise TypeError(
        f"a {type(value).__name__} cannot travel as JSON through aiocrypt's job "
        "queue: pass identifiers, numbers, strings, lists and dicts"
    )


def job_serializer(obj: Any) -> bytes:
    """arq's ``job_serializer``: a job or a result as UTF-8 JSON.

    Tuples become lists; enums their value; dates ISO 8601 text; an exception
    its class name and message. Anything else (bytes included) raises
    ``TypeError``, which arq reports as a ``SerializationError`` on enqueue.
    """
    return json.dumps(obj, default=_plain, separators=(",", ":")).encode("utf-8")


def job_deserializer(data: bytes) -> dict[str, Any]:
    """arq's ``job_deserializer``: UTF-8 JSON back to plain data; anything else is refused.

    The error names neither the payload nor a part of it (arq logs it with a
    traceback), and carries no reference to it: the decoder's own error (whose
    ``object`` is the payload) is dropped, not chained.
    """
    try:
        value = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise ValueError(_NOT_JSON)
    result = value.get("r")
    if value.get("s") is False and isinstance(result, dict) and _ERROR_TAG in result:
        value["r"] = _error(result)
    return value


def _error(tagged: Mapping[str, Any]) -> BaseException:
    name, message = str(tagged[_ERROR_TAG]), str(tagged.get("message", ""))
    known = _known_errors().get(name)
    if known is not None:
        return known(message)
    return JobExecutionFailed(f"{name.rpartition('.')[2]}: {message}")


def codec_settings() -> dict[str, Any]:
    """``job_serializer`` and ``job_deserializer``, as arq's ``Worker`` and
    ``create_pool`` take them."""
    return {"job_serializer": job_serializer, "job_deserializer": job_deserializer}


def _describe(function: Any, default: str) -> str:
    if function is None:
        return f"{default} (arq's default)"
    if function in (pickle.loads, pickle.dumps):
        return f"pickle.{function.__name__}"
    return str(getattr(function, "__qualname__", type(function).__name__))


def codec_problem(serializer: Any, deserializer: Any) -> str | None:
    """Why a worker or a pool with this codec must not carry aiocrypt's jobs, or None."""
    problems = []
    if deserializer is not job_deserializer:
        problems.append(
            f"it decodes with {_describe(deserializer, 'pickle.loads')}, so "
            "whoever can write to its Redis (arq:job:<id> and a ZADD to the queue) "
            "could run code in a process that holds the master key (or KMS "
            "credentials) and every unwrapped data key"
        )
    if serializer is not job_serializer:
        problems.append(
            f"it encodes with {_describe(serializer, 'pickle.dumps')}, which "
            "aiocrypt's JSON-only workers refuse to read"
        )
    if not problems:
        return None
    return (
        "; ".join(problems) + ". Build workers with aiocrypt_worker_settings() or "
        "merge_into(), enqueue through create_job_pool(), or pass "
        "job_serializer=aiocrypt.integrations.arq.job_serializer and "
        "job_deserializer=aiocrypt.integrations.arq.job_deserializer"
    )


def _running_worker(ctx: dict[str, Any]) -> Worker | None:
    # arq hands on_startup its ``ctx`` and nothing else; the Worker that called it is
    # on the stack (Worker.main awaits on_startup). Found there, so that a worker given
    # a JSON pool (``redis_pool=``) but decoding with pickle is refused too.
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Worker) and candidate.ctx is ctx:
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


def check_worker(ctx: dict[str, Any]) -> None:
    """Refuse to start (``ConfigurationError``) a worker, or a worker's pool, whose codec
    is not aiocrypt's JSON: called first thing by aiocrypt's ``on_startup``, before
    any key is loaded and before the worker takes its first job."""
    worker = _running_worker(ctx)
    owners: list[tuple[str, Any]] = [("this arq worker", worker)] if worker else []
    owners.append(("this arq worker's Redis pool (ctx['redis'])", ctx.get("redis")))
    for what, owner in owners:
        problem = codec_problem(
            getattr(owner, "job_serializer", None), getattr(owner, "job_deserializer", None)
        )
        if problem is not None:
            raise ConfigurationError(
                f"refusing to start: {what} does not use aiocrypt's JSON job codec: {problem}"
            )


def check_pool(redis: Any) -> None:
    """Refuse (``ConfigurationError``) to enqueue through a pool whose codec is not
    aiocrypt's JSON."""
    problem = codec_problem(
        getattr(redis, "job_serializer", None), getattr(redis, "job_deserializer", None)
    )
    if problem is not None:
        raise ConfigurationError(
            "cannot enqueue aiocrypt's jobs: this arq pool does not use "
            f"aiocrypt's JSON job codec: {problem}"
        )
