"""Frozen wire-format vectors: a change that breaks old ciphertext fails here."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from aiocrypt import EncryptedData, Keyring
from aiocrypt._bulk import StreamEncryptor, decrypt_bulk, split_segments
from aiocrypt._codec import decode_value, encode_value
from aiocrypt._crypto import DataKey
from aiocrypt._keys import EncryptionKey
from aiocrypt.kek.local import LocalKekProvider

VECTORS = Path(__file__).parent / "vectors"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def load(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((VECTORS / f"{name}.json").read_text())
    return data


def vectors(name: str) -> Any:
    cases = load(name)
    return pytest.mark.parametrize("vector", cases, ids=[f"{name}-{i}" for i in range(len(cases))])


def data_key(vector: dict[str, Any]) -> DataKey:
    key = EncryptionKey(key_id=vector["key_id"], key_type=vector["key_type"], version=1,
                        status="active", created_at=T0, expires_at=T0 + dt.timedelta(days=1))
    return DataKey(key, bytes.fromhex(vector["dek"]))


_VALUE_TYPES = {
    "bytes": bytes.fromhex, "float": float, "decimal": Decimal,
    "date": dt.date.fromisoformat, "datetime": dt.datetime.fromisoformat, "uuid": uuid.UUID,
}


@vectors("codec")
def test_codec_vectors(vector: dict[str, Any]) -> None:
    value = _VALUE_TYPES.get(vector["type"], lambda v: v)(vector["value"])
    assert encode_value(value).hex() == vector["encoded"]
    decoded = decode_value(bytes.fromhex(vector["encoded"]))
    assert decoded == value and type(decoded) is type(value)


@vectors("fields")
def test_field_vectors(vector: dict[str, Any]) -> None:
    dk = data_key(vector)
    keyring = Keyring([dk])
    context = vector["context"]
    plaintext = bytes.fromhex(vector["plaintext"])
    if vector["algorithm"] == "AES_256_GCM":
        again = dk.seal_text(plaintext, context.encode(), vector["flags"],
                             bytes.fromhex(vector["nonce"]))
    else:
        again = dk.seal_deterministic(plaintext, context.encode())
    assert again == vector["token"]
    opened = keyring.decrypt_bytes(vector["token"], vector["key_type"], context)
    if vector["flags"]:
        assert opened == encode_value("note " * 20)
        assert keyring.decrypt(vector["token"], vector["key_type"], context) == "note " * 20
    else:
        assert opened == plaintext


@vectors("blobs")
def test_blob_vectors(vector: dict[str, Any]) -> None:
    dk = data_key(vector)
    blob = bytes.fromhex(vector["blob"])
    encrypted = EncryptedData.from_bytes(blob)
    assert encrypted.to_bytes() == blob
    assert encrypted.algorithm == vector["algorithm"]
    plaintext = bytes.fromhex(vector["plaintext"])
    assert decrypt_bulk(dk, encrypted, vector["context"].encode()) == plaintext
    if vector["segment_size"]:
        randomness = bytes.fromhex(vector["random"])
        parts = iter([randomness[:16], randomness[16:]])
        enc = StreamEncryptor(dk, vector["context"].encode(), vector["segment_size"],
                              random=lambda n: next(parts))
        body = b"".join(enc.seal(c, last) for c, last in
                        split_segments(memoryview(plaintext), vector["segment_size"]))
        assert enc.preamble + body == blob


@vectors("local_kek")
async def test_local_kek_vectors(vector: dict[str, Any]) -> None:
    kek = LocalKekProvider(bytes.fromhex(vector["master_key"]))
    assert kek.kek_id == vector["kek_id"]
    wrapped = kek.wrap_sync(bytes.fromhex(vector["plaintext"]), vector["context"],
                            nonce=bytes.fromhex(vector["nonce"]))
    assert wrapped.hex() == vector["wrapped"]
    assert await kek.unwrap(bytes.fromhex(vector["wrapped"]), vector["context"]) == \
        bytes.fromhex(vector["plaintext"])


def test_sql_helpers_select_tokens_by_key_id() -> None:
    import sqlite3

    from aiocrypt._format import like_pattern, text_prefix

    vector = load("fields")[0]
    token, key_id = vector["token"], vector["key_id"]
    assert token.startswith(text_prefix(key_id))
    # "_" is a LIKE wildcard: the pattern escapes it, so a look-alike id does not match
    look_alike = token.replace("financial_data", "financialXdata", 1)
    with sqlite3.connect(":memory:") as conn:
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.executemany("INSERT INTO t VALUES (?)", [(token,), (look_alike,)])
        rows = conn.execute("SELECT v FROM t WHERE v LIKE ? ESCAPE '\\'",
                            (like_pattern(key_id),)).fetchall()
    assert rows == [(token,)]
