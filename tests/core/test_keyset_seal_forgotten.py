"""``aiocrypt._keyset_seal``: the forgotten map's shape and ``derive`` before an unwrap.

The two lines of the seal that the subject-key work added and no test reached
(issue 21 holds ``_keyset_seal`` to 100% line and branch coverage).
"""

from __future__ import annotations

import json

import pytest

from aiocrypt import KeyStateError, KeyStoreIntegrityError
from aiocrypt._keyset_seal import KeysetSealer, Seal

from .test_mutants_keyset_guard import WHERE, _sealed, key


@pytest.mark.parametrize("forgotten", [[], "x", {"subject-key": 5}, {"subject-key": None}])
async def test_a_malformed_forgotten_map_is_refused(forgotten: object) -> None:
    _, text, _ = await _sealed(key(1))
    doc = json.loads(text)
    doc["forgotten"] = {"subject-key": "kek-1"}
    assert Seal.from_text(json.dumps(doc), WHERE).forgotten == {"subject-key": "kek-1"}
    doc["forgotten"] = forgotten
    with pytest.raises(KeyStoreIntegrityError, match="malformed"):
        Seal.from_text(json.dumps(doc), WHERE)


async def test_derive_needs_the_seal_key_unwrapped() -> None:
    sealer, text, f = await _sealed(key(1))
    seal = await sealer.verify(text, 1, [key(1)], WHERE)
    assert seal is not None
    derived = sealer.derive(seal, b"info")
    assert len(derived) == 32 and sealer.derive(seal, b"info") == derived
    assert sealer.derive(seal, b"other") != derived
    fresh = KeysetSealer(f.kek_for)
    with pytest.raises(KeyStoreIntegrityError, match="not unwrapped yet"):
        fresh.derive(Seal.from_text(text, WHERE), b"info")


async def test_forgotten_subject_keys_are_sealed_and_read_back() -> None:
    sealer, _, f = await _sealed(key(1))
    text = await sealer.seal(1, [key(1)], f.kek, None, {"subject-a": "kek-1"})
    assert json.loads(text)["forgotten"] == {"subject-a": "kek-1"}
    seal = await KeysetSealer(f.kek_for).verify(text, 1, [key(1)], WHERE)
    assert seal is not None and dict(seal.forgotten) == {"subject-a": "kek-1"}
    plain = await sealer.seal(1, [key(1)], f.kek, None)
    assert "forgotten" not in json.loads(plain)  # only when there are some


async def test_a_seal_over_the_size_limit_is_never_written() -> None:
    sealer, _, f = await _sealed(key(1))
    forgotten = {f"subject-{i:07d}": "kek-1" for i in range(4 * 1024 * 1024 // 20)}
    with pytest.raises(KeyStateError, match="would exceed"):
        await sealer.seal(1, [key(1)], f.kek, None, forgotten)
