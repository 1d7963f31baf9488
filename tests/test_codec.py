"""The value codec and the service keep value and type through a round trip."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiocrypt import EncryptionService, UnsupportedTypeError
from aiocrypt._codec import MAX_DEPTH, decode_value, encode_value
from aiocrypt.testing import make_service

aware_datetimes = st.datetimes(
    timezones=st.sampled_from(
        [
            dt.UTC,
            dt.timezone(dt.timedelta(hours=5, minutes=30)),
            dt.timezone(dt.timedelta(hours=-8)),
        ]
    )
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.decimals(allow_nan=False),
    st.dates(),
    aware_datetimes,
    st.uuids(),
)
hashable_scalars = st.one_of(st.text(), st.integers(), st.booleans(), st.uuids(), st.dates())
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(hashable_scalars, children, max_size=5)
    ),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    """Equal, of the same type, all the way down (and the same UTC offset for datetimes)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, dt.datetime):
        same_offset: bool = a.utcoffset() == b.utcoffset()
        return a == b and same_offset
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


@given(values)
def test_codec_round_trip_keeps_value_and_type(value: Any) -> None:
    assert same(decode_value(encode_value(value)), value)


@settings(max_examples=150, deadline=None)
@given(value=values, context=st.text(max_size=40))
async def test_service_round_trip_keeps_value_and_type(value: Any, context: str) -> None:
    service = make_service()
    async with service:
        token = await service.encrypt_field(value, "pii", context=context)
        assert same(await service.decrypt_field(token, "pii", context=context), value)


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -0.0, Decimal("NaN"), Decimal("-0.00"), Decimal("1E+3")]
)
def test_special_numbers(value: Any) -> None:
    decoded = decode_value(encode_value(value))
    assert type(decoded) is type(value)
    assert str(decoded) == str(value)
    if isinstance(value, float):
        assert math.copysign(1, decoded) == math.copysign(1, value)


@pytest.mark.parametrize(
    "value",
    [
        (1, 2),
        {1, 2},
        frozenset(),
        object(),
        dt.datetime(2026, 1, 1),
        complex(1, 2),
        {(1, 2): "tuple key"},
        {frozenset(): 1},
    ],
)
async def test_unsupported_types_are_refused_clearly(
    value: Any, service: EncryptionService
) -> None:
    with pytest.raises(UnsupportedTypeError) as info:
        await service.encrypt_field(value)
    assert isinstance(info.value, TypeError)
    assert (
        "datetime" in str(info.value) or "cannot" in str(info.value) or "scalar" in str(info.value)
    )


def test_nesting_is_bounded() -> None:
    value: Any = "leaf"
    for _ in range(MAX_DEPTH + 1):
        value = [value]
    with pytest.raises(UnsupportedTypeError):
        encode_value(value)


@given(st.binary(max_size=64))
def test_decoder_rejects_garbage_with_value_error_only(data: bytes) -> None:
    try:
        decode_value(data)
    except ValueError:
        pass


def test_subclasses_are_stored_as_their_base_type() -> None:
    import enum

    class Color(enum.IntEnum):
        RED = 1

    assert type(decode_value(encode_value(Color.RED))) is int
    assert decode_value(encode_value(bytearray(b"ab"))) == b"ab"
    assert decode_value(encode_value(uuid.UUID(int=5))) == uuid.UUID(int=5)


def test_deepest_allowed_nesting_round_trips() -> None:
    value: Any = []
    for _ in range(MAX_DEPTH):
        value = [value]
    assert decode_value(encode_value(value)) == value
