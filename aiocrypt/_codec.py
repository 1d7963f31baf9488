"""Type-preserving value codec: a Python value <-> bytes, before encryption.

One tag byte names the type, the rest is the value:

====  ==========  ===============================================
tag   type        body
====  ==========  ===============================================
0x00  None        (empty)
0x01  str         UTF-8
0x02  bytes       raw (bytearray / memoryview decode as bytes)
0x03  int         two's complement, big-endian, minimal length
0x04  float       IEEE 754 binary64, big-endian (NaN, -0.0 kept)
0x05  Decimal     ``str(value)``, ASCII
0x06  True        (empty)
0x07  False       (empty)
0x08  date        ISO 8601, ASCII
0x09  datetime    ISO 8601 with UTC offset (tz-aware only)
0x0A  UUID        16 bytes
0x0B  list        u32 count, then per item: u32 length, item
0x0C  dict        u32 count, then per pair: key item, value item
0x0D  time        ISO 8601, ASCII (a UTC offset if it has one)
0x0E  timedelta   days (i32), seconds (u32), microseconds (u32), big-endian
0x0F  naive       ISO 8601 without offset, ASCII: a :class:`NaiveDateTime`
      datetime    (decodes to a plain naive datetime)
====  ==========  ===============================================

Tags 0x0D-0x0F were added after the format was frozen (tests/vectors): values of
the earlier tags encode exactly as before, and readers older than these tags
refuse the new ones as malformed rather than misread them.

Dict keys may be any scalar type above. Nesting is bounded (``MAX_DEPTH``) and
every length is checked against what is left, so a decoder never allocates or
recurses past the input it was given. A datetime keeps its wall time and UTC
offset, not its zone name: it comes back with a fixed offset, at the same instant.
A zoned local time in a daylight-saving gap or overlap keeps the offset Python
gives it for its ``fold`` (by PEP 495 it then compares unequal to the fixed-offset
value; compare instants). Tuples, sets and naive datetimes are refused rather
than silently changed; a naive datetime the caller means as its own clock is
stored when wrapped in :class:`NaiveDateTime`, explicitly.
"""

from __future__ import annotations

import datetime as _dt
import struct
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from ._errors import UnsupportedTypeError

__all__ = ["MAX_DEPTH", "STR_TAG", "NaiveDateTime", "decode_value", "encode_value"]

MAX_DEPTH: Final = 32

_NONE, _STR, _BYTES, _INT, _FLOAT, _DECIMAL, _TRUE, _FALSE = (bytes([i]) for i in range(8))
_DATE, _DATETIME, _UUID, _LIST, _DICT = (bytes([i]) for i in range(8, 13))
_TIME, _TIMEDELTA, _NAIVE_DATETIME = (bytes([i]) for i in range(13, 16))
#: The tag of a str value: ``STR_TAG + value.encode()`` is ``encode_value(value)``.
STR_TAG: Final = _STR

_U32 = struct.Struct(">I")
_DELTA = struct.Struct(">iII")


class NaiveDateTime(_dt.datetime):
    """A naive datetime meant as the application's own clock (no zone, no offset).

    Plain naive datetimes stay refused (their instant is ambiguous); wrapping one
    says the caller knows: ``NaiveDateTime.combine(value.date(), value.time())``.
    It decodes to a plain naive ``datetime``.
    """

    __slots__ = ()


def _enc_naive(value: _dt.datetime) -> bytes:
    if value.tzinfo is not None:
        raise UnsupportedTypeError("NaiveDateTime must not carry a timezone")
    return _NAIVE_DATETIME + value.isoformat().encode("ascii")


_F64 = struct.Struct(">d")


class _CodecError(ValueError):
    """Malformed encoded value (only ever seen inside authenticated plaintext)."""


def _enc_int(value: int) -> bytes:
    return _INT + value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)


def _enc_datetime(value: _dt.datetime) -> bytes:
    if value.tzinfo is None or value.utcoffset() is None:
        raise UnsupportedTypeError(
            "naive datetime cannot be encrypted: attach a timezone (e.g. datetime.UTC)"
        )
    return _DATETIME + value.isoformat().encode("ascii")


def _enc_list(value: list[Any], depth: int) -> bytes:
    parts = [_LIST, _U32.pack(len(value))]
    for item in value:
        body = _encode(item, depth + 1)
        parts.append(_U32.pack(len(body)))
        parts.append(body)
    return b"".join(parts)


def _enc_dict(value: dict[Any, Any], depth: int) -> bytes:
    parts = [_DICT, _U32.pack(len(value))]
    for key, item in value.items():
        if isinstance(key, (list, dict)):
            raise UnsupportedTypeError("dict keys must be scalar values (str, int, ...)")
        for part in (_encode(key, depth + 1), _encode(item, depth + 1)):
            parts.append(_U32.pack(len(part)))
            parts.append(part)
    return b"".join(parts)


_SCALAR_ENCODERS: Final[dict[type, Callable[[Any], bytes]]] = {
    str: lambda v: _STR + v.encode("utf-8"),
    bytes: lambda v: _BYTES + v,
    bytearray: lambda v: _BYTES + bytes(v),
    memoryview: lambda v: _BYTES + v.tobytes(),
    int: _enc_int,
    float: lambda v: _FLOAT + _F64.pack(v),
    Decimal: lambda v: _DECIMAL + str(v).encode("ascii"),
    bool: lambda v: _TRUE if v else _FALSE,
    type(None): lambda v: _NONE,
    _dt.date: lambda v: _DATE + v.isoformat().encode("ascii"),
    _dt.datetime: _enc_datetime,
    uuid.UUID: lambda v: _UUID + v.bytes,
    _dt.time: lambda v: _TIME + v.isoformat().encode("ascii"),
    _dt.timedelta: lambda v: _TIMEDELTA + _DELTA.pack(v.days, v.seconds, v.microseconds),
    NaiveDateTime: _enc_naive,
}

# Subclasses (IntEnum, StrEnum, ...) are stored as their base type; order matters
# because bool is an int and datetime is a date.
_BASES: Final = (
    bool,
    int,
    float,
    str,
    bytes,
    bytearray,
    memoryview,
    Decimal,
    _dt.datetime,
    _dt.date,
    uuid.UUID,
    _dt.time,
    _dt.timedelta,
)


def _encode(value: Any, depth: int) -> bytes:
    if depth > MAX_DEPTH:
        raise UnsupportedTypeError(f"value nested deeper than {MAX_DEPTH} levels")
    encoder = _SCALAR_ENCODERS.get(type(value))
    if encoder is not None:
        return encoder(value)
    if isinstance(value, list):
        return _enc_list(value, depth)
    if isinstance(value, dict):
        return _enc_dict(value, depth)
    for base in _BASES:
        if isinstance(value, base):
            return _SCALAR_ENCODERS[base](value)
    raise UnsupportedTypeError(
        f"cannot encrypt a value of type {type(value).__name__}: supported types are "
        "str, bytes, int, float, Decimal, bool, None, date, tz-aware datetime, time, "
        "timedelta, UUID, and list / dict of those"
    )


def encode_value(value: Any) -> bytes:
    """Encode ``value`` so that :func:`decode_value` returns an equal value of the same type."""
    if type(value) is str:
        return _STR + value.encode("utf-8")
    return _encode(value, 0)


def _decode(data: bytes, pos: int, end: int, depth: int) -> Any:  # noqa: C901 - one branch per type tag of the frozen value codec; a dispatch table would add a call per value on the hot path
    """Decode the value occupying ``data[pos:end]`` (no copies of containers)."""
    if pos >= end:
        raise _CodecError("empty value")
    tag = data[pos]
    if tag == 1:
        return data[pos + 1 : end].decode("utf-8")
    if tag == 3:
        if end - pos < 2:
            raise _CodecError("empty int")
        return int.from_bytes(data[pos + 1 : end], "big", signed=True)
    if tag in (11, 12):
        if depth > MAX_DEPTH:
            raise _CodecError("nested too deeply")
        if end - pos < 5:
            raise _CodecError("truncated container")
        (count,) = _U32.unpack_from(data, pos + 1)
        if tag == 12:
            count *= 2
        p = pos + 5
        # each item needs at least its 4-byte length and 1 tag byte
        if count > (end - p) // 5:
            raise _CodecError("container count exceeds data")
        items = []
        for _ in range(count):
            if p + 4 > end:
                raise _CodecError("truncated container")
            (length,) = _U32.unpack_from(data, p)
            p += 4
            if length == 0 or p + length > end:
                raise _CodecError("bad item length")
            items.append(_decode(data, p, p + length, depth + 1))
            p += length
        if p != end:
            raise _CodecError("trailing bytes in container")
        if tag == 11:
            return items
        return dict(zip(items[::2], items[1::2], strict=True))
    body = data[pos + 1 : end]
    if tag == 2:
        return body
    if tag == 4:
        if len(body) != 8:
            raise _CodecError("bad float")
        return _F64.unpack(body)[0]
    if tag == 5:
        return Decimal(body.decode("ascii"))
    if tag in (0, 6, 7):
        if body:
            raise _CodecError("trailing bytes")
        return None if tag == 0 else tag == 6
    if tag == 8:
        return _dt.date.fromisoformat(body.decode("ascii"))
    if tag == 9:
        value = _dt.datetime.fromisoformat(body.decode("ascii"))
        if value.tzinfo is None:
            raise _CodecError("naive datetime")
        return value
    if tag == 10:
        if len(body) != 16:
            raise _CodecError("bad uuid")
        return uuid.UUID(bytes=body)
    return _decode_added(tag, body)


def _decode_added(tag: int, body: bytes) -> Any:
    """Tags added after the format was frozen (0x0D-0x0F)."""
    if tag == 13:
        return _dt.time.fromisoformat(body.decode("ascii"))
    if tag == 14:
        if len(body) != _DELTA.size:
            raise _CodecError("bad timedelta")
        days, seconds, micros = _DELTA.unpack(body)
        if seconds >= 86400 or micros >= 1_000_000:
            raise _CodecError("bad timedelta")
        try:
            return _dt.timedelta(days=days, seconds=seconds, microseconds=micros)
        except OverflowError:
            raise _CodecError("bad timedelta") from None
    if tag == 15:
        value = _dt.datetime.fromisoformat(body.decode("ascii"))
        if value.tzinfo is not None:
            raise _CodecError("naive datetime with an offset")
        return value
    raise _CodecError("unknown type tag")


def decode_value(data: bytes | memoryview) -> Any:
    """Decode bytes produced by :func:`encode_value`; raises ``ValueError`` on malformed input."""
    if data[:1] == _STR:  # the common case, without the general machinery
        try:
            return str(data[1:], "utf-8")
        except UnicodeDecodeError:  # its .object is the plaintext: not chained
            raise ValueError("malformed encoded value") from None
    if not isinstance(data, bytes):
        data = bytes(data)
    try:
        return _decode(data, 0, len(data), 0)
    except (ValueError, InvalidOperation, TypeError):
        # ValueError: ours, and those of fromisoformat / UUID, whose messages quote
        # the plaintext (so none is chained)
        raise ValueError("malformed encoded value") from None
