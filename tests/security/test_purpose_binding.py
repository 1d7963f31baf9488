"""Format version 2 binds what a ciphertext is for (issue 14, items 7 and 9).

The attacker writes the database, Redis and uploaded files, and holds no key:
they can take any ciphertext the application made and present it somewhere
else. Each test mounts one such move through the public API and shows it
refused: a field token turned into a bulk blob or a stream, a blob turned into
a field token, a session payload read as a field (and back), a stream whose
header's segment size was rewritten, a field token that inflates past what a
field can be. Version 1 data keeps opening until ``accept_format_v1=False``,
and the re-encryption engine moves it to version 2 on real Postgres.
"""

from __future__ import annotations

import base64
import os
import struct
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterable

import asyncpg
import pytest

from aiocrypt import (
    DecryptionError,
    EncryptedData,
    EncryptionService,
    KeyType,
    Purpose,
    ReencryptionEngine,
)
from aiocrypt._compression import compress
from aiocrypt._crypto import DataKey, stream_nonce
from aiocrypt._format import (
    ALG_AES_256_GCM,
    ALG_AES_256_GCM_STREAM,
    FLAG_ZSTD,
    MAX_FIELD_PLAINTEXT,
)
from aiocrypt.reencrypt import AsyncpgDatabase, ColumnSpec, TableSpec
from aiocrypt.testing import make_key_manager, make_service


async def collect(parts: AsyncIterator[bytes]) -> bytes:
    return b"".join([part async for part in parts])


def token_to_blob(token: str) -> bytes:
    """A text token's bytes in the binary form (same header fields, version 2)."""
    _, key_id, body = token.split(".", 2)
    raw = base64.urlsafe_b64decode(body)
    kid = key_id.encode()
    return bytes((2, raw[0], raw[1], len(kid))) + kid + raw[2:]


def blob_to_token(blob: bytes) -> str:
    """A binary blob's bytes in the text form ("ac2." + key id + base64url(...))."""
    n = blob[3]
    body = bytes(blob[1:3]) + blob[4 + n :]
    return f"ac2.{blob[4 : 4 + n].decode()}.{base64.urlsafe_b64encode(body).decode()}"


def seal_v1_field(dk: DataKey, plaintext: bytes, context: str) -> str:
    """A format version 1 field token, as aiocrypt wrote them before version 2 (tests only:
    the library writes version 2 alone; tests/vectors/fields.json freezes version 1)."""
    nonce = os.urandom(12)
    aad = dk.aad(ALG_AES_256_GCM, 0, context.encode(), purpose=Purpose.FIELD, version=1)
    sealed = dk._gcm.encrypt(nonce, plaintext, aad)
    return dk.text_prefix_v1 + base64.urlsafe_b64encode(b"\x01\x00" + nonce + sealed).decode()


# -- item 7: a ciphertext opens only as what it was made for ---------------------


async def test_a_field_token_turned_into_a_blob_is_refused(service: EncryptionService) -> None:
    token = await service.encrypt_field("123-45-6789", KeyType.PII)  # the empty context
    blob = token_to_blob(token)
    assert EncryptedData.from_bytes(blob).algorithm == "AES_256_GCM"  # well formed
    with pytest.raises(DecryptionError):
        await service.decrypt_bulk_data(blob, key_type=KeyType.PII)
    with pytest.raises(DecryptionError):
        await collect(service.decrypt_stream([blob], key_type=KeyType.PII))
    assert await service.decrypt_field(token, KeyType.PII) == "123-45-6789"


async def test_an_uploaded_blob_turned_into_a_field_token_is_refused(
    service: EncryptionService,
) -> None:
    # bytes an attacker uploads through a bulk endpoint: a valid encoded str value
    encrypted = await service.encrypt_bulk_data(b"\x01attacker-chosen", KeyType.PII)
    token = blob_to_token(encrypted.to_bytes())
    with pytest.raises(DecryptionError):
        await service.decrypt_field(token, KeyType.PII)
    with pytest.raises(DecryptionError):
        service.keyring.decrypt(token, KeyType.PII)
    with pytest.raises(DecryptionError):
        await service.decrypt_many([token], KeyType.PII)
    assert (
        await service.decrypt_bulk_data(encrypted, key_type=KeyType.PII) == b"\x01attacker-chosen"
    )


async def test_session_and_cache_payloads_are_not_field_tokens(service: EncryptionService) -> None:
    session = await service.encrypt_session_data({"user_id": 1}, context="sid-1")
    with pytest.raises(DecryptionError):
        await service.decrypt_field(session, KeyType.SESSION, context="sid-1")
    field = await service.encrypt_field(
        {"user_id": 2, "admin": True}, KeyType.SESSION, context="sid-1"
    )
    with pytest.raises(DecryptionError):
        await service.decrypt_session_data(field, context="sid-1")
    assert await service.decrypt_session_data(session, context="sid-1") == {"user_id": 1}
    cache_key, cache_value = await service.encrypt_cache_data("report:1", {"n": 1})
    for token in (cache_key, cache_value):
        with pytest.raises(DecryptionError):
            await service.decrypt_field(token, KeyType.CACHE)
        with pytest.raises(DecryptionError):
            await service.decrypt_session_data(token)


async def test_bulk_data_and_streams_need_the_key_type(service: EncryptionService) -> None:
    encrypted = await service.encrypt_bulk_data(b"report", KeyType.PII)
    stream = await collect(service.encrypt_stream([b"report"], KeyType.PII))
    with pytest.raises(TypeError, match="key_type"):
        await service.decrypt_bulk_data(encrypted)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="key_type"):
        await service.decrypt_bulk_data(encrypted, key_type=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key_type"):
        await collect(service.decrypt_stream([stream], key_type=None))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key_type"):
        await collect(service.decrypt_stream([stream]))  # type: ignore[call-arg]
    with pytest.raises(DecryptionError):  # another key type's endpoint
        await service.decrypt_bulk_data(encrypted, key_type=KeyType.AUDIT_LOGS)
    assert await service.decrypt_bulk_data(encrypted, key_type="pii") == b"report"
    assert await collect(service.decrypt_stream([stream], key_type="pii")) == b"report"


# -- item 9: the stream preamble is authenticated, buffering bounded ---------------


def _with_segment_size(stream: bytes, size: int) -> bytes:
    offset = 4 + stream[3]
    return stream[:offset] + struct.pack(">I", size) + stream[offset + 4 :]


class CountingSource:
    """A source of chunks that counts what the reader pulled from it."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            self.pulled += len(chunk)
            yield chunk


async def test_rewriting_the_segment_size_gives_no_second_ciphertext(
    service: EncryptionService,
) -> None:
    """One stream, five rewritten segment sizes: version 1 accepted all five (its one
    segment is its last), version 2 refuses each at the first segment."""
    data = os.urandom(700)
    stream = await collect(
        service.encrypt_stream([data], KeyType.PII, context="up/1", segment_size=1024)
    )
    assert await collect(service.decrypt_stream([stream], key_type="pii", context="up/1")) == data
    for size in (2048, 4096, 65_536, 1024 * 1024, 4 * 1024 * 1024):
        forged = _with_segment_size(stream, size)
        source = CountingSource([forged[i : i + 256] for i in range(0, len(forged), 256)])
        with pytest.raises(DecryptionError):
            await collect(service.decrypt_stream(source, key_type="pii", context="up/1"))
        assert source.pulled <= len(forged)  # refused at the first (and only) segment
        with pytest.raises(DecryptionError):
            await service.decrypt_bulk_data(forged, key_type="pii", context="up/1")


def _endless(head: bytes, chunk: int = 64 * 1024) -> Iterable[bytes]:
    yield head
    filler = bytes(chunk)
    while True:
        yield filler


async def test_a_hostile_stream_cannot_make_the_reader_buffer_much(
    service: EncryptionService,
) -> None:
    stream = await collect(
        service.encrypt_stream([os.urandom(5000)], KeyType.PII, segment_size=1024)
    )
    preamble = stream[: 4 + stream[3] + 27]
    # a header declaring 64 MiB segments, then garbage forever: refused at the header
    source = CountingSource(_endless(_with_segment_size(preamble, 64 * 1024 * 1024)))
    tracemalloc.start()
    try:
        with pytest.raises(DecryptionError):
            await collect(service.decrypt_stream(source, key_type="pii"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert source.pulled <= len(preamble) + 64 * 1024
    assert peak < 2 * 1024 * 1024
    # the genuine header of 1 KiB segments, then garbage: refused after the first segment,
    # not after a batch of 4 MiB of them
    source = CountingSource(_endless(preamble, 1024))
    with pytest.raises(DecryptionError):
        await collect(service.decrypt_stream(source, key_type="pii"))
    assert source.pulled <= len(preamble) + 3 * 1024
    # a reader that allows larger segments says so, and is bounded by what it allows
    source = CountingSource(_endless(_with_segment_size(preamble, 8 * 1024 * 1024)))
    with pytest.raises(DecryptionError):
        await collect(
            service.decrypt_stream(source, key_type="pii", max_segment_size=8 * 1024 * 1024)
        )
    assert 8 * 1024 * 1024 <= source.pulled <= 8 * 1024 * 1024 + len(preamble) + 128 * 1024


# -- a compressed field inflates to no more than a field can hold -------------------


async def test_a_compression_bomb_field_token_is_refused(service: EncryptionService) -> None:
    dk = (await service._keyring(KeyType.PII)).active(KeyType.PII)
    bomb = compress(b"\x01" + bytes(MAX_FIELD_PLAINTEXT), 1)  # content size in its header
    assert len(bomb) < 64 * 1024
    token = dk.seal_text(bomb, b"notes", FLAG_ZSTD)  # as only a key holder could
    tracemalloc.start()
    try:
        with pytest.raises(DecryptionError):
            await service.decrypt_field(token, KeyType.PII, context="notes")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024
    # the largest value a field holds still inflates
    fits = dk.seal_text(compress(b"\x01" + bytes(1024 * 1024), 1), b"notes", FLAG_ZSTD)
    assert await service.decrypt_field(fits, KeyType.PII, context="notes") == "\x00" * 2**20
    with pytest.raises(ValueError, match="at most"):  # and none is written bigger
        service.keyring.encrypt_bytes(bytes(MAX_FIELD_PLAINTEXT + 1), KeyType.PII)


# -- version 1: still read, until the window is closed -------------------------------


async def test_v1_field_tokens_open_until_format_v1_is_refused() -> None:
    async with make_service() as service:
        dk = (await service._keyring(KeyType.PII)).active(KeyType.PII)
        old = seal_v1_field(dk, b"\x01old value", "users.note")
        assert old.startswith("ac1.")
        assert await service.decrypt_field(old, KeyType.PII, context="users.note") == "old value"
    refusing = EncryptionService(make_key_manager(), accept_format_v1=False)
    async with refusing:
        dk = (await refusing._keyring(KeyType.PII)).active(KeyType.PII)
        old = seal_v1_field(dk, b"\x01old value", "users.note")
        with pytest.raises(DecryptionError):
            await refusing.decrypt_field(old, KeyType.PII, context="users.note")
        with pytest.raises(DecryptionError):
            await refusing.decrypt_many([old], KeyType.PII, context="users.note")
        new = await refusing.encrypt_field("new value", KeyType.PII, context="users.note")
        assert await refusing.decrypt_field(new, KeyType.PII, context="users.note") == "new value"


def seal_v1_blob(dk: DataKey, plaintext: bytes, context: str) -> bytes:
    """A format version 1 one-shot blob, as written before version 2 (tests only)."""
    nonce = os.urandom(12)
    aad = dk.aad(ALG_AES_256_GCM, 0, context.encode(), purpose=Purpose.BLOB, version=1)
    kid = dk.key_id.encode()
    return (
        bytes((1, ALG_AES_256_GCM, 0, len(kid)))
        + kid
        + nonce
        + dk._gcm.encrypt(nonce, plaintext, aad)
    )


def seal_v1_stream(dk: DataKey, plaintext: bytes, context: str, segment_size: int) -> bytes:
    """A format version 1 stream (segment size not authenticated), tests only."""
    salt, prefix = os.urandom(16), os.urandom(7)
    cipher = dk.stream_cipher(salt)
    aad = dk.aad(ALG_AES_256_GCM_STREAM, 0, context.encode(), purpose=Purpose.STREAM, version=1)
    kid = dk.key_id.encode()
    out = [
        bytes((1, ALG_AES_256_GCM_STREAM, 0, len(kid)))
        + kid
        + struct.pack(">I", segment_size)
        + salt
        + prefix
    ]
    pieces = [plaintext[i : i + segment_size] for i in range(0, len(plaintext), segment_size)] or [
        b""
    ]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        out.append(cipher.encrypt(stream_nonce(prefix, i, last), piece, aad))
    return b"".join(out)


@pytest.mark.parametrize("accept", [True, False])
async def test_v1_blobs_and_streams_open_until_format_v1_is_refused(accept: bool) -> None:
    async with EncryptionService(make_key_manager(), accept_format_v1=accept) as service:
        dk = (await service._keyring(KeyType.PII)).active(KeyType.PII)
        blob = seal_v1_blob(dk, b"old export", "exports/1")
        stream = seal_v1_stream(dk, b"old stream" * 50, "exports/2", 1024)
        assert EncryptedData.from_bytes(blob).format_version == 1
        if accept:
            assert (
                await service.decrypt_bulk_data(blob, key_type="pii", context="exports/1")
                == b"old export"
            )
            assert (
                await collect(service.decrypt_stream([stream], key_type="pii", context="exports/2"))
                == b"old stream" * 50
            )
            # the window this leaves open: version 1 authenticates no segment size
            forged = _with_segment_size(stream, 4096)
            assert (
                await collect(service.decrypt_stream([forged], key_type="pii", context="exports/2"))
                == b"old stream" * 50
            )
            return
        with pytest.raises(DecryptionError):
            await service.decrypt_bulk_data(blob, key_type="pii", context="exports/1")
        with pytest.raises(DecryptionError):
            await collect(service.decrypt_stream([stream], key_type="pii", context="exports/2"))
        with pytest.raises(DecryptionError):
            await service.decrypt_bulk_data(stream, key_type="pii", context="exports/2")


# -- the re-encryption engine moves version 1 rows to version 2 (real Postgres) -----


@pytest.mark.services
async def test_reencryption_moves_v1_rows_to_v2(
    service: EncryptionService, postgres_dsn: str
) -> None:
    suffix = uuid.uuid4().hex[:8]
    table, checkpoints = f"v1rows_{suffix}", f"v1ckpt_{suffix}"
    keyring = await service.key_manager.ensure_active([KeyType.PII])
    active = keyring.active(KeyType.PII)
    old_key = await service.key_manager.rotate_key(KeyType.PII, force=True)
    del old_key
    current = service.key_manager.keyring.active(KeyType.PII)
    assert current.key_id != active.key_id
    # rows 1-3: v1 on the old key; 4-6: v1 on the current key; 7-9: v2 on the current key
    values: dict[int, str] = {i: f"ssn-{i:03d}" for i in range(1, 10)}
    ctx = f"{table}.ssn"
    rows: list[tuple[int, str]] = []
    for i, value in values.items():
        plaintext = b"\x01" + value.encode()
        if i <= 3:
            rows.append((i, seal_v1_field(active, plaintext, ctx)))
        elif i <= 6:
            rows.append((i, seal_v1_field(current, plaintext, ctx)))
        else:
            rows.append((i, await service.encrypt_field(value, KeyType.PII, context=ctx)))
    conn = await asyncpg.connect(postgres_dsn)
    database = AsyncpgDatabase(postgres_dsn, checkpoint_table=checkpoints)
    try:
        await conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, ssn text)")
        await conn.copy_records_to_table(table, records=rows)
        spec = TableSpec(table, "id", (ColumnSpec("ssn", KeyType.PII),))
        engine = ReencryptionEngine(service.key_manager, database, tables=[spec])
        census = await engine.census(table)
        assert census.counts["ssn"] == {active.key_id: 3, current.key_id: 6}
        assert census.v1_counts["ssn"] == 6 and census.v1_rows() == 6

        result = await engine.reencrypt(table)

        assert result.complete and result.run_rows_updated == 6  # v1 on the current key too
        stored = dict(await conn.fetch(f"SELECT id, ssn FROM {table}"))
        assert all(token.startswith(f"ac2.{current.key_id}.") for token in stored.values())
        for i in range(7, 10):
            assert stored[i] == rows[i - 1][1]  # version 2 rows were left alone
        for i, value in values.items():
            assert await service.decrypt_field(stored[i], KeyType.PII, context=ctx) == value
        census = await engine.census(table)
        assert census.counts["ssn"] == {current.key_id: 9} and census.v1_rows() == 0
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"DROP TABLE IF EXISTS {checkpoints}")
        await conn.close()
        await database.close()


async def test_the_config_closes_the_v1_window_for_sync_readers_too() -> None:
    """``ENCRYPTION_ACCEPT_FORMAT_V1=false`` reaches the keyring every sync reader uses."""
    from aiocrypt import EncryptionConfig

    config = EncryptionConfig.from_env({"ENCRYPTION_ACCEPT_FORMAT_V1": "false"})
    assert config.accept_format_v1 is False
    async with make_service(config) as service:
        dk = (await service._keyring(KeyType.PII)).active(KeyType.PII)
        old = seal_v1_field(dk, b"\x01old value", "users.note")
        with pytest.raises(DecryptionError):
            service.keyring.decrypt(old, KeyType.PII, "users.note")
        with pytest.raises(DecryptionError):
            await service.decrypt_field(old, KeyType.PII, context="users.note")
    async with make_service() as service:  # the default keeps the window open
        dk = (await service._keyring(KeyType.PII)).active(KeyType.PII)
        old = seal_v1_field(dk, b"\x01old value", "users.note")
        assert service.keyring.decrypt(old, KeyType.PII, "users.note") == "old value"
