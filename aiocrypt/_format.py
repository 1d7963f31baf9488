"""The versioned ciphertext format (DESIGN.md section 3). Frozen by tests/vectors/.

Binary form (blobs, streams)::

    offset  size  field
    0       1     format version (0x01)
    1       1     algorithm (ALG_*)
    2       1     flags (FLAG_*; unknown bits refused)
    3       1     key id length n (1..64)
    4       n     key id, ASCII [A-Za-z0-9_-]
    4+n     ...   algorithm body

Text form (columns, Redis), same bytes, key id readable at a fixed place::

    "ac1." + key_id + "." + base64url(algorithm || flags || body)   (padded, canonical)

so SQL can select rows by key version with ``left(col, len(text_prefix(kid))) =
text_prefix(kid)`` without decrypting them.

Algorithm bodies:

* ``ALG_AES_256_GCM``: nonce (12) || ciphertext || tag (16)
* ``ALG_AES_256_SIV``: SIV (16) || ciphertext (deterministic; key = HKDF(DEK, "aes-siv"))
* ``ALG_AES_256_GCM_STREAM``: segment size (u32) || salt (16) || nonce prefix (7) ||
  segments, each ciphertext || tag (16); the last one may be shorter. Segment i uses
  key HKDF(DEK, salt) and nonce prefix || u32 i || last-segment flag.

Associated data for every algorithm is the binary header (bytes 0..4+n) ||
u8 len(key type) || key type || caller context, so a token moved to another key
type, column or row fails to authenticate.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ALG_AES_256_GCM",
    "ALG_AES_256_GCM_STREAM",
    "ALG_AES_256_SIV",
    "ALGORITHM_NAMES",
    "B64URL_TO_STD",
    "B64_CANONICAL_LAST",
    "FLAG_ZSTD",
    "FORMAT_VERSION",
    "MAX_KEY_ID_LEN",
    "MAX_TOKEN_CHARS",
    "STD_TO_B64URL",
    "TEXT_PREFIX",
    "Header",
    "b64decode_canonical",
    "b64encode_urlsafe",
    "context_bytes",
    "like_pattern",
    "parse_binary",
    "text_prefix",
    "validate_key_id",
]

FORMAT_VERSION: Final = 1
TEXT_PREFIX: Final = "ac1."

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
MAX_CONTEXT_LEN: Final = 4096
# Text tokens are for fields; anything larger belongs in bulk/stream encryption.
MAX_TOKEN_CHARS: Final = 96 * 1024 * 1024

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

    def to_bytes(self) -> bytes:
        kid = self.key_id.encode("ascii")
        return bytes((FORMAT_VERSION, self.algorithm, self.flags, len(kid))) + kid


def text_prefix(key_id: str) -> str:
    """The exact text every text-form token made with ``key_id`` starts with."""
    return f"{TEXT_PREFIX}{validate_key_id(key_id)}."


def like_pattern(key_id: str) -> str:
    """A SQL ``LIKE`` pattern (escape character ``\\``) matching tokens of ``key_id``."""
    return text_prefix(key_id).replace("_", "\\_") + "%"


def _check_header(algorithm: int, flags: int) -> None:
    if algorithm not in ALGORITHM_NAMES:
        raise FormatError("unknown algorithm")
    if flags & ~_KNOWN_FLAGS:
        raise FormatError("unknown flags")


def parse_binary(blob: bytes | memoryview) -> tuple[Header, bytes, memoryview]:
    """Split a binary token into (header, header bytes, body)."""
    view = memoryview(blob)
    if len(view) < 5 or view[0] != FORMAT_VERSION:
        raise FormatError("not an aiocrypt v1 token")
    algorithm, flags, kid_len = view[1], view[2], view[3]
    _check_header(algorithm, flags)
    if not 1 <= kid_len <= MAX_KEY_ID_LEN or len(view) < 4 + kid_len:
        raise FormatError("bad key id length")
    try:
        key_id = validate_key_id(str(view[4:4 + kid_len], "ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError("bad key id") from exc
    header_bytes = view[:4 + kid_len].tobytes()
    return Header(algorithm, flags, key_id), header_bytes, view[4 + kid_len:]


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
