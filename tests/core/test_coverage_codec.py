"""``aiocrypt._codec``: every refusal of the decoder, reached with bytes built by hand.

Every malformed input raises ``ValueError`` (never another exception, never a
value such as ``None``), and nothing the encoder refuses is silently changed.
"""

from __future__ import annotations

import datetime as _dt
import enum
import struct
import uuid
from decimal import Decimal

import pytest

from aiocrypt import UnsupportedTypeError
from aiocrypt._codec import MAX_DEPTH, decode_value, encode_value

U32 = struct.Struct(">I")


def item(body: bytes) -> bytes:
    return U32.pack(len(body)) + body


def nested_lists(depth: int) -> bytes:
    """``depth`` lists, each holding the next, around an empty list."""
    data = b"\x0b" + U32.pack(0)
    for _ in range(depth):
        data = b"\x0b" + U32.pack(1) + item(data)
    return data


MALFORMED = {
    "empty": b"",
    "empty int": b"\x03",
    "truncated container head": b"\x0b\x00\x00\x00",
    "count beyond data": b"\x0b" + U32.pack(2) + item(b"\x00"),
    "item runs out of length bytes": b"\x0b" + U32.pack(2) + item(b"\x02" + b"x" * 5) + b"\x00",
    "zero item length": b"\x0b" + U32.pack(1) + U32.pack(0) + b"\x00",
    "item past the end": b"\x0b" + U32.pack(1) + U32.pack(9) + b"\x00",
    "trailing bytes in container": b"\x0b" + U32.pack(1) + item(b"\x00") + b"\x00",
    "odd dict": b"\x0c" + U32.pack(1) + item(b"\x01k") + U32.pack(0),
    "unhashable dict key": b"\x0c" + U32.pack(1) + item(b"\x0b" + U32.pack(0)) + item(b"\x00"),
    "short float": b"\x04" + bytes(7),
    "long float": b"\x04" + bytes(9),
    "bad decimal": b"\x05not a number",
    "none with body": b"\x00\x00",
    "true with body": b"\x06x",
    "false with body": b"\x07x",
    "bad date": b"\x082026-13-01",
    "naive datetime": b"\x092026-01-01T00:00:00",
    "short uuid": b"\x0a" + bytes(15),
    "long uuid": b"\x0a" + bytes(17),
    "unknown tag": b"\x0d",
    "high tag": b"\xff",
    "bad utf-8": b"\x01\xff",
    "bad utf-8 nested": b"\x0b" + U32.pack(1) + item(b"\x01\xff"),
    "non-ascii decimal": b"\x05\xff",
    "too deep": nested_lists(MAX_DEPTH + 2),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("wrap", [bytes, memoryview, bytearray], ids=lambda w: w.__name__)
def test_malformed_input_is_a_value_error(data: bytes, wrap: type) -> None:
    with pytest.raises(ValueError):  # "malformed encoded value", or the date parser's own
        decode_value(wrap(data))


def test_nesting_up_to_the_limit_decodes() -> None:
    value = decode_value(memoryview(nested_lists(MAX_DEPTH)))
    for _ in range(MAX_DEPTH):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value == []


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        255,
        -256,
        2**64,
        1.5,
        -0.0,
        b"",
        b"\x00",
        "",
        "é",
        _dt.date(2026, 1, 2),
        _dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=_dt.UTC),
        uuid.UUID(int=7),
        [],
        [[]],
        {},
        {1: "a", "b": [None]},
        {None: 1, True: 2, 1.5: 3},
    ],
)
def test_round_trip_from_bytes_and_views(value: object) -> None:
    data = encode_value(value)
    for wrap in (bytes, memoryview, bytearray):
        decoded = decode_value(wrap(data))  # type: ignore[arg-type]  # a bytearray decodes too
        assert decoded == value and type(decoded) is type(value)


def test_dict_keys_must_be_scalars() -> None:
    for key_type in (list, dict):

        class Key(key_type):  # type: ignore[valid-type,misc]
            __hash__ = object.__hash__  # hashable, so it can be a dict key at all

        with pytest.raises(UnsupportedTypeError, match="dict keys must be scalar"):
            encode_value({Key(): 1})


def test_values_nested_past_the_limit_are_refused() -> None:
    value: list[object] = []
    for _ in range(MAX_DEPTH + 1):
        value = [value]
    with pytest.raises(UnsupportedTypeError, match="nested deeper"):
        encode_value(value)


class _NoOffset(_dt.tzinfo):  # utcoffset() only: dst() and tzname() are never called
    def utcoffset(self, dt: _dt.datetime | None) -> None:
        return None


@pytest.mark.parametrize(
    "value",
    [
        _dt.datetime(2026, 1, 1),
        _dt.datetime(2026, 1, 1, tzinfo=_NoOffset()),  # type: ignore[abstract]
        (1, 2),
        {1},
        frozenset(),
        object(),
        1j,
    ],
    ids=repr,
)
def test_unsupported_values_are_refused_not_changed(value: object) -> None:
    with pytest.raises(UnsupportedTypeError):
        encode_value(value)


class _Int(enum.IntEnum):
    ONE = 1


class _Str(enum.StrEnum):
    A = "a"


class _Bytes(bytes):
    pass


class _Decimal(Decimal):
    pass


@pytest.mark.parametrize(
    ("value", "base"),
    [
        (_Int.ONE, int),
        (_Str.A, str),
        (_Bytes(b"x"), bytes),
        (_Decimal("1.5"), Decimal),
    ],
)
def test_subclasses_are_stored_as_their_base_type(value: object, base: type) -> None:
    decoded = decode_value(encode_value(value))
    assert decoded == value and type(decoded) is base
