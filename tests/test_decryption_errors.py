"""Each DecryptionError reason arises from its cause, through the public API (issue 17).

The reason (``DecryptionFailure``) and the key id come from what every token
shows in clear and from the authenticated key records; authentication failures
(wrong context, tampering, another row's token, truncation inside the body) are
one reason. The message is safe to log: no token, no value, no key material.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator

import pytest
from security._helpers import exception_texts, find_secrets

from aiocrypt import (
    DecryptionError,
    DecryptionFailure,
    EncryptionConfig,
    EncryptionService,
    KeyType,
)
from aiocrypt.testing import ManualClock, make_service

F = DecryptionFailure
SSN = "123-45-6789"
CTX = "users.ssn_encrypted"


async def reason_of(
    service: EncryptionService,
    token: str,
    key_type: KeyType | str = "pii",
    context: str | None = CTX,
) -> DecryptionError:
    with pytest.raises(DecryptionError) as info:
        await service.decrypt_field(token, key_type, context=context)
    error = info.value
    assert type(error) is DecryptionError  # never a private subclass
    assert str(error).startswith("decryption failed")
    assert token[-16:] not in str(error) and SSN not in str(error)
    return error


def flip_body(token: str) -> str:
    prefix, body = token.rsplit(".", 1)
    raw = bytearray(base64.urlsafe_b64decode(body))
    raw[20] ^= 1  # inside the ciphertext or tag, away from the last base64 character
    return prefix + "." + base64.urlsafe_b64encode(bytes(raw)).decode()


async def test_authentication_failures_are_one_reason(service: EncryptionService) -> None:
    token = await service.encrypt_field(SSN, KeyType.PII, context=CTX)
    other_row = await service.encrypt_field("987-65-4321", KeyType.PII, context=f"{CTX}#2")
    key_id = service.keyring.active(KeyType.PII).key_id
    cases = {
        "wrong context": (token, "users.other"),
        "tampered": (flip_body(token), CTX),
        "another row's token": (other_row, CTX),
        "truncated inside the body": (token[:-8], CTX),
    }
    messages = set()
    for name, (bad, ctx) in cases.items():
        error = await reason_of(service, bad, context=ctx)
        assert error.reason is F.AUTHENTICATION_FAILED, name
        assert error.key_id == key_id, name
        messages.add(str(error))
    assert len(messages) == 1  # indistinct among themselves: no oracle


async def test_malformed(service: EncryptionService) -> None:
    token = await service.encrypt_field(SSN, KeyType.PII, context=CTX)
    prefix = token.rsplit(".", 1)[0]
    for bad in [
        "123-45-6789",
        "ac2.",
        prefix + ".@@@@",
        prefix + ".AAAA",  # too short
        token[: len(token) // 4],
    ]:
        error = await reason_of(service, bad)
        assert error.reason is F.MALFORMED, bad


async def test_wrong_key_type_names_both(service: EncryptionService) -> None:
    token = await service.encrypt_field(SSN, KeyType.PII, context=CTX)
    error = await reason_of(service, token, KeyType.FINANCIAL_DATA)
    assert error.reason is F.WRONG_KEY_TYPE
    assert error.key_id == service.keyring.active(KeyType.PII).key_id
    assert "token is for key type pii, not financial_data" in str(error)


async def test_unknown_key(service: EncryptionService) -> None:
    async with make_service() as elsewhere:  # another store: a key this one never had
        foreign = await elsewhere.encrypt_field(SSN, KeyType.PII, context=CTX)
        foreign_id = elsewhere.keyring.active(KeyType.PII).key_id
    error = await reason_of(service, foreign)
    assert error.reason is F.UNKNOWN_KEY and error.key_id == foreign_id
    assert f"key {foreign_id} is not in this key store" in str(error)


@pytest.mark.parametrize("how", ["revoked", "compromised", "minimum version"])
async def test_key_not_readable_says_which(service: EncryptionService, how: str) -> None:
    manager = service.key_manager
    token = await service.encrypt_field(SSN, KeyType.PII, context=CTX)
    old = service.keyring.active(KeyType.PII).key_id
    if how == "revoked":
        await manager.revoke_key(old)
        expected = "is revoked"
    elif how == "compromised":
        await manager.mark_compromised(old, "test")
        expected = "is compromised"
    else:
        await manager.rotate_key(KeyType.PII, force=True)
        await manager.set_min_decryption_version(KeyType.PII, 2, confirm_unreferenced=[old])
        expected = "below its key type's minimum decryption version"
    await manager.refresh(force=True)
    error = await reason_of(service, token)
    assert error.reason is F.KEY_NOT_READABLE and error.key_id == old
    assert expected in str(error)


async def test_destroyed_and_past_grace_keys() -> None:
    clock = ManualClock()
    async with make_service(clock=clock) as service:
        manager = service.key_manager
        token = await service.encrypt_field({"u": 1}, KeyType.SESSION, context=CTX)
        old = service.keyring.active(KeyType.SESSION).key_id
        await manager.rotate_key(KeyType.SESSION, force=True)
        clock.advance(days=90 + 1)
        await manager.rotate_keys_due()
        clock.advance(days=60)  # past max age and grace
        await manager.refresh(force=True)
        error = await reason_of(service, token, KeyType.SESSION)
        assert error.reason is F.KEY_NOT_READABLE
        assert "expired past its grace period" in str(error)

        await manager.cleanup_report(census={old: 0})
        await manager.refresh(force=True)
        error = await reason_of(service, token, KeyType.SESSION)
        assert error.reason is F.KEY_NOT_READABLE and error.key_id == old
        assert str(error) == f"decryption failed: key {old} was destroyed"


async def test_format_v1_refused_is_malformed() -> None:
    config = EncryptionConfig(accept_format_v1=False)
    async with make_service(config) as service:
        v2 = await service.encrypt_field(SSN, KeyType.PII, context=CTX)
        v1 = "ac1." + v2[4:]  # the version 1 prefix: refused before anything is read
        error = await reason_of(service, v1)
        assert error.reason is F.MALFORMED
        assert "accept_format_v1=False" in str(error)


async def test_bulk_data_reasons(service: EncryptionService) -> None:
    blob = (
        await service.encrypt_bulk_data(b"report " * 100, KeyType.FINANCIAL_DATA, context="r1")
    ).to_bytes()
    with pytest.raises(DecryptionError) as info:
        await service.decrypt_bulk_data(blob, key_type=KeyType.PII, context="r1")
    assert info.value.reason is F.WRONG_KEY_TYPE
    with pytest.raises(DecryptionError) as info:
        await service.decrypt_bulk_data(blob, key_type=KeyType.FINANCIAL_DATA, context="r2")
    assert info.value.reason is F.AUTHENTICATION_FAILED
    with pytest.raises(DecryptionError) as info:
        await service.decrypt_bulk_data(b"plain text, not a blob", key_type=KeyType.FINANCIAL_DATA)
    assert info.value.reason is F.MALFORMED


async def _collect(parts: AsyncIterator[bytes]) -> bytes:
    return b"".join([part async for part in parts])


async def test_stream_reasons(service: EncryptionService) -> None:
    data = b"x" * 5000
    stream = await _collect(
        service.encrypt_stream([data], KeyType.FINANCIAL_DATA, context="s", segment_size=1024)
    )
    assert (
        await _collect(
            service.decrypt_stream([stream], key_type=KeyType.FINANCIAL_DATA, context="s")
        )
        == data
    )
    cases = [
        ([stream], KeyType.PII, "s", F.WRONG_KEY_TYPE),
        ([stream], KeyType.FINANCIAL_DATA, "other", F.AUTHENTICATION_FAILED),
        ([stream[:-100]], KeyType.FINANCIAL_DATA, "s", F.AUTHENTICATION_FAILED),  # cut short
        ([b"not a stream at all"], KeyType.FINANCIAL_DATA, "s", F.MALFORMED),
    ]
    blob = (await service.encrypt_bulk_data(data, KeyType.FINANCIAL_DATA, context="s")).to_bytes()
    cases.append(([blob], KeyType.FINANCIAL_DATA, "s", F.WRONG_PURPOSE))  # one-shot blob
    for source, kt, ctx, reason in cases:
        with pytest.raises(DecryptionError) as info:
            await _collect(service.decrypt_stream(source, key_type=kt, context=ctx))
        assert info.value.reason is reason, (kt, ctx, reason)


async def test_decrypt_many_names_the_first_failure(service: EncryptionService) -> None:
    tokens = await service.encrypt_many([SSN, "x"], KeyType.PII, context=CTX)
    with pytest.raises(DecryptionError) as info:
        await service.decrypt_many([tokens[0], flip_body(tokens[1])], KeyType.PII, context=CTX)
    assert info.value.reason is F.AUTHENTICATION_FAILED


async def test_failures_are_logged_at_debug_without_secrets(
    service: EncryptionService, caplog: pytest.LogCaptureFixture
) -> None:
    token = await service.encrypt_field(SSN, KeyType.PII, context=CTX)
    dk = service.keyring.active(KeyType.PII)
    with caplog.at_level(logging.DEBUG, logger="aiocrypt"):
        error = await reason_of(service, token, KeyType.FINANCIAL_DATA)
        await reason_of(service, flip_body(token))
    logged = [r.getMessage() for r in caplog.records if r.name == "aiocrypt"]
    assert any("reason=wrong_key_type" in m and dk.key_id in m for m in logged)
    assert any("reason=authentication_failed" in m for m in logged)
    text = "\n".join([*logged, *exception_texts(error)])
    assert token not in text and SSN not in text
    assert not find_secrets(text, {"dek": dk._material})


async def test_no_argument_form_still_works() -> None:
    assert str(DecryptionError()) == "decryption failed"
    assert DecryptionError().reason is None
    assert str(DecryptionError("custom")) == "custom"
