"""Every way a token can be wrong ends in DecryptionError, and nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aiocrypt import DecryptionError, EncryptedData, EncryptionService, KeyType


def bit_flips(token: str) -> Iterator[str]:
    for i, char in enumerate(token):
        for bit in range(8):
            flipped = chr(ord(char) ^ (1 << bit))
            yield token[:i] + flipped + token[i + 1 :]


async def assert_rejected(
    service: EncryptionService, token: str, key_type: KeyType | str, context: str | None
) -> None:
    with pytest.raises(DecryptionError) as info:
        await service.decrypt_field(token, key_type, context=context)
    assert type(info.value) is DecryptionError
    # the reason is named (issue 17), never the token
    assert str(info.value).startswith("decryption failed")
    assert len(token) < 20 or token not in str(info.value)


async def test_every_single_bit_flip_is_rejected(service: EncryptionService) -> None:
    token = await service.encrypt_field("123-45-6789", KeyType.PII, context="users.ssn")
    count = 0
    for bad in bit_flips(token):
        await assert_rejected(service, bad, KeyType.PII, "users.ssn")
        count += 1
    assert count == 8 * len(token)
    assert await service.decrypt_field(token, KeyType.PII, context="users.ssn") == "123-45-6789"


async def test_deterministic_tokens_reject_bit_flips(service: EncryptionService) -> None:
    enc_key, enc_value = await service.encrypt_cache_data("report:7", {"total": 3})
    for bad in bit_flips(enc_key):
        with pytest.raises(DecryptionError):
            await service.decrypt_cache_data(bad, enc_value)


async def test_truncation_at_every_length_is_rejected(service: EncryptionService) -> None:
    token = await service.encrypt_field(75000.0, context="users.income")
    for length in range(len(token)):
        await assert_rejected(service, token[:length], KeyType.FINANCIAL_DATA, "users.income")
    await assert_rejected(service, token + "A", KeyType.FINANCIAL_DATA, "users.income")
    await assert_rejected(service, token + "AAAA", KeyType.FINANCIAL_DATA, "users.income")


async def test_other_key_type_is_rejected(service: EncryptionService) -> None:
    token = await service.encrypt_field("secret", KeyType.API_KEYS)
    await service.key_manager.ensure_active([KeyType.PII])
    await assert_rejected(service, token, KeyType.PII, None)
    await assert_rejected(service, token, KeyType.FINANCIAL_DATA, None)


async def test_token_moved_to_another_column_is_rejected(service: EncryptionService) -> None:
    token = await service.encrypt_field(75000.0, context="users.income")
    await assert_rejected(service, token, KeyType.FINANCIAL_DATA, "users.savings")
    await assert_rejected(service, token, KeyType.FINANCIAL_DATA, None)
    pii = await service.encrypt_field("123-45-6789", KeyType.PII, context="users.ssn")
    await assert_rejected(service, pii, KeyType.PII, "users.income")


async def test_token_moved_to_another_row_is_rejected(service: EncryptionService) -> None:
    row1 = await service.encrypt_field("123-45-6789", KeyType.PII, context="users.ssn#id=1")
    await assert_rejected(service, row1, KeyType.PII, "users.ssn#id=2")
    assert await service.decrypt_field(row1, KeyType.PII, context="users.ssn#id=1")


async def test_unknown_key_id_is_rejected(service: EncryptionService) -> None:
    token = await service.encrypt_field("x", KeyType.PII)
    key_id = token.split(".")[1]
    forged = token.replace(key_id, "pii-v9-00000000", 1)
    await assert_rejected(service, forged, KeyType.PII, None)


async def test_token_from_another_deployment_is_rejected(service: EncryptionService) -> None:
    from aiocrypt.testing import make_service

    other = make_service()
    async with other:
        token = await other.encrypt_field("x", KeyType.PII)
    await assert_rejected(service, token, KeyType.PII, None)


async def test_destroyed_key_is_rejected(service: EncryptionService) -> None:
    import datetime as dt

    manager = service.key_manager
    old = await manager.get_active_key(KeyType.SESSION)
    token = await service.encrypt_field({"user": 1}, KeyType.SESSION)
    await manager.rotate_key(KeyType.SESSION, force=True)
    # jump past max age + grace, then confirm the old key is unreferenced
    manager._clock = lambda: old.expires_at + dt.timedelta(days=31)
    assert await manager.cleanup_expired_keys(confirm_unreferenced=[old.key_id]) == 1
    assert (await manager.get_key(old.key_id)).status.value == "destroyed"
    await assert_rejected(service, token, KeyType.SESSION, None)


@pytest.mark.parametrize("size", [100, 200_000])
async def test_bulk_blob_tampering_is_rejected(service: EncryptionService, size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    encrypted = await service.encrypt_bulk_data(data[:size], context="exports")
    blob = encrypted.to_bytes()
    positions = [*list(range(0, len(blob), max(1, len(blob) // 300))), len(blob) - 1]
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(DecryptionError):
            await service.decrypt_bulk_data(
                bytes(bad), context="exports", key_type="financial_data"
            )
    for cut in (1, 16, 17, len(blob) // 2, len(blob) - 1):
        with pytest.raises(DecryptionError):
            await service.decrypt_bulk_data(
                blob[:cut], context="exports", key_type="financial_data"
            )
    with pytest.raises(DecryptionError):
        await service.decrypt_bulk_data(blob, context="other", key_type="financial_data")
    assert (
        await service.decrypt_bulk_data(blob, context="exports", key_type="financial_data")
        == data[:size]
    )


async def test_stream_segments_cannot_be_dropped_or_reordered(service: EncryptionService) -> None:
    seg = service.config.performance.segment_size
    data = bytes(3 * seg + 10)
    encrypted = await service.encrypt_bulk_data(data)
    sealed = bytes(encrypted.encrypted_data) + encrypted.tag
    stride = seg + 16
    segments = [sealed[i : i + stride] for i in range(0, len(sealed), stride)]
    assert len(segments) == 4

    def rebuilt(parts: list[bytes]) -> EncryptedData:
        joined = b"".join(parts)
        return EncryptedData(
            joined[:-16],
            encrypted.key_id,
            encrypted.algorithm,
            encrypted.iv,
            joined[-16:],
            encrypted.segment_size,
        )

    for variant in (
        [segments[0], segments[2], segments[1], segments[3]],  # reordered
        segments[:3],  # last dropped
        [segments[0], segments[1], segments[3]],  # middle dropped
        [*segments, segments[3]],
    ):  # appended
        with pytest.raises(DecryptionError):
            await service.decrypt_bulk_data(rebuilt(variant), key_type="financial_data")
    assert await service.decrypt_bulk_data(rebuilt(segments), key_type="financial_data") == data
