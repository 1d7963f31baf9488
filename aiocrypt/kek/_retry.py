"""Bounded retries for KEK provider calls.

A provider call is retried only when the provider's error translator marks the
failure ``retryable`` (throttling, timeouts, 5xx answers, connection errors),
with exponential backoff and jitter, a few attempts and a bounded total time.
Access denied, unknown keys and invalid ciphertext (a wrong context or a
tampered wrapped key) fail at once: retrying them only multiplies the load
on a service that has already said no.

The SDKs' own retry loops are switched off in the clients the providers build
(botocore ``total_max_attempts=1``, azure-core ``retry_total=0``, GAPIC ``retry=None``;
hvac does not retry), so this is the only loop and a call is never multiplied
twice. A client the caller passes in keeps the caller's settings.

The cloud SDKs are asyncio libraries, so these calls run on asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from .._errors import KekProviderError

__all__ = ["RetryPolicy", "call_with_retry"]

logger = logging.getLogger("aiocrypt.kek")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a KEK provider retries transient failures."""

    attempts: int = 4
    """Total attempts, the first one included."""
    initial_delay: float = 0.2
    """Backoff before the second attempt; doubled for each further one."""
    max_delay: float = 2.0
    """Cap of a single backoff."""
    call_timeout: float = 10.0
    """Time allowed for one attempt."""
    total_timeout: float = 30.0
    """Time allowed for all attempts and backoffs together."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if min(self.initial_delay, self.max_delay) < 0:
            raise ValueError("delays cannot be negative")
        if min(self.call_timeout, self.total_timeout) <= 0:
            raise ValueError("timeouts must be positive")

    def delay(self, attempt: int) -> float:
        """Backoff after failed attempt number ``attempt`` (1-based), with jitter."""
        base = min(self.max_delay, self.initial_delay * 2.0 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)


NO_RETRY = RetryPolicy(attempts=1)


async def call_with_retry(
    call: Callable[[], Awaitable[T]],
    translate: Callable[[Exception], KekProviderError],
    policy: RetryPolicy,
    *,
    what: str,
    backend: str,
) -> T:
    """Run ``call``, translating failures with ``translate`` and retrying retryable ones.

    ``what`` names the operation and key ("AWS KMS Encrypt with aws-kms://...")
    for timeouts and log lines. The last error is raised ``from`` the
    provider's exception.
    """
    deadline = anyio.current_time() + policy.total_timeout
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - anyio.current_time()
        try:
            # asyncio's own timeout, not anyio's: grpc.aio re-raises a cancellation as the
            # CancelledError of its inner task, which anyio's scope does not recognise
            async with asyncio.timeout(max(0.001, min(policy.call_timeout, remaining))):
                return await call()
        except KekProviderError as exc:
            error, cause = exc, exc.__cause__
        except TimeoutError as exc:
            error, cause = (
                KekProviderError(
                    f"{what}: no answer within {policy.call_timeout:g}s (check the endpoint, the "
                    "network path and the service's health)",
                    backend=backend,
                    retryable=True,
                ),
                exc,
            )
        except Exception as exc:
            error, cause = translate(exc), exc
        delay = policy.delay(attempt)
        last = (
            not error.retryable
            or attempt >= policy.attempts
            or anyio.current_time() + delay >= deadline
        )
        if last:
            if error.retryable and attempt > 1:
                error = KekProviderError(
                    f"{error} (gave up after {attempt} attempts)",
                    backend=error.backend,
                    retryable=True,
                )
            raise error from cause
        logger.warning(
            "%s failed (attempt %d of %d), retrying in %.2fs: %s",
            what,
            attempt,
            policy.attempts,
            delay,
            error,
        )
        await anyio.sleep(delay)
