"""``aiocrypt._bulk``: the segment codec's refusals, bounds and layout, line by line.

Issue 21's mutation run of ``_bulk.py``: the stream sealer's and opener's
refusals (a finished stream, a wrong-size segment, the segment-count limit), the
segment bounds of a sealed payload, the in-place sealer and opener's "not done
yet" guards and their output layout are pinned here, each test failing on the
mutants it names.
"""

from __future__ import annotations

import array
import dataclasses
import mmap

import pytest

from aiocrypt import DecryptionError, _bulk
from aiocrypt._bulk import (
    MAX_SEGMENT_SIZE,
    MAX_SEGMENTS,
    MIN_SEGMENT_SIZE,
    BulkOpener,
    BulkSealer,
    EncryptedData,
    StreamDecryptor,
    StreamEncryptor,
    _segment_bounds,
    decrypt_bulk,
    encrypt_bulk,
    output_buffer,
    sealed_size,
    split_ranges,
    split_segments,
)
from aiocrypt._errors import DecryptionFailure

from ._core_keys import data_key

MALFORMED, AUTH = DecryptionFailure.MALFORMED, DecryptionFailure.AUTHENTICATION_FAILED
SEG = MIN_SEGMENT_SIZE


def test_the_limits_as_numbers() -> None:
    assert (MIN_SEGMENT_SIZE, MAX_SEGMENT_SIZE, MAX_SEGMENTS) == (1024, 64 << 20, 2**32 - 1)


def _decryptor(enc: StreamEncryptor, dk: object, context: bytes = b"c") -> StreamDecryptor:
    return StreamDecryptor(
        dk,  # type: ignore[arg-type]
        context,
        enc.flags,
        enc.segment_size,
        enc.salt + enc.prefix,
    )


# -- StreamEncryptor ------------------------------------------------------------------


@pytest.mark.parametrize("size", [MIN_SEGMENT_SIZE - 1, MAX_SEGMENT_SIZE + 1, 0])
def test_stream_segment_size_outside_the_limits_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="between 1 KiB and 64 MiB"):
        StreamEncryptor(data_key(), b"c", size)


@pytest.mark.parametrize("size", [MIN_SEGMENT_SIZE, MAX_SEGMENT_SIZE])
def test_stream_segment_size_at_the_limits_is_taken(size: int) -> None:
    assert StreamEncryptor(data_key(), b"c", size).segment_size == size


def test_segments_but_the_last_are_exactly_segment_size() -> None:
    enc = StreamEncryptor(data_key(), b"c", SEG)
    for wrong in (SEG - 1, SEG + 1, 0):
        with pytest.raises(ValueError, match="exactly segment_size"):
            enc.seal(bytes(wrong), False)
    with pytest.raises(ValueError, match="exactly segment_size"):
        enc.seal(bytes(SEG + 1), True)  # the last one may be shorter, never longer
    enc.seal(bytes(SEG), False)  # nothing refused above was sealed: index 0 here


@pytest.mark.parametrize("last_size", [0, 1, SEG - 1, SEG])
def test_a_sealed_stream_opens_segment_by_segment(last_size: int) -> None:
    dk = data_key()
    enc = StreamEncryptor(dk, b"c", SEG)
    chunks = [bytes([1]) * SEG, bytes([2]) * SEG, bytes([3]) * last_size]
    sealed = [enc.seal(chunk, i == 2) for i, chunk in enumerate(chunks)]
    assert [len(s) for s in sealed] == [len(c) + 16 for c in chunks]
    dec = _decryptor(enc, dk)
    assert not dec.finished
    assert [dec.open(s, i == 2) for i, s in enumerate(sealed)] == chunks
    assert dec.finished
    with pytest.raises(DecryptionError, match="after the stream's last segment") as exc:
        dec.open(sealed[0], False)
    assert (exc.value.reason, exc.value.key_id) == (MALFORMED, dk.key_id)


def test_a_finished_stream_seals_nothing_more() -> None:
    enc = StreamEncryptor(data_key(), b"c", SEG)
    enc.seal(b"end", True)
    for chunk, last in ((b"", True), (bytes(SEG), False)):
        with pytest.raises(ValueError, match="already finished"):
            enc.seal(chunk, last)


def test_a_segment_opens_only_at_its_place_and_with_its_last_flag() -> None:
    dk = data_key()
    enc = StreamEncryptor(dk, b"c", SEG)
    first, second = enc.seal(bytes(SEG), False), enc.seal(b"tail", True)
    for order in (
        [(second, True)],
        [(first, True)],
        [(first, False), (first, False)],
        [(first, False), (second, False)],
    ):
        dec = _decryptor(enc, dk)
        with pytest.raises(DecryptionError) as exc:
            for sealed, last in order:
                dec.open(sealed, last)
        assert (exc.value.reason, exc.value.key_id) == (AUTH, dk.key_id)
        assert not dec.finished
    with pytest.raises(DecryptionError):  # another context
        _decryptor(enc, dk, b"other").open(first, False)


def test_the_segment_count_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2**32 - 1 segments are terabytes: the limit's comparisons are pinned on a small one.
    monkeypatch.setattr(_bulk, "MAX_SEGMENTS", 2)
    dk = data_key()
    enc = StreamEncryptor(dk, b"c", SEG)
    sealed = [enc.seal(bytes(SEG), False) for _ in range(2)]
    with pytest.raises(ValueError, match="stream too long"):
        enc.seal(b"", True)
    dec = _decryptor(enc, dk)
    assert [dec.open(s, False) for s in sealed] == [bytes(SEG)] * 2
    with pytest.raises(DecryptionError, match="after the stream's last segment") as exc:
        dec.open(sealed[0], True)
    assert exc.value.reason is MALFORMED
    two = encrypt_bulk(dk, bytes(2 * SEG), b"c", segment_size=SEG)
    assert bytes(decrypt_bulk(dk, two, b"c")) == bytes(2 * SEG)
    three = EncryptedData(
        bytes(3 * (SEG + 16) - 16), dk.key_id, "AES_256_GCM_STREAM", two.iv, two.tag
    )
    with pytest.raises(DecryptionError) as exc:
        BulkOpener(dk, three, b"c")
    assert (exc.value.reason, exc.value.key_id) == (MALFORMED, dk.key_id)


# -- splitting and bounds ------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (0, [(0, 0, True)]),
        (1, [(0, 1, True)]),
        (SEG, [(0, SEG, True)]),
        (SEG + 1, [(0, SEG, False), (SEG, SEG + 1, True)]),
        (3 * SEG, [(0, SEG, False), (SEG, 2 * SEG, False), (2 * SEG, 3 * SEG, True)]),
    ],
)
def test_split_segments(total: int, expected: list[tuple[int, int, bool]]) -> None:
    data = memoryview(bytes(range(256)) * (total // 256 + 1))[:total]
    pieces = list(split_segments(data, SEG))
    assert [(len(p), last) for p, last in pieces] == [(e - s, last) for s, e, last in expected]
    assert [bytes(p) for p, _ in pieces] == [bytes(data[s:e]) for s, e, _ in expected]


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (16, [(0, 16, True)]),
        (SEG + 16, [(0, SEG + 16, True)]),
        (SEG + 32, [(0, SEG + 16, False), (SEG + 16, SEG + 32, True)]),
        (SEG + 33, [(0, SEG + 16, False), (SEG + 16, SEG + 33, True)]),
        (2 * SEG + 32, [(0, SEG + 16, False), (SEG + 16, 2 * SEG + 32, True)]),
        (
            2 * SEG + 48,
            [
                (0, SEG + 16, False),
                (SEG + 16, 2 * SEG + 32, False),
                (2 * SEG + 32, 2 * SEG + 48, True),
            ],
        ),
    ],
)
def test_segment_bounds(total: int, expected: list[tuple[int, int, bool]]) -> None:
    assert _segment_bounds(total, SEG) == expected


@pytest.mark.parametrize("total", [0, 15, SEG + 16 + 1, SEG + 16 + 15, 2 * SEG + 32 + 15])
def test_segment_bounds_refuse_a_piece_shorter_than_a_tag(total: int) -> None:
    with pytest.raises(DecryptionError) as exc:
        _segment_bounds(total, SEG)
    assert exc.value.reason is MALFORMED


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, 16),
        (1, 17),
        (SEG, SEG + 16),
        (SEG + 1, SEG + 33),
        (2 * SEG, 2 * SEG + 32),
    ],
)
def test_sealed_size(size: int, expected: int) -> None:
    assert sealed_size(size, SEG) == expected


@pytest.mark.parametrize(
    ("count", "parts", "expected"),
    [
        (0, 4, [(0, 0)]),
        (1, 0, [(0, 1)]),
        (1, 4, [(0, 1)]),
        (5, 2, [(0, 3), (3, 5)]),
        (6, 3, [(0, 2), (2, 4), (4, 6)]),
        (7, 3, [(0, 3), (3, 5), (5, 7)]),
    ],
)
def test_split_ranges(count: int, parts: int, expected: list[tuple[int, int]]) -> None:
    assert split_ranges(count, parts) == expected


# -- BulkSealer and BulkOpener ----------------------------------------------------------


def test_results_are_held_back_until_every_segment_is_done() -> None:
    dk = data_key()
    data = bytes(range(256)) * 16  # four segments
    sealer = BulkSealer(dk, data, b"c", segment_size=SEG)
    with pytest.raises(ValueError, match="not sealed yet"):
        sealer.result()
    assert sealer.step(1) is False  # about one byte: one whole segment
    assert sealer.step(SEG) is False  # one more
    with pytest.raises(ValueError, match="not sealed yet"):
        sealer.result()
    assert sealer.step(SEG + 1) is True  # two: all four
    blob = sealer.result()
    opener = BulkOpener(dk, blob, b"c")
    assert opener.segments == 4
    with pytest.raises(ValueError, match="not opened yet"):
        opener.result()
    assert opener.step(2 * SEG) is False
    assert opener.step(SEG) is False
    assert opener.step(1) is True
    assert bytes(opener.result()) == data


def test_ranges_work_in_any_order() -> None:
    dk = data_key()
    data = bytes(range(256)) * 20 + b"tail"
    sealer = BulkSealer(dk, data, b"c", segment_size=SEG)
    ranges = sealer.ranges(3)
    assert ranges == [(0, 2), (2, 4), (4, 6)]
    for first, stop in reversed(ranges):
        sealer.run_range(first, stop)
    sealer.ranges_done()
    blob = sealer.result()
    assert len(blob.encrypted_data) + 16 == sealed_size(len(data), SEG)
    opener = BulkOpener(dk, blob, b"c")
    for first, stop in reversed(opener.ranges(2)):
        opener.run_range(first, stop)
    opener.ranges_done()
    assert bytes(opener.result()) == data
    assert bytes(decrypt_bulk(dk, blob, b"c")) == data


def test_a_one_shot_blob_is_not_opened_as_segments() -> None:
    dk = data_key()
    blob = encrypt_bulk(dk, b"x" * 3000, b"c")
    with pytest.raises(DecryptionError) as exc:
        BulkOpener(dk, blob, b"c")
    assert (exc.value.reason, exc.value.key_id) == (MALFORMED, dk.key_id)


def test_scrub_zeroes_the_whole_output() -> None:
    dk = data_key()
    data = b"\xff" * (3 * SEG + 5)
    out = bytearray(len(data))
    blob = encrypt_bulk(dk, data, b"c", segment_size=SEG)
    opener = BulkOpener(dk, blob, b"c", out=memoryview(out))
    opener.step(len(data))
    assert out == data
    opener.scrub()
    assert out == bytes(len(data))


def test_scrub_works_a_mib_at_a_time() -> None:
    dk = data_key()
    data = b"\xff" * ((1 << 20) * 2 + 7)
    out = bytearray(len(data))
    blob = encrypt_bulk(dk, data, b"c", segment_size=1 << 20)
    opener = BulkOpener(dk, blob, b"c", out=memoryview(out))
    opener.step(len(data))
    opener.scrub()
    assert out.count(0) == len(data)


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG])
def test_the_sealed_layout_is_segment_after_segment(size: int) -> None:
    dk = data_key()
    data = bytes(i % 251 for i in range(size))
    blob = encrypt_bulk(dk, data, b"c", segment_size=SEG)
    sealed = bytes(blob.encrypted_data) + blob.tag
    dec = StreamDecryptor(dk, b"c", 0, SEG, blob.iv[6:])
    bounds = _segment_bounds(len(sealed), SEG)
    assert b"".join(dec.open(sealed[s:e], last) for s, e, last in bounds) == data
    assert blob.plaintext_size == size


def test_a_tampered_segment_fails_to_authenticate_and_names_the_key() -> None:
    dk = data_key()
    blob = encrypt_bulk(dk, bytes(3 * SEG), b"c", segment_size=SEG)
    for at in (0, SEG + 16, len(blob.encrypted_data) - 1):
        body = bytearray(blob.encrypted_data)
        body[at] ^= 1
        forged = EncryptedData(bytes(body), dk.key_id, "AES_256_GCM_STREAM", blob.iv, blob.tag)
        with pytest.raises(DecryptionError) as exc:
            decrypt_bulk(dk, forged, b"c")
        assert (exc.value.reason, exc.value.key_id) == (AUTH, dk.key_id)
    with pytest.raises(DecryptionError) as exc:
        decrypt_bulk(dk, blob, b"other")
    assert exc.value.reason is AUTH


def test_a_one_shot_blob_round_trips_and_refuses_tampering() -> None:
    dk = data_key()
    blob = encrypt_bulk(dk, b"one shot", b"c")
    assert (len(blob.iv), blob.segment_size, blob.plaintext_size) == (12, None, 8)
    assert bytes(decrypt_bulk(dk, blob, b"c")) == b"one shot"
    forged = EncryptedData(blob.encrypted_data, dk.key_id, "AES_256_GCM", blob.iv, bytes(16))
    for bad, context in ((forged, b"c"), (blob, b"d")):
        with pytest.raises(DecryptionError) as exc:
            decrypt_bulk(dk, bad, context)
        assert (exc.value.reason, exc.value.key_id) == (AUTH, dk.key_id)


# -- output_buffer ------------------------------------------------------------------------


def test_output_buffer_takes_any_writable_buffer_and_gives_its_first_bytes() -> None:
    out = bytearray(10)
    view = output_buffer(out, 4, "x")
    assert (len(view), view.obj) == (4, out)
    view[:] = b"abcd"
    assert out == b"abcd" + bytes(6)
    words = array.array("I", [0, 0, 0])  # format "I": cast to bytes
    assert len(output_buffer(words, 12, "x")) == 12
    grid = memoryview(bytearray(12)).cast("B", (3, 4))  # 2-D: cast to one dimension
    flat = output_buffer(grid, 12, "x")
    assert (flat.ndim, flat.format, len(flat)) == (1, "B", 12)


def test_output_buffer_refusals() -> None:
    with pytest.raises(TypeError, match=r"must be a writable buffer .* not str"):
        output_buffer("text", 1, "x")
    with pytest.raises(TypeError, match="bytes is read-only"):
        output_buffer(b"xxxx", 1, "x")
    assert len(output_buffer(bytearray(5), 5, "the result")) == 5
    with pytest.raises(ValueError, match="out= holds 4 bytes; the result needs 5"):
        output_buffer(bytearray(4), 5, "the result")


def test_the_repr_leaves_out_the_ciphertext_nonce_and_tag() -> None:
    blob = EncryptedData(b"\xaa" * 40, "k1", "AES_256_GCM", b"\xbb" * 12, b"\xcc" * 16)
    text = repr(blob)
    assert "k1" in text and "AES_256_GCM" in text
    for hidden in ("encrypted_data=", "iv=", "tag=", "xaa", "xbb", "xcc"):
        assert hidden not in text
    assert (
        blob.compressed is False
        and EncryptedData(b"", "k1", "AES_256_GCM", bytes(12), bytes(16)).compressed is False
    )


# -- the rest of the first full run's survivors -------------------------------------------


def test_encrypted_data_is_frozen_and_slotted() -> None:
    blob = EncryptedData(b"x", "k1", "AES_256_GCM", bytes(12), bytes(16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        blob.key_id = "k2"  # type: ignore[misc]
    assert not hasattr(blob, "__dict__")


def test_a_packed_iv_sets_the_format_version() -> None:
    blob = EncryptedData(b"x", "k1", "AES_256_GCM", bytes((1, 0)) + bytes(12), bytes(16))
    assert blob.format_version == 1 and blob.header.version == 1


@pytest.mark.parametrize("segment_size", [None, SEG])
@pytest.mark.parametrize("size", [0, 1, SEG, SEG + 1])
def test_blobs_round_trip_through_bytes(segment_size: int | None, size: int) -> None:
    dk = data_key()
    data = bytes(i % 253 for i in range(size))
    blob = encrypt_bulk(dk, data, b"c", segment_size=segment_size)
    again = EncryptedData.from_bytes(blob.to_bytes())
    assert (again.iv, again.tag, again.segment_size) == (blob.iv, blob.tag, segment_size)
    assert bytes(again.encrypted_data) == bytes(blob.encrypted_data)
    assert bytes(decrypt_bulk(dk, again, b"c")) == data


def test_a_stream_body_shorter_than_its_parameters_and_a_tag_is_malformed() -> None:
    head = bytes((2, 3, 0, 2)) + b"k1" + (SEG).to_bytes(4, "big")
    assert EncryptedData.from_bytes(head + bytes(23 + 16)).segment_size == SEG
    with pytest.raises(DecryptionError) as exc:
        EncryptedData.from_bytes(head + bytes(23 + 15))
    assert exc.value.reason is MALFORMED


def test_flags_default_to_zero() -> None:
    dk = data_key()
    enc = StreamEncryptor(dk, b"c", SEG)
    assert enc.flags == 0 and enc.header[2] == 0
    sealer = BulkSealer(dk, b"x", b"c", segment_size=SEG)
    sealer.step(1)
    assert sealer.result().compressed is False
    assert StreamDecryptor(dk, b"c", 0, SEG, enc.salt + enc.prefix).segment_size == SEG


def test_a_step_of_nothing_still_works_a_segment() -> None:
    dk = data_key()
    sealer = BulkSealer(dk, bytes(2 * SEG), b"c", segment_size=SEG)
    assert sealer.step(0) is False and sealer.step(0) is True


def test_step_output_end_counts_a_tag_per_segment() -> None:
    dk = data_key()
    sealer = BulkSealer(dk, bytes(3 * SEG + 10), b"c", segment_size=SEG)  # four segments
    stride = SEG + 16
    assert [sealer.step_output_end(n) for n in (0, 1, SEG, SEG + 1, 10 * SEG)] == [
        stride,
        stride,
        stride,
        2 * stride,
        len(sealer.output),
    ]
    sealer.step(SEG)
    assert sealer.step_output_end(1) == 2 * stride
    sealer.ranges_done()
    assert sealer.step_output_end(1) == len(sealer.output) == 3 * stride + 10 + 16


def test_fresh_output_is_an_own_mapping_only() -> None:
    dk = data_key()
    small = BulkSealer(dk, bytes(SEG), b"c", segment_size=SEG)
    assert isinstance(small.output.obj, bytearray) and not small.fresh_output
    big = BulkSealer(dk, bytes(1 << 20), b"c", segment_size=SEG)
    assert isinstance(big.output.obj, mmap.mmap) and big.fresh_output
    given = mmap.mmap(-1, sealed_size(1 << 20, SEG))
    assert not BulkSealer(
        dk, bytes(1 << 20), b"c", segment_size=SEG, out=memoryview(given)
    ).fresh_output
    big.step(1 << 20)
    blob = big.result()
    opener = BulkOpener(dk, blob, b"c")
    assert opener.fresh_output
    out = bytearray(1 << 20)
    assert not BulkOpener(dk, blob, b"c", out=memoryview(out)).fresh_output


@pytest.mark.parametrize(
    ("size", "kind"),
    [
        ((1 << 20) - 1, bytearray),
        (1 << 20, mmap.mmap),
        ((1 << 20) + 1, mmap.mmap),
    ],
)
def test_own_buffers_are_mappings_from_a_mib(size: int, kind: type) -> None:
    assert isinstance(_bulk._buffer(size).obj, kind)
    assert len(_bulk._buffer(size)) == size


def test_segments_claimed_in_order_are_sealed_and_opened_in_any_order() -> None:
    dk = data_key()
    enc = StreamEncryptor(dk, b"c", SEG)
    chunks = [bytes([1]) * SEG, bytes([2]) * SEG, b"end"]
    indexes = [enc.claim(chunk, i == 2) for i, chunk in enumerate(chunks)]
    assert indexes == [0, 1, 2]
    with pytest.raises(ValueError, match="already finished"):
        enc.claim(b"", True)
    sealed = {i: enc.seal_at(i, chunks[i], i == 2) for i in reversed(indexes)}
    dec = _decryptor(enc, dk)
    assert [dec.claim(i == 2) for i in range(3)] == [0, 1, 2]
    assert dec.finished
    with pytest.raises(DecryptionError, match="after the stream's last segment") as exc:
        dec.claim(True)
    assert (exc.value.reason, exc.value.key_id) == (MALFORMED, dk.key_id)
    assert [dec.open_at(i, sealed[i], i == 2) for i in (2, 0, 1)] == [
        chunks[2],
        chunks[0],
        chunks[1],
    ]
    with pytest.raises(DecryptionError) as exc:
        dec.open_at(1, sealed[0], False)
    assert (exc.value.reason, exc.value.key_id) == (AUTH, dk.key_id)
    other = _decryptor(enc, dk)
    assert other.open(sealed[0], False) == chunks[0] and not other.finished
    with pytest.raises(DecryptionError):
        other.open(sealed[2], False)  # the last segment must say so
    assert not other.finished
