"""Values stored before encryption was turned on: plaintext as the database holds it,
parsed back into the Python type a column declares (the one type map of the project)."""

from __future__ import annotations

import datetime as _dt
import json
import re
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Final

from .._codec import NaiveDateTime
from .._parse import FALSE_WORDS, TRUE_WORDS

# -- values stored before encryption was turned on ------------------------------


# Stored data, not a setting: the words settings accept (_parse), and the short forms
# databases print a boolean as (Postgres's t/f, y/n).
_TRUE_VALUES: Final = TRUE_WORDS | {"t", "y"}
_FALSE_VALUES: Final = FALSE_WORDS | {"f", "n"}


def _parse_bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE_VALUES:
        return True
    if low in _FALSE_VALUES:
        return False
    raise ValueError("not a boolean")


def _parse_bytes(raw: str) -> bytes:
    # Postgres renders bytea as text in hex form ("\x4869"); anything else is UTF-8.
    if raw.startswith("\\x"):
        return bytes.fromhex(raw[2:])
    return raw.encode("utf-8")


def _parse_datetime(raw: str) -> _dt.datetime:
    value = _dt.datetime.fromisoformat(raw.strip())
    # Legacy naive timestamps are taken as UTC: the codec only stores aware ones.
    return value if value.tzinfo is not None else value.replace(tzinfo=_dt.UTC)


def _parse_date(raw: str) -> _dt.date:
    return _dt.date.fromisoformat(raw.strip()[:10])


def _parse_naive_datetime(raw: str) -> _dt.datetime:
    # a naive column keeps the application's clock: an offset would be dropped, so no
    value = _dt.datetime.fromisoformat(raw.strip())
    if value.tzinfo is not None:
        raise ValueError("an aware timestamp in a naive column")
    return NaiveDateTime.combine(value.date(), value.time())


_INTERVAL_RE: Final = re.compile(
    r"(?:(?P<days>-?\d+) days?,? ?)?(?P<sign>-)?(?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d(?:\.\d{1,6})?)"
)


def _parse_timedelta(raw: str) -> _dt.timedelta:
    # str(timedelta) ("1 day, 2:03:04.5"), Postgres interval text ("1 day 02:03:04"),
    # or a number of seconds
    text = raw.strip()
    match = _INTERVAL_RE.fullmatch(text)
    if match is None:
        return _dt.timedelta(seconds=float(text))
    clock = _dt.timedelta(hours=int(match["h"]), minutes=int(match["m"]), seconds=float(match["s"]))
    return _dt.timedelta(days=int(match["days"] or 0)) + (-clock if match["sign"] else clock)


_LEGACY_PARSERS: Final[Mapping[str, Callable[[str], Any]]] = {
    "str": str,
    "bytes": _parse_bytes,
    "int": lambda raw: int(raw.strip()),
    "float": lambda raw: float(raw.strip()),
    "decimal": lambda raw: Decimal(raw.strip()),
    "bool": _parse_bool,
    "date": _parse_date,
    "datetime": _parse_datetime,
    "json": json.loads,
    "uuid": lambda raw: uuid.UUID(raw.strip()),
    "time": lambda raw: _dt.time.fromisoformat(raw.strip()),
    "timedelta": _parse_timedelta,
    "naive_datetime": _parse_naive_datetime,
}
#: The Python type of each value type name: the one map the column types and the
#: re-encryption of plaintext share.
PYTHON_TYPES: Final[Mapping[str, type | tuple[type, ...]]] = {
    "str": str,
    "bytes": bytes,
    "int": int,
    "float": float,
    "decimal": Decimal,
    "bool": bool,
    "date": _dt.date,
    "datetime": _dt.datetime,
    "json": (dict, list),
    "uuid": uuid.UUID,
    "time": _dt.time,
    "timedelta": _dt.timedelta,
    "naive_datetime": _dt.datetime,
}
LEGACY_TYPES: Final = frozenset(_LEGACY_PARSERS)
"""Value types a column may hold as plaintext from before encryption (``legacy_type``)."""


def parse_legacy(value_type: str, raw: Any) -> Any:
    """A plaintext value stored before encryption, as the Python type the column holds.

    ``raw`` is what the driver returned (usually text: ``"50000.0"``, ``"t"``,
    ``"2024-01-31"``, JSON). Raises ``ValueError`` when it does not parse.
    """
    parser = _LEGACY_PARSERS.get(value_type)
    if parser is None:
        raise ValueError(
            f"unknown legacy value type {value_type!r}; use one of {sorted(LEGACY_TYPES)}"
        )
    if value_type == "date" and isinstance(raw, _dt.datetime):
        # before the isinstance check below: a datetime is a date too, and kept whole it
        # would be encrypted as a datetime into a date column
        return raw.date()
    expected = PYTHON_TYPES[value_type]
    if isinstance(raw, expected) and not (value_type == "int" and isinstance(raw, bool)):
        if value_type == "naive_datetime" and isinstance(raw, _dt.datetime):
            return _parse_naive_datetime(raw.isoformat())
        if isinstance(raw, _dt.datetime) and raw.tzinfo is None:
            return raw.replace(tzinfo=_dt.UTC)
        return raw
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw).decode("utf-8")
    if value_type == "float" and isinstance(raw, (int, Decimal)):
        return float(raw)
    if value_type == "decimal" and isinstance(raw, (int, float)):
        return Decimal(str(raw))
    if value_type == "bool" and isinstance(raw, int):
        return bool(raw)
    try:
        return parser(raw if isinstance(raw, str) else str(raw))
    except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:  # deep JSON
        raise ValueError(f"stored plaintext is not a valid {value_type}") from exc
