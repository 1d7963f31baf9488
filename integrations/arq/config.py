"""Settings of aiocrypt's ARQ worker: one typed object, read once from ``ENCRYPTION_ARQ_*``.

Nothing here imports arq (the CLI reads these settings to find the status
records), and nothing secret appears in a repr: the Redis URL may carry a
password, so it is ``repr=False`` and only ever handed to arq's
``RedisSettings.from_dsn`` (whose own repr prints the password: never log it).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiocrypt import ConfigurationError
from aiocrypt.reencrypt import DEFAULT_CHECKPOINT_TABLE, quote_identifier

__all__ = ["ArqWorkerConfig", "Schedule"]

_WEEKDAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME_RE: Final = re.compile(r"(?:(?P<days>[a-z,]+)\s+)?(?P<hour>\d{1,2}):(?P<minute>\d{2})")
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
CRON_NAMES: Final = ("rotation", "cleanup")


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a cron job runs: ``"02:00"`` (daily) or ``"sun 03:00"`` / ``"mon,thu 04:30"``.

    ``weekdays`` use Python's numbering (Monday is 0), as arq's ``cron`` does.
    """

    hour: int
    minute: int
    weekdays: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.hour <= 23 and 0 <= self.minute <= 59):
            raise ValueError(f"not a time of day: {self.hour:02d}:{self.minute:02d}")
        if self.weekdays is not None:
            object.__setattr__(self, "weekdays", frozenset(self.weekdays))
            if not self.weekdays or not self.weekdays <= set(range(7)):
                raise ValueError("weekdays must be 0 (Monday) to 6 (Sunday)")

    @classmethod
    def parse(cls, text: str) -> Schedule | None:
        """``"HH:MM"``, ``"<days> HH:MM"`` (days: mon..sun, comma-separated), or ``"off"``."""
        value = text.strip().lower()
        if value in ("off", "none", "disabled"):
            return None
        match = _TIME_RE.fullmatch(value)
        if match is None:
            raise ValueError(f"{text!r} is not a schedule: use 'HH:MM', 'sun HH:MM' or 'off'")
        days = None
        if match["days"]:
            try:
                days = frozenset(_WEEKDAYS.index(d) for d in match["days"].split(","))
            except ValueError:
                raise ValueError(f"{text!r}: weekdays are {', '.join(_WEEKDAYS)}") from None
        return cls(int(match["hour"]), int(match["minute"]), days)

    def cron_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``arq.cron.cron``."""
        kwargs: dict[str, Any] = {"hour": self.hour, "minute": self.minute, "second": 0}
        if self.weekdays is not None:
            kwargs["weekday"] = set(self.weekdays)
        return kwargs

    def __str__(self) -> str:
        days = (
            ""
            if self.weekdays is None
            else ",".join(_WEEKDAYS[d] for d in sorted(self.weekdays)) + " "
        )
        return f"{days}{self.hour:02d}:{self.minute:02d}"


@dataclass(frozen=True)
class ArqWorkerConfig:
    """What the worker needs beyond ``EncryptionConfig`` (which it reads as well).

    ``from_env()`` reads the variables in ``_ENV_VARS`` once; ``replace()`` derives
    a changed copy (the way ``aiocrypt_worker_settings(config=...)`` is tuned in code).
    """

    redis_url: str | None = field(default=None, repr=False, compare=False)
    """ENCRYPTION_ARQ_REDIS_URL, else ENCRYPTION_REDIS_URL: the Redis arq queues on."""
    queue_name: str = "encryption"
    key_prefix: str = "aiocrypt"
    """Namespace of every Redis key and arq job id aiocrypt's jobs create."""
    metadata: str | None = None
    """Import path of SQLAlchemy metadata, ``"myapp.models:Base.metadata"``."""
    tables: str | None = None
    """Table specs as JSON (a list of ``TableSpec.to_dict()``), or ``@/path/to/file.json``."""
    rotation_schedule: Schedule | None = Schedule(2, 0)
    cleanup_schedule: Schedule | None = Schedule(3, 0, frozenset({6}))
    timezone: str | None = None
    """IANA name the cron times are read in (default: the worker's local time zone)."""
    run_at_startup: frozenset[str] = frozenset()
    """Cron jobs (``rotation``, ``cleanup``) to also run once when the worker starts."""
    shards: int = 4
    """Shards per table; more when a table has more than ``max_shard_rows`` rows to move."""
    max_shard_rows: int = 2_000_000
    batch_size: int = 1000
    rate_limit: float | None = None
    """Rows per second per shard (None: as fast as the worker goes)."""
    max_jobs: int = 1
    """Jobs one worker process runs at once (re-encryption is CPU-bound: add processes)."""
    poll_delay: float = 0.5
    """Seconds between two looks at the queue (arq's ``poll_delay``)."""
    max_tries: int = 5
    job_timeout: float = 1800.0
    retry_delay: float = 5.0
    """First retry after this many seconds, doubling each try, at most ``max_retry_delay``."""
    max_retry_delay: float = 300.0
    sweep_delay: float = 10.0
    """Wait before sweeping rows written on an old key after their shard passed them."""
    status_ttl: int = 30 * 86400
    keep_result: float = 86400.0
    """Seconds arq keeps the result of each aiocrypt job (the cron runs' reports too)."""
    checkpoint_table: str = DEFAULT_CHECKPOINT_TABLE
    worker_name: str | None = None
    """How status records name this worker (default ``host:pid``)."""

    def __post_init__(self) -> None:
        problems = self.validate()
        if problems:
            raise ConfigurationError("invalid aiocrypt ARQ settings:\n- " + "\n- ".join(problems))

    def validate(self) -> list[str]:  # noqa: C901 - one check per worker setting, each naming the setting
        problems = []
        if not _PREFIX_RE.fullmatch(self.key_prefix):
            problems.append("ENCRYPTION_ARQ_PREFIX must be 1-64 characters of [A-Za-z0-9_.:-]")
        if not self.queue_name:
            problems.append("ENCRYPTION_ARQ_QUEUE must not be empty")
        for name in (
            "shards",
            "max_shard_rows",
            "batch_size",
            "max_jobs",
            "max_tries",
            "status_ttl",
        ):
            if int(getattr(self, name)) < 1:
                problems.append(f"{_ENV_VARS[name]} must be at least 1")
        for name in ("job_timeout", "retry_delay", "max_retry_delay", "poll_delay", "keep_result"):
            if float(getattr(self, name)) <= 0:
                problems.append(f"{_ENV_VARS[name]} must be a positive number of seconds")
        if self.sweep_delay < 0:
            problems.append("ENCRYPTION_ARQ_SWEEP_DELAY cannot be negative")
        if self.rate_limit is not None and self.rate_limit <= 0:
            problems.append("ENCRYPTION_ARQ_RATE_LIMIT must be a positive number of rows/s")
        unknown = set(self.run_at_startup) - set(CRON_NAMES)
        if unknown:
            problems.append(
                f"ENCRYPTION_ARQ_RUN_AT_STARTUP: unknown cron job(s) "
                f"{', '.join(sorted(unknown))} (use {', '.join(CRON_NAMES)})"
            )
        if self.metadata is not None and ":" not in self.metadata:
            problems.append("ENCRYPTION_ARQ_METADATA must look like 'package.module:attribute'")
        if self.metadata is not None and self.tables is not None:
            problems.append("set ENCRYPTION_ARQ_METADATA or ENCRYPTION_ARQ_TABLES, not both")
        try:
            quote_identifier(self.checkpoint_table)
        except ValueError:
            problems.append("ENCRYPTION_ARQ_CHECKPOINT_TABLE must be a plain SQL name")
        if self.timezone is not None:
            try:
                self.tzinfo()
            except Exception:
                problems.append(f"ENCRYPTION_ARQ_TIMEZONE: unknown time zone {self.timezone!r}")
        return problems

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ArqWorkerConfig:
        env = os.environ if environ is None else environ
        raw = {
            name: env[var].strip() for name, var in _ENV_VARS.items() if env.get(var, "").strip()
        }
        if "redis_url" not in raw and env.get("ENCRYPTION_REDIS_URL", "").strip():
            raw["redis_url"] = env["ENCRYPTION_REDIS_URL"].strip()
        values: dict[str, Any] = {}
        problems: list[str] = []
        for name, text in raw.items():
            try:
                values[name] = _PARSERS.get(name, str)(text)
            except ValueError as exc:
                problems.append(f"{_ENV_VARS[name]}: {exc}")
        if problems:
            raise ConfigurationError("invalid aiocrypt ARQ settings:\n- " + "\n- ".join(problems))
        return cls(**values)

    def replace(self, **changes: Any) -> ArqWorkerConfig:
        return dataclasses.replace(self, **changes)

    # -- derived values -----------------------------------------------------

    def tzinfo(self) -> Any:
        if self.timezone is None:
            return None
        from zoneinfo import ZoneInfo

        return ZoneInfo(self.timezone)

    def redis_settings(self) -> Any:
        """arq's ``RedisSettings`` for ``redis_url`` (its repr shows the password: never log it)."""
        from arq.connections import RedisSettings

        if not self.redis_url:
            return RedisSettings()
        return RedisSettings.from_dsn(self.redis_url)

    def retry_defer(self, job_try: int) -> float:
        """Seconds before try ``job_try + 1``: exponential backoff, capped."""
        return float(min(self.max_retry_delay, self.retry_delay * 2 ** max(0, job_try - 1)))

    def name_of_worker(self) -> str:
        return self.worker_name or f"{socket.gethostname()}:{os.getpid()}"

    def job_id(self, *parts: str) -> str:
        """An arq job id in aiocrypt's namespace (arq job ids are global in a Redis db)."""
        return ":".join((self.key_prefix, *parts))


def _float_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


def _names(text: str) -> frozenset[str]:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "all"):
        return frozenset(CRON_NAMES)
    if value in ("0", "false", "no", "none"):
        return frozenset()
    return frozenset(n.strip() for n in value.split(",") if n.strip())


_PARSERS: Final[dict[str, Any]] = {
    "rotation_schedule": Schedule.parse,
    "cleanup_schedule": Schedule.parse,
    "run_at_startup": _names,
    "shards": int,
    "max_shard_rows": int,
    "batch_size": int,
    "rate_limit": _float_or_none,
    "max_jobs": int,
    "poll_delay": float,
    "max_tries": int,
    "job_timeout": float,
    "retry_delay": float,
    "max_retry_delay": float,
    "sweep_delay": float,
    "status_ttl": int,
    "keep_result": float,
}

_ENV_VARS: Final = {
    "redis_url": "ENCRYPTION_ARQ_REDIS_URL",
    "queue_name": "ENCRYPTION_ARQ_QUEUE",
    "key_prefix": "ENCRYPTION_ARQ_PREFIX",
    "metadata": "ENCRYPTION_ARQ_METADATA",
    "tables": "ENCRYPTION_ARQ_TABLES",
    "rotation_schedule": "ENCRYPTION_ARQ_ROTATION_AT",
    "cleanup_schedule": "ENCRYPTION_ARQ_CLEANUP_AT",
    "timezone": "ENCRYPTION_ARQ_TIMEZONE",
    "run_at_startup": "ENCRYPTION_ARQ_RUN_AT_STARTUP",
    "shards": "ENCRYPTION_ARQ_SHARDS",
    "max_shard_rows": "ENCRYPTION_ARQ_MAX_SHARD_ROWS",
    "batch_size": "ENCRYPTION_ARQ_BATCH_SIZE",
    "rate_limit": "ENCRYPTION_ARQ_RATE_LIMIT",
    "max_jobs": "ENCRYPTION_ARQ_MAX_JOBS",
    "poll_delay": "ENCRYPTION_ARQ_POLL_DELAY",
    "max_tries": "ENCRYPTION_ARQ_MAX_TRIES",
    "job_timeout": "ENCRYPTION_ARQ_JOB_TIMEOUT",
    "retry_delay": "ENCRYPTION_ARQ_RETRY_DELAY",
    "max_retry_delay": "ENCRYPTION_ARQ_MAX_RETRY_DELAY",
    "sweep_delay": "ENCRYPTION_ARQ_SWEEP_DELAY",
    "status_ttl": "ENCRYPTION_ARQ_STATUS_TTL",
    "keep_result": "ENCRYPTION_ARQ_KEEP_RESULT",
    "checkpoint_table": "ENCRYPTION_ARQ_CHECKPOINT_TABLE",
    "worker_name": "ENCRYPTION_ARQ_WORKER_NAME",
}
