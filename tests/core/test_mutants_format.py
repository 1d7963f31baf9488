"""The wire format's bounds and tables in ``aiocrypt._format``, exactly.

Each test pins lines a mutant of ``./dev mutate aiocrypt/_format.py`` changed
without any other test noticing (docs/testing.md); test_coverage_format.py holds
the rest. Limits are written out as numbers (the documented ones), so a constant
off by one fails here rather than moving the test with it.
"""

from __future__ import annotations

import base64
import dataclasses
import string

import pytest

from aiocrypt import DecryptionError, KeyStatus
from aiocrypt._errors import DecryptionFailure
from aiocrypt._format import (
    ALG_AES_256_GCM,
    ALG_AES_256_GCM_STREAM,
    ALG_AES_256_SIV,
    FLAG_ZSTD,
    MAX_FIELD_PLAINTEXT,
    TEXT_GCM_NONCE,
    TEXT_GCM_SEALED,
    FormatError,
    Purpose,
    aad_prefix,
    b64decode_canonical,
    b64encode_urlsafe,
    context_bytes,
    key_id_dot,
    key_id_sql,
    parse_binary,
    stream_params,
    text_prefix,
    validate_key_id,
)
from aiocrypt._keyring import Keyring

from ._core_keys import data_key, record

B64URL = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
KEY_ID_CHARS = string.ascii_letters + string.digits + "_-"
MAX_KEY_ID = 64
MAX_CONTEXT = 4096
MAX_TOKEN = 96 * 1024 * 1024
#: "ac2." + the longest key id + "."
LONGEST_PREFIX = 4 + MAX_KEY_ID + 1


# -- key ids --------------------------------------------------------------------


def test_every_key_id_character_is_accepted_alone_and_at_64() -> None:
    for char in KEY_ID_CHARS:
        assert validate_key_id(char) == char
    assert validate_key_id(KEY_ID_CHARS[:MAX_KEY_ID]) == KEY_ID_CHARS[:MAX_KEY_ID]


@pytest.mark.parametrize(
    "key_id",
    [
        "",
        "k" * (MAX_KEY_ID + 1),
        "a.b",
        "a b",
        "a/b",
        "a+b",
        "a=b",
        "é",
        "k\n",
        "\u0661",
        "\uff4b",
        "a:b",
        "a%b",
    ],
)
def test_anything_else_is_not_a_key_id(key_id: str) -> None:
    with pytest.raises(ValueError, match="key id must be"):
        validate_key_id(key_id)
    if key_id:  # (record() names an empty id itself)
        with pytest.raises(ValueError):
            record(key_id=key_id)  # key records are held to it too


@pytest.mark.parametrize("key_id", [b"k1", None, 1, ["k1"]])
def test_a_key_id_is_a_str(key_id: object) -> None:
    with pytest.raises(ValueError, match="key id must be"):
        validate_key_id(key_id)  # type: ignore[arg-type]


def test_every_other_ascii_character_is_refused_inside_a_key_id() -> None:
    for code in range(128):
        char = chr(code)
        if char in KEY_ID_CHARS:
            continue
        with pytest.raises(ValueError):
            validate_key_id(f"ab{char}cd")


def test_a_binary_header_with_a_bad_key_id_is_malformed() -> None:
    for kid in (b"a.b", b"a b", b"a/b", b"\xc3\xa9"):
        with pytest.raises(FormatError, match=r"bad key id$"):
            parse_binary(bytes((2, 1, 0, len(kid))) + kid + b"body")


# -- contexts -------------------------------------------------------------------


def test_a_str_context_is_bounded_in_utf8_bytes_not_characters() -> None:
    four_byte = "\U0001f600"
    assert context_bytes(four_byte * (MAX_CONTEXT // 4)) == four_byte.encode() * 1024
    for too_long in (four_byte * 1025, "é" * 2049, "x" * 4097):
        with pytest.raises(ValueError, match="context longer than 4096 bytes"):
            context_bytes(too_long)
    assert context_bytes("x" * MAX_CONTEXT) == b"x" * MAX_CONTEXT


def test_a_str_subclass_context_is_its_text() -> None:
    class Column(str):
        pass

    assert context_bytes(Column("users.ssn")) == b"users.ssn"
    assert context_bytes(Column("é")) == "é".encode()


# -- binary headers -------------------------------------------------------------


def test_wire_numbers() -> None:
    # each is a byte of every header or of the associated data: frozen
    assert (ALG_AES_256_GCM, ALG_AES_256_SIV, ALG_AES_256_GCM_STREAM, FLAG_ZSTD) == (1, 2, 3, 1)
    assert [int(p) for p in Purpose] == [1, 2, 3, 4, 5]
    assert [p.name for p in Purpose] == ["FIELD", "BLOB", "STREAM", "SESSION", "CACHE"]


@pytest.mark.parametrize(
    ("blob", "fields"),
    [
        (bytes((2, 3, 1, 1)) + b"k", (2, 3, 1, "k", b"")),
        (bytes((1, 2, 0, 3)) + b"a-b" + b"xyz", (1, 2, 0, "a-b", b"xyz")),
        (bytes((2, 1, 1, 2)) + b"Zz" + bytes(range(5)), (2, 1, 1, "Zz", bytes(range(5)))),
    ],
)
def test_parse_binary_reads_each_field_from_its_offset(
    blob: bytes, fields: tuple[int, int, int, str, bytes]
) -> None:
    header, head, body = parse_binary(blob)
    assert (header.version, header.algorithm, header.flags, header.key_id, bytes(body)) == fields
    assert head == blob[: 4 + len(header.key_id)]
    assert header.to_bytes() == head


def test_the_shortest_binary_token_is_five_bytes() -> None:
    header, _, body = parse_binary(b"\x02\x01\x00\x01k")
    assert header.key_id == "k" and bytes(body) == b""
    for short in (b"", b"\x02", b"\x02\x01\x00\x01"):
        with pytest.raises(FormatError, match="not an aiocrypt token"):
            parse_binary(short)


@pytest.mark.parametrize(
    "blob",
    [
        bytes((2, 1, 0, 2)) + b"k",  # one key id byte missing
        bytes((2, 1, 0, 5)) + b"kk",
        bytes((2, 1, 0, MAX_KEY_ID + 1)) + b"k" * 65 + b"body",
        bytes((2, 1, 0, 0)) + b"body",
    ],
)
def test_a_key_id_length_past_the_data_or_the_limit_is_refused(blob: bytes) -> None:
    with pytest.raises(FormatError, match="bad key id length"):
        parse_binary(blob)


def test_a_header_is_immutable() -> None:
    header = parse_binary(b"\x02\x01\x00\x01k")[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        header.key_id = "other"  # type: ignore[misc]


def test_stream_params_bytes() -> None:
    assert stream_params(65536, b"s" * 16, b"p" * 7) == b"\x00\x01\x00\x00" + b"s" * 16 + b"p" * 7


@pytest.mark.parametrize("purpose", list(Purpose))
def test_aad_prefix_bytes_per_purpose(purpose: Purpose) -> None:
    assert (
        aad_prefix(2, 3, 1, "k", "pii", purpose)
        == b"\x02\x03\x01\x01k" + bytes((int(purpose),)) + b"\x03pii"
    )
    assert aad_prefix(1, 3, 1, "k", "pii", purpose) == b"\x01\x03\x01\x01k\x03pii"


# -- canonical base64 -----------------------------------------------------------


def test_base64url_alphabet_both_ways() -> None:
    data = bytes(range(256)) * 3
    text = b64encode_urlsafe(data)
    assert text == base64.urlsafe_b64encode(data).decode()
    assert b64decode_canonical(text) == data
    assert b64encode_urlsafe(b"\xfb\xff") == "-_8="
    assert b64decode_canonical("-_8=") == b"\xfb\xff"
    assert b64decode_canonical("") == b""
    assert b64decode_canonical("AAAA") == b"\x00\x00\x00"
    assert b64decode_canonical("ac2.AAAA", 4) == b"\x00\x00\x00"
    assert b64decode_canonical("ac2.kid.-_8=", 8) == b"\xfb\xff"


@pytest.mark.parametrize("tail", [1, 2])
def test_all_64_final_characters(tail: int) -> None:
    # 3 + tail bytes end in a character whose low 4 (one byte left) or 2 (two bytes
    # left) bits encode nothing: they must be zero, or two texts give the same bytes
    unused = 4 if tail == 1 else 2
    for index, char in enumerate(B64URL):
        text = "AAAA" + "B" * tail + char + "=" * (3 - tail)
        canonical = index % (1 << unused) == 0
        if canonical:
            raw = b64decode_canonical(text)
            assert len(raw) == 3 + tail
            assert base64.urlsafe_b64encode(raw).decode() == text
            assert b64decode_canonical("ac2." + text, 4) == raw
        else:
            with pytest.raises(FormatError, match="non-canonical base64"):
                b64decode_canonical(text)
            with pytest.raises(FormatError, match="non-canonical base64"):
                b64decode_canonical("ac2." + text, 4)


@pytest.mark.parametrize(
    "text",
    [
        "AA=A",
        "AAAA=",
        "AAAA==",
        "AAAAAA==AA",
        "A===",
        "AA",
        "AAA",
        "AAAAA",
        "+AAA",
        "/AAA",
        "AA+A",
        "A/==",
        "AAA\n",
        " AAA",
        "AAé=",
        "AA=\u00e9",
    ],
)
def test_refused_base64(text: str) -> None:
    with pytest.raises(FormatError, match="base64"):
        b64decode_canonical(text)
    with pytest.raises(FormatError, match="base64"):
        b64decode_canonical("ac2." + text, 4)


# -- field and token size limits ------------------------------------------------


def _token_of_length(prefix: str, length: int) -> str:
    """A GCM field token (algorithm 1, no flags) of ``length`` characters, all zeros."""
    assert (length - len(prefix)) % 4 == 0
    return prefix + "AQAA" + "A" * (length - len(prefix) - 4)


@pytest.mark.slow
def test_the_largest_field_fits_the_largest_token_under_the_longest_key_id() -> None:
    # 96 MiB of text, less "ac2." + a 64-character key id + "."; the body is base64 of
    # algorithm, flags, nonce, ciphertext and tag
    assert MAX_FIELD_PLAINTEXT == (MAX_TOKEN - LONGEST_PREFIX) // 4 * 3 - 2 - 12 - 16
    dk = data_key(key_id="L" * MAX_KEY_ID)
    keyring = Keyring([dk])
    token = keyring.encrypt_bytes(bytes(MAX_FIELD_PLAINTEXT), dk.key_type, "c")
    assert len(token) <= MAX_TOKEN
    assert len(keyring.decrypt_bytes(token, dk.key_type, "c")) == MAX_FIELD_PLAINTEXT
    del token
    with pytest.raises(ValueError, match="a field holds at most"):
        keyring.encrypt_bytes(bytes(MAX_FIELD_PLAINTEXT + 1), dk.key_type, "c")


@pytest.mark.slow
def test_a_text_token_may_be_96_mib_and_no_longer() -> None:
    dk = data_key(key_id="abc")  # "ac2.abc.": the body fills whole base64 quads
    keyring = Keyring([dk])
    at_limit = _token_of_length(dk.text_prefix, MAX_TOKEN)
    with pytest.raises(DecryptionError) as info:
        keyring.decrypt_bytes(at_limit, dk.key_type)  # read, and fails to authenticate
    assert info.value.reason is DecryptionFailure.AUTHENTICATION_FAILED
    del at_limit
    over = _token_of_length(dk.text_prefix, MAX_TOKEN + 4)
    with pytest.raises(DecryptionError) as info:
        keyring.decrypt_bytes(over, dk.key_type)  # refused unread
    assert info.value.reason is DecryptionFailure.MALFORMED


def test_key_records_use_the_same_key_id_rule() -> None:
    assert record(key_id="L" * MAX_KEY_ID).key_id == "L" * MAX_KEY_ID
    assert text_prefix("L" * MAX_KEY_ID) == "ac2." + "L" * MAX_KEY_ID + "."
    assert record(status=KeyStatus.ACTIVE).status is KeyStatus.ACTIVE


def test_the_text_forms_offsets_are_the_documented_ones() -> None:
    """docs/format.md: "ac2." + key id (1..64 characters) + "." + base64(algorithm ||
    flags || nonce (12) || ciphertext || tag (16)); the offsets live in _format."""
    longest = "k" * 64
    assert key_id_dot(f"ac2.{longest}.AAAA") == 68
    assert key_id_dot(f"ac2.{longest}k.AAAA") == -1  # 65 characters: not a key id
    assert key_id_dot("ac2.k.AAAA") == 5
    assert key_id_dot("ac2..AAAA") == -1  # an empty key id ends nowhere
    assert (TEXT_GCM_NONCE, TEXT_GCM_SEALED) == (slice(2, 14), 14)
    assert MAX_FIELD_PLAINTEXT == (96 * 1024 * 1024 - 69) // 4 * 3 - 2 - 12 - 16


def test_the_key_id_sql_reads_the_key_id_in_sqlite() -> None:
    import sqlite3

    db = sqlite3.connect(":memory:")
    sql = key_id_sql('"c"', "sqlite")
    for token, key_id in (("ac2.pii-v1-0a0b0c0d.AAAA", "pii-v1-0a0b0c0d"), ("ac1.k.B", "k")):
        assert db.execute(f'SELECT {sql} FROM (SELECT ? AS "c")', (token,)).fetchone() == (key_id,)
    db.close()
