"""Paths of the re-encryption package the wider suite leaves unrun: the parsing of
plaintext stored before encryption, ..."""

from __future__ import annotations

import datetime as _dt
from decimal import Decimal
from typing import Any

import pytest

from aiocrypt import KeyType
from aiocrypt.reencrypt import (
    AsyncpgDatabase,
    ColumnSpec,
    ReencryptionEngine,
    TableSpec,
    parse_legacy,
    quote_identifier,
)
from aiocrypt.testing import make_key_manager


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


# -- the specs' checks -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.b.c", "drop table", ""])
def test_quote_identifier_refuses_what_is_not_a_plain_name(name: str) -> None:
    with pytest.raises(ValueError, match="not a plain SQL identifier"):
        quote_identifier(name)


def test_column_spec_checks_its_legacy_options() -> None:
    with pytest.raises(ValueError, match=r"unknown legacy_type 'money'; use one of \['bool'"):
        ColumnSpec("ssn", KeyType.PII, legacy_type="money")
    with pytest.raises(ValueError, match="column ssn: legacy_reader needs the legacy_type"):
        ColumnSpec("ssn", KeyType.PII, legacy_reader="fernet")


def test_table_spec_checks_its_columns() -> None:
    with pytest.raises(ValueError, match="table users: no encrypted columns"):
        TableSpec("users", "id", ())
    with pytest.raises(ValueError, match="table users: duplicate column names"):
        TableSpec("users", "id", (ColumnSpec("ssn", KeyType.PII), ColumnSpec("ssn", KeyType.PII)))
    with pytest.raises(ValueError, match="table users: duplicate column names"):
        TableSpec("users", "id", (ColumnSpec("id", KeyType.PII),))


def test_table_spec_selection() -> None:
    spec = TableSpec(
        "users",
        "id",
        (ColumnSpec("ssn", KeyType.PII), ColumnSpec("income", KeyType.FINANCIAL_DATA)),
    )
    with pytest.raises(KeyError, match="table users has no encrypted column 'email'"):
        spec.select(columns=["ssn", "email"])
    with pytest.raises(ValueError, match="table users: no encrypted column matches the selection"):
        spec.select(columns=["ssn"], key_type=KeyType.FINANCIAL_DATA)
    assert [c.name for c in spec.select(key_type="financial_data").columns] == ["income"]


# -- the engine's checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"rate_limit": 0}, "rate_limit must be a positive number"),
        ({"max_passes": 0}, "max_passes must be at least 1"),
        ({"on_error": "ignore"}, "on_error must be 'raise' or 'skip'"),
    ],
)
def test_engine_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReencryptionEngine(make_key_manager(), AsyncpgDatabase("postgresql://x/y"), **options)


def test_engine_repr_and_unknown_table() -> None:
    spec = TableSpec("users", "id", (ColumnSpec("ssn", KeyType.PII),))
    engine = ReencryptionEngine(
        make_key_manager(), AsyncpgDatabase("postgresql://x/y"), tables=[spec], batch_size=7
    )
    assert repr(engine) == "<ReencryptionEngine tables=['users'] batch_size=7>"
    assert engine.table(spec) is spec
    with pytest.raises(KeyError, match="no table spec registered for 'orders'"):
        engine.table("orders")


def test_asyncpg_database_needs_one_of_dsn_and_pool() -> None:
    with pytest.raises(ValueError, match="give a DSN or an asyncpg pool"):
        AsyncpgDatabase()
    with pytest.raises(ValueError, match="give a DSN or an asyncpg pool"):
        AsyncpgDatabase("postgresql://x/y", pool=object())
    db = AsyncpgDatabase("postgresql://x/y", checkpoint_table="ckpt")
    assert repr(db) == "<AsyncpgDatabase checkpoint_table=ckpt>"
    assert "x/y" not in repr(db)
