"""``aiocrypt._crypto`` against an independent AES-GCM / AES-SIV / HKDF.

Each test pins lines a mutant of ``./dev mutate aiocrypt/_crypto.py`` changed
without any other test noticing (docs/testing.md); test_coverage_crypto.py holds
the rest. Tokens are opened with ``cryptography``'s own classes over associated
data built from ``aad_prefix``, so a DataKey that sealed under the wrong header,
flags or purpose fails here even when it would still open its own tokens.
"""

from __future__ import annotations

import base64

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aiocrypt import KeyStatus, _crypto
from aiocrypt._crypto import DataKey, derive_key, field_nonce
from aiocrypt._format import (
    ALG_AES_256_GCM,
    ALG_AES_256_GCM_STREAM,
    ALG_AES_256_SIV,
    FORMAT_V1,
    FORMAT_V2,
    Purpose,
    aad_prefix,
)

from ._core_keys import record

MATERIAL = bytes(range(32))


def fresh(**changes: object) -> DataKey:
    return DataKey(record(**changes), MATERIAL)  # type: ignore[arg-type]


def raw_of(token: str, prefix: str) -> bytes:
    assert token.startswith(prefix)
    return base64.urlsafe_b64decode(token[len(prefix) :])


def hkdf(info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, b"aiocrypt/v1/" + info).derive(MATERIAL)


# -- sealing under the right header ------------------------------------------------


@pytest.mark.parametrize("flags", [0, 1])
@pytest.mark.parametrize("purpose", list(Purpose))
def test_seal_text_is_gcm_under_the_documented_aad(flags: int, purpose: Purpose) -> None:
    dk = fresh()
    token = dk.seal_text(b"\x01secret", b"ctx", flags, purpose=purpose)
    raw = raw_of(token, "ac2.pii-v1.")
    assert raw[:2] == bytes((ALG_AES_256_GCM, flags))
    aad = aad_prefix(FORMAT_V2, ALG_AES_256_GCM, flags, "pii-v1", "pii", purpose) + b"ctx"
    assert AESGCM(MATERIAL).decrypt(raw[2:14], raw[14:], aad) == b"\x01secret"
    # and the DataKey opens it under that purpose only
    assert dk.open_gcm_raw(flags, raw, b"ctx", purpose=purpose) == b"\x01secret"
    other = Purpose.BLOB if purpose is Purpose.FIELD else Purpose.FIELD
    with pytest.raises(InvalidTag):
        dk.open_gcm_raw(flags, raw, b"ctx", purpose=other)


@pytest.mark.parametrize("context", [None, "users.ssn", b"raw", "é" * 3])
def test_seal_field_is_gcm_under_the_field_aad(context: str | bytes | None) -> None:
    dk = fresh()
    for _ in range(2):  # the second time through the cached AAD
        raw = raw_of(dk.seal_field(b"\x01v", context), "ac2.pii-v1.")
        assert raw[:2] == b"\x01\x00"
        ctx = b"" if context is None else context.encode() if isinstance(context, str) else context
        aad = aad_prefix(FORMAT_V2, ALG_AES_256_GCM, 0, "pii-v1", "pii", Purpose.FIELD) + ctx
        assert AESGCM(MATERIAL).decrypt(raw[2:14], raw[14:], aad) == b"\x01v"
    assert dk.encryptions == 2


def test_seal_field_count_zero_is_not_counted_again() -> None:
    dk = fresh()
    dk.seal_field(b"\x01v", None, 0)
    assert dk.encryptions == 0
    dk.seal_field(b"\x01v", None)
    assert dk.encryptions == 1


def test_seal_field_refills_an_empty_nonce_pool() -> None:
    dk = fresh()
    _crypto._nonce_pool.clear()
    tokens = {dk.seal_field(b"\x01v", "c") for _ in range(3)}
    assert len(tokens) == 3
    assert len(_crypto._nonce_pool) == 256 - 3  # one batch: 256 nonces, 3 used
    nonces = {raw_of(t, dk.text_prefix)[2:14] for t in tokens}
    assert len(nonces) == 3 and all(len(n) == 12 for n in nonces)


def test_a_nonce_batch_is_256_nonces() -> None:
    _crypto._nonce_pool.clear()
    batch = [field_nonce() for _ in range(256)]
    assert not _crypto._nonce_pool and len(set(batch)) == 256
    field_nonce()
    assert len(_crypto._nonce_pool) == 255


def test_version_1_aad_takes_the_flags_and_no_purpose_or_stream_params() -> None:
    dk = fresh()
    for flags in (0, 1):
        for purpose in Purpose:
            assert (
                dk.aad(
                    ALG_AES_256_GCM,
                    flags,
                    b"c",
                    purpose=purpose,
                    version=FORMAT_V1,
                    stream_params=b"ignored",
                )
                == aad_prefix(FORMAT_V1, ALG_AES_256_GCM, flags, "pii-v1", "pii", purpose) + b"c"
            )


def test_version_2_aad_puts_stream_params_before_the_context() -> None:
    dk = fresh()
    for flags in (0, 1):
        assert (
            dk.aad(ALG_AES_256_GCM_STREAM, flags, b"c", purpose=Purpose.STREAM, stream_params=b"SP")
            == aad_prefix(FORMAT_V2, ALG_AES_256_GCM_STREAM, flags, "pii-v1", "pii", Purpose.STREAM)
            + b"SP"
            + b"c"
        )


@pytest.mark.parametrize("flags", [0, 1])
def test_open_gcm_raw_reads_version_1_field_tokens(flags: int) -> None:
    dk = fresh()
    aad = aad_prefix(FORMAT_V1, ALG_AES_256_GCM, flags, "pii-v1", "pii", Purpose.FIELD) + b"c"
    nonce = bytes(range(12))
    raw = bytes((ALG_AES_256_GCM, flags)) + nonce + AESGCM(MATERIAL).encrypt(nonce, b"v", aad)
    assert dk.open_gcm_raw(flags, raw, b"c", version=FORMAT_V1) == b"v"


def test_empty_plaintexts_are_the_shortest_bodies_and_open() -> None:
    dk = fresh()
    raw = raw_of(dk.seal_text(b"", b"c"), dk.text_prefix)
    assert len(raw) == 2 + 12 + 16
    assert dk.open_gcm_raw(0, raw, b"c") == b""
    nonce, sealed = dk.gcm_parts(b"", b"c")
    assert len(nonce + sealed) == 12 + 16
    assert dk.open_gcm(0, nonce + sealed, b"c") == b""
    siv = raw_of(dk.seal_deterministic(b"", b"c"), dk.text_prefix)
    assert len(siv) == 2 + 16
    assert dk.open_siv(0, siv[2:], b"c") == b""


def test_gcm_parts_is_a_flagless_blob_under_the_blob_purpose() -> None:
    dk = fresh()
    nonce, sealed = dk.gcm_parts(b"data", b"c", nonce=bytes(12))
    aad = aad_prefix(FORMAT_V2, ALG_AES_256_GCM, 0, "pii-v1", "pii", Purpose.BLOB) + b"c"
    assert AESGCM(MATERIAL).decrypt(nonce, sealed, aad) == b"data"
    assert dk.open_gcm(0, nonce + sealed, b"c", purpose=Purpose.BLOB) == b"data"


# -- deterministic tokens -------------------------------------------------------


def test_deterministic_tokens_are_aes_siv_under_an_hkdf_subkey() -> None:
    dk = fresh()
    siv = AESSIV(hkdf(b"aes-siv", 64))
    token = dk.seal_deterministic(b"\x01v", b"c")
    assert token == dk.deterministic_tokens(b"\x01v", b"c")[0]
    raw = raw_of(token, "ac2.pii-v1.")
    assert raw[:2] == bytes((ALG_AES_256_SIV, 0))
    aad = aad_prefix(FORMAT_V2, ALG_AES_256_SIV, 0, "pii-v1", "pii", Purpose.FIELD) + b"c"
    assert siv.decrypt(raw[2:], [aad]) == b"\x01v"
    v1 = raw_of(dk.deterministic_tokens(b"\x01v", b"c")[1], "ac1.pii-v1.")
    assert v1[:2] == bytes((ALG_AES_256_SIV, 0))
    aad1 = aad_prefix(FORMAT_V1, ALG_AES_256_SIV, 0, "pii-v1", "pii", Purpose.FIELD) + b"c"
    assert siv.decrypt(v1[2:], [aad1]) == b"\x01v"
    assert dk.open_siv(0, v1[2:], b"c", version=FORMAT_V1) == b"\x01v"


# -- key derivation ---------------------------------------------------------------


def test_derived_keys_are_hkdf_sha256_with_the_aiocrypt_label() -> None:
    dk = fresh()
    assert derive_key(MATERIAL, b"blind") == hkdf(b"blind")
    assert len(derive_key(MATERIAL, b"blind")) == 32
    assert dk.derive(b"blind") == hkdf(b"blind")
    assert dk.derive(b"x", 48, b"salt") == hkdf(b"x", 48, b"salt")


def test_a_stream_cipher_is_gcm_under_the_salted_stream_subkey() -> None:
    dk = fresh()
    nonce = bytes(12)
    sealed = dk.stream_cipher(b"S" * 16).encrypt(nonce, b"seg", b"")
    assert AESGCM(hkdf(b"stream", 32, b"S" * 16)).decrypt(nonce, sealed, b"") == b"seg"


# -- a fresh DataKey ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "disabled", "readable", "reencryptable"),
    [
        (KeyStatus.ACTIVE, False, True, True),
        (KeyStatus.DECRYPT_ONLY, False, True, True),
        (KeyStatus.EXPIRED, False, True, True),
        (KeyStatus.REVOKED, False, False, True),
        (KeyStatus.COMPROMISED, False, False, True),
        (KeyStatus.DESTROYED, False, False, False),
        (KeyStatus.DECRYPT_ONLY, True, False, False),
        (KeyStatus.ACTIVE, True, False, False),
    ],
)
def test_a_fresh_data_key_reads_its_record(
    status: KeyStatus, disabled: bool, readable: bool, reencryptable: bool
) -> None:
    dk = fresh(status=status, decrypt_disabled=disabled)
    assert (dk.readable, dk.reencryptable) == (readable, reencryptable)
    assert (dk.encryptions, dk.allowance, dk.refill_at) == (0, 0, 0)
    assert (dk.expired, dk.past_grace) == (False, False)
    assert dk.key_id == "pii-v1" and dk.key_type == "pii"
    assert (dk.text_prefix, dk.text_prefix_v1) == ("ac2.pii-v1.", "ac1.pii-v1.")


def test_the_field_aad_cache_holds_512_contexts() -> None:
    dk = fresh()
    for i in range(512):
        dk.field_aad(f"c{i}")
    assert len(dk.field_aads) == 512
    dk.field_aad("c511")  # a hit never clears
    assert len(dk.field_aads) == 512
    dk.field_aad("c512")
    assert list(dk.field_aads) == ["c512"]


def test_seal_field_takes_a_bytearray_context() -> None:
    # unhashable: it must not reach the str-keyed AAD cache
    dk = fresh()
    raw = raw_of(dk.seal_field(b"\x01v", bytearray(b"ctx")), dk.text_prefix)  # type: ignore[arg-type]
    assert dk.open_gcm_raw(0, raw, b"ctx") == b"\x01v"
    assert dk.field_aads == {}
