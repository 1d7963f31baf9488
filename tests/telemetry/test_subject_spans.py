"""Subject erasure and the rewrap of subject keys, traced: never a subject id.

A file key store (its subject-key store beside it) and the local KEK: values sealed
for a few subjects, the key type rotated and the subject keys rewrapped in batches,
one subject forgotten, then one that has no key.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from aiocrypt import DecryptionError, KeyType

from .conftest import Telemetry
from .test_spans import attributes, file_service


async def test_forget_and_rewrap_spans_hold_no_subject_id(otel: Telemetry, tmp_path: Path) -> None:
    subjects = [f"user:{secrets.token_hex(6)}" for _ in range(5)]
    values = {subject: f"address of {subject} {secrets.token_hex(6)}" for subject in subjects}
    async with file_service(tmp_path / "keys.json", os.urandom(32)) as svc:
        tokens = {
            subject: await svc.encrypt_field(
                values[subject], KeyType.PII, context="users.address", subject=subject
            )
            for subject in subjects
        }
        v1 = await svc.key_manager.get_active_key(KeyType.PII)
        v2 = await svc.key_manager.rotate_key(KeyType.PII, force=True)
        exported = [otel.dumps()]  # the values sealed for each subject, the rotation
        otel.reset()
        report = await svc.rewrap_subjects(KeyType.PII, batch_size=2)
        assert report.rewrapped == len(subjects)
        batches = otel.spans("aiocrypt.subject.rewrap")
        assert sum(attributes(b)["aiocrypt.count"] for b in batches) == len(subjects)
        assert {
            (
                attributes(b)["aiocrypt.key_type"],
                attributes(b)["aiocrypt.wrapping_key_id"],
                attributes(b)["aiocrypt.new_wrapping_key_id"],
            )
            for b in batches
        } == {("pii", v1.key_id, v2.key_id)}
        assert {attributes(b)["aiocrypt.outcome"] for b in batches} <= {"ok", "done"}

        forgotten = subjects[0]
        await svc.forget_subject(forgotten)
        forget = otel.one("aiocrypt.subject.forget")
        assert attributes(forget)["aiocrypt.outcome"] == "forgotten"
        assert attributes(forget)["aiocrypt.keys"] == 1
        with pytest.raises(DecryptionError):
            await svc.decrypt_field(tokens[forgotten], KeyType.PII, context="users.address")
        assert (
            await svc.decrypt_field(tokens[subjects[1]], KeyType.PII, context="users.address")
            == values[subjects[1]]
        )

        exported.append(otel.dumps())
        otel.reset()
        stranger = f"user:{secrets.token_hex(6)}"
        await svc.forget_subject(stranger)
        assert attributes(otel.one("aiocrypt.subject.forget"))["aiocrypt.outcome"] == "no_key"
        subjects.append(stranger)
    assert otel.metric("aiocrypt.subject.forget.duration", outcome="no_key") == 1

    everything = "".join([*exported, otel.dumps()])  # every span of the run, every metric
    assert v2.key_id in everything  # the search is not blind
    for subject in subjects:
        assert subject.split(":")[1] not in everything
    for subject, value in values.items():
        assert value not in everything and tokens[subject].split(".")[2] not in everything
    assert "ac2." not in everything
