"""Bulk data: ``EncryptedData`` and the segmented streaming AEAD (pure, sync).

Small payloads are one AES-256-GCM message. Large ones are cut into segments
(1 MiB by default) under a per-stream key HKDF(DEK, random salt); segment i is
sealed with nonce = prefix(7) || u32 i || last-flag(1), so truncation, reordering
and appending are all detected, memory stays O(segment), and no single
cryptography call holds the GIL for long.

Everything is written in format version 2: a one-shot blob is sealed with
purpose BLOB and a stream with purpose STREAM and its whole preamble (segment
size, salt, nonce prefix) in the associated data, so a field token cannot be
opened as a blob (nor a blob as a field), and a rewritten segment size fails at
the first segment. Version 1 blobs and streams still open (``format_version=1``).

``EncryptedData`` rebuilt from the five fields the seed code keeps
(``encrypted_data``, ``key_id``, ``algorithm``, ``iv``, ``tag``) decrypts for every
size and setting: what a stream, a compressed blob or a version 1 blob needs
beyond a nonce (version, flags, segment size, salt, nonce prefix) travels in a
packed ``iv`` (see :class:`EncryptedData` and docs/format.md).

Over 500 lines on purpose: ``EncryptedData``, its packed ``iv`` and the sync
sealer and opener of the segmented AEAD are one format (docs/format.md), kept in
one module so that writer and reader change together; pure core, held to 100 %
coverage and mutation-tested.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag

from ._crypto import (
    NONCE_BYTES,
    STREAM_PREFIX_BYTES,
    STREAM_SALT_BYTES,
    TAG_BYTES,
    DataKey,
    stream_nonce,
)
from ._errors import DecryptionFailure, decryption_failed
from ._format import (
    ALG_AES_256_GCM,
    ALG_AES_256_GCM_STREAM,
    ALGORITHM_NAMES,
    FLAG_ZSTD,
    FORMAT_VERSION,
    FORMAT_VERSIONS,
    FormatError,
    Header,
    Purpose,
    parse_binary,
    stream_params,
)

__all__ = [
    "MAX_SEGMENT_SIZE",
    "BulkOpener",
    "BulkSealer",
    "MIN_SEGMENT_SIZE",
    "EncryptedData",
    "StreamDecryptor",
    "StreamEncryptor",
    "split_segments",
    "decrypt_bulk",
    "encrypt_bulk",
]

MIN_SEGMENT_SIZE: Final = 1024
MAX_SEGMENT_SIZE: Final = 64 * 1024 * 1024
MAX_SEGMENTS: Final = 2**32 - 1
_U32 = struct.Struct(">I")
_MALFORMED: Final = DecryptionFailure.MALFORMED
_AUTHENTICATION: Final = DecryptionFailure.AUTHENTICATION_FAILED
_ALG_BY_NAME: Final = {name: alg for alg, name in ALGORITHM_NAMES.items()}
_IV_HEAD: Final = 2
"""A packed ``iv`` starts with the header's format version and flags bytes."""
_STREAM_PARAMS_BYTES: Final = 4 + STREAM_SALT_BYTES + STREAM_PREFIX_BYTES


@dataclass(frozen=True, slots=True)
class EncryptedData:
    """An encrypted blob, as separate fields or as one self-describing blob.

    ``tag`` is the final 16 bytes of the authenticated ciphertext, and ``iv``
    carries everything else a reader needs, so the five fields
    ``encrypted_data``, ``key_id``, ``algorithm``, ``iv`` and ``tag`` rebuild the
    object whatever its size, compression or format version:

    * a one-shot blob of the current format, uncompressed: ``iv`` is the 12-byte
      nonce;
    * anything else (a stream, a compressed blob, a version 1 blob): ``iv`` is
      packed, format version (1) || flags (1) || the algorithm's parameters as the
      binary body holds them: the nonce (14 bytes in all), or segment size (u32)
      || salt || nonce prefix (29 bytes in all).

    ``segment_size``, ``compressed`` and ``format_version`` are read from a packed
    ``iv`` (values given beside it must agree). A bare ``iv`` (the nonce, or a
    stream's salt || nonce prefix) still works with them given explicitly, as
    before; the object then holds the packed form. The whole is also one blob:
    :meth:`to_bytes` and :meth:`from_bytes`.
    """

    encrypted_data: bytes | memoryview = field(repr=False)
    key_id: str
    algorithm: str
    iv: bytes = field(repr=False)
    tag: bytes = field(repr=False)
    segment_size: int | None = None
    compressed: bool = False
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:  # noqa: C901 - one guard per field of the wire format's parameters, each raising
        if self.algorithm not in _ALG_BY_NAME:
            raise ValueError(f"unknown algorithm {self.algorithm!r}")
        if len(self.tag) != TAG_BYTES:
            raise ValueError("tag must be 16 bytes")
        is_stream = self.algorithm == "AES_256_GCM_STREAM"
        iv = bytes(self.iv)
        bare = STREAM_SALT_BYTES + STREAM_PREFIX_BYTES if is_stream else NONCE_BYTES
        packed = _IV_HEAD + (_STREAM_PARAMS_BYTES if is_stream else NONCE_BYTES)
        if len(iv) == packed:
            version, flags = iv[0], iv[1]
            segment_size = _U32.unpack_from(iv, _IV_HEAD)[0] if is_stream else None
            if (
                self.segment_size not in (None, segment_size)
                or (self.compressed and not flags & FLAG_ZSTD)
                or self.format_version not in (FORMAT_VERSION, version)
            ):
                raise ValueError("segment_size, compressed or format_version contradicts the iv")
        elif len(iv) == bare:
            version, flags = self.format_version, FLAG_ZSTD if self.compressed else 0
            segment_size = self.segment_size
        else:
            raise ValueError(f"iv must be {bare} or {packed} bytes for {self.algorithm}")
        if version not in FORMAT_VERSIONS:
            raise ValueError(f"unknown format version {version!r}")
        if flags & ~FLAG_ZSTD:
            raise ValueError("unknown flags in iv")
        if not is_stream and segment_size is not None:
            raise ValueError("segment_size is for streams only")
        if is_stream and not (
            segment_size and MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE
        ):
            raise ValueError("streams need a segment_size between 1 KiB and 64 MiB")
        if len(iv) == bare:  # pack it: the five fields alone must rebuild the object
            if is_stream:
                assert segment_size is not None
                iv = stream_params(segment_size, iv[:STREAM_SALT_BYTES], iv[STREAM_SALT_BYTES:])
            if is_stream or flags or version != FORMAT_VERSION:
                iv = bytes((version, flags)) + iv
        object.__setattr__(self, "iv", iv)
        object.__setattr__(self, "segment_size", segment_size)
        object.__setattr__(self, "compressed", bool(flags & FLAG_ZSTD))
        object.__setattr__(self, "format_version", version)

    @property
    def _parameters(self) -> bytes:
        """The algorithm's parameters as the binary body starts with them (``iv`` unpacked)."""
        return self.iv if len(self.iv) == NONCE_BYTES else self.iv[_IV_HEAD:]

    @property
    def header(self) -> Header:
        return Header(
            _ALG_BY_NAME[self.algorithm],
            FLAG_ZSTD if self.compressed else 0,
            self.key_id,
            self.format_version,
        )

    @property
    def plaintext_size(self) -> int:
        """Bytes ``decrypt_bulk_data`` writes (before decompression, when compressed):
        the size an ``out=`` buffer needs."""
        size = len(self.encrypted_data)
        if self.segment_size is None:
            return size
        stride = self.segment_size + TAG_BYTES
        return size - TAG_BYTES * ((size + TAG_BYTES - 1) // stride)

    def body(self) -> bytes:
        return self._parameters + bytes(self.encrypted_data) + self.tag

    def to_bytes(self) -> bytes:
        """One self-describing blob (the binary token form)."""
        return self.header.to_bytes() + self.body()

    @classmethod
    def from_bytes(cls, blob: bytes | memoryview) -> EncryptedData:
        """Parse :meth:`to_bytes` output (no copy of the ciphertext); bad input: DecryptionError."""
        try:
            header, _, body = parse_binary(blob)
            return cls._from_body(header, body)
        except (FormatError, ValueError):
            raise decryption_failed(_MALFORMED) from None

    @classmethod
    def _from_body(cls, header: Header, body: memoryview) -> EncryptedData:
        compressed = bool(header.flags & FLAG_ZSTD)
        name = ALGORITHM_NAMES[header.algorithm]
        if header.algorithm == ALG_AES_256_GCM:
            if len(body) < NONCE_BYTES + TAG_BYTES:
                raise FormatError("blob too short")
            return cls(
                body[NONCE_BYTES:-TAG_BYTES].tobytes(),
                header.key_id,
                name,
                body[:NONCE_BYTES].tobytes(),
                body[-TAG_BYTES:].tobytes(),
                None,
                compressed,
                header.version,
            )
        if header.algorithm == ALG_AES_256_GCM_STREAM:
            iv_end = _STREAM_PARAMS_BYTES
            if len(body) < iv_end + TAG_BYTES:
                raise FormatError("blob too short")
            (segment_size,) = _U32.unpack_from(body)
            return cls(
                body[iv_end:-TAG_BYTES],
                header.key_id,
                name,
                body[4:iv_end].tobytes(),
                body[-TAG_BYTES:].tobytes(),
                segment_size,
                compressed,
                header.version,
            )
        raise FormatError("not a bulk algorithm")


def _stream_aad(
    dk: DataKey,
    version: int,
    flags: int,
    segment_size: int,
    salt: bytes,
    prefix: bytes,
    context: bytes,
) -> bytes:
    return dk.aad(
        ALG_AES_256_GCM_STREAM,
        flags,
        context,
        purpose=Purpose.STREAM,
        version=version,
        stream_params=stream_params(segment_size, salt, prefix),
    )


class StreamEncryptor:
    """Seals one stream segment by segment (format version 2); feed ``segment_size``
    bytes per call."""

    def __init__(
        self,
        dk: DataKey,
        context: bytes,
        segment_size: int,
        *,
        flags: int = 0,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError("segment_size must be between 1 KiB and 64 MiB")
        self.segment_size = segment_size
        self.flags = flags
        self.salt = random(STREAM_SALT_BYTES)
        self.prefix = random(STREAM_PREFIX_BYTES)
        self._cipher = dk.stream_cipher(self.salt, sealing=True)
        self._aad = _stream_aad(
            dk, FORMAT_VERSION, flags, segment_size, self.salt, self.prefix, context
        )
        self._index = 0
        self._finished = False
        self.header = Header(ALG_AES_256_GCM_STREAM, flags, dk.key_id).to_bytes()
        self.preamble = self.header + stream_params(segment_size, self.salt, self.prefix)

    def seal(self, chunk: bytes | memoryview, last: bool) -> bytes:
        return self.seal_at(self.claim(chunk, last), chunk, last)

    def claim(self, chunk: bytes | memoryview, last: bool) -> int:
        """The index of the next segment, ``chunk``, after checking it may come next;
        :meth:`seal_at` seals it (in any thread: segments claimed in order, sealed in
        parallel where the cipher releases the GIL)."""
        if self._finished:
            raise ValueError("stream already finished")
        if len(chunk) > self.segment_size or (not last and len(chunk) != self.segment_size):
            raise ValueError("every segment but the last must be exactly segment_size bytes")
        if self._index >= MAX_SEGMENTS:
            raise ValueError("stream too long")
        index = self._index
        self._index += 1
        self._finished = last
        return index

    def seal_at(self, index: int, chunk: bytes | memoryview, last: bool) -> bytes:
        """Seal a segment :meth:`claim` numbered ``index`` (each exactly once)."""
        return self._cipher.encrypt(stream_nonce(self.prefix, index, last), chunk, self._aad)

    def seal_segment_into(
        self, index: int, chunk: bytes | memoryview, last: bool, out: memoryview
    ) -> None:
        """Seal segment ``index`` of a payload whose segments the caller lays out, writing
        ciphertext || tag into ``out`` (len(chunk) + 16 bytes), so several threads can seal
        one payload. The caller seals each index exactly once (:class:`BulkSealer` does);
        the nonce is the index, as :meth:`seal` uses."""
        self._cipher.encrypt_into(stream_nonce(self.prefix, index, last), chunk, self._aad, out)


class StreamDecryptor:
    """Opens one stream segment by segment; raises ``DecryptionError`` on any tampering.

    ``version`` is the format version of the stream's header: version 2 binds the
    segment size, salt and nonce prefix, so a forged one fails at the first segment.
    """

    def __init__(
        self,
        dk: DataKey,
        context: bytes,
        flags: int,
        segment_size: int,
        iv: bytes,
        version: int = FORMAT_VERSION,
    ) -> None:
        self.segment_size = segment_size
        salt, prefix = iv[:STREAM_SALT_BYTES], iv[STREAM_SALT_BYTES:]
        self._cipher = dk.stream_cipher(salt)
        self._key_id = dk.key_id
        self._prefix = prefix
        self._aad = _stream_aad(dk, version, flags, segment_size, salt, prefix, context)
        self._index = 0
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def open(self, sealed: bytes | memoryview, last: bool) -> bytes:
        self._check_next()
        index = self._index
        self._index += 1
        plaintext = self.open_at(index, sealed, last)
        self._finished = last  # once the last segment authenticated
        return plaintext

    def claim(self, last: bool) -> int:
        """The index of the next segment, after checking one may come next; :meth:`open_at`
        opens it (in any thread: segments claimed in order, opened in parallel where the
        cipher releases the GIL). Claiming the last one ends the stream: use either
        this or :meth:`open` on one decryptor."""
        self._check_next()
        index = self._index
        self._index += 1
        self._finished = last
        return index

    def _check_next(self) -> None:
        if self._finished or self._index >= MAX_SEGMENTS:
            raise decryption_failed(
                _MALFORMED,
                self._key_id,
                f"data after the stream's last segment (key {self._key_id})",
            )

    def open_at(self, index: int, sealed: bytes | memoryview, last: bool) -> bytes:
        """Open the segment :meth:`claim` numbered ``index``."""
        try:
            plaintext: bytes = self._cipher.decrypt(
                stream_nonce(self._prefix, index, last), sealed, self._aad
            )
        except InvalidTag:
            raise decryption_failed(_AUTHENTICATION, self._key_id) from None
        return plaintext

    def open_segment_into(
        self, index: int, sealed: bytes | memoryview, last: bool, out: memoryview
    ) -> None:
        """Open segment ``index`` of a payload whose segment bounds the caller knows
        (:class:`BulkOpener`: the last one is the last by position, so truncation and
        reordering still fail to authenticate)."""
        try:
            self._cipher.decrypt_into(
                stream_nonce(self._prefix, index, last), sealed, self._aad, out
            )
        except InvalidTag:
            raise decryption_failed(_AUTHENTICATION, self._key_id) from None


def split_segments(data: memoryview, segment_size: int) -> Iterator[tuple[memoryview, bool]]:
    """Plaintext chunks of ``segment_size``; always at least one (possibly empty) last one."""
    total = len(data)
    if total == 0:
        yield data, True
        return
    for start in range(0, total, segment_size):
        end = start + segment_size
        yield data[start:end], end >= total


def _segment_bounds(total: int, segment_size: int) -> list[tuple[int, int, bool]]:
    """(start, end, last) of each sealed segment in ``total`` bytes of ciphertext."""
    stride = segment_size + TAG_BYTES
    if total < TAG_BYTES:
        raise decryption_failed(_MALFORMED)
    bounds = []
    start = 0
    while total - start > stride:
        bounds.append((start, start + stride, False))
        start += stride
    if total - start < TAG_BYTES:
        raise decryption_failed(_MALFORMED)
    bounds.append((start, total, True))
    return bounds


def _buffer(size: int) -> memoryview:
    """A writable buffer that is not zeroed under the GIL (anonymous mmap past 1 MiB).

    ``bytearray(n)`` zeroes every byte while holding the GIL; an anonymous map gets
    its zero pages lazily from the kernel as the cipher writes into it.
    """
    if size < 1024 * 1024:
        return memoryview(bytearray(size))
    return memoryview(mmap.mmap(-1, size))


def output_buffer(out: object, size: int, what: str) -> memoryview:
    """``out`` as a writable byte view of at least ``size`` bytes (its first ``size``)."""
    try:
        view = memoryview(out)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"out= must be a writable buffer (bytearray, mmap, numpy array), "
            f"not {type(out).__name__}"
        ) from None
    if view.readonly:
        raise TypeError("out= must be writable (bytes is read-only: use a bytearray)")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if len(view) < size:
        raise ValueError(f"out= holds {len(view)} bytes; {what} needs {size}")
    return view[:size]


def sealed_size(plaintext_size: int, segment_size: int) -> int:
    """Bytes of a segmented payload's ciphertext and tags (``encrypted_data`` + ``tag``)."""
    return plaintext_size + TAG_BYTES * max(1, -(-plaintext_size // segment_size))


def split_ranges(count: int, parts: int) -> list[tuple[int, int]]:
    """``count`` segment indexes in at most ``parts`` contiguous ``(first, stop)`` ranges."""
    parts = max(1, min(parts, count))
    size, extra = divmod(count, parts)
    ranges, first = [], 0
    for part in range(parts):
        stop = first + size + (1 if part < extra else 0)
        ranges.append((first, stop))
        first = stop
    return ranges


class _BulkJob:
    """The segments of one in-memory payload, worked in order or in ranges."""

    segments: int
    segment_size: int
    done: bool
    #: the buffer the segments are written to (``out=``, or one of the job's own)
    output: memoryview
    _own_output: bool
    _next: int

    def run_range(self, first: int, stop: int) -> None:  # pragma: no cover - subclasses override it
        raise NotImplementedError

    def step(self, max_bytes: int) -> bool:
        """Work the next segments in order until about ``max_bytes`` are done; True once
        all are."""
        count = max(1, -(-max_bytes // self.segment_size))
        stop = min(self.segments, self._next + count)
        self.run_range(self._next, stop)
        self._next = stop
        self.done = stop == self.segments
        return self.done

    def step_output_end(self, max_bytes: int) -> int:
        """How far into :attr:`output` the next :meth:`step` of ``max_bytes`` writes, at
        most (a segment's tag counted for every segment)."""
        count = max(1, -(-max_bytes // self.segment_size))
        stop = min(self.segments, self._next + count)
        return min(len(self.output), stop * (self.segment_size + TAG_BYTES))

    @property
    def fresh_output(self) -> bool:
        """Whether :attr:`output` is an anonymous mapping this job made (not ``out=``),
        whose pages are faulted in as they are first written."""
        return isinstance(self.output.obj, mmap.mmap) and self._own_output

    def ranges(self, parts: int) -> list[tuple[int, int]]:
        """The segments in at most ``parts`` ranges for :meth:`run_range`; call
        :meth:`ranges_done` once every range is done."""
        return split_ranges(self.segments, parts)

    def ranges_done(self) -> None:
        self._next = self.segments
        self.done = True


class BulkSealer(_BulkJob):
    """Seals one in-memory payload as a stream into one unzeroed buffer, in parts.

    Segment ``i`` of the plaintext goes to a fixed place of the output, sealed with
    nonce ``i``, so the work splits two ways: :meth:`step` seals the next segments
    in order, about ``max_bytes`` of them (a caller yields to its event loop between
    steps), and :meth:`run_range` seals any range of them (worker threads sealing
    one payload in parallel, where the cipher releases the GIL). Either way every
    segment is sealed exactly once before :meth:`result`. Nothing is copied: the
    result's ``encrypted_data`` is a read-only view over the buffer (``out=`` when
    the caller gives one).
    """

    def __init__(
        self,
        dk: DataKey,
        data: bytes | memoryview,
        context: bytes,
        *,
        flags: int = 0,
        segment_size: int,
        out: memoryview | None = None,
    ) -> None:
        self._enc = StreamEncryptor(dk, context, segment_size, flags=flags)
        self._key_id = dk.key_id
        self._source = memoryview(data)
        total = len(self._source)
        self.segments = max(1, -(-total // segment_size))
        size = sealed_size(total, segment_size)
        self._out = self.output = (
            _buffer(size) if out is None else output_buffer(out, size, "the result")
        )
        self._own_output = out is None
        self.segment_size = segment_size
        self._next = 0
        self.done = False

    def run_range(self, first: int, stop: int) -> None:
        """Seal segments ``first`` to ``stop - 1`` (each range once; any order, any thread)."""
        seg, source, out, enc = self._enc.segment_size, self._source, self._out, self._enc
        total, last_index = len(source), self.segments - 1
        for index in range(first, stop):
            start = index * seg
            end = min(start + seg, total)
            at = start + index * TAG_BYTES
            enc.seal_segment_into(
                index,
                source[start:end],
                index == last_index,
                out[at : at + end - start + TAG_BYTES],
            )

    def result(self) -> EncryptedData:
        if not self.done:
            raise ValueError("not sealed yet")
        enc, out = self._enc, self._out
        return EncryptedData(
            out[:-TAG_BYTES].toreadonly(),
            self._key_id,
            "AES_256_GCM_STREAM",
            enc.salt + enc.prefix,
            bytes(out[-TAG_BYTES:]),
            enc.segment_size,
            bool(enc.flags & FLAG_ZSTD),
        )


class BulkOpener(_BulkJob):
    """Opens a segmented ``EncryptedData`` into one unzeroed buffer, in parts.

    As :class:`BulkSealer`: :meth:`step` in order, :meth:`run_range` for worker
    threads. Raises ``DecryptionError`` (from the constructor or a part) on any
    tampering; the plaintext is released by :meth:`result` only once every segment
    authenticated. When a part fails, :meth:`scrub` zeroes what was written (the
    caller's ``out=`` must not keep the plaintext of the segments that did open).
    """

    def __init__(
        self,
        dk: DataKey,
        encrypted: EncryptedData,
        context: bytes,
        *,
        out: memoryview | None = None,
    ) -> None:
        if encrypted.algorithm != "AES_256_GCM_STREAM" or encrypted.segment_size is None:
            raise decryption_failed(_MALFORMED, encrypted.key_id)
        self._dec = StreamDecryptor(
            dk,
            context,
            encrypted.header.flags,
            encrypted.segment_size,
            encrypted._parameters[4:],
            encrypted.format_version,
        )
        self._body = memoryview(encrypted.encrypted_data)
        self._tag = bytes(encrypted.tag)
        self._bounds = _segment_bounds(len(self._body) + TAG_BYTES, encrypted.segment_size)
        if len(self._bounds) > MAX_SEGMENTS:
            raise decryption_failed(_MALFORMED, encrypted.key_id)
        self.segments = len(self._bounds)
        size = len(self._body) + TAG_BYTES * (1 - self.segments)
        self._out = self.output = (
            _buffer(size) if out is None else output_buffer(out, size, "the plaintext")
        )
        self._own_output = out is None
        self.segment_size = encrypted.segment_size
        self._next = 0
        self.done = False

    def run_range(self, first: int, stop: int) -> None:
        """Open segments ``first`` to ``stop - 1`` (each range once; any order, any thread)."""
        body, out, dec, bounds = self._body, self._out, self._dec, self._bounds
        for index in range(first, stop):
            start, end, last = bounds[index]
            sealed: bytes | memoryview = (
                body[start:end] if not last else bytes(body[start:]) + self._tag
            )
            at = start - index * TAG_BYTES
            dec.open_segment_into(index, sealed, last, out[at : at + end - start - TAG_BYTES])

    def scrub(self) -> None:
        """Zero the output (after a failed part), a MiB at a time."""
        out, chunk = self._out, 1024 * 1024
        zeros = bytes(min(chunk, len(out)))
        for at in range(0, len(out), chunk):
            part = out[at : at + chunk]
            part[:] = zeros[: len(part)]

    def result(self) -> memoryview:
        if not self.done:
            raise ValueError("not opened yet")
        return self._out.toreadonly()


def encrypt_bulk(
    dk: DataKey,
    data: bytes | memoryview,
    context: bytes,
    *,
    flags: int = 0,
    segment_size: int | None = None,
) -> EncryptedData:
    """One-shot GCM when ``segment_size`` is None, otherwise a segmented stream.

    A stream is written segment by segment into one unzeroed buffer (see
    :class:`BulkSealer`); ``encrypted_data`` is then a memoryview over it.
    """
    if segment_size is None:
        nonce, sealed = dk.gcm_parts(bytes(data), context, flags)
        return EncryptedData(
            sealed[:-TAG_BYTES],
            dk.key_id,
            "AES_256_GCM",
            nonce,
            sealed[-TAG_BYTES:],
            None,
            bool(flags & FLAG_ZSTD),
        )
    job = BulkSealer(dk, data, context, flags=flags, segment_size=segment_size)
    job.step(len(data) + 1)
    return job.result()


def decrypt_bulk(dk: DataKey, encrypted: EncryptedData, context: bytes) -> bytes | memoryview:
    """Authenticate and decrypt; the compressed flag is left to the caller.

    Streams decrypt into one unzeroed buffer, returned as a read-only memoryview
    (call ``bytes()`` on it if bytes are needed; the copy holds the GIL).
    """
    if encrypted.algorithm == "AES_256_GCM":
        try:
            return dk.open_gcm(
                encrypted.header.flags,
                encrypted._parameters + bytes(encrypted.encrypted_data) + bytes(encrypted.tag),
                context,
                version=encrypted.format_version,
                purpose=Purpose.BLOB,
            )
        except InvalidTag:
            raise decryption_failed(_AUTHENTICATION, dk.key_id) from None
        # open_gcm's only FormatError is a body under nonce + tag, and EncryptedData
        # always holds a 12-byte nonce and a 16-byte tag.
        except FormatError:  # pragma: no cover - EncryptedData cannot hold a short body
            raise decryption_failed(_MALFORMED, dk.key_id) from None
    job = BulkOpener(dk, encrypted, context)
    job.step(len(encrypted.encrypted_data) + 1)
    return job.result()
