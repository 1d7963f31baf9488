"""``aiocrypt._keyset_guard`` and ``aiocrypt._keyset_seal``: what a KeyManager trusts of
its store, checked directly (mutation survivors, issue 21).

A keyset that verifies must come with a seal over exactly its records and
revision; a verified keyset may not go back in revision, revive a withdrawn key,
re-activate a key or lose a record; usage totals never go below the highest seen.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
from pathlib import Path

import pytest

from aiocrypt import (
    EncryptionKey,
    KekProviderError,
    KeyStateError,
    KeyStatus,
    KeyStoreIntegrityError,
    KeyType,
)
from aiocrypt._keyset_guard import KeysetGuard
from aiocrypt._keyset_seal import MAX_SEAL_CHARS, SEAL_CONTEXT, KeysetSealer, Seal, record_digest
from aiocrypt._keyset_state import KeysetStateFile
from aiocrypt.keystore import KeySet
from aiocrypt.testing import FakeKekProvider

NOW = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)
WHERE = "test store"


def key(
    version: int = 1,
    status: KeyStatus = KeyStatus.ACTIVE,
    kt: str = "pii",
    key_id: str | None = None,
) -> EncryptionKey:
    return EncryptionKey(
        key_id or f"{kt}-v{version}-abcd",
        KeyType(kt),
        version,
        status,
        NOW,
        NOW + _dt.timedelta(days=365),
        wrapped_key=b"w" * 8,
    )


class Fixture:
    def __init__(self, state_path: str | None = None) -> None:
        self.kek = FakeKekProvider()
        self.guard = KeysetGuard(
            self.kek_for, where=WHERE, store_identity="store-a", state_path=state_path
        )
        self.keys: list[EncryptionKey] = []
        self.revision = 0

    def kek_for(self, kek_id: str) -> FakeKekProvider:
        if kek_id != self.kek.kek_id:
            raise KekProviderError(f"no KEK {kek_id}")
        return self.kek

    async def write(self, *updates: EncryptionKey) -> KeySet:
        """Write ``updates`` as a KeyManager does (sealed over the verified keyset), verify."""
        current = KeySet(self.revision, tuple(self.keys))
        seal = await self.guard.seal_for(current, updates, self.kek)
        merged = {k.key_id: k for k in self.keys}
        merged.update({k.key_id: k for k in updates})
        self.keys, self.revision = list(merged.values()), self.revision + 1
        keyset = KeySet(self.revision, tuple(self.keys), seal)
        await self.guard.verify(keyset)
        return keyset


async def test_an_empty_unsealed_store_verifies_and_a_non_empty_one_does_not() -> None:
    f = Fixture()
    assert not f.guard.verified_once
    await f.guard.verify(KeySet(0, ()))
    assert f.guard.verified_once and f.guard.high_water == 0
    with pytest.raises(KeyStoreIntegrityError, match="not sealed"):
        await Fixture().guard.verify(KeySet(0, (key(),)))
    with pytest.raises(KeyStoreIntegrityError, match="not sealed"):
        await Fixture().guard.verify(KeySet(1, ()))


async def test_the_revision_never_goes_back() -> None:
    f = Fixture()
    first = await f.write(key())
    second = await f.write(key(2))
    assert f.guard.high_water == 2
    assert repr(f.guard) == f"<KeysetGuard {WHERE} revision>=2>"
    await f.guard.verify(second)  # the same revision again: fine
    with pytest.raises(KeyStoreIntegrityError, match="went back from revision 2 to 1"):
        await f.guard.verify(first)  # authentic, older: a restored backup
    assert f.guard.high_water == 2


@pytest.mark.parametrize(
    ("before", "after", "ok"),
    [
        (KeyStatus.ACTIVE, KeyStatus.DECRYPT_ONLY, True),
        (KeyStatus.ACTIVE, KeyStatus.REVOKED, True),
        (KeyStatus.DECRYPT_ONLY, KeyStatus.EXPIRED, True),
        (KeyStatus.DECRYPT_ONLY, KeyStatus.ACTIVE, False),
        (KeyStatus.EXPIRED, KeyStatus.ACTIVE, False),
        (KeyStatus.REVOKED, KeyStatus.COMPROMISED, True),
        (KeyStatus.REVOKED, KeyStatus.DESTROYED, True),
        (KeyStatus.REVOKED, KeyStatus.DECRYPT_ONLY, False),
        (KeyStatus.REVOKED, KeyStatus.ACTIVE, False),
        (KeyStatus.COMPROMISED, KeyStatus.DESTROYED, True),
        (KeyStatus.COMPROMISED, KeyStatus.REVOKED, False),
        (KeyStatus.COMPROMISED, KeyStatus.EXPIRED, False),
        (KeyStatus.COMPROMISED, KeyStatus.ACTIVE, False),
        (KeyStatus.DESTROYED, KeyStatus.REVOKED, False),
        (KeyStatus.DESTROYED, KeyStatus.DECRYPT_ONLY, False),
    ],
)
async def test_status_transitions(before: KeyStatus, after: KeyStatus, ok: bool) -> None:
    f = Fixture()
    await f.write(key(status=before))
    if ok:
        await f.write(key(status=after))
        return
    with pytest.raises(KeyStoreIntegrityError, match=f"went from {before.value} back to") as exc:
        await f.write(key(status=after))
    assert exc.value.key_id == "pii-v1-abcd"


async def test_a_record_never_disappears() -> None:
    f = Fixture()
    await f.write(key(1), key(2))
    f.keys = [key(2)]
    seal = await KeysetGuard(f.kek_for, where=WHERE, store_identity="x").seal_unverified(
        KeySet(f.revision, tuple(f.keys)), f.kek
    )
    with pytest.raises(KeyStoreIntegrityError, match="pii-v1-abcd disappeared") as exc:
        await f.guard.verify(KeySet(f.revision + 1, tuple(f.keys), seal))
    assert exc.value.key_id == "pii-v1-abcd"


async def test_usage_start_never_goes_below_the_floor() -> None:
    guard = Fixture().guard
    assert guard.usage_start("k", 100, 10) == (90, None)
    assert guard.usage_start("k", 150, 10) == (140, None)
    # the shared counter went backwards (a restored store): start at the floor, say so
    assert guard.usage_start("k", 60, 10) == (150, 150)
    assert guard.usage_start("k", 170, 10) == (160, None)  # exactly at the floor: fine
    assert guard.usage_start("other", 5, 5) == (0, None)
    assert guard.usage_start("neg", -3, 1) == (0, 0)


async def test_the_high_water_mark_survives_a_restart_through_the_state_file(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "keyset.json")
    f = Fixture(path)
    await f.guard.load_state()
    await f.write(key())
    old = await f.write(key(2))
    assert KeysetStateFile(path).read().revisions == {"store-a": 2}  # verify persisted it
    f.guard.usage_start("pii-v2-abcd", 70, 10)
    await f.guard.persist()
    state = KeysetStateFile(path).read()
    assert state.revisions == {"store-a": 2} and state.usage == {"pii-v2-abcd": 70}
    # a new process of the host, with a store restored to revision 1
    restarted = KeysetGuard(f.kek_for, where=WHERE, store_identity="store-a", state_path=path)
    await restarted.load_state()
    await restarted.load_state()  # once only
    assert restarted.high_water == 2
    assert restarted.usage_start("pii-v2-abcd", 30, 10) == (70, 70)
    with pytest.raises(KeyStoreIntegrityError, match="went back"):
        await restarted.verify(KeySet(1, old.keys[:1], None))
    other = KeysetGuard(f.kek_for, where=WHERE, store_identity="store-b", state_path=path)
    await other.load_state()
    assert other.high_water == 0  # marks are per store
    nothing = KeysetGuard(f.kek_for, where=WHERE, store_identity="store-a")
    await nothing.load_state()
    await nothing.persist()
    assert nothing.high_water == 0


# -- the seal ---------------------------------------------------------------------


async def _sealed(*keys: EncryptionKey, revision: int = 1) -> tuple[KeysetSealer, str, Fixture]:
    f = Fixture()
    sealer = KeysetSealer(f.kek_for)
    return sealer, await sealer.seal(revision, keys, f.kek, None), f


async def test_a_seal_verifies_exactly_its_records_and_revision() -> None:
    sealer, text, _ = await _sealed(key(1), key(2))
    seal = await sealer.verify(text, 1, [key(2), key(1)], WHERE)
    assert seal is not None and seal.revision == 1
    assert dict(seal.records) == {
        "pii-v1-abcd": record_digest(key(1)),
        "pii-v2-abcd": record_digest(key(2)),
    }
    for keys, revision, why in (
        ([key(1), key(2)], 2, "says revision 2 but its seal is for revision 1"),
        ([key(1)], 1, "pii-v2-abcd is sealed but missing"),
        ([key(1), key(2), key(3)], 1, "pii-v3-abcd is not covered"),
        ([key(1), key(2, KeyStatus.REVOKED)], 1, "pii-v2-abcd does not match"),
    ):
        with pytest.raises(KeyStoreIntegrityError, match=why):
            await sealer.verify(text, revision, keys, WHERE)
    assert await sealer.verify(None, 0, [], WHERE) is None


async def test_a_record_whose_id_does_not_name_its_type_and_version_is_refused() -> None:
    for odd in (
        key(1, key_id="pii-v2-abcd"),
        key(1, key_id="api_keys-v1-abcd"),
        key(1, key_id="pii-v1abcd"),
    ):
        sealer, text, _ = await _sealed(odd)
        with pytest.raises(KeyStoreIntegrityError, match="which its id does not") as exc:
            await sealer.verify(text, 1, [odd], WHERE)
        assert exc.value.key_id == odd.key_id


async def test_a_modified_seal_fails_authentication() -> None:
    sealer, text, _ = await _sealed(key(1))
    doc = json.loads(text)
    doc["mac"] = ("0" if doc["mac"][0] != "0" else "1") + doc["mac"][1:]
    with pytest.raises(KeyStoreIntegrityError, match="failed authentication"):
        await sealer.verify(json.dumps(doc), 1, [key(1)], WHERE)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(format="x"),
        lambda d: d.update(version=2),
        lambda d: d.pop("mac"),
        lambda d: d.update(kek_id=5),
        lambda d: d.update(revision="1"),
        lambda d: d.update(revision=0),
        lambda d: d.update(revision=True),
        lambda d: d.update(records=[]),
        lambda d: d.update(records={"k": "ab"}),
        lambda d: d.update(records={"k": 5}),
        lambda d: d.update(seal_key="!!"),
        lambda d: d.update(mac="zz"),
        lambda d: d.pop("kek_id"),
    ],
)
async def test_malformed_seals_are_integrity_errors(edit: object) -> None:
    sealer, text, _ = await _sealed(key(1))
    doc = json.loads(text)
    edit(doc)  # type: ignore[operator]
    with pytest.raises(KeyStoreIntegrityError):
        await sealer.verify(json.dumps(doc), 1, [key(1)], WHERE)
    for bad in ("[]", "nope", "[" * 10000, " " * (MAX_SEAL_CHARS + 1)):
        with pytest.raises(KeyStoreIntegrityError, match="malformed"):
            Seal.from_text(bad, WHERE)


async def test_the_seal_key_is_pinned_and_refused_under_another_kek() -> None:
    _, text, f = await _sealed(key(1))
    calls = f.kek.calls["unwrap"]
    fresh = KeysetSealer(f.kek_for)
    await fresh.verify(text, 1, [key(1)], WHERE)
    await fresh.verify(text, 1, [key(1)], WHERE)
    assert f.kek.calls["unwrap"] == calls + 1  # unwrapped once, then pinned
    assert repr(fresh) == "<KeysetSealer pinned=1>"
    fresh.forget()
    assert repr(fresh) == "<KeysetSealer pinned=0>"
    with pytest.raises(TypeError):
        fresh.__reduce__()
    other = Fixture()
    with pytest.raises(KeyStoreIntegrityError, match="does not open under KEK"):
        await KeysetSealer(lambda _: other.kek).verify(text, 1, [key(1)], WHERE)
    f.kek.fail_with = KekProviderError("down", retryable=True)
    with pytest.raises(KekProviderError, match="down"):  # an outage is not tampering
        await KeysetSealer(f.kek_for).verify(text, 1, [key(1)], WHERE)


async def test_a_seal_key_of_the_wrong_size_is_refused() -> None:
    f = Fixture()
    wrapped = await f.kek.wrap(b"k" * 31, SEAL_CONTEXT)
    _, text, _ = await _sealed(key(1))
    doc = json.loads(text)
    doc["kek_id"] = f.kek.kek_id
    doc["seal_key"] = base64.b64encode(wrapped).decode()
    with pytest.raises(KeyStoreIntegrityError, match="wrong size"):
        await KeysetSealer(f.kek_for).verify(json.dumps(doc), 1, [key(1)], WHERE)


async def test_sealing_reuses_the_seal_key_and_rewraps_it_for_a_new_kek() -> None:
    sealer, first, f = await _sealed(key(1))
    previous = await sealer.verify(first, 1, [key(1)], WHERE)
    wraps = f.kek.calls["wrap"]
    second = await sealer.seal(2, [key(1), key(2)], f.kek, previous)
    assert f.kek.calls["wrap"] == wraps  # same KEK: the same wrapped key
    assert json.loads(second)["seal_key"] == json.loads(first)["seal_key"]
    new_kek = FakeKekProvider("new")
    third = await sealer.seal(3, [key(1)], new_kek, previous)
    assert json.loads(third)["kek_id"] == new_kek.kek_id
    assert json.loads(third)["seal_key"] != json.loads(first)["seal_key"]
    reader = KeysetSealer(lambda kek_id: new_kek if kek_id == new_kek.kek_id else f.kek)
    await reader.verify(third, 3, [key(1)], WHERE)
    assert repr(reader) == "<KeysetSealer pinned=1>"


async def test_state_is_loaded_once_and_low_usage_marks_floor_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    path.write_text(
        json.dumps(
            {
                "format": "aiocrypt.keyset-state",
                "revisions": {"store-a": 1},
                "usage": {"neg": -5, "zero": 0},
            }
        )
    )
    f = Fixture(str(path))
    await f.guard.load_state()
    path.write_text("damaged after loading")
    await f.guard.load_state()  # not read again
    assert f.guard.usage_start("neg", -3, 1) == (0, 0)
    assert f.guard.usage_start("zero", 1, 1) == (0, None)


async def test_the_seal_key_is_reused_across_writes_until_forgotten() -> None:
    f = Fixture()
    for version in (1, 2, 3):
        keyset = await f.write(key(version))
    assert f.kek.calls["wrap"] == 1  # one seal key for the store, wrapped once
    unwraps = f.kek.calls["unwrap"]
    await f.guard.verify(keyset)
    assert f.kek.calls["unwrap"] == unwraps  # pinned
    f.guard.forget()
    await f.guard.verify(keyset)
    assert f.kek.calls["unwrap"] == unwraps + 1


async def test_the_first_missing_record_is_named() -> None:
    f = Fixture()
    await f.write(key(1), key(2), key(3))
    f.keys = [key(2)]
    seal = await KeysetGuard(f.kek_for, where=WHERE, store_identity="x").seal_unverified(
        KeySet(f.revision, tuple(f.keys)), f.kek
    )
    with pytest.raises(KeyStoreIntegrityError, match="pii-v1-abcd disappeared") as exc:
        await f.guard.verify(KeySet(f.revision + 1, tuple(f.keys), seal))
    assert exc.value.key_id == "pii-v1-abcd"


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(revision=0),
        lambda d: d.update(revision=-1),
        lambda d: d.update(records={"k": "ab"}),
        lambda d: d.update(records={"k": "G" * 64}),
        lambda d: d.update(records={"k": 5}),
        lambda d: d.update(seal_key="QQ=A"),
        lambda d: d.update(seal_key="Q Q=="),
    ],
)
async def test_seal_from_text_refuses_malformed_fields_itself(edit: object) -> None:
    _, text, _ = await _sealed(key(1))
    doc = json.loads(text)
    Seal.from_text(json.dumps(doc), WHERE)  # unedited: parses
    edit(doc)  # type: ignore[operator]
    with pytest.raises(KeyStoreIntegrityError, match="malformed"):
        Seal.from_text(json.dumps(doc), WHERE)


async def test_a_seal_of_exactly_max_seal_chars_parses() -> None:
    _, text, _ = await _sealed(key(1))
    padded = text + " " * (4 * 1024 * 1024 - len(text))  # the bound, pinned as a number
    assert Seal.from_text(padded, WHERE).revision == 1
    with pytest.raises(KeyStoreIntegrityError, match="malformed"):
        Seal.from_text(padded + " ", WHERE)


# A seal frozen when it was written (generated with the fixed master key below): the seal
# format, its canonical JSON, MAC domain and record digests may not change, or every store
# sealed so far would be refused. A fixed key, as in every known-answer vector.
FROZEN_SEAL = (
    '{"format":"aiocrypt.keyset-seal","kek_id":"local:1b1e2b0f4b188ff8","mac":"181a77b00f853bf5'
    'c38f8b7a44d89ee10dec9288ed92f793b6937f47f3e7da6a","records":{"pii-v1-abcd":"2749ab1ac5a5e'
    '0f2e5836c55c825262e0710dcf3489bc8f267b926bebe89908a"},"revision":1,"seal_key":"AW4Huhq8ca'
    'mZ1pUXwb2HLMK4gsloCVcKavFiKNinm/1pNkYhKNT60Gjt9fSWfhO1SsFe3RldXJ+tcsBQsw==","version":1}'
)


async def test_a_frozen_seal_still_verifies_and_is_made_again_byte_for_byte() -> None:
    from aiocrypt.kek import LocalKekProvider

    kek = LocalKekProvider(bytes(range(32)))
    record = EncryptionKey(
        "pii-v1-abcd",
        KeyType.PII,
        1,
        KeyStatus.ACTIVE,
        NOW,
        NOW + _dt.timedelta(days=365),
        wrapped_key=b"w" * 8,
        status_reason="é",
    )
    sealer = KeysetSealer(lambda _: kek)
    previous = await sealer.verify(FROZEN_SEAL, 1, [record], WHERE)
    assert await sealer.seal(1, [record], kek, previous) == FROZEN_SEAL
    # a fresh sealer, given the verified seal, re-uses its key without wrapping anew
    again = KeysetSealer(lambda _: kek)
    await again.verify(FROZEN_SEAL, 1, [record], WHERE)
    assert await again.seal(1, [record], kek, previous) == FROZEN_SEAL


async def test_seal_odds_and_ends() -> None:
    import dataclasses

    sealer, text, f = await _sealed(key(1), key(2), key(3))
    seal = Seal.from_text(text, WHERE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        seal.revision = 2  # type: ignore[misc]
    assert not hasattr(seal, "__dict__")
    # the sealer pinned the key it made: verifying its own seal unwraps nothing
    unwraps = f.kek.calls["unwrap"]
    await sealer.verify(text, 1, [key(1), key(2), key(3)], WHERE)
    assert f.kek.calls["unwrap"] == unwraps
    # keys may come as any iterable, an empty one included
    assert await sealer.verify(None, 0, iter([]), WHERE) is None
    await sealer.verify(text, 1, iter([key(1), key(2), key(3)]), WHERE)
    # the first of several missing records is named
    with pytest.raises(KeyStoreIntegrityError, match="pii-v1-abcd is sealed but missing") as exc:
        await sealer.verify(text, 1, [key(3)], WHERE)
    assert exc.value.key_id == "pii-v1-abcd"


async def test_a_seal_of_exactly_the_largest_size_is_written_and_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MAX_SEAL_CHARS is the largest seal both sides take: one character more is refused
    (above), exactly that many is not, when written and when read back."""
    import aiocrypt._keyset_seal as seal_module

    sealer, text, f = await _sealed(key(1))
    # read: the same seal padded (JSON allows whitespace) to exactly the limit
    padded = text + " " * (MAX_SEAL_CHARS - len(text))
    assert len(padded) == MAX_SEAL_CHARS
    assert Seal.from_text(padded, WHERE).revision == 1
    # write: a limit of exactly this seal's size still writes it; one less refuses
    size = len(text)
    monkeypatch.setattr(seal_module, "MAX_SEAL_CHARS", size)
    assert len(await sealer.seal(1, [key(1)], f.kek, None)) == size
    monkeypatch.setattr(seal_module, "MAX_SEAL_CHARS", size - 1)
    with pytest.raises(KeyStateError, match="would exceed"):
        await sealer.seal(1, [key(1)], f.kek, None)
