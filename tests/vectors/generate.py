"""Write the format version 2 vectors (tests/vectors/*_v2.json). Never rewrites v1 files.

fields.json, blobs.json, codec.json and local_kek.json froze format version 1
(written by this script as it stood at commit e543e0e; ``git show
e543e0e:tests/vectors/generate.py``). aiocrypt no longer writes version 1, so
they are never regenerated: tests/test_vectors.py opens them through aiocrypt
and checks them against an independent implementation of the spec.

fields_v2.json, blobs_v2.json and streams_v2.json freeze version 2: the test
decrypts every one and re-encrypts with the recorded nonce or randomness,
expecting the identical token. Run this ONLY for a deliberate new format version
(and then write new files). These keys are fixed test keys, published here on
purpose; never use them for data.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from aiocrypt._bulk import StreamEncryptor, split_segments
from aiocrypt._codec import encode_value
from aiocrypt._compression import compress
from aiocrypt._crypto import DataKey
from aiocrypt._format import ALG_AES_256_GCM, Header, Purpose
from aiocrypt._keys import EncryptionKey

HERE = Path(__file__).parent
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NONCE = bytes(range(100, 112))
SALT, PREFIX = bytes(range(16)), bytes(range(16, 23))
PAYLOAD = bytes(i % 251 for i in range(2600))


def key(key_id: str, key_type: str) -> EncryptionKey:
    return EncryptionKey(
        key_id=key_id,
        key_type=key_type,  # type: ignore[arg-type]  # coerced to KeyType
        version=1,
        status="active",  # type: ignore[arg-type]  # coerced to KeyStatus
        created_at=T0,
        expires_at=T0 + dt.timedelta(days=365),
    )


DEKS = {
    "financial_data": bytes(range(32)),
    "pii": bytes(range(32, 64)),
    "session": bytes(range(64, 96)),
    "cache": bytes(range(96, 128)),
}
KEYS = {
    "financial_data": "financial_data-v1-0a1b2c3d",
    "pii": "pii-v7-ffffffff",
    "session": "session-v2-12345678",
    "cache": "cache-v1-cafe0001",
}


def data_key(key_type: str) -> DataKey:
    return DataKey(key(KEYS[key_type], key_type), DEKS[key_type])


def fields() -> list[dict[str, Any]]:
    out = []
    for key_type, purpose, plaintext, context, flags in [
        ("financial_data", Purpose.FIELD, encode_value(75000.0), "users.monthly_income", 0),
        ("financial_data", Purpose.FIELD, encode_value("x" * 100), "", 0),
        ("pii", Purpose.FIELD, encode_value("123-45-6789"), "users.ssn#id=42", 0),
        ("pii", Purpose.FIELD, compress(encode_value("note " * 20), 3), "users.notes", 1),
        (
            "session",
            Purpose.SESSION,
            encode_value({"user_id": 1, "roles": ["customer"]}),
            "aiocrypt/session:abc",
            0,
        ),
        ("cache", Purpose.CACHE, encode_value([0, "report"]), "aiocrypt/cache-value:1", 0),
    ]:
        dk = data_key(key_type)
        out.append(
            {
                "algorithm": "AES_256_GCM",
                "purpose": purpose.name.lower(),
                "key_id": dk.key_id,
                "key_type": key_type,
                "dek": DEKS[key_type].hex(),
                "context": context,
                "flags": flags,
                "nonce": NONCE.hex(),
                "plaintext": plaintext.hex(),
                "token": dk.seal_text(plaintext, context.encode(), flags, NONCE, purpose=purpose),
            }
        )
    for key_type, purpose, value, context in [
        ("financial_data", Purpose.FIELD, "report:2026", "cache"),
        ("cache", Purpose.CACHE, "user:42", "aiocrypt/cache-key"),
    ]:
        dk = data_key(key_type)
        plaintext = encode_value(value)
        out.append(
            {
                "algorithm": "AES_256_SIV",
                "purpose": purpose.name.lower(),
                "key_id": dk.key_id,
                "key_type": key_type,
                "dek": DEKS[key_type].hex(),
                "context": context,
                "flags": 0,
                "nonce": None,
                "plaintext": plaintext.hex(),
                "token": dk.seal_deterministic(plaintext, context.encode(), purpose=purpose),
            }
        )
    return out


def blobs() -> list[dict[str, Any]]:
    out = []
    for payload, flags in [(PAYLOAD, 0), (compress(b"row,amount\n" * 200, 3), 1)]:
        dk = data_key("financial_data")
        nonce, sealed = dk.gcm_parts(payload, b"exports.q3", flags, NONCE)
        header = Header(ALG_AES_256_GCM, flags, dk.key_id).to_bytes()  # version 2
        out.append(
            {
                "algorithm": "AES_256_GCM",
                "purpose": "blob",
                "dek": DEKS["financial_data"].hex(),
                "key_id": dk.key_id,
                "key_type": "financial_data",
                "context": "exports.q3",
                "flags": flags,
                "random": nonce.hex(),
                "plaintext": payload.hex(),
                "blob": (header + nonce + sealed).hex(),
            }
        )
    return out


def streams() -> list[dict[str, Any]]:
    out = []
    for payload, segment_size in [(PAYLOAD, 1024), (PAYLOAD[:700], 1024), (b"", 2048)]:
        dk = data_key("pii")
        randomness = iter([SALT, PREFIX])
        enc = StreamEncryptor(
            dk,
            b"exports/q3.csv",
            segment_size,
            random=lambda n, r=randomness: next(r),  # type: ignore[misc]  # r: a default
        )
        body = b"".join(
            enc.seal(chunk, last)
            for chunk, last in split_segments(memoryview(payload), segment_size)
        )
        out.append(
            {
                "algorithm": "AES_256_GCM_STREAM",
                "purpose": "stream",
                "dek": DEKS["pii"].hex(),
                "key_id": dk.key_id,
                "key_type": "pii",
                "context": "exports/q3.csv",
                "flags": 0,
                "segment_size": segment_size,
                "random": (SALT + PREFIX).hex(),
                "plaintext": payload.hex(),
                "blob": (enc.preamble + body).hex(),
            }
        )
    return out


def main() -> None:
    for name, data in [("fields_v2", fields()), ("blobs_v2", blobs()), ("streams_v2", streams())]:
        (HERE / f"{name}.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
