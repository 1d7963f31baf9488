"""``aiocrypt._format``: the helpers the wire format's callers lean on, line by line."""

from __future__ import annotations

import string

import pytest

from aiocrypt._format import (
    ALG_AES_256_GCM,
    B64_CANONICAL_LAST,
    FLAG_ZSTD,
    FORMAT_V1,
    FORMAT_V2,
    MAX_CONTEXT_LEN,
    MAX_KEY_ID_LEN,
    FormatError,
    Purpose,
    aad_prefix,
    b64decode_canonical,
    context_bytes,
    is_token_text,
    like_pattern,
    parse_binary,
    text_prefix,
    text_version,
    token_sql,
)


def test_aad_prefix_per_version() -> None:
    v2 = aad_prefix(FORMAT_V2, ALG_AES_256_GCM, 0, "pii-v1", "pii", Purpose.SESSION)
    assert v2 == bytes((2, 1, 0, 6)) + b"pii-v1" + bytes((Purpose.SESSION,)) + b"\x03pii"
    v1 = aad_prefix(FORMAT_V1, ALG_AES_256_GCM, 1, "pii-v1", "pii", Purpose.SESSION)
    assert v1 == bytes((1, 1, 1, 6)) + b"pii-v1" + b"\x03pii"  # no purpose byte
    for version in (0, 3, 255):
        with pytest.raises(ValueError, match=f"unknown format version {version}"):
            aad_prefix(version, ALG_AES_256_GCM, 0, "pii-v1", "pii", Purpose.FIELD)


@pytest.mark.parametrize(
    ("value", "version"),
    [
        ("ac2.pii-v1.AAAA", FORMAT_V2),
        ("ac1.pii-v1.AAAA", FORMAT_V1),
        ("ac2.", FORMAT_V2),
        ("ac3.pii-v1.AAAA", None),
        ("ac2", None),
        ("", None),
        ("AC2.x.AAAA", None),
        (b"ac2.pii-v1.AAAA", None),
        (None, None),
        (42, None),
    ],
)
def test_text_version_and_is_token_text(value: object, version: int | None) -> None:
    assert text_version(value) == version
    assert is_token_text(value) is (version is not None)


def test_text_prefix_and_like_pattern() -> None:
    assert text_prefix("pii_v1") == "ac2.pii_v1."
    assert text_prefix("pii_v1", FORMAT_V1) == "ac1.pii_v1."
    assert like_pattern("pii_v1") == "ac2.pii\\_v1.%"
    assert like_pattern("a-b", FORMAT_V1) == "ac1.a-b.%"
    with pytest.raises(ValueError, match="key id"):
        text_prefix("bad id")


def test_token_sql() -> None:
    assert token_sql('"t"."c"') == """substr("t"."c", 1, 4) IN ('ac1.', 'ac2.')"""
    assert token_sql("c", (FORMAT_V2,)) == "substr(c, 1, 4) IN ('ac2.')"


def test_context_bytes_limits_and_types() -> None:
    assert context_bytes(None) == b""
    assert context_bytes("users.ssn") == b"users.ssn"
    assert context_bytes("\U0001f600" * 1024) == "\U0001f600".encode() * 1024  # 4096 bytes
    assert context_bytes("x" * MAX_CONTEXT_LEN) == b"x" * MAX_CONTEXT_LEN
    for ok in (b"x" * MAX_CONTEXT_LEN, bytearray(b"ab"), memoryview(b"ab")):
        assert context_bytes(ok) == bytes(ok)  # type: ignore[arg-type]  # any bytes-like binds
    for too_long in ("x" * (MAX_CONTEXT_LEN + 1), "é" * 2049, b"x" * (MAX_CONTEXT_LEN + 1)):
        with pytest.raises(ValueError, match="context longer than 4096 bytes"):
            context_bytes(too_long)
    for wrong in (1, 1.5, ["a"], object()):
        with pytest.raises(TypeError, match="context must be str, bytes or None"):
            context_bytes(wrong)  # type: ignore[arg-type]


def _binary(
    version: int = 2,
    algorithm: int = 1,
    flags: int = 0,
    key_id: bytes = b"k1",
    kid_len: int | None = None,
    body: bytes = b"body",
) -> bytes:
    size = len(key_id) if kid_len is None else kid_len
    return bytes((version, algorithm, flags, size)) + key_id + body


def test_parse_binary_splits_a_good_header() -> None:
    header, head, body = parse_binary(_binary(key_id=b"k" * MAX_KEY_ID_LEN))
    assert (header.version, header.algorithm, header.flags) == (2, 1, 0)
    assert header.key_id == "k" * MAX_KEY_ID_LEN and head == _binary(key_id=b"k" * 64)[:68]
    assert bytes(body) == b"body"
    assert parse_binary(_binary(version=1, flags=FLAG_ZSTD, body=b""))[0].version == 1


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b"", "not an aiocrypt token"),
        (_binary()[:4], "not an aiocrypt token"),
        (_binary(version=0), "not an aiocrypt token"),
        (_binary(version=3), "not an aiocrypt token"),
        (_binary(algorithm=0), "unknown algorithm"),
        (_binary(algorithm=4), "unknown algorithm"),
        (_binary(flags=2), "unknown flags"),
        (_binary(flags=0x80), "unknown flags"),
        (_binary(kid_len=0), "bad key id length"),
        (_binary(key_id=b"k" * 65), "bad key id length"),
        (_binary(kid_len=9, body=b""), "bad key id length"),
        (_binary(key_id=b"k\xff"), "bad key id"),
        (_binary(key_id=b"k."), "bad key id"),
    ],
)
def test_parse_binary_refusals(blob: bytes, why: str) -> None:
    with pytest.raises(FormatError, match=why):
        parse_binary(blob)


def test_b64decode_canonical_refusals() -> None:
    assert b64decode_canonical("xxAAAAAQ==", 2) == b"\x00\x00\x00\x01"
    for text in ("AAA", "AA=A", "AAAA=", "AAAA====", "+AAA", "/AAA", "AA A", "AAé=", "A==="):
        with pytest.raises(FormatError, match="base64"):
            b64decode_canonical(text)


@pytest.mark.parametrize("tail", [1, 2])
def test_b64decode_canonical_takes_one_last_character_per_value(tail: int) -> None:
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    accepted = set()
    for char in alphabet:
        text = "AAAA" + "A" * tail + char + "=" * (3 - tail)  # 3 + tail bytes
        try:
            b64decode_canonical(text)
        except FormatError:
            continue
        accepted.add(char)
    assert accepted == set(B64_CANONICAL_LAST[tail])
    assert len(accepted) == (4 if tail == 1 else 16)
