"""Re-encryption plans and shard jobs as they cross Redis: the same JSON as before
they were dataclasses, and nothing malformed read back as a plan or a job."""

from __future__ import annotations

from typing import Any

import pytest

from aiocrypt.integrations.arq import JobFailedError
from aiocrypt.integrations.arq.codec import job_deserializer, job_serializer
from aiocrypt.integrations.arq.plans import ReencryptionPlan, ShardJob, ShardPlan

# the status record's meta as the jobs wrote it while plans were loose dicts
PLANNED: dict[str, Any] = {
    "kind": "reencrypt",
    "job_id": "reencrypt-pii-v1-0a0b0c0d",
    "key_type": "pii",
    "old_key_id": "pii-v1-0a0b0c0d",
    "target_key_id": "pii-v2-1a1b1c1d",
    "batch_size": 500,
    "created_at": "2026-01-01T02:00:00+00:00",
    "planned_by": "host-a:1",
    "plan": [
        {"index": 0, "table": "users", "after": None, "until": 5000, "rows_total": 4000},
        {"index": 1, "table": "users", "after": 5000, "until": None, "rows_total": 1000},
    ],
}
UNPLANNED: dict[str, Any] = {
    "kind": "reencrypt",
    "job_id": "reencrypt-pii-v1-0a0b0c0d",
    "key_type": "pii",
    "old_key_id": "pii-v1-0a0b0c0d",
    "target_key_id": None,
    "created_at": "2026-01-01T02:00:00+00:00",
    "plan": [],
    "unplanned": True,
}


@pytest.mark.parametrize("meta", [PLANNED, UNPLANNED])
def test_a_plan_reads_and_writes_the_status_records_json(meta: dict[str, Any]) -> None:
    plan = ReencryptionPlan.from_dict(job_deserializer(job_serializer(meta)))
    assert plan.to_dict() == meta
    assert list(plan.to_dict()) == list(meta)  # the same order of fields, too


def test_a_shard_job_keeps_the_queues_argument_order() -> None:
    plan = ReencryptionPlan.from_dict(PLANNED)
    assert plan.rows_total == 5000
    job = plan.shard_job(plan.shards[1], default_batch_size=1000)
    assert job.to_args() == ("reencrypt-pii-v1-0a0b0c0d", "pii", "users", 1, 5000, None, 500)
    assert ShardJob.from_args(*job_deserializer(job_serializer({"a": job.to_args()}))["a"]) == job
    assert plan.shards[0].key_range.until == 5000


@pytest.mark.parametrize(
    "args",
    [
        (1, "pii", "users", 0, None, None, 10),  # job id not text
        ("job", "pii", "users", True, None, None, 10),  # a bool is not an index
        ("job", "pii", "users", -1, None, None, 10),  # nor a negative one
        ("job", "pii", "users", 0, {"$gt": 1}, None, 10),  # a bound is a number or text
        ("job", "pii", "users", 0, None, [1], 10),
        ("job", "pii", "users", 0, None, None, 0),  # batches of at least one row
        ("job", "pii", ["users"], 0, None, None, 10),
    ],
)
def test_malformed_shard_arguments_fail_the_job(args: tuple[Any, ...]) -> None:
    with pytest.raises(JobFailedError, match="reencrypt_shard's"):
        ShardJob.from_args(*args)


@pytest.mark.parametrize(
    "change",
    [
        {"plan": {"index": 0}},
        {"plan": [["users"]]},
        {"plan": [{"index": "0", "table": "users"}]},
        {"batch_size": -5},
        {"target_key_id": 7},
        {"old_key_id": None},
    ],
)
def test_a_malformed_plan_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(JobFailedError):
        ReencryptionPlan.from_dict({**PLANNED, **change})
    assert ShardPlan.from_dict(PLANNED["plan"][0]).rows_total == 4000
