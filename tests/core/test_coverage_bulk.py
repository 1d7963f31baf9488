"""``aiocrypt._bulk`` and the service's bulk and stream paths: key status and usage.

Survivors of issue 21's mutation run, killed directly: a weakened
``check_decryptable`` let revoked, compromised and past-grace keys decrypt blobs
and streams; usage was not pinned to exactly one per blob or stream. Also the
``EncryptedData`` constructor's refusals, line by line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from aiocrypt import DecryptionError, EncryptionConfig, EncryptionService, KeyType
from aiocrypt._bulk import (
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    EncryptedData,
    StreamEncryptor,
    decrypt_bulk,
    encrypt_bulk,
)
from aiocrypt._errors import DecryptionFailure
from aiocrypt._format import FLAG_ZSTD
from aiocrypt.testing import ManualClock, make_service

from ._core_keys import data_key

FIN = KeyType.FINANCIAL_DATA
GCM, STREAM = "AES_256_GCM", "AES_256_GCM_STREAM"
TAG = bytes(16)


# -- EncryptedData ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"algorithm": "AES_128_GCM"}, "unknown algorithm"),
        ({"tag": bytes(15)}, "tag must be 16 bytes"),
        ({"tag": bytes(17)}, "tag must be 16 bytes"),
        ({"iv": bytes(11)}, "iv must be 12 or 14 bytes"),
        ({"iv": bytes(13)}, "iv must be 12 or 14 bytes"),
        ({"iv": bytes((3, 0)) + bytes(12)}, "unknown format version 3"),
        ({"iv": bytes((0, 0)) + bytes(12)}, "unknown format version 0"),
        ({"iv": bytes((2, 2)) + bytes(12)}, "unknown flags"),
        ({"iv": bytes(12), "format_version": 3}, "unknown format version 3"),
        ({"iv": bytes(12), "segment_size": 1024}, "for streams only"),
        ({"iv": bytes((2, 0)) + bytes(12), "compressed": True}, "contradicts the iv"),
        ({"iv": bytes((2, 1)) + bytes(12), "format_version": 1}, "contradicts the iv"),
    ],
)
def test_encrypted_data_refusals(kwargs: dict[str, Any], why: str) -> None:
    fields: dict[str, Any] = {
        "encrypted_data": b"x",
        "key_id": "k1",
        "algorithm": GCM,
        "iv": bytes(12),
        "tag": TAG,
    }
    fields.update(kwargs)
    with pytest.raises(ValueError, match=why):
        EncryptedData(**fields)


@pytest.mark.parametrize("segment_size", [None, 0, MIN_SEGMENT_SIZE - 1, MAX_SEGMENT_SIZE + 1])
def test_streams_need_a_segment_size_within_the_limits(segment_size: int | None) -> None:
    with pytest.raises(ValueError, match="between 1 KiB and 64 MiB"):
        EncryptedData(b"x", "k1", STREAM, bytes(23), TAG, segment_size)


@pytest.mark.parametrize("segment_size", [MIN_SEGMENT_SIZE, MAX_SEGMENT_SIZE])
def test_stream_iv_is_packed_and_read_back(segment_size: int) -> None:
    bare = EncryptedData(b"x", "k1", STREAM, bytes(range(23)), TAG, segment_size, True)
    assert bare.iv == bytes((2, FLAG_ZSTD)) + segment_size.to_bytes(4, "big") + bytes(range(23))
    again = EncryptedData(b"x", "k1", STREAM, bare.iv, TAG)
    assert (again.segment_size, again.compressed, again.format_version) == (segment_size, True, 2)
    with pytest.raises(ValueError, match="contradicts the iv"):
        EncryptedData(b"x", "k1", STREAM, bare.iv, TAG, segment_size + 1)
    with pytest.raises(ValueError, match="iv must be 23 or 29 bytes"):
        EncryptedData(b"x", "k1", STREAM, bytes(12), TAG, segment_size)


def test_one_shot_iv_packs_only_what_a_nonce_cannot_say() -> None:
    assert EncryptedData(b"x", "k1", GCM, bytes(12), TAG).iv == bytes(12)
    assert EncryptedData(b"x", "k1", GCM, bytes(12), TAG, compressed=True).iv == bytes(
        (2, 1)
    ) + bytes(12)
    assert EncryptedData(b"x", "k1", GCM, bytes(12), TAG, format_version=1).iv == bytes(
        (1, 0)
    ) + bytes(12)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        bytes((2, 1, 0, 2)) + b"k1" + bytes(27),  # one-shot body shorter than nonce + tag
        bytes((2, 3, 0, 2)) + b"k1" + bytes(38),  # stream body shorter than params + tag
        bytes((2, 2, 0, 2)) + b"k1" + bytes(40),  # AES-SIV is not a bulk algorithm
        bytes((2, 3, 0, 2)) + b"k1" + (512).to_bytes(4, "big") + bytes(39),  # segment too small
    ],
)
def test_from_bytes_refusals_are_malformed(blob: bytes) -> None:
    with pytest.raises(DecryptionError) as exc:
        EncryptedData.from_bytes(blob)
    assert exc.value.reason is DecryptionFailure.MALFORMED


# -- usage: exactly one per blob and per stream -----------------------------------


@pytest.mark.parametrize("segment_size", [None, 1024])
@pytest.mark.parametrize("size", [0, 1, 5000])
def test_a_blob_counts_once_whatever_its_size(segment_size: int | None, size: int) -> None:
    dk = data_key()
    blob = encrypt_bulk(dk, b"b" * size, b"ctx", segment_size=segment_size)
    assert dk.encryptions == 1
    assert bytes(decrypt_bulk(dk, blob, b"ctx")) == b"b" * size
    assert dk.encryptions == 1


def test_a_stream_counts_once_whatever_its_length() -> None:
    dk = data_key()
    enc = StreamEncryptor(dk, b"", 1024)
    assert dk.encryptions == 1
    for _ in range(5):
        enc.seal(bytes(1024), False)
    enc.seal(b"", True)
    assert dk.encryptions == 1


@pytest.mark.parametrize("compress", [False, True])
async def test_the_service_counts_one_per_blob_and_stream(compress: bool) -> None:
    config = EncryptionConfig(compression_enabled=compress)
    async with make_service(config) as service:
        await service.encrypt_field(1)
        dk = service.keyring.active(FIN)
        before = dk.encryptions
        await service.encrypt_bulk_data(b"z" * 3000)
        assert dk.encryptions == before + 1
        async for _ in service.encrypt_stream([b"z" * 5000], segment_size=1024):
            pass
        assert dk.encryptions == before + 2
        await service.encrypt_field("z" * 3000)  # compressed or not: one token, one count
        assert dk.encryptions == before + 3


# -- key status on the bulk and stream paths --------------------------------------

Reader = Callable[[EncryptionService], Awaitable[Callable[[], Awaitable[Any]]]]


async def _blob(service: EncryptionService) -> Callable[[], Awaitable[Any]]:
    blob = (await service.encrypt_bulk_data(b"secret" * 10, FIN)).to_bytes()
    return lambda: service.decrypt_bulk_data(blob, key_type=FIN)


async def _segmented(service: EncryptionService) -> Callable[[], Awaitable[Any]]:
    size = (await service.get_encryption_stats())["inline_threshold"] + 1
    blob = await service.encrypt_bulk_data(b"s" * size, FIN)
    return lambda: service.decrypt_bulk_data(blob, key_type=FIN)


async def _stream(service: EncryptionService) -> Callable[[], Awaitable[Any]]:
    parts = [p async for p in service.encrypt_stream([b"secret" * 500], FIN, segment_size=1024)]

    async def read() -> bytes:
        return b"".join([p async for p in service.decrypt_stream(parts, key_type=FIN)])

    return read


READERS = pytest.mark.parametrize(
    "reader", [_blob, _segmented, _stream], ids=["blob", "segmented", "stream"]
)


async def _withdraw(service: EncryptionService, how: str, clock: ManualClock) -> None:
    manager = service.key_manager
    key = await manager.get_active_key(FIN)
    if how == "revoked":
        await manager.revoke_key(key.key_id, "test")
    elif how == "compromised":
        await manager.mark_compromised(key.key_id, "test")
    else:  # past its max age and its grace period
        clock.advance(days=365 + 31)
        await manager.rotate_keys_due()
    await manager.refresh(force=True)


@READERS
@pytest.mark.parametrize("how", ["revoked", "compromised", "past grace"])
async def test_withdrawn_keys_do_not_decrypt_blobs_or_streams(reader: Reader, how: str) -> None:
    clock = ManualClock()
    async with make_service(clock=clock, refresh_interval=3600.0, watch=False) as service:
        read = await reader(service)
        await read()  # readable while the key is live
        await _withdraw(service, how, clock)
        with pytest.raises(DecryptionError) as exc:
            await read()
        assert exc.value.reason is DecryptionFailure.KEY_NOT_READABLE


@READERS
async def test_blobs_and_streams_of_another_key_type_are_refused(reader: Reader) -> None:
    async with make_service() as service:
        read = await reader(service)
        await read()
        blob = (await service.encrypt_bulk_data(b"x", KeyType.PII)).to_bytes()
        with pytest.raises(DecryptionError) as exc:
            await service.decrypt_bulk_data(blob, key_type=FIN)
        assert exc.value.reason is DecryptionFailure.WRONG_KEY_TYPE
        parts = [p async for p in service.encrypt_stream([b"x"], KeyType.PII)]
        with pytest.raises(DecryptionError) as exc:
            async for _ in service.decrypt_stream(parts, key_type=FIN):
                pass
        assert exc.value.reason is DecryptionFailure.WRONG_KEY_TYPE
