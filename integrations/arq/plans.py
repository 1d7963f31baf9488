"""Re-encryption plans and shard jobs as they cross Redis: frozen dataclasses with
their JSON forms.

A :class:`ReencryptionPlan` is the ``meta`` of a job's status record; a
:class:`ShardJob` is the arguments of one ``reencrypt_shard`` job, in the order the
queue carries them. Both are identifiers, primary-key bounds and counts: never
plaintext, never key material. Read back through ``from_dict`` / ``from_args``,
which check every field's type: a malformed job fails at once
(:class:`~.failures.JobFailedError`), it does not run on guessed values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiocrypt.reencrypt import KeyRange

from .failures import JobFailedError

__all__ = ["ReencryptionPlan", "ShardJob", "ShardPlan", "count", "typed"]


def typed(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is a ``kind`` (never a bool for a number), else a failed job."""
    if isinstance(value, kind) and not (
        isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        return value
    raise JobFailedError(
        f"{what}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}"
    )


def _bound(value: Any, what: str) -> Any:
    """A primary-key bound as JSON carries one: None (open), a number or a string."""
    if value is None:
        return None
    return typed(value, (int, float, str), what)


def count(value: Any, what: str, *, minimum: int = 0) -> int:
    number: int = typed(value, int, what)
    if number < minimum:
        raise JobFailedError(f"{what}: must be at least {minimum}, got {number}")
    return number


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One primary-key range (``after < pk <= until``) of one table, with the rows it
    had to move when planned."""

    index: int
    table: str
    after: Any
    until: Any
    rows_total: int

    @property
    def key_range(self) -> KeyRange:
        return KeyRange(self.after, self.until)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "table": self.table,
            "after": self.after,
            "until": self.until,
            "rows_total": self.rows_total,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardPlan:
        if not isinstance(data, Mapping):
            raise JobFailedError(f"a planned shard: expected an object, got {type(data).__name__}")
        return cls(
            index=count(data.get("index"), "a planned shard's index"),
            table=typed(data.get("table"), str, "a planned shard's table"),
            after=_bound(data.get("after"), "a planned shard's lower bound"),
            until=_bound(data.get("until"), "a planned shard's upper bound"),
            rows_total=count(data.get("rows_total", 0), "a planned shard's rows"),
        )


@dataclass(frozen=True, slots=True)
class ReencryptionPlan:
    """What one re-encryption job is (``meta`` of its status record): the key type, the
    old key, the target key, and its shards. ``unplanned`` marks the record of a job
    that failed before it could plan (no target, no shards)."""

    job_id: str
    key_type: str
    old_key_id: str
    target_key_id: str | None
    created_at: str
    shards: tuple[ShardPlan, ...] = ()
    batch_size: int | None = None
    planned_by: str | None = None
    unplanned: bool = False

    @property
    def rows_total(self) -> int:
        return sum(s.rows_total for s in self.shards)

    def shard_job(self, shard: ShardPlan, default_batch_size: int) -> ShardJob:
        """The arguments of the ``reencrypt_shard`` job that runs ``shard``."""
        return ShardJob(
            self.job_id,
            self.key_type,
            shard.table,
            shard.index,
            shard.after,
            shard.until,
            self.batch_size if self.batch_size is not None else default_batch_size,
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": "reencrypt",
            "job_id": self.job_id,
            "key_type": self.key_type,
            "old_key_id": self.old_key_id,
            "target_key_id": self.target_key_id,
        }
        if self.batch_size is not None:
            data["batch_size"] = self.batch_size
        data["created_at"] = self.created_at
        if self.planned_by is not None:
            data["planned_by"] = self.planned_by
        data["plan"] = [s.to_dict() for s in self.shards]
        if self.unplanned:
            data["unplanned"] = True
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReencryptionPlan:
        plan = data.get("plan", [])
        batch_size = data.get("batch_size")
        planned_by = data.get("planned_by")
        return cls(
            job_id=typed(data.get("job_id", ""), str, "a plan's job id"),
            key_type=typed(data.get("key_type", ""), str, "a plan's key type"),
            old_key_id=typed(data.get("old_key_id", ""), str, "a plan's old key"),
            target_key_id=(
                None
                if data.get("target_key_id") is None
                else typed(data["target_key_id"], str, "a plan's target key")
            ),
            created_at=typed(data.get("created_at", ""), str, "a plan's creation time"),
            shards=tuple(ShardPlan.from_dict(s) for s in typed(plan, list, "a plan's shards")),
            batch_size=None
            if batch_size is None
            else count(batch_size, "a plan's batch size", minimum=1),
            planned_by=None if planned_by is None else typed(planned_by, str, "a plan's planner"),
            unplanned=bool(data.get("unplanned", False)),
        )


@dataclass(frozen=True, slots=True)
class ShardJob:
    """The arguments of one ``reencrypt_shard`` job, in the order the queue carries them."""

    job_id: str
    key_type: str
    table: str
    index: int
    after: Any
    until: Any
    batch_size: int = 1000

    def to_args(self) -> tuple[Any, ...]:
        return (
            self.job_id,
            self.key_type,
            self.table,
            self.index,
            self.after,
            self.until,
            self.batch_size,
        )

    @classmethod
    def from_args(
        cls,
        job_id: Any,
        key_type: Any,
        table: Any,
        index: Any,
        after: Any,
        until: Any,
        batch_size: Any = 1000,
    ) -> ShardJob:
        return cls(
            job_id=typed(job_id, str, "reencrypt_shard's job id"),
            key_type=typed(key_type, str, "reencrypt_shard's key type"),
            table=typed(table, str, "reencrypt_shard's table"),
            index=count(index, "reencrypt_shard's shard index"),
            after=_bound(after, "reencrypt_shard's lower bound"),
            until=_bound(until, "reencrypt_shard's upper bound"),
            batch_size=count(batch_size, "reencrypt_shard's batch size", minimum=1),
        )
