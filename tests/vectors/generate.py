"""Regenerate tests/vectors/*.json. Run ONLY for a deliberate new format version.

The vectors freeze wire format v1: tests/test_vectors.py decrypts every one and
re-encrypts with the recorded nonce, expecting the identical token. These keys
are fixed test keys, published here on purpose; never use them for data.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiocrypt._bulk import StreamEncryptor, encrypt_bulk, split_segments
from aiocrypt._codec import encode_value
from aiocrypt._compression import compress
from aiocrypt._crypto import DataKey
from aiocrypt._keys import EncryptionKey
from aiocrypt.kek.local import LocalKekProvider

HERE = Path(__file__).parent
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

CODEC_CASES: list[tuple[str, Any, Any]] = [
    ("none", None, None),
    ("str", "123-45-6789", "123-45-6789"),
    ("str", "", ""),
    ("str", "zürich ✓", "zürich ✓"),
    ("bytes", "00ff10", bytes.fromhex("00ff10")),
    ("int", 0, 0),
    ("int", -129, -129),
    ("int", 2**80, 2**80),
    ("float", 75000.0, 75000.0),
    ("float", "-0.0", -0.0),
    ("decimal", "125000.50", Decimal("125000.50")),
    ("bool", True, True),
    ("bool", False, False),
    ("date", "2026-11-28", dt.date(2026, 11, 28)),
    ("datetime", "2026-11-28T23:59:59.123456+01:00",
     dt.datetime(2026, 11, 28, 23, 59, 59, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))),
    ("uuid", "12345678-1234-5678-1234-567812345678",
     uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("json", {"user_id": 1, "roles": ["customer"], "mfa": True},
     {"user_id": 1, "roles": ["customer"], "mfa": True}),
    ("json", [1, "a", None, [2.5]], [1, "a", None, [2.5]]),
]


def key(key_id: str, key_type: str) -> EncryptionKey:
    return EncryptionKey(key_id=key_id, key_type=key_type, version=1, status="active",
                         created_at=T0, expires_at=T0 + dt.timedelta(days=365))


def main() -> None:
    codec = [{"type": t, "value": v, "encoded": encode_value(pv).hex()}
             for t, v, pv in CODEC_CASES]
    dek = bytes(range(32))
    dk = DataKey(key("financial_data-v1-0a1b2c3d", "financial_data"), dek)
    pii = DataKey(key("pii-v7-ffffffff", "pii"), bytes(range(32, 64)))
    nonce = bytes(range(100, 112))
    fields = []
    for data_key, plaintext, context, flags in [
        (dk, encode_value(75000.0), "users.monthly_income", 0),
        (dk, encode_value("x" * 100), "", 0),
        (pii, encode_value("123-45-6789"), "users.ssn#id=42", 0),
        (pii, compress(encode_value("note " * 20), 3), "users.notes", 1),
    ]:
        fields.append({
            "algorithm": "AES_256_GCM", "key_id": data_key.key_id,
            "key_type": data_key.key.key_type.value,
            "dek": (dek if data_key is dk else bytes(range(32, 64))).hex(),
            "context": context, "flags": flags, "nonce": nonce.hex(),
            "plaintext": plaintext.hex(),
            "token": data_key.seal_text(plaintext, context.encode(), flags, nonce),
        })
    fields.append({
        "algorithm": "AES_256_SIV", "key_id": dk.key_id, "key_type": "financial_data",
        "dek": dek.hex(), "context": "cache", "flags": 0, "nonce": None,
        "plaintext": encode_value("report:2026").hex(),
        "token": dk.seal_deterministic(encode_value("report:2026"), b"cache"),
    })
    blobs = []
    payload = bytes(i % 251 for i in range(2600))
    one_shot = encrypt_bulk(dk, payload, b"exports.q3")
    # deterministic re-creation: seal with a fixed nonce
    nonce_b, sealed = dk.gcm_parts(payload, b"exports.q3", 0, nonce)
    blobs.append({"algorithm": "AES_256_GCM", "dek": dek.hex(), "key_id": dk.key_id,
                  "key_type": "financial_data", "context": "exports.q3",
                  "segment_size": None, "random": nonce.hex(), "plaintext": payload.hex(),
                  "blob": (one_shot.header.to_bytes() + nonce_b + sealed).hex()})
    stream_random = iter([bytes(range(16)), bytes(range(16, 23))])
    enc = StreamEncryptor(dk, b"exports.q3", 1024, random=lambda n: next(stream_random))
    body = b"".join(enc.seal(c, last) for c, last in split_segments(memoryview(payload), 1024))
    blobs.append({"algorithm": "AES_256_GCM_STREAM", "dek": dek.hex(), "key_id": dk.key_id,
                  "key_type": "financial_data", "context": "exports.q3", "segment_size": 1024,
                  "random": (bytes(range(16)) + bytes(range(16, 23))).hex(),
                  "plaintext": payload.hex(), "blob": (enc.preamble + body).hex()})
    kek = LocalKekProvider(bytes(range(200, 232)))
    wraps = [{"master_key": bytes(range(200, 232)).hex(), "kek_id": kek.kek_id,
              "context": {"aiocrypt_key_id": dk.key_id, "aiocrypt_key_type": "financial_data"},
              "nonce": nonce.hex(), "plaintext": dek.hex(),
              "wrapped": kek.wrap_sync(dek, {"aiocrypt_key_id": dk.key_id,
                                            "aiocrypt_key_type": "financial_data"},
                                       nonce=nonce).hex()}]
    for name, data in [("codec", codec), ("fields", fields), ("blobs", blobs),
                       ("local_kek", wraps)]:
        (HERE / f"{name}.json").write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
