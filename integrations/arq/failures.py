"""How aiocrypt's ARQ jobs fail: what is retried, what fails at once, and what it says.

An error that may pass (key store, KEK provider, database or Redis unreachable,
a lock held too long) is retried with exponential backoff (``arq.Retry(defer=...)``)
up to ``max_tries``, each retry logged and shown in the status record; anything
else (a missing table, an unknown key, a row that does not decrypt, bad
configuration) fails the job at once with :class:`JobFailedError`, whose message
says what to fix.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from arq import Retry

from aiocrypt import (
    AiocryptError,
    KekProviderError,
    KeyStoreError,
    KeyStoreIntegrityError,
    KeyType,
    ReencryptionError,
)
from aiocrypt.adapters import KeyTypeLike

if TYPE_CHECKING:
    from .state import WorkerState

__all__ = [
    "JobFailedError",
    "ShardIncompleteError",
    "describe",
    "guarded",
    "is_transient",
    "job_key_type",
]

logger = logging.getLogger("aiocrypt.arq")
T = TypeVar("T")


class JobFailedError(AiocryptError):
    """A job cannot proceed; the message says why and what to check. Not retried."""


class ShardIncompleteError(AiocryptError):
    """A shard's passes left rows behind (concurrent writers): worth another try later."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass on its own (retry later) rather than need a fix."""
    if isinstance(exc, (JobFailedError, KeyStoreIntegrityError)):
        return False
    if isinstance(exc, ShardIncompleteError):
        return True
    if isinstance(exc, KeyStoreError):  # unreachable, lock timeout, lost write race
        return True
    if isinstance(exc, KekProviderError):
        return exc.retryable
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    module = type(exc).__module__
    if module.startswith("asyncpg"):
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate is None:  # InterfaceError: the connection went away under us
            return True
        # connection, transaction rollback (deadlock, serialization), resources,
        # operator intervention (shutdown), system error, lock not available
        return str(sqlstate)[:2] in ("08", "40", "53", "57", "58") or sqlstate == "55P03"
    if module.startswith("redis"):
        return type(exc).__name__ in ("ConnectionError", "TimeoutError", "BusyLoadingError")
    return False


def describe(exc: BaseException) -> str:
    """A one-line reason naming what failed (identifiers only)."""
    detail = f"{type(exc).__name__}: {str(exc)[:300]}".rstrip(": ")
    module = type(exc).__module__
    if isinstance(exc, KeyStoreError):
        return f"the key store failed ({detail})"
    if isinstance(exc, KekProviderError):
        return f"the KEK provider failed ({detail})"
    if isinstance(exc, ReencryptionError):
        return (
            f"{exc.table}.{exc.column}: the value of the row with primary key "
            f"{exc.primary_key!r} does not decrypt; fix or remove it, then enqueue the "
            "re-encryption again"
        )
    if module.startswith("asyncpg"):
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        if sqlstate in ("42P01", "42703"):
            return f"a table or column is missing in the database ({detail})"
        return f"the database failed ({detail})"
    if module.startswith("redis"):
        return f"Redis failed ({detail})"
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return f"a connection failed ({detail})"
    return detail


async def guarded(
    ctx: dict[str, Any],
    state: WorkerState,
    what: str,
    work: Callable[[], Awaitable[T]],
    *,
    on_retry: Callable[[str, float], Awaitable[None]] | None = None,
    on_failure: Callable[[str], Awaitable[None]] | None = None,
) -> T:
    """Run ``work``; retry what may pass (bounded), fail clearly on anything else.

    The keyring is reloaded first: another worker may have rotated a key a moment
    ago, and this one must not plan or re-encrypt against an older active key.
    """
    try:
        await state.key_manager.refresh(force=True)
        return await work()
    except (Retry, asyncio.CancelledError):
        raise
    except Exception as exc:
        job_try = int(ctx.get("job_try") or 1)
        max_tries = state.config.max_tries
        reason = exc.args[0] if isinstance(exc, JobFailedError) and exc.args else describe(exc)
        if is_transient(exc) and job_try < max_tries:
            defer = state.config.retry_defer(job_try)
            logger.warning(
                "%s: try %d of %d failed: %s; retrying in %.1f s",
                what,
                job_try,
                max_tries,
                reason,
                defer,
            )
            if on_retry is not None:
                await on_retry(reason, defer)
            raise Retry(defer=defer) from exc
        message = (
            f"{what}: gave up after {job_try} tries: {reason}"
            if is_transient(exc)
            else f"{what}: cannot proceed: {reason}"
        )
        logger.error("%s", message)
        if on_failure is not None:
            await on_failure(message)
        raise JobFailedError(message) from exc


def job_key_type(value: KeyTypeLike) -> KeyType:
    """A key type read from a job's arguments; an unknown one fails the job (not retried)."""
    try:
        return KeyType(value)
    except ValueError as exc:
        raise JobFailedError(f"unknown key type {value!r}: {exc}") from None
