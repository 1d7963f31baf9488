"""The versioned ciphertext format (docs/format.md). Frozen by tests/vectors/.

Binary form (blobs, streams)::

    offset  size  field
    0       1     format version (0x02; 0x01 is still read)
    1       1     algorithm (ALG_*)
    2       1     flags (FLAG_*; unknown bits refused)
    3       1     key id length n (1..64)
    4       n     key id, ASCII [A-Za-z0-9_-]
    4+n     ...   algorithm body

Text form (columns, Redis), same bytes, key id readable at a fixed place::

    "ac2." + key_id + "." + base64url(algorithm || flags || body)   (padded, canonical)

("ac1." for version 1: both prefixes are 4 characters, so the key id always
starts at character 5 and SQL can select rows by key version with
``left(col, len(text_prefix(kid))) = text_prefix(kid)`` without decrypting them.)

Algorithm bodies:

* ``ALG_AES_256_GCM``: nonce (12) || ciphertext || tag (16)
* ``ALG_AES_256_SIV``: SIV (16) || ciphertext (deterministic; key = HKDF(DEK, "aes-siv"))
* ``ALG_AES_256_GCM_STREAM``: segment size (u32) || salt (16) || nonce prefix (7) ||
  segments, each ciphertext || tag (16); the last one may be shorter. Segment i uses
  key HKDF(DEK, salt) and nonce prefix || u32 i || last-segment flag.

Associated data (:func:`aad_prefix` builds everything before the context):

* version 2: binary header (version 2) || purpose (:class:`Purpose`) || u8 len(key
  type) || key type || [streams: segment size (u32) || salt || nonce prefix] ||
  caller context. The purpose says what the ciphertext is (a field, a bulk blob, a
  stream, a session, a cache entry), so one cannot be passed off as another, and
  a stream's segment size, salt and prefix cannot be rewritten.
* version 1 (read only): binary header (version 1) || u8 len(key type) || key type
  || caller context. A field token and a one-shot blob of version 1 are
  interchangeable, and a stream's segment size is not authenticated: readers
  refuse version 1 once ``accept_format_v1`` is off.

A token moved to another key type, column or row fails to authenticate.
"""

from __future__ import annotations

import binascii
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

__all__ = [
    "ALG_AES_256_GCM",
    "ALG_AES_256_GCM_STREAM",
    "ALG_AES_256_SIV",
    "ALGORITHM_NAMES",
    "B64URL_TO_STD",
    "B64_CANONICAL_LAST",
    "FLAG_ZSTD",
    "FORMAT_V1",
    "FORMAT_V2",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "GCM_NONCE_BYTES",
    "GCM_TAG_BYTES",
    "KEY_ID_DOT_END",
    "KEY_ID_DOT_FIRST",
    "MAX_FIELD_PLAINTEXT",
    "MAX_KEY_ID_LEN",
    "MAX_TOKEN_CHARS",
    "STD_TO_B64URL",
    "TEXT_BODY_HEAD",
    "TEXT_GCM_NONCE",
    "TEXT_GCM_SEALED",
    "TEXT_PREFIXES",
    "TEXT_PREFIX_LEN",
    "key_id_sql",
    "TEXT_PREFIX_V1",
    "TEXT_PREFIX_V2",
    "Header",
    "Purpose",
    "aad_prefix",
    "b64decode_canonical",
    "b64encode_urlsafe",
    "context_bytes",
    "is_token_text",
    "key_id_dot",
    "like_pattern",
    "parse_binary",
    "stream_params",
    "text_prefix",
    "text_version",
    "token_sql",
    "validate_key_id",
]

FORMAT_V1: Final = 1
FORMAT_V2: Final = 2
#: The version every new token, blob and stream is written in.
FORMAT_VERSION: Final = FORMAT_V2
FORMAT_VERSIONS: Final = frozenset((FORMAT_V1, FORMAT_V2))
TEXT_PREFIX_V1: Final = "ac1."
TEXT_PREFIX_V2: Final = "ac2."
#: Every prefix a text token may start with (``str.startswith`` takes the tuple).
TEXT_PREFIXES: Final = (TEXT_PREFIX_V1, TEXT_PREFIX_V2)
#: Both prefixes are this long: the key id starts at character TEXT_PREFIX_LEN + 1.
TEXT_PREFIX_LEN: Final = 4
_TEXT_PREFIX_OF: Final = {FORMAT_V1: TEXT_PREFIX_V1, FORMAT_V2: TEXT_PREFIX_V2}
_VERSION_OF_TEXT: Final = {TEXT_PREFIX_V1: FORMAT_V1, TEXT_PREFIX_V2: FORMAT_V2}


class Purpose(IntEnum):
    """What a version-2 ciphertext is for: one byte of its associated data."""

    FIELD = 1
    BLOB = 2
    STREAM = 3
    SESSION = 4
    CACHE = 5


ALG_AES_256_GCM: Final = 1
ALG_AES_256_SIV: Final = 2
ALG_AES_256_GCM_STREAM: Final = 3
ALGORITHM_NAMES: Final = {
    ALG_AES_256_GCM: "AES_256_GCM",
    ALG_AES_256_SIV: "AES_256_SIV",
    ALG_AES_256_GCM_STREAM: "AES_256_GCM_STREAM",
}

FLAG_ZSTD: Final = 0x01
_KNOWN_FLAGS: Final = FLAG_ZSTD

MAX_KEY_ID_LEN: Final = 64
#: ``str.find(".", KEY_ID_DOT_FIRST, KEY_ID_DOT_END)`` finds the "." that ends a text
#: token's key id (``token[TEXT_PREFIX_LEN:dot]``): after at least one character of
#: key id, at most MAX_KEY_ID_LEN in.
KEY_ID_DOT_FIRST: Final = TEXT_PREFIX_LEN + 1
KEY_ID_DOT_END: Final = TEXT_PREFIX_LEN + MAX_KEY_ID_LEN + 1
#: A text token's body (its base64, decoded) starts with these two bytes: algorithm,
#: flags; the algorithm's body follows.
TEXT_BODY_HEAD: Final = 2
GCM_NONCE_BYTES: Final = 12
GCM_TAG_BYTES: Final = 16
#: AES-GCM in a text body: the nonce, then ciphertext || tag from TEXT_GCM_SEALED on.
TEXT_GCM_NONCE: Final = slice(TEXT_BODY_HEAD, TEXT_BODY_HEAD + GCM_NONCE_BYTES)
TEXT_GCM_SEALED: Final = TEXT_BODY_HEAD + GCM_NONCE_BYTES
MAX_CONTEXT_LEN: Final = 4096
# Text tokens are for fields; anything larger belongs in bulk/stream encryption.
MAX_TOKEN_CHARS: Final = 96 * 1024 * 1024
#: The largest plaintext a text token can carry (the base64 body of MAX_TOKEN_CHARS
#: less the longest "ac2.<key id>." prefix, less algorithm, flags, nonce and tag):
#: also the bound of a compressed field's decompressed size, so a small token
#: cannot inflate past what a field can be.
MAX_FIELD_PLAINTEXT: Final = (
    (MAX_TOKEN_CHARS - KEY_ID_DOT_END) // 4 * 3 - TEXT_GCM_SEALED - GCM_TAG_BYTES
)
_U32: Final = struct.Struct(">I")

_KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


class FormatError(ValueError):
    """Malformed token (internal: callers of the service only ever see DecryptionError)."""


def validate_key_id(key_id: str) -> str:
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        raise ValueError("key id must be 1-64 characters of [A-Za-z0-9_-]")
    return key_id


def context_bytes(context: str | bytes | None) -> bytes:
    """Normalise a caller context (``"users.ssn"``, ``b"..."`` or None) to bytes."""
    if type(context) is str and len(context) <= MAX_CONTEXT_LEN // 4:
        return context.encode("utf-8")
    if context is None:
        return b""
    if isinstance(context, str):
        data = context.encode("utf-8")
    elif isinstance(context, (bytes, bytearray, memoryview)):
        data = bytes(context)
    else:
        raise TypeError(f"context must be str, bytes or None, not {type(context).__name__}")
    if len(data) > MAX_CONTEXT_LEN:
        raise ValueError(f"context longer than {MAX_CONTEXT_LEN} bytes")
    return data


@dataclass(frozen=True, slots=True)
class Header:
    """The authenticated header of a token."""

    algorithm: int
    flags: int
    key_id: str
    version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        kid = self.key_id.encode("ascii")
        return bytes((self.version, self.algorithm, self.flags, len(kid))) + kid


def aad_prefix(
    version: int, algorithm: int, flags: int, key_id: str, key_type: str, purpose: Purpose
) -> bytes:
    """The associated data of a ciphertext up to (not including) stream parameters and context.

    Version 1 has no purpose byte (``purpose`` is then ignored).
    """
    header = Header(algorithm, flags, key_id, version).to_bytes()
    kt = key_type.encode("ascii")
    tail = bytes((len(kt),)) + kt
    if version == FORMAT_V1:
        return header + tail
    if version != FORMAT_V2:
        raise ValueError(f"unknown format version {version}")
    return header + bytes((Purpose(purpose),)) + tail


def stream_params(segment_size: int, salt: bytes, nonce_prefix: bytes) -> bytes:
    """A stream's parameters as its preamble holds them (and version-2 AAD binds them)."""
    return _U32.pack(segment_size) + salt + nonce_prefix


def text_prefix(key_id: str, version: int = FORMAT_VERSION) -> str:
    """The exact text every text-form token of ``version`` made with ``key_id`` starts with."""
    return f"{_TEXT_PREFIX_OF[version]}{validate_key_id(key_id)}."


def like_pattern(key_id: str, version: int = FORMAT_VERSION) -> str:
    """A SQL ``LIKE`` pattern (escape character ``\\``) matching tokens of ``key_id``."""
    return text_prefix(key_id, version).replace("_", "\\_") + "%"


def text_version(value: object) -> int | None:
    """The format version of a text token (by its prefix), None for anything else."""
    if type(value) is not str:
        return None
    return _VERSION_OF_TEXT.get(value[:TEXT_PREFIX_LEN])


def key_id_dot(token: str) -> int:
    """Where the "." that ends ``token``'s key id is (``token[TEXT_PREFIX_LEN:dot]`` is the
    key id), or -1 if there is none where a key id may end."""
    return token.find(".", KEY_ID_DOT_FIRST, KEY_ID_DOT_END)


def is_token_text(value: object) -> bool:
    """Whether ``value`` looks like a text token of any version (not whether it is valid)."""
    return type(value) is str and value.startswith(TEXT_PREFIXES)


def token_sql(column: str, versions: tuple[int, ...] = (FORMAT_V1, FORMAT_V2)) -> str:
    """SQL true when ``column`` (a quoted identifier) holds a token of one of ``versions``."""
    quoted = ", ".join(f"'{_TEXT_PREFIX_OF[v]}'" for v in versions)
    return f"substr({column}, 1, {TEXT_PREFIX_LEN}) IN ({quoted})"


def key_id_sql(column: str, dialect: str = "postgresql") -> str:
    """SQL for the key id of a text token in ``column`` (a quoted identifier): the text
    between the prefix and the next ``.``. ``dialect``: ``"postgresql"`` or ``"sqlite"``."""
    if dialect == "postgresql":
        return f"split_part({column}, '.', 2)"
    start = KEY_ID_DOT_FIRST  # SQL counts from 1: the key id's first character
    return f"substr({column}, {start}, instr(substr({column}, {start}), '.') - 1)"


def _check_header(algorithm: int, flags: int) -> None:
    if algorithm not in ALGORITHM_NAMES:
        raise FormatError("unknown algorithm")
    if flags & ~_KNOWN_FLAGS:
        raise FormatError("unknown flags")


def parse_binary(blob: bytes | memoryview) -> tuple[Header, bytes, memoryview]:
    """Split a binary token into (header, header bytes, body)."""
    view = memoryview(blob)
    if len(view) < 5 or view[0] not in FORMAT_VERSIONS:
        raise FormatError("not an aiocrypt token")
    version, algorithm, flags, kid_len = view[0], view[1], view[2], view[3]
    _check_header(algorithm, flags)
    if not 1 <= kid_len <= MAX_KEY_ID_LEN or len(view) < 4 + kid_len:
        raise FormatError("bad key id length")
    try:
        key_id = validate_key_id(str(view[4 : 4 + kid_len], "ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError("bad key id") from exc
    header_bytes = view[: 4 + kid_len].tobytes()
    return Header(algorithm, flags, key_id, version), header_bytes, view[4 + kid_len :]


#: base64url -> standard alphabet for ``binascii.a2b_base64(..., strict_mode=True)``.
#: "+" and "/" (standard alphabet, not base64url) become "*", which strict mode
#: refuses: one translation pass both converts and rejects them.
B64URL_TO_STD: Final = bytes.maketrans(b"-_+/", b"+/**")
STD_TO_B64URL: Final = bytes.maketrans(b"+/", b"-_")
#: Last significant base64 character when 1 or 2 bytes end the data: its unused
#: low bits must be zero, or two different texts would decode to the same bytes.
B64_CANONICAL_LAST: Final = {1: frozenset("AQgw"), 2: frozenset("AEIMQUYcgkosw048")}


def b64encode_urlsafe(data: bytes) -> str:
    """Padded base64url."""
    return binascii.b2a_base64(data, newline=False).translate(STD_TO_B64URL).decode("ascii")


def b64decode_canonical(text: str, start: int = 0) -> bytes:
    """Strict padded base64url: only the canonical encoding of some bytes is accepted.

    Decodes ``text[start:]`` without copying that slice (a token may be many MiB).
    """
    try:
        std = text.encode("ascii")
        std = std.translate(B64URL_TO_STD)  # one encoded copy alive at a time
        raw = binascii.a2b_base64(memoryview(std)[start:], strict_mode=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise FormatError("bad base64") from None
    del std
    if len(text) - start != 4 * -(-len(raw) // 3):  # strict mode allows "=" after a full quad
        raise FormatError("non-canonical base64")
    tail = len(raw) % 3
    if tail and text[-4 + tail] not in B64_CANONICAL_LAST[tail]:
        raise FormatError("non-canonical base64")
    return raw
