"""The value codec byte for byte, at its bounds, and on malformed input.

Each test pins lines a mutant of ``./dev mutate aiocrypt/_codec.py`` changed
without any other test noticing (docs/testing.md). Malformed input must raise
``ValueError("malformed encoded value")`` and nothing else: never ``IndexError``,
``struct.error`` or a third-party message, and never return a value (``None``
included) for bytes no encoder made.
"""

from __future__ import annotations

import datetime as dt
import enum
import struct
import traceback
import uuid
from decimal import Decimal
from typing import Any

import pytest

from aiocrypt import DecryptionError, UnsupportedTypeError
from aiocrypt._codec import NaiveDateTime, decode_value, encode_value
from aiocrypt.testing import make_service

from .test_coverage_codec import MALFORMED as COVERED

U32 = struct.Struct(">I").pack
#: The documented nesting bound (``MAX_DEPTH``), written out so a changed bound fails.
DEPTH = 32
MALFORMED_MESSAGE = r"^malformed encoded value$"


def item(body: bytes) -> bytes:
    return U32(len(body)) + body


def lst(*bodies: bytes) -> bytes:
    return b"\x0b" + U32(len(bodies)) + b"".join(item(b) for b in bodies)


UTC = dt.UTC
WHEN = dt.datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
ID = uuid.UUID("12345678-1234-5678-1234-567812345678")

ENCODINGS: list[tuple[Any, bytes]] = [
    (None, b"\x00"),
    ("é", b"\x01\xc3\xa9"),
    ("", b"\x01"),
    (b"ab", b"\x02ab"),
    (bytearray(b"ab"), b"\x02ab"),
    (memoryview(b"ab"), b"\x02ab"),
    (0, b"\x03\x00"),
    (1, b"\x03\x01"),
    (127, b"\x03\x7f"),
    (128, b"\x03\x00\x80"),
    (255, b"\x03\x00\xff"),
    (256, b"\x03\x01\x00"),
    (-1, b"\x03\xff"),
    (-127, b"\x03\x81"),
    (-128, b"\x03\xff\x80"),  # bit_length() + 8 bytes: one more than minimal
    (-129, b"\x03\xff\x7f"),
    (2**63, b"\x03\x00\x80" + bytes(7)),
    (1.5, b"\x04" + struct.pack(">d", 1.5)),
    (Decimal("-1.10"), b"\x05-1.10"),
    (True, b"\x06"),
    (False, b"\x07"),
    (dt.date(2026, 3, 4), b"\x082026-03-04"),
    (WHEN, b"\x09" + WHEN.isoformat().encode()),
    (ID, b"\x0a" + ID.bytes),
    ([], b"\x0b" + U32(0)),
    ([1, "a"], lst(b"\x03\x01", b"\x01a")),
    ({}, b"\x0c" + U32(0)),
    (
        {"a": None, 2: [True]},
        b"\x0c" + U32(2) + item(b"\x01a") + item(b"\x00") + item(b"\x03\x02") + item(lst(b"\x06")),
    ),
]


@pytest.mark.parametrize(("value", "encoded"), ENCODINGS)
def test_each_type_encodes_to_its_documented_bytes(value: Any, encoded: bytes) -> None:
    assert encode_value(value) == encoded


@pytest.mark.parametrize(("value", "encoded"), ENCODINGS)
def test_each_encoding_decodes_to_the_same_type_and_value(value: Any, encoded: bytes) -> None:
    for data in (encoded, memoryview(encoded), bytearray(encoded)):
        decoded = decode_value(data)  # type: ignore[arg-type]  # a bytearray decodes too
        expected_type = bytes if isinstance(value, (bytearray, memoryview)) else type(value)
        assert type(decoded) is expected_type
        assert decoded == value
        if isinstance(value, dt.datetime):
            assert decoded.utcoffset() == value.utcoffset()  # type: ignore[union-attr]  # a datetime


def test_containers_of_every_type_decode_item_by_item() -> None:
    scalars = [value for value, _ in ENCODINGS if not isinstance(value, (list, dict))]
    decoded = decode_value(encode_value(scalars))
    assert [type(v) for v in decoded] == [
        bytes if isinstance(v, (bytearray, memoryview)) else type(v) for v in scalars
    ]
    assert decoded == scalars
    many = {i: [None] * i for i in range(7)}  # lists of minimal 5-byte items, dict pairs
    assert decode_value(encode_value(many)) == many
    assert decode_value(encode_value([None] * 6)) == [None] * 6


def test_subclasses_encode_as_their_base_type() -> None:
    class Label(str):
        pass

    class Moment(dt.datetime):
        pass

    class Day(dt.date):
        pass

    class Level(enum.IntEnum):
        HIGH = 300

    assert encode_value(Label("x")) == b"\x01x"
    assert encode_value(Level.HIGH) == b"\x03\x01\x2c"
    moment = Moment(2026, 1, 2, tzinfo=UTC)
    assert encode_value(moment) == b"\x09" + moment.isoformat().encode()
    assert encode_value(Day(2026, 1, 2)) == b"\x082026-01-02"
    assert type(decode_value(encode_value(Moment(2026, 1, 2, tzinfo=UTC)))) is dt.datetime


class _NoOffset(dt.tzinfo):
    """A tzinfo that knows no offset: the datetime is naive by Python's definition."""

    # utcoffset() only: dst() and tzname() are never called (mypy: abstract)

    def utcoffset(self, when: dt.datetime | None) -> None:
        return None


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2026, 1, 1),
        dt.datetime(2026, 1, 1, tzinfo=_NoOffset()),  # type: ignore[abstract]
        object(),
        (1,),
        {1},
        complex(1, 2),
    ],
)
def test_unsupported_values_raise_unsupported_type_error(value: Any) -> None:
    with pytest.raises(UnsupportedTypeError):
        encode_value(value)


def test_list_and_dict_keys_are_refused_as_dict_keys() -> None:
    class Key(list):  # type: ignore[type-arg]
        __hash__ = object.__hash__  # type: ignore[assignment]  # hashable, still a list

    with pytest.raises(UnsupportedTypeError):
        encode_value({Key(): 1})


def nested(depth: int, leaf: Any, container: str) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value] if container == "list" else {"k": value}
    return value


@pytest.mark.parametrize("container", ["list", "dict"])
def test_encoding_nests_exactly_32_levels(container: str) -> None:
    # the leaf is at depth 32 (allowed), one more level is refused
    ok = nested(DEPTH, 1, container)
    assert decode_value(encode_value(ok)) == ok
    with pytest.raises(UnsupportedTypeError):
        encode_value(nested(DEPTH + 1, 1, container))


def test_a_dict_key_counts_one_level_deeper_than_its_dict() -> None:
    inner: Any = {"key": 1}
    for _ in range(DEPTH - 1):
        inner = [inner]
    assert decode_value(encode_value(inner)) == inner  # key and value at depth 32
    deeper = [inner]
    with pytest.raises(UnsupportedTypeError):
        encode_value(deeper)


def raw_lists(levels: int) -> bytes:
    data = b"\x0b" + U32(0)
    for _ in range(levels - 1):
        data = lst(data)
    return data


def test_decoding_nests_exactly_33_lists() -> None:
    # 33 lists: the innermost is at depth 32, the deepest an encoder writes
    assert decode_value(raw_lists(DEPTH + 1)) == nested(DEPTH, [], "list")
    with pytest.raises(ValueError, match=MALFORMED_MESSAGE):
        decode_value(raw_lists(DEPTH + 2))


#: Beyond the refusals test_coverage_codec.py reaches: lengths that point past the
#: end of a container or of the data (a decoder that trusted them would raise
#: struct.error or read a neighbour's bytes).
MALFORMED: dict[str, bytes] = {
    **COVERED,
    **{
        "empty int in a list": lst(b"\x03"),
        "list count 2**32-1": b"\x0b" + U32(2**32 - 1) + item(b"\x00"),
        "list missing its last item": b"\x0b" + U32(2) + item(b"\x04" + bytes(8)),
        "list item header cut at 3 bytes": b"\x0b"
        + U32(2)
        + item(b"\x04" + bytes(8))
        + b"\x00" * 3,
        "list item header without body": b"\x0b" + U32(2) + item(b"\x04" + bytes(8)) + U32(1),
        "item longer than the data": b"\x0b" + U32(1) + U32(100) + b"\x0b" + U32(1),
        "item longer than its list": lst(b"\x0b" + U32(1) + U32(9) + b"\x00") + item(b"\x00" * 8),
        "trailing bytes in an empty list": b"\x0b" + U32(0) + b"\x00",
        "truncated list in a list": b"\x0b" + U32(1) + U32(4) + b"\x0b\x00\x00\x00",
        "truncated list in a list, then more": lst(b"\x0b\x00\x00\x00", b"\x01abcdefgh"),
    },
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_raises_the_one_value_error(data: bytes) -> None:
    for form in (data, memoryview(data)):  # (bytearray: test_coverage_codec.py)
        with pytest.raises(ValueError, match=MALFORMED_MESSAGE) as info:
            result = decode_value(form)
            pytest.fail(f"decoded to {result!r}")  # never a value, None included
        assert type(info.value) is ValueError


async def test_a_malformed_plaintext_is_a_decryption_error_through_the_service() -> None:
    async with make_service() as service:
        await service.encrypt_field("first", "pii", context="ctx")  # an active key
        for data in MALFORMED.values():
            token = service.keyring.encrypt_bytes(data, "pii", "ctx")
            with pytest.raises(DecryptionError):
                await service.decrypt_field(token, "pii", context="ctx")


@pytest.mark.parametrize(
    "data", [b"\x08secret-1234", b"\x09secret-1234", b"\x01secret\xff", b"\x05secret"]
)
def test_a_decode_failure_does_not_carry_the_plaintext(data: bytes) -> None:
    # fromisoformat quotes its input, UnicodeDecodeError holds it: neither is chained
    with pytest.raises(ValueError, match=MALFORMED_MESSAGE) as info:
        decode_value(data)
    assert "secret" not in "".join(traceback.format_exception(info.value))
    assert info.value.__cause__ is None


# -- the tags added after the format was frozen (0x0D time, 0x0E timedelta, 0x0F naive) --

DELTA = struct.Struct(">iII").pack
ADDED: list[tuple[Any, bytes]] = [
    (dt.time(1, 2, 3, 4), b"\x0d01:02:03.000004"),
    (dt.time(23, 59, tzinfo=dt.timezone(dt.timedelta(hours=-3))), b"\x0d23:59:00-03:00"),
    (dt.timedelta(days=-1, seconds=86399, microseconds=999999), b"\x0e" + DELTA(-1, 86399, 999999)),
    (dt.timedelta(0), b"\x0e" + DELTA(0, 0, 0)),
    (dt.timedelta(days=999999999), b"\x0e" + DELTA(999999999, 0, 0)),
]


@pytest.mark.parametrize(("value", "encoded"), ADDED)
def test_time_and_timedelta_encode_to_their_documented_bytes(value: Any, encoded: bytes) -> None:
    assert encode_value(value) == encoded
    decoded = decode_value(encoded)
    assert type(decoded) is type(value) and decoded == value
    if isinstance(value, dt.time):
        assert decoded.utcoffset() == value.utcoffset()
    assert decode_value(encode_value([value])) == [value]


def test_time_and_timedelta_subclasses_encode_as_their_base() -> None:
    class Clock(dt.time):
        pass

    class Span(dt.timedelta):
        pass

    assert encode_value(Clock(1, 2)) == b"\x0d01:02:00"
    assert encode_value(Span(seconds=5)) == b"\x0e" + DELTA(0, 5, 0)


def test_a_naive_datetime_is_stored_only_when_wrapped() -> None:
    wrapped = NaiveDateTime(2026, 3, 4, 5, 6, 7, 8)
    assert encode_value(wrapped) == b"\x0f2026-03-04T05:06:07.000008"
    decoded = decode_value(encode_value(wrapped))
    assert type(decoded) is dt.datetime and decoded.tzinfo is None
    assert decoded == dt.datetime(2026, 3, 4, 5, 6, 7, 8)
    with pytest.raises(UnsupportedTypeError):
        encode_value(NaiveDateTime(2026, 3, 4, tzinfo=UTC))
    with pytest.raises(UnsupportedTypeError):
        encode_value(dt.datetime(2026, 3, 4))


ADDED_MALFORMED: dict[str, bytes] = {
    "bad time": b"\x0d25:00",
    "short timedelta": b"\x0e" + bytes(11),
    "long timedelta": b"\x0e" + bytes(13),
    "timedelta seconds of a whole day": b"\x0e" + DELTA(0, 86400, 0),
    "timedelta microseconds of a whole second": b"\x0e" + DELTA(0, 0, 1_000_000),
    "timedelta days out of range": b"\x0e" + DELTA(2**31 - 1, 0, 0),
    "timedelta days out of range below": b"\x0e" + DELTA(-(2**31), 0, 0),
    "naive datetime with an offset": b"\x0f2026-01-01T00:00:00+00:00",
    "bad naive datetime": b"\x0f2026-13-01T00:00:00",
    "unknown tag after the added ones": b"\x10",
}


@pytest.mark.parametrize("data", ADDED_MALFORMED.values(), ids=ADDED_MALFORMED.keys())
def test_malformed_added_tags_raise_the_one_value_error(data: bytes) -> None:
    test_malformed_input_raises_the_one_value_error(data)
