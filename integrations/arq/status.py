"""Status of re-encryption jobs in Redis, readable from outside the workers.

One hash per re-encryption job, ``<prefix>:status:<job id>``:

* ``meta``: what the job is (key type, old key, target key, batch size, when it
  was planned) and its plan: the shards, each a primary-key range of one table
  with the rows it had to move when planned;
* ``shard:<n>``: that shard's state (``queued``, ``running``, ``retrying``,
  ``done``, ``failed``), the worker running it, its tries, rows done (from the
  engine's checkpoint, so it survives a crash), rate, and every attempt;
* ``result``: written by the last shard to finish (the census of the old key).

Each field has one writer at a time (arq runs a job id once), so fields are
JSON documents replaced whole. A sorted set ``<prefix>:status`` indexes the
jobs by creation time. Records expire ``status_ttl`` after their last write.
Everything stored is an identifier or a counter: no plaintext, no key material.
"""

from __future__ import annotations

import datetime as _dt
import json
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from .config import ArqWorkerConfig

__all__ = [
    "ReencryptionStatus",
    "LockState",
    "ShardStatus",
    "StatusStore",
    "now_iso",
    "redis_lock",
    "reencryption_status",
]

SHARD_STATES: Final = ("queued", "running", "retrying", "done", "failed")
JOB_STATES: Final = ("queued", "running", "done", "incomplete", "failed")
_RATE_WINDOW: Final = 15.0  # a running shard silent for longer adds nothing to the rate
_RELEASE_SCRIPT: Final = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) "
    "else return 0 end"
)


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _load(value: Any) -> Any:
    return None if value is None else json.loads(_text(value))


def _dump(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class ShardStatus:
    """One shard: a primary-key range of one table, run by one job at a time."""

    index: int
    table: str
    after: Any
    until: Any
    rows_total: int
    state: str = "queued"
    worker: str | None = None
    tries: int = 0
    rows_done: int = 0
    rows_updated: int = 0
    rows_conflicted: int = 0
    rows_failed: int = 0
    rate: float = 0.0
    started_at: str | None = None
    updated_at: str | None = None
    finished_at: str | None = None
    updated_ts: float = 0.0
    error: str | None = None
    attempts: tuple[Mapping[str, Any], ...] = ()

    @property
    def rows_left(self) -> int:
        return 0 if self.state == "done" else max(0, self.rows_total - self.rows_done)

    @property
    def workers(self) -> list[str]:
        """Every worker that ran an attempt of this shard, in order."""
        seen: list[str] = []
        for attempt in self.attempts:
            name = attempt.get("worker")
            if name and name not in seen:
                seen.append(name)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "table": self.table,
            "after": self.after,
            "until": self.until,
            "rows_total": self.rows_total,
            "state": self.state,
            "worker": self.worker,
            "tries": self.tries,
            "rows_done": self.rows_done,
            "rows_left": self.rows_left,
            "rows_updated": self.rows_updated,
            "rows_conflicted": self.rows_conflicted,
            "rows_failed": self.rows_failed,
            "rate": self.rate,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "updated_ts": self.updated_ts,
            "error": self.error,
            "attempts": [dict(a) for a in self.attempts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardStatus:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["attempts"] = tuple(data.get("attempts", ()))
        return cls(**known)


@dataclass(frozen=True, slots=True)
class ReencryptionStatus:
    """A re-encryption job as its status record tells it, with totals over the shards."""

    job_id: str
    key_type: str
    old_key_id: str
    target_key_id: str | None
    created_at: str
    shards: tuple[ShardStatus, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)
    result: Mapping[str, Any] | None = None
    error: str | None = None

    @property
    def state(self) -> str:
        if self.error is not None or any(s.state == "failed" for s in self.shards):
            return "failed"
        if all(s.state == "done" for s in self.shards):
            result = self.result or {}
            # the census found rows on the old key even after the sweeps
            return (
                "incomplete" if result.get("old_key_rows") and result.get("finished_at") else "done"
            )
        if any(s.state in ("running", "retrying", "done") for s in self.shards):
            return "running"
        return "queued"

    @property
    def rows_total(self) -> int:
        return sum(s.rows_total for s in self.shards)

    @property
    def rows_done(self) -> int:
        return sum(
            min(s.rows_done, s.rows_total) if s.state != "done" else s.rows_total
            for s in self.shards
        )

    @property
    def rows_left(self) -> int:
        return sum(s.rows_left for s in self.shards)

    @property
    def rate(self) -> float:
        """Rows per second over the shards running now."""
        now = time.time()
        return sum(
            s.rate
            for s in self.shards
            if s.state == "running" and now - s.updated_ts <= _RATE_WINDOW
        )

    @property
    def finished_at(self) -> str | None:
        if self.state not in ("done", "incomplete") or not self.shards:
            return None if self.result is None else self.result.get("finished_at")
        return max((s.finished_at or "" for s in self.shards), default=None) or None

    @property
    def started_at(self) -> str | None:
        return min((s.started_at for s in self.shards if s.started_at), default=None)

    @property
    def workers(self) -> list[str]:
        seen: list[str] = []
        for shard in self.shards:
            for name in shard.workers:
                if name not in seen:
                    seen.append(name)
        return seen

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "key_type": self.key_type,
            "old_key_id": self.old_key_id,
            "target_key_id": self.target_key_id,
            "state": self.state,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "rows_total": self.rows_total,
            "rows_done": self.rows_done,
            "rows_left": self.rows_left,
            "rate": self.rate,
            "workers": self.workers,
            "error": self.error,
            "result": None if self.result is None else dict(self.result),
            "shards": [s.to_dict() for s in self.shards],
        }


class StatusStore:
    """Reads and writes the status records under ``prefix`` in one Redis database.

    ``redis`` is a ``redis.asyncio.Redis`` (arq's ``ArqRedis`` is one).
    """

    def __init__(self, redis: Any, prefix: str, *, ttl: int = 30 * 86400) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl

    def __repr__(self) -> str:
        return f"<StatusStore prefix={self.prefix!r}>"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:status"

    def key(self, job_id: str) -> str:
        return f"{self.prefix}:status:{job_id}"

    async def create(self, job_id: str, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Store ``meta`` and a queued record per planned shard, unless the job has a plan
        already (another run planned it first): return the plan in force."""
        key = self.key(job_id)
        if await self.redis.hsetnx(key, "meta", _dump(meta)):
            shards = {
                f"shard:{s['index']}": _dump({**s, "state": "queued"}) for s in meta.get("plan", ())
            }
            if shards:
                await self.redis.hset(key, mapping=shards)
            await self.redis.zadd(self.index_key, {job_id: time.time()}, nx=True)
        await self.redis.expire(key, self.ttl)
        await self.redis.expire(self.index_key, self.ttl)
        stored = await self.meta(job_id)
        assert stored is not None
        return stored

    async def delete(self, job_id: str) -> None:
        await self.redis.delete(self.key(job_id))

    async def meta(self, job_id: str) -> dict[str, Any] | None:
        value = _load(await self.redis.hget(self.key(job_id), "meta"))
        return None if value is None else dict(value)

    async def shard(self, job_id: str, index: int) -> ShardStatus | None:
        value = _load(await self.redis.hget(self.key(job_id), f"shard:{index}"))
        return None if value is None else ShardStatus.from_dict(value)

    async def put_shard(self, job_id: str, shard: ShardStatus) -> None:
        key = self.key(job_id)
        await self.redis.hset(key, f"shard:{shard.index}", _dump(shard.to_dict()))
        await self.redis.expire(key, self.ttl)

    async def put(self, job_id: str, name: str, value: Any) -> None:
        key = self.key(job_id)
        await self.redis.hset(key, name, _dump(value))
        await self.redis.expire(key, self.ttl)

    async def read(self, job_id: str) -> ReencryptionStatus | None:
        raw = await self.redis.hgetall(self.key(job_id))
        if not raw:
            return None
        fields = {_text(k): _load(v) for k, v in raw.items()}
        meta = fields.get("meta")
        if meta is None:
            return None
        shards = sorted(
            (ShardStatus.from_dict(v) for k, v in fields.items() if k.startswith("shard:")),
            key=lambda s: s.index,
        )
        return ReencryptionStatus(
            job_id=job_id,
            key_type=meta.get("key_type", ""),
            old_key_id=meta.get("old_key_id", ""),
            target_key_id=meta.get("target_key_id"),
            created_at=meta.get("created_at", ""),
            shards=tuple(shards),
            meta=meta,
            result=fields.get("result"),
            error=fields.get("error"),
        )

    async def job_ids(self, limit: int = 20) -> list[str]:
        """The most recent job ids, newest first."""
        return [_text(v) for v in await self.redis.zrevrange(self.index_key, 0, limit - 1)]

    async def recent(self, limit: int = 20) -> list[ReencryptionStatus]:
        found = []
        for job_id in await self.job_ids(limit):
            status = await self.read(job_id)
            if status is not None:
                found.append(status)
        return found

    async def resolve(self, name: str) -> str | None:
        """A job id from a job id or an old key id (``reencrypt-<key id>``)."""
        for candidate in (name, f"reencrypt-{name}"):
            if await self.redis.hget(self.key(candidate), "meta") is not None:
                return candidate
        return None


@dataclass(frozen=True, slots=True)
class LockState:
    """Whether ``redis_lock`` got the lock, and who holds it."""

    acquired: bool
    holder: str | None


@asynccontextmanager
async def redis_lock(redis: Any, key: str, *, ttl: float, owner: str) -> AsyncIterator[LockState]:
    """Hold ``key`` for at most ``ttl`` seconds if nobody else does; never waits.

    Released only by its holder (compare-and-delete), so a lock that expired and
    was taken by another worker is not dropped by the late first holder.
    """
    token = f"{owner}|{secrets.token_hex(8)}"
    if not await redis.set(key, token, px=max(1, int(ttl * 1000)), nx=True):
        holder = await redis.get(key)
        yield LockState(False, None if holder is None else _text(holder).split("|")[0])
        return
    try:
        yield LockState(True, owner)
    finally:
        await redis.eval(_RELEASE_SCRIPT, 1, key, token)


async def reencryption_status(
    redis: Any, job_or_key_id: str, *, config: ArqWorkerConfig | None = None
) -> ReencryptionStatus | None:
    """The status of a re-encryption job, by its id or by the old key's id."""
    cfg = config if config is not None else ArqWorkerConfig.from_env()
    store = StatusStore(redis, cfg.key_prefix, ttl=cfg.status_ttl)
    job_id = await store.resolve(job_or_key_id)
    return None if job_id is None else await store.read(job_id)
