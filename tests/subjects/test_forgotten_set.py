"""The forgotten-set in the keyset seal: authenticated, carried over, pruned only when no
backup could be unwrapped any more."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from aiocrypt import DecryptionError, DecryptionFailure, KeyStateError, KeyStatus, KeyType
from aiocrypt._keys import EncryptionKey
from aiocrypt._keyset_seal import Seal
from aiocrypt._subjects import prunable
from aiocrypt.testing import make_service

PII = KeyType.PII
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def key(version: int, status: KeyStatus, key_type: KeyType = PII) -> EncryptionKey:
    return EncryptionKey(
        f"{key_type.value}-v{version}-abc",
        key_type,
        version,
        status,
        NOW,
        NOW + dt.timedelta(days=90),
    )


def test_an_entry_goes_only_when_every_version_that_could_have_wrapped_it_is_destroyed() -> None:
    forgotten = {"S-a": "pii-v2-abc"}
    # v1 still alive: a backup of the row from before its rewrap to v2 would unwrap
    assert not prunable(
        forgotten,
        [key(1, KeyStatus.DECRYPT_ONLY), key(2, KeyStatus.DESTROYED), key(3, KeyStatus.ACTIVE)],
    )
    assert not prunable(
        forgotten,
        [key(1, KeyStatus.DESTROYED), key(2, KeyStatus.DECRYPT_ONLY), key(3, KeyStatus.ACTIVE)],
    )
    assert prunable(
        forgotten,
        [key(1, KeyStatus.DESTROYED), key(2, KeyStatus.DESTROYED), key(3, KeyStatus.ACTIVE)],
    ) == {"S-a"}
    # another key type's live versions do not hold it; an unknown wrapping key keeps it
    assert prunable(
        forgotten, [key(2, KeyStatus.DESTROYED), key(1, KeyStatus.ACTIVE, KeyType.SESSION)]
    ) == {"S-a"}
    assert not prunable({"S-b": "pii-v9-zzz"}, [key(1, KeyStatus.DESTROYED)])


async def test_the_forgotten_set_is_sealed_carried_over_and_pruned() -> None:
    svc = make_service()
    async with svc:
        token = await svc.encrypt_field("x", PII, subject="user:1")
        plain_seal = svc.key_manager.store._seal  # type: ignore[attr-defined]
        assert "forgotten" not in json.loads(plain_seal)  # seals without it keep their bytes
        report = await svc.forget_subject("user:1")
        (key_id,) = report.subject_key_ids
        old = svc.keyring.active(PII).key_id
        seal = Seal.from_text(svc.key_manager.store._seal, "memory")  # type: ignore[attr-defined]
        assert dict(seal.forgotten) == {key_id: old}

        # the store writer drops the entry from the seal: the MAC refuses it
        doc = json.loads(svc.key_manager.store._seal)  # type: ignore[attr-defined]
        del doc["forgotten"]
        svc.key_manager.store._seal = json.dumps(doc)  # type: ignore[attr-defined]
        await svc.key_manager.refresh(force=True)
        assert svc.key_manager.integrity_error is not None
        with pytest.raises(DecryptionError) as info:
            await svc.decrypt_field(token, PII)
        assert info.value.reason is DecryptionFailure.SUBJECT_FORGOTTEN
        svc.key_manager.store._seal = seal.to_text()  # type: ignore[attr-defined]
        await svc.key_manager.refresh(force=True)

        # other writes carry it over; destroying the only version that wrapped it prunes it
        await svc.key_manager.rotate_key(PII, force=True)
        assert key_id in svc.key_manager._guard.forgotten
        await svc.key_manager.retire_key(old, confirm_unreferenced=[old])
        assert key_id not in svc.key_manager._guard.forgotten
        with pytest.raises(DecryptionError) as info:  # the store's marker still says why
            await svc.decrypt_field(token, PII)
        assert info.value.reason is DecryptionFailure.SUBJECT_FORGOTTEN


async def test_a_forget_that_would_overflow_the_seal_is_refused_before_writing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aiocrypt._keyset_seal as seal_module

    svc = make_service()
    async with svc:
        await svc.encrypt_field("x", PII, subject="user:1")
        size = len(svc.key_manager.store._seal)  # type: ignore[attr-defined]
        monkeypatch.setattr(seal_module, "MAX_SEAL_CHARS", size + 20)
        revision = svc.keyring.revision
        with pytest.raises(KeyStateError, match="forgotten subject keys"):
            await svc.forget_subject("user:1")
        assert svc.key_manager.store._revision == revision  # type: ignore[attr-defined]
        assert await svc.subject_key_exists("user:1", PII)  # nothing deleted either
