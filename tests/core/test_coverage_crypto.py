"""``aiocrypt._crypto``: the DataKey's guards, bookkeeping and short-body refusals."""

from __future__ import annotations

import copy
import pickle

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aiocrypt import KeyStatus, _crypto
from aiocrypt._crypto import (
    DEK_BYTES,
    FIELD_AAD_CACHE_SIZE,
    NONCE_BATCH,
    NONCE_BYTES,
    TAG_BYTES,
    DataKey,
    field_nonce,
    stream_nonce,
)
from aiocrypt._format import ALG_AES_256_GCM, FORMAT_V1, FormatError, Purpose, b64encode_urlsafe

from ._core_keys import data_key, record


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_only_256_bit_deks_are_taken(size: int) -> None:
    # a 16- or 24-byte DEK would silently make AES-128 or AES-192
    with pytest.raises(ValueError, match="32 bytes"):
        DataKey(record(), bytes(size))
    assert DEK_BYTES == 32
    DataKey(record(), bytes(32))


def test_no_material_in_repr_and_no_pickling() -> None:
    material = bytes(range(32))
    dk = DataKey(record(), material)
    assert repr(dk) == "<DataKey pii-v1 active>"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(dk, protocol)
    with pytest.raises(TypeError, match="cannot be pickled"):
        dk.__reduce__()
    with pytest.raises(TypeError, match="cannot be pickled"):
        copy.copy(dk)


def test_hand_usage_to_moves_the_allowance_once() -> None:
    old, new = data_key(), data_key()
    old.encryptions, old.allowance, old.refill_at = 5, 100, 90
    old.hand_usage_to(new)
    assert (new.encryptions, new.allowance, new.refill_at) == (5, 100, 90)
    assert (old.encryptions, old.allowance, old.refill_at) == (5, 0, 0)


def test_holds_compares_the_material() -> None:
    material = bytes(range(32))
    dk = DataKey(record(), material)
    assert dk.holds(material) and not dk.holds(bytes(32)) and not dk.holds(material[:16])


def test_rebind_takes_only_a_record_of_the_same_key() -> None:
    dk = data_key()
    with pytest.raises(ValueError, match="same key"):
        dk.rebind(record(key_id="other-v1"))
    with pytest.raises(ValueError, match="same key"):
        dk.rebind(record("financial_data", key_id="pii-v1"))
    dk.rebind(dk.key.replace(status=KeyStatus.COMPROMISED))
    assert (dk.readable, dk.reencryptable) == (False, True)
    dk.rebind(dk.key.replace(status=KeyStatus.DECRYPT_ONLY, decrypt_disabled=True))
    assert (dk.readable, dk.reencryptable) == (False, False)
    dk.rebind(dk.key.replace(status=KeyStatus.DESTROYED, decrypt_disabled=False))
    assert (dk.readable, dk.reencryptable) == (False, False)
    dk.rebind(dk.key.replace(status=KeyStatus.EXPIRED))
    assert (dk.readable, dk.reencryptable) == (True, True)


def test_field_aads_are_cached_up_to_the_limit_then_cleared() -> None:
    dk = data_key()
    for i in range(FIELD_AAD_CACHE_SIZE):
        dk.field_aad(f"c{i}")
    assert len(dk.field_aads) == FIELD_AAD_CACHE_SIZE
    assert dk.field_aad("c0") is dk.field_aads["c0"]
    dk.field_aad("one more")
    assert dk.field_aads == {"one more": dk.field_aad("one more")}
    for context in (None, b"x", "x", bytearray(b"x")):
        # a bytearray context binds too, though the signature says str | bytes
        assert dk.field_aad(context) == dk.aad(  # type: ignore[arg-type]
            ALG_AES_256_GCM,
            0,
            b"x" if context else b"",
            purpose=Purpose.FIELD,
        )


def test_short_bodies_are_format_errors_not_crypto_errors() -> None:
    dk = data_key()
    for size in (0, NONCE_BYTES, NONCE_BYTES + TAG_BYTES - 1):
        with pytest.raises(FormatError, match="too short"):
            dk.open_gcm(0, bytes(size), b"")
        with pytest.raises(FormatError, match="too short"):
            dk.open_gcm_raw(0, bytes(2 + size), b"")
    for size in (0, TAG_BYTES - 1):
        with pytest.raises(FormatError, match="too short"):
            dk.open_siv(0, bytes(size), b"")


def test_one_shot_parts_and_batches_count_each_message() -> None:
    dk = data_key()
    nonce, sealed = dk.gcm_parts(b"data", b"ctx", nonce=bytes(12))
    assert nonce == bytes(12) and len(sealed) == 4 + TAG_BYTES
    assert dk.open_gcm(0, nonce + sealed, b"ctx") == b"data"
    assert dk.encryptions == 1
    nonce2, _ = dk.gcm_parts(b"data", b"ctx")  # a fresh random nonce when none is given
    assert len(nonce2) == NONCE_BYTES and nonce2 != nonce and dk.encryptions == 2
    tokens = dk.seal_fields([b"\x01a", b"\x01b"], ["c1", None])
    assert len(set(tokens)) == 2 and dk.encryptions == 4
    dk.stream_cipher(bytes(16))  # opening a stream does not count
    assert dk.encryptions == 4
    dk.stream_cipher(bytes(16), sealing=True)
    assert dk.encryptions == 5
    with pytest.raises(ValueError):
        dk.seal_fields([b"\x01a"], [None, None])
    assert dk.encryptions == 6  # the pair sealed before the mismatch showed is counted


def test_the_nonce_pool_refills_when_dry() -> None:
    _crypto._nonce_pool.clear()
    first = field_nonce()
    assert len(first) == NONCE_BYTES and len(_crypto._nonce_pool) == NONCE_BATCH - 1
    pooled = {field_nonce() for _ in range(NONCE_BATCH - 1)}
    assert len(pooled | {first}) == NONCE_BATCH and not _crypto._nonce_pool


def test_deterministic_tokens_with_and_without_version_1() -> None:
    dk = data_key()
    both = dk.deterministic_tokens(b"\x01v", b"c")
    assert [t[:4] for t in both] == ["ac2.", "ac1."]
    assert dk.deterministic_tokens(b"\x01v", b"c", v1=False) == both[:1]


def test_seal_text_with_a_given_nonce_is_aes_gcm_over_the_field_aad() -> None:
    material = bytes(range(32))
    dk = DataKey(record(), material)
    token = dk.seal_text(b"\x01v", b"ctx", nonce=bytes(12))
    sealed = AESGCM(material).encrypt(bytes(12), b"\x01v", dk.field_aad(b"ctx"))
    assert token == dk.text_prefix + b64encode_urlsafe(bytes((1, 0)) + bytes(12) + sealed)
    assert dk.encryptions == 1


def test_version_1_aad_has_no_purpose() -> None:
    dk = data_key()
    v1 = {dk.aad(ALG_AES_256_GCM, 0, b"c", purpose=p, version=FORMAT_V1) for p in Purpose}
    assert len(v1) == 1
    v2 = {dk.aad(ALG_AES_256_GCM, 0, b"c", purpose=p) for p in Purpose}
    assert len(v2) == len(Purpose)


def test_stream_nonce_layout() -> None:
    assert stream_nonce(b"P" * 7, 1, False) == b"P" * 7 + b"\x00\x00\x00\x01\x00"
    assert stream_nonce(b"P" * 7, 2**32 - 1, True) == b"P" * 7 + b"\xff" * 4 + b"\x01"
