"""Frozen wire-format vectors: a change that breaks old ciphertext fails here.

Version 1 vectors (fields.json, blobs.json) are opened through aiocrypt and
checked against an independent implementation of the spec; version 2 vectors
(*_v2.json) are also re-created byte for byte from their recorded randomness.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import struct
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from aiocrypt import DecryptionError, EncryptedData, Keyring, Purpose, _compression
from aiocrypt._bulk import StreamEncryptor, decrypt_bulk, split_segments
from aiocrypt._codec import decode_value, encode_value
from aiocrypt._crypto import DataKey
from aiocrypt._keys import EncryptionKey
from aiocrypt._streams import open_stream
from aiocrypt.kek.local import LocalKekProvider

VECTORS = Path(__file__).parent / "vectors"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def load(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((VECTORS / f"{name}.json").read_text())
    return data


def vectors(name: str) -> pytest.MarkDecorator:
    cases = load(name)
    return pytest.mark.parametrize("vector", cases, ids=[f"{name}-{i}" for i in range(len(cases))])


def data_key(vector: dict[str, Any]) -> DataKey:
    key = EncryptionKey(
        key_id=vector["key_id"],
        key_type=vector["key_type"],
        version=1,
        status="active",  # type: ignore[arg-type]  # coerced to KeyStatus
        created_at=T0,
        expires_at=T0 + dt.timedelta(days=1),
    )
    return DataKey(key, bytes.fromhex(vector["dek"]))


_VALUE_TYPES: dict[str, Callable[[Any], Any]] = {  # from the JSON value
    "bytes": bytes.fromhex,
    "float": float,
    "decimal": Decimal,
    "date": dt.date.fromisoformat,
    "datetime": dt.datetime.fromisoformat,
    "uuid": uuid.UUID,
}


@vectors("codec")
def test_codec_vectors(vector: dict[str, Any]) -> None:
    value = _VALUE_TYPES.get(vector["type"], lambda v: v)(vector["value"])
    assert encode_value(value).hex() == vector["encoded"]
    decoded = decode_value(bytes.fromhex(vector["encoded"]))
    assert decoded == value and type(decoded) is type(value)


# -- an independent implementation of the spec (docs/format.md), for both versions --


def spec_aad(
    vector: dict[str, Any], version: int, algorithm: int, stream_params: bytes = b""
) -> bytes:
    """The associated data as docs/format.md defines it, built without aiocrypt."""
    kid, kt = vector["key_id"].encode(), vector["key_type"].encode()
    header = bytes((version, algorithm, vector.get("flags") or 0, len(kid))) + kid
    purpose = b"" if version == 1 else bytes((_PURPOSE_BYTES[vector["purpose"]],))
    aad: bytes = (
        header + purpose + bytes((len(kt),)) + kt + stream_params + vector["context"].encode()
    )
    return aad


_PURPOSE_BYTES = {"field": 1, "blob": 2, "stream": 3, "session": 4, "cache": 5}
_PURPOSES = {name: Purpose(value) for name, value in _PURPOSE_BYTES.items()}


def spec_open_text(vector: dict[str, Any], version: int) -> bytes:
    token: str = vector["token"]
    assert token.startswith(f"ac{version}.{vector['key_id']}.")
    raw = base64.urlsafe_b64decode(token.split(".", 2)[2])
    dek = bytes.fromhex(vector["dek"])
    if raw[0] == 1:
        aad = spec_aad(vector, version, 1)
        return AESGCM(dek).decrypt(raw[2:14], raw[14:], aad)
    siv_key = HKDF(hashes.SHA256(), 64, None, b"aiocrypt/v1/aes-siv").derive(dek)
    return AESSIV(siv_key).decrypt(raw[2:], [spec_aad(vector, version, 2)])


def spec_seal_stream(vector: dict[str, Any], version: int) -> bytes:
    """A whole stream blob from the spec: header, preamble, segments."""
    dek, plaintext = bytes.fromhex(vector["dek"]), bytes.fromhex(vector["plaintext"])
    size, randomness = vector["segment_size"], bytes.fromhex(vector["random"])
    salt, prefix = randomness[:16], randomness[16:]
    params = struct.pack(">I", size) + salt + prefix
    aad = spec_aad(vector, version, 3, params if version == 2 else b"")
    cipher = AESGCM(HKDF(hashes.SHA256(), 32, salt, b"aiocrypt/v1/stream").derive(dek))
    kid = vector["key_id"].encode()
    out = [bytes((version, 3, 0, len(kid))) + kid + params]
    pieces = [plaintext[i : i + size] for i in range(0, len(plaintext), size)] or [b""]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        out.append(cipher.encrypt(prefix + struct.pack(">IB", i, last), piece, aad))
    return b"".join(out)


# -- format version 1: frozen, opened by aiocrypt, never written any more -------


@vectors("fields")
def test_v1_field_vectors_open(vector: dict[str, Any]) -> None:
    dk = data_key(vector)
    keyring = Keyring([dk])
    context = vector["context"]
    plaintext = bytes.fromhex(vector["plaintext"])
    assert spec_open_text({**vector, "purpose": "field"}, 1) == plaintext
    opened = keyring.decrypt_bytes(vector["token"], vector["key_type"], context)
    if vector["flags"]:
        assert opened == encode_value("note " * 20)
        assert keyring.decrypt(vector["token"], vector["key_type"], context) == "note " * 20
    else:
        assert opened == plaintext
    # version 1 binds no purpose: what the migration window leaves open, and closes
    assert (
        keyring.decrypt_bytes(vector["token"], vector["key_type"], context, purpose=Purpose.SESSION)
        == opened
    )
    refusing = Keyring([data_key(vector)], accept_format_v1=False)
    with pytest.raises(DecryptionError):
        refusing.decrypt_bytes(vector["token"], vector["key_type"], context)


@vectors("blobs")
def test_v1_blob_vectors_open(vector: dict[str, Any]) -> None:
    dk = data_key(vector)
    blob = bytes.fromhex(vector["blob"])
    encrypted = EncryptedData.from_bytes(blob)
    assert encrypted.format_version == 1
    assert encrypted.to_bytes() == blob
    assert encrypted.algorithm == vector["algorithm"]
    plaintext = bytes.fromhex(vector["plaintext"])
    assert decrypt_bulk(dk, encrypted, vector["context"].encode()) == plaintext
    if vector["segment_size"]:
        assert spec_seal_stream(vector, 1) == blob
        assert asyncio.run(_open_stream(dk, blob, vector["context"])) == plaintext
    else:
        nonce = bytes.fromhex(vector["random"])
        sealed = AESGCM(bytes.fromhex(vector["dek"])).encrypt(
            nonce, plaintext, spec_aad(vector, 1, 1)
        )
        assert blob.endswith(nonce + sealed)


# -- format version 2 -------------------------------------------------------------


@vectors("fields_v2")
def test_v2_field_vectors(vector: dict[str, Any]) -> None:
    dk = data_key(vector)
    keyring = Keyring([dk])
    context = vector["context"]
    purpose = _PURPOSES[vector["purpose"]]
    plaintext = bytes.fromhex(vector["plaintext"])
    if vector["algorithm"] == "AES_256_GCM":
        again = dk.seal_text(
            plaintext,
            context.encode(),
            vector["flags"],
            bytes.fromhex(vector["nonce"]),
            purpose=purpose,
        )
    else:
        again = dk.seal_deterministic(plaintext, context.encode(), purpose=purpose)
    assert again == vector["token"]
    assert spec_open_text(vector, 2) == plaintext
    opened = keyring.decrypt_bytes(vector["token"], vector["key_type"], context, purpose=purpose)
    expected = _compression.decompress(plaintext) if vector["flags"] else plaintext
    assert opened == expected
    assert keyring.decrypt(
        vector["token"], vector["key_type"], context, purpose=purpose
    ) == decode_value(expected)
    for other in Purpose:  # bound to its purpose: no other opens it
        if other is not purpose:
            with pytest.raises(DecryptionError):
                keyring.decrypt_bytes(vector["token"], vector["key_type"], context, purpose=other)
    # relabelled as version 1, it does not open either
    with pytest.raises(DecryptionError):
        keyring.decrypt_bytes(
            "ac1." + vector["token"][4:], vector["key_type"], context, purpose=purpose
        )


@vectors("blobs_v2")
def test_v2_blob_vectors(vector: dict[str, Any]) -> None:
    dk = data_key(vector)
    blob = bytes.fromhex(vector["blob"])
    encrypted = EncryptedData.from_bytes(blob)
    assert encrypted.format_version == 2 and encrypted.to_bytes() == blob
    plaintext = bytes.fromhex(vector["plaintext"])
    nonce, sealed = dk.gcm_parts(
        plaintext, vector["context"].encode(), vector["flags"], bytes.fromhex(vector["random"])
    )
    assert blob.endswith(nonce + sealed)
    assert (
        AESGCM(bytes.fromhex(vector["dek"])).decrypt(nonce, sealed, spec_aad(vector, 2, 1))
        == plaintext
    )
    assert decrypt_bulk(dk, encrypted, vector["context"].encode()) == plaintext


@vectors("streams_v2")
def test_v2_stream_vectors(vector: dict[str, Any]) -> None:
    dk = data_key(vector)
    blob = bytes.fromhex(vector["blob"])
    plaintext = bytes.fromhex(vector["plaintext"])
    randomness = bytes.fromhex(vector["random"])
    parts = iter([randomness[:16], randomness[16:]])
    enc = StreamEncryptor(
        dk, vector["context"].encode(), vector["segment_size"], random=lambda n: next(parts)
    )
    body = b"".join(
        enc.seal(c, last)
        for c, last in split_segments(memoryview(plaintext), vector["segment_size"])
    )
    assert enc.preamble + body == blob
    assert spec_seal_stream(vector, 2) == blob
    encrypted = EncryptedData.from_bytes(blob)
    assert encrypted.format_version == 2 and encrypted.to_bytes() == blob
    assert bytes(decrypt_bulk(dk, encrypted, vector["context"].encode())) == plaintext
    assert asyncio.run(_open_stream(dk, blob, vector["context"])) == plaintext


async def _open_stream(dk: DataKey, blob: bytes, context: str) -> bytes:
    async def find_key(key_id: str) -> DataKey:
        assert key_id == dk.key_id
        return dk

    async def run(func: Any, *args: Any) -> Any:
        return func(*args)

    chunks = [blob[i : i + 500] for i in range(0, len(blob), 500)]
    return b"".join(
        [part async for part in open_stream(chunks, find_key, context.encode(), run, 1 << 20)]
    )


@vectors("local_kek")
async def test_local_kek_vectors(vector: dict[str, Any]) -> None:
    kek = LocalKekProvider(bytes.fromhex(vector["master_key"]))
    assert kek.kek_id == vector["kek_id"]
    wrapped = kek.wrap_sync(
        bytes.fromhex(vector["plaintext"]), vector["context"], nonce=bytes.fromhex(vector["nonce"])
    )
    assert wrapped.hex() == vector["wrapped"]
    assert await kek.unwrap(bytes.fromhex(vector["wrapped"]), vector["context"]) == bytes.fromhex(
        vector["plaintext"]
    )


def test_sql_helpers_select_tokens_by_key_id() -> None:
    import sqlite3

    from aiocrypt._format import like_pattern, text_prefix, token_sql

    for name, version in [("fields", 1), ("fields_v2", 2)]:
        vector = load(name)[0]
        token, key_id = vector["token"], vector["key_id"]
        assert token.startswith(text_prefix(key_id, version))
        assert token[5 - 1 :].startswith(key_id)  # the key id at the same offset in both
        # "_" is a LIKE wildcard: the pattern escapes it, so a look-alike id does not match
        look_alike = token.replace("financial_data", "financialXdata", 1)
        with sqlite3.connect(":memory:") as conn:
            conn.execute("CREATE TABLE t (v TEXT)")
            conn.executemany("INSERT INTO t VALUES (?)", [(token,), (look_alike,)])
            rows = conn.execute(
                "SELECT v FROM t WHERE v LIKE ? ESCAPE '\\'", (like_pattern(key_id, version),)
            ).fetchall()
            assert rows == [(token,)]
            assert conn.execute(f"SELECT count(*) FROM t WHERE {token_sql('v')}").fetchone() == (2,)


def test_deterministic_lookups_match_v1_rows_while_v1_is_read() -> None:
    """A deterministic column's ``==`` matches the frozen v1 token of a value (rows not yet
    migrated) as well as its v2 token, and only the v2 one once v1 is refused."""
    from aiocrypt.integrations.sqlalchemy import EncryptedString

    vector = next(v for v in load("fields") if v["algorithm"] == "AES_256_SIV")
    column = EncryptedString(vector["key_type"], deterministic=True, context=vector["context"])
    value = decode_value(bytes.fromhex(vector["plaintext"]))
    reading_v1 = column.tokens_for(value, Keyring([data_key(vector)]))
    assert len(reading_v1) == 2 and reading_v1[1] == vector["token"]
    assert reading_v1[0].startswith("ac2.")
    refusing = column.tokens_for(value, Keyring([data_key(vector)], accept_format_v1=False))
    assert refusing == reading_v1[:1]
