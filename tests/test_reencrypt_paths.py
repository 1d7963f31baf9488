"""Paths of the re-encryption package the wider suite leaves unrun: the parsing of
plaintext stored before encryption, ..."""

from __future__ import annotations

import datetime as _dt
from decimal import Decimal

import pytest

from aiocrypt.reencrypt._values import parse_legacy


@pytest.mark.parametrize(
    ("value_type", "raw", "expected"),
    [
        ("bytes", "\\x4869", b"Hi"),  # Postgres's hex form of bytea as text
        ("bytes", "plain", b"plain"),
        (
            "datetime",
            " 2024-01-31T10:20:30+02:00 ",
            _dt.datetime(2024, 1, 31, 8, 20, 30, tzinfo=_dt.UTC),
        ),
        ("datetime", "2024-01-31T10:20:30", _dt.datetime(2024, 1, 31, 10, 20, 30, tzinfo=_dt.UTC)),
        ("float", 3, 3.0),
        ("float", Decimal("2.5"), 2.5),
        ("decimal", 7, Decimal(7)),
        ("decimal", 0.1, Decimal("0.1")),
        ("bool", 0, False),
        ("bool", 2, True),
        ("date", _dt.datetime(2024, 1, 31, 23, 59), _dt.date(2024, 1, 31)),
    ],
)
def test_legacy_value_parses_to_column_type(value_type: str, raw: object, expected: object) -> None:
    got = parse_legacy(value_type, raw)
    assert got == expected
    assert type(got) is type(expected)


def test_legacy_naive_datetime_value_is_taken_as_utc() -> None:
    got = parse_legacy("datetime", _dt.datetime(2024, 1, 31, 10, 20, 30))
    assert got == _dt.datetime(2024, 1, 31, 10, 20, 30, tzinfo=_dt.UTC)
    assert got.tzinfo is _dt.UTC


def test_legacy_aware_datetime_value_is_returned_as_is() -> None:
    aware = _dt.datetime(2024, 1, 31, 10, 20, 30, tzinfo=_dt.timezone(_dt.timedelta(hours=2)))
    assert parse_legacy("datetime", aware) is aware


def test_legacy_unknown_value_type_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown legacy value type 'money'; use one of \['bool'"):
        parse_legacy("money", "1.00")
