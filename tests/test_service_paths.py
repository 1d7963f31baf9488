"""EncryptionService paths the rest of the suite leaves untaken (issue 21): argument
guards, worker-thread hops of large values, compression and subjects together,
keys rotated by another process, refused version 1 tokens, ``out=`` buffers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from aiocrypt import (
    CacheEntryExpiredError,
    DecryptionError,
    DecryptionFailure,
    EncryptionConfig,
    EncryptionService,
    KeyManager,
    KeyStateError,
    KeyType,
)
from aiocrypt._bulk import encrypt_bulk
from aiocrypt._codec import encode_value
from aiocrypt._format import FLAG_ZSTD, MAX_FIELD_PLAINTEXT, Purpose
from aiocrypt._keyring import GCM_MESSAGE_LIMIT
from aiocrypt._subjects import token_key_id
from aiocrypt.testing import (
    FakeKekProvider,
    ManualClock,
    MemoryKeyStore,
    make_key_manager,
    make_service,
)

PII = KeyType.PII
BIG = 70_000  # over the balanced mode's 64 KiB inline threshold


@pytest.fixture
async def compressing() -> AsyncIterator[EncryptionService]:
    async with make_service(EncryptionConfig(compression_enabled=True)) as service:
        yield service


def _v1(token: str) -> str:
    return "ac1." + token[4:]  # the version 1 prefix


# -- fields -------------------------------------------------------------------


async def test_a_large_non_text_field_is_sealed_in_a_thread(service: EncryptionService) -> None:
    value = os.urandom(BIG)
    before = service.counters["threaded_operations"]
    token = await service.encrypt_field(value, PII, context="c")
    assert service.counters["threaded_operations"] == before + 1
    assert await service.decrypt_field(token, PII, context="c") == value


async def test_a_small_field_of_a_compressed_type_is_compressed(
    compressing: EncryptionService,
) -> None:
    value = {"line": "the same words again " * 200}
    token = await compressing.encrypt_field(value, PII)
    assert len(token) < len(encode_value(value)) // 4
    assert await compressing.decrypt_field(token, PII) == value


async def test_a_v1_field_is_refused_and_counted() -> None:
    service = EncryptionService(make_key_manager(), accept_format_v1=False)
    async with service:
        token = await service.encrypt_field("x", PII)
        with pytest.raises(DecryptionError, match="accept_format_v1=False") as info:
            await service.decrypt_field(_v1(token), PII)
        assert info.value.reason is DecryptionFailure.MALFORMED
        assert service.counters["decrypt_failures:pii"] == 1
        with pytest.raises(DecryptionError, match="accept_format_v1=False"):
            await service.decrypt_many([token, _v1(token)], PII)
        assert service.counters["decrypt_failures:pii"] == 2
        assert await service.decrypt_many([token], PII) == ["x"]  # v2 only: read
        session = await service.encrypt_session_data({"a": 1})
        with pytest.raises(DecryptionError, match="accept_format_v1=False"):
            await service.decrypt_session_data(_v1(session))


async def test_an_undecodable_plaintext_is_malformed_on_the_general_path() -> None:
    manager = make_key_manager()
    async with EncryptionService(manager) as writer:
        token = await writer.encrypt_field("x", PII)  # makes the key
        junk = writer.keyring.encrypt_bytes(b"\xfe not a codec value", PII)
    reader = EncryptionService(manager)  # not started: the general path
    with pytest.raises(DecryptionError) as info:
        await reader.decrypt_field(junk, PII)
    assert info.value.reason is DecryptionFailure.MALFORMED
    assert reader.counters["decrypt_failures"] == 1
    assert await reader.decrypt_field(token, PII) == "x"
    await reader.close()


async def test_a_non_str_token_is_a_type_error(service: EncryptionService) -> None:
    with pytest.raises(TypeError, match="token must be str, not bytes"):
        await service.decrypt_session_data(b"ac2.x")  # type: ignore[arg-type]


async def test_keys_rotated_by_another_process_are_loaded_on_demand() -> None:
    store, kek = MemoryKeyStore(), FakeKekProvider()
    async with (
        EncryptionService(KeyManager(store, kek)) as old,
        EncryptionService(KeyManager(store, kek)) as other,
    ):
        await old.encrypt_field("before", PII)
        await other.key_manager.rotate_key(PII, force=True)
        big = "y" * BIG  # over the threshold: past the fast path
        tokens = [await other.encrypt_field(v, PII) for v in ("a", big)]
        assert old.keyring.get(token_key_id(tokens[0])) is None
        assert await old.decrypt_field(tokens[1], PII) == big
        assert await old.decrypt_many(tokens, PII) == ["a", big]


async def test_reads_under_a_destroyed_key_say_it_was_destroyed() -> None:
    clock = ManualClock()
    async with make_service(clock=clock) as service:
        manager = service.key_manager
        token = await service.encrypt_field("gone", PII)
        blob = (await service.encrypt_bulk_data(b"gone", PII)).to_bytes()
        old = service.keyring.active(PII).key_id
        await manager.rotate_key(PII, force=True)
        clock.advance(days=180 + 1)
        await manager.rotate_keys_due()
        clock.advance(days=730)  # past max age and grace
        await manager.refresh(force=True)
        await manager.cleanup_report(census={old: 0})
        await manager.refresh(force=True)
        for read in (
            service.decrypt_many([token], PII),
            service.decrypt_bulk_data(blob, key_type=PII),
        ):
            with pytest.raises(DecryptionError) as info:
                await read
            assert info.value.reason is DecryptionFailure.KEY_NOT_READABLE
            assert str(info.value) == f"decryption failed: key {old} was destroyed"


async def test_a_batch_with_a_key_no_store_holds_names_it(service: EncryptionService) -> None:
    token = await service.encrypt_field("a", PII)
    elsewhere = make_service()
    async with elsewhere:
        foreign = await elsewhere.encrypt_field("b", PII)
    with pytest.raises(DecryptionError) as info:
        await service.decrypt_many([token, foreign], PII)
    assert info.value.reason is DecryptionFailure.UNKNOWN_KEY
    assert info.value.key_id == token_key_id(foreign)


async def test_context_and_contexts_together_are_refused(service: EncryptionService) -> None:
    with pytest.raises(ValueError, match="pass context or contexts, not both"):
        await service.encrypt_many(["a"], PII, context="c", contexts=["c"])


# -- subjects -----------------------------------------------------------------


async def test_a_subject_key_comes_from_the_cache_the_second_time(
    service: EncryptionService,
) -> None:
    first = await service.encrypt_field("a", PII, subject="alice")
    unwraps = service.key_manager.kek.calls["unwrap"]  # type: ignore[attr-defined]
    second = await service.encrypt_field("b", PII, subject="alice")
    assert token_key_id(first) == token_key_id(second)
    assert service.key_manager.kek.calls["unwrap"] == unwraps  # type: ignore[attr-defined]
    assert await service.decrypt_many([first, second], PII) == ["a", "b"]


async def test_subject_values_too_large_or_too_many_are_refused(
    service: EncryptionService,
) -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_FIELD_PLAINTEXT} bytes"):
        await service.encrypt_field(bytes(MAX_FIELD_PLAINTEXT), PII, subject="bob")
    token = await service.encrypt_field("x", PII, subject="bob")
    dk = service.key_manager.subjects.cached(PII, "bob")
    assert dk is not None and dk.key_id == token_key_id(token)
    dk.encryptions = GCM_MESSAGE_LIMIT
    with pytest.raises(KeyStateError, match=r"reached 2\*\*32 encryptions"):
        await service.encrypt_field("x", PII, subject="bob")


async def test_a_large_subject_value_is_sealed_in_a_thread(service: EncryptionService) -> None:
    value = os.urandom(BIG)
    before = service.counters["threaded_operations"]
    token = await service.encrypt_field(value, PII, subject="carol")
    assert service.counters["threaded_operations"] == before + 1
    assert await service.decrypt_field(token, PII) == value


async def test_a_compressed_subject_session_round_trips(compressing: EncryptionService) -> None:
    data = {"cart": ["the same item"] * 300}
    token = await compressing.encrypt_session_data(data, context="s1", subject="dan")
    assert len(token) < len(encode_value(data)) // 4
    assert await compressing.decrypt_session_data(token, context="s1") == data


async def test_subject_key_exists_only_once_made() -> None:
    service = make_service()  # not started: the call starts it
    assert await service.subject_key_exists("gus", PII) is False
    assert service.started
    await service.encrypt_field("g", PII, subject="gus")
    assert await service.subject_key_exists("gus", PII) is True
    assert await service.subject_key_exists("gus", KeyType.SESSION) is False
    await service.close()


async def test_a_large_batch_of_subject_values_is_sealed_in_a_thread(
    service: EncryptionService,
) -> None:
    values = [os.urandom(BIG // 2) for _ in range(3)]
    before = service.counters["threaded_operations"]
    tokens = await service.encrypt_many(values, PII, subjects=["hal", None, "hal"])
    assert service.counters["threaded_operations"] > before
    assert token_key_id(tokens[0]) == token_key_id(tokens[2]) != token_key_id(tokens[1])
    assert await service.decrypt_many(tokens, PII) == values


async def test_subject_and_subjects_together_are_refused(service: EncryptionService) -> None:
    with pytest.raises(ValueError, match="pass subject or subjects, not both"):
        await service.encrypt_many(["a"], PII, subject="a", subjects=["a"])
    with pytest.raises(ValueError, match="2 subjects for 1 values"):
        await service.encrypt_many(["a"], PII, subjects=["a", "b"])


async def test_a_forgotten_subject_blob_is_refused_and_counted(
    service: EncryptionService,
) -> None:
    blob = (await service.encrypt_bulk_data(b"report", PII, subject="erin")).to_bytes()
    assert await service.decrypt_bulk_data(blob, key_type=PII) == b"report"
    await service.forget_subject("erin")
    with pytest.raises(DecryptionError) as info:
        await service.decrypt_bulk_data(blob, key_type=PII)
    assert info.value.reason is DecryptionFailure.SUBJECT_FORGOTTEN
    assert service.counters["decrypt_failures"] == 1


async def test_subject_calls_start_the_service() -> None:
    service = make_service()
    report = await service.forget_subject("nobody")
    assert service.started and report.subject_key_ids == ()
    await service.close()
    service = make_service(preload=[PII])
    rewrapped = await service.rewrap_subjects(PII)
    assert service.started and rewrapped.rewrapped == 0
    await service.close()


async def test_a_subject_token_from_another_process_is_read_when_always_stale() -> None:
    store, kek = MemoryKeyStore(), FakeKekProvider()
    async with EncryptionService(KeyManager(store, kek)) as writer:
        token = await writer.encrypt_field("z", PII, subject="fay")
    # refresh_interval=0: every call finds the snapshot stale and reloads it
    async with EncryptionService(KeyManager(store, kek, refresh_interval=0)) as reader:
        assert reader.key_manager.subjects.ring_of(token) is None
        assert await reader.decrypt_field(token, PII) == "z"
        assert reader.key_manager.subjects.ring_of(token) is not None


# -- sessions and cache entries -------------------------------------------------


async def test_a_large_session_is_sealed_in_a_thread(service: EncryptionService) -> None:
    data = {"blob": os.urandom(BIG)}
    before = service.counters["threaded_operations"]
    token = await service.encrypt_session_data(data)
    assert service.counters["threaded_operations"] >= before + 1
    assert await service.decrypt_session_data(token) == data


async def test_session_data_must_be_a_dict(service: EncryptionService) -> None:
    with pytest.raises(TypeError, match="session data must be a dict, not list"):
        await service.encrypt_session_data([1])  # type: ignore[arg-type]


async def test_a_session_token_of_a_non_dict_is_malformed(service: EncryptionService) -> None:
    await service.encrypt_session_data({})
    token = service.keyring.encrypt_bytes(
        encode_value([1]), KeyType.SESSION, "s", purpose=Purpose.SESSION
    )
    with pytest.raises(DecryptionError, match="the decrypted session is not a dict"):
        await service.decrypt_session_data(token, context="s")


async def test_cache_arguments_are_checked(service: EncryptionService) -> None:
    with pytest.raises(TypeError, match="cache_key must be str"):
        await service.encrypt_cache_data(1, "v")  # type: ignore[arg-type]
    for ttl in (0, -1, True, "60"):
        with pytest.raises(ValueError, match="ttl must be a positive number"):
            await service.encrypt_cache_data("k", "v", ttl=ttl)  # type: ignore[arg-type]


async def test_a_large_cache_value_is_sealed_in_a_thread(service: EncryptionService) -> None:
    value = os.urandom(BIG)
    before = service.counters["threaded_operations"]
    key, sealed = await service.encrypt_cache_data("k", value, ttl=None)
    assert service.counters["threaded_operations"] == before + 1
    assert await service.decrypt_cache_data(key, sealed) == ("k", value)


async def test_a_cache_value_without_its_expiry_is_malformed(service: EncryptionService) -> None:
    key, _ = await service.encrypt_cache_data("k", "v")
    from aiocrypt._service import _cache_value_context

    bare = service.keyring.encrypt_bytes(
        encode_value(5), KeyType.CACHE, _cache_value_context("k"), purpose=Purpose.CACHE
    )
    with pytest.raises(DecryptionError) as info:
        await service.decrypt_cache_data(key, bare)
    assert info.value.reason is DecryptionFailure.MALFORMED
    assert not isinstance(info.value, CacheEntryExpiredError)


async def test_a_cache_key_that_is_not_text_is_malformed(service: EncryptionService) -> None:
    _, sealed = await service.encrypt_cache_data("k", "v")
    from aiocrypt._service import _CACHE_KEY_CONTEXT

    not_text = service.keyring.encrypt_bytes(
        encode_value(5), KeyType.CACHE, _CACHE_KEY_CONTEXT, purpose=Purpose.CACHE
    )
    with pytest.raises(DecryptionError) as info:
        await service.decrypt_cache_data(not_text, sealed)
    assert info.value.reason is DecryptionFailure.MALFORMED


# -- bulk data and streams ----------------------------------------------------------


async def test_bulk_arguments_are_checked(
    service: EncryptionService, compressing: EncryptionService
) -> None:
    with pytest.raises(ValueError, match="size must be >= 0"):
        service.bulk_output_size(-1)
    with pytest.raises(TypeError, match="bulk data must be bytes-like, not str"):
        await service.encrypt_bulk_data("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out= cannot take compressed bulk data"):
        await compressing.encrypt_bulk_data(b"x", PII, out=bytearray(64))
    with pytest.raises(TypeError, match="expected EncryptedData"):
        await service.decrypt_bulk_data(123, key_type=PII)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key_type is required"):
        await service.decrypt_bulk_data(b"", key_type=None)  # type: ignore[arg-type]
    compressed = await compressing.encrypt_bulk_data(b"abc" * 100, PII)
    with pytest.raises(ValueError, match="its size is known only once decompressed"):
        await compressing.decrypt_bulk_data(compressed, key_type=PII, out=bytearray(400))


async def test_bulk_data_of_another_key_type_is_refused_and_counted(
    service: EncryptionService,
) -> None:
    blob = (await service.encrypt_bulk_data(b"ledger", KeyType.FINANCIAL_DATA)).to_bytes()
    with pytest.raises(DecryptionError) as info:
        await service.decrypt_bulk_data(blob, key_type=PII)
    assert info.value.reason is DecryptionFailure.WRONG_KEY_TYPE
    assert service.counters["decrypt_failures"] == 1


async def test_small_bulk_data_into_out_buffers(service: EncryptionService) -> None:
    data = b"a small report"
    out = bytearray(service.bulk_output_size(len(data)))
    encrypted = await service.encrypt_bulk_data(data, PII, out=out)
    view = encrypted.encrypted_data
    assert isinstance(view, memoryview) and view.readonly and view.obj is out
    assert bytes(view) == bytes(out[: len(data)]) and bytes(out[len(data) :]) == encrypted.tag
    plain = bytearray(len(data))
    result = await service.decrypt_bulk_data(encrypted.to_bytes(), key_type=PII, out=plain)
    assert isinstance(result, memoryview) and result.readonly
    assert bytes(result) == bytes(plain) == data


async def test_a_failed_segmented_decrypt_zeroes_out(service: EncryptionService) -> None:
    data = os.urandom(3 * BIG)
    blob = bytearray((await service.encrypt_bulk_data(data, PII)).to_bytes())
    blob[-1] ^= 1
    out = bytearray(b"\xaa" * len(data))
    with pytest.raises(DecryptionError):
        await service.decrypt_bulk_data(bytes(blob), key_type=PII, out=out)
    assert out == bytes(len(data))


async def test_segments_over_the_inline_limit_run_in_thread_hops() -> None:
    service = EncryptionService(make_key_manager(), parallel_bulk=False)
    async with service:
        segment = 5 * 1024 * 1024  # over INLINE_SEGMENT_LIMIT: never sealed inline
        data = os.urandom(2 * segment + 1)
        parts = [p async for p in service.encrypt_stream([data], PII, segment_size=segment)]
        before = service.counters["threaded_operations"]
        result = await service.decrypt_bulk_data(b"".join(parts), key_type=PII)
        assert bytes(result) == data
        assert service.counters["threaded_operations"] - before >= 2


async def test_bulk_data_that_does_not_decompress_is_malformed(
    service: EncryptionService,
) -> None:
    await service.encrypt_field("x", PII)
    dk = service.keyring.active(PII)
    forged = encrypt_bulk(dk, b"not zstd at all", b"", flags=FLAG_ZSTD)
    with pytest.raises(DecryptionError, match="does not decompress") as info:
        await service.decrypt_bulk_data(forged, key_type=PII)
    assert info.value.reason is DecryptionFailure.MALFORMED


async def test_bulk_and_stream_reads_start_the_service() -> None:
    manager = make_key_manager()
    async with EncryptionService(manager) as writer:
        blob = (await writer.encrypt_bulk_data(b"data", PII)).to_bytes()
        stream = b"".join([p async for p in writer.encrypt_stream([b"chunk"], PII)])
    reader = EncryptionService(manager)
    assert await reader.decrypt_bulk_data(blob, key_type=PII) == b"data"
    await reader.close()
    reader = EncryptionService(manager)
    assert b"".join([p async for p in reader.decrypt_stream([stream], key_type=PII)]) == b"chunk"
    assert reader.started
    await reader.close()


# -- statistics -----------------------------------------------------------------


async def test_stats_before_start_and_when_the_kms_is_down() -> None:
    service = make_service()
    stats = await service.get_encryption_stats()
    assert stats["encryption_service"] == "not_started"
    assert "key_store_reachable" not in stats
    async with service:
        service.key_manager.kek.deny()  # type: ignore[attr-defined]
        stats = await service.get_encryption_stats()
        assert stats["encryption_service"] == "degraded"
        assert stats["kek_provider_reachable"] is False
    assert (await service.get_encryption_stats())["encryption_service"] == "closed"
