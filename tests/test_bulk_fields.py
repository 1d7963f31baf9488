"""``EncryptedData`` rebuilt from the five fields the seed code keeps (issue 17).

The seed writes ``encrypted_data`` to a file and rebuilds
``EncryptedData(encrypted_data=..., key_id=..., algorithm=..., iv=..., tag=...)``.
That must decrypt for every frozen vector (version 1 and 2, one-shot and
stream, compressed or not), and what ``iv`` carries beyond a nonce (format
version, flags, segment size) must be authenticated: a rebuilt object whose
packed ``iv`` was edited never decrypts. tests/test_seed_examples.py runs the
seed's example itself.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from aiocrypt import DecryptionError, EncryptedData, KeyStatus
from aiocrypt._bulk import decrypt_bulk
from aiocrypt._crypto import DataKey
from aiocrypt._keys import EncryptionKey

VECTORS = Path(__file__).parent / "vectors"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
VECTOR_FILES = {
    name: json.loads((VECTORS / f"{name}.json").read_text())
    for name in ("blobs", "blobs_v2", "streams_v2")
}
CASES = [(name, vector) for name, cases in VECTOR_FILES.items() for vector in cases]
IDS = [f"{name}-{i}" for name, cases in VECTOR_FILES.items() for i in range(len(cases))]


def data_key(vector: dict[str, Any]) -> DataKey:
    key = EncryptionKey(
        key_id=vector["key_id"],
        key_type=vector["key_type"],
        version=1,
        status=KeyStatus.ACTIVE,
        created_at=T0,
        expires_at=T0 + dt.timedelta(days=1),
    )
    return DataKey(key, bytes.fromhex(vector["dek"]))


def five_fields(encrypted: EncryptedData, **changes: Any) -> EncryptedData:
    """What the seed does: keep five fields (the ciphertext through a file), rebuild."""
    fields = {
        "encrypted_data": bytes(encrypted.encrypted_data),
        "key_id": encrypted.key_id,
        "algorithm": encrypted.algorithm,
        "iv": bytes(encrypted.iv),
        "tag": bytes(encrypted.tag),
    }
    return EncryptedData(**{**fields, **changes})


@pytest.mark.parametrize("name, vector", CASES, ids=IDS)
def test_five_fields_rebuild_every_vector(name: str, vector: dict[str, Any]) -> None:
    blob = bytes.fromhex(vector["blob"])
    original = EncryptedData.from_bytes(blob)
    rebuilt = five_fields(original)
    assert rebuilt == original
    assert rebuilt.to_bytes() == blob  # the frozen bytes, unchanged
    assert rebuilt.format_version == blob[0]
    assert rebuilt.compressed == bool(vector.get("flags"))
    assert rebuilt.segment_size == vector.get("segment_size")
    plaintext = decrypt_bulk(data_key(vector), rebuilt, vector["context"].encode())
    assert bytes(plaintext) == bytes.fromhex(vector["plaintext"])


@pytest.mark.parametrize("name, vector", CASES, ids=IDS)
def test_bare_iv_with_explicit_fields_still_rebuilds(name: str, vector: dict[str, Any]) -> None:
    """The rebuild that existed before: the nonce (or salt || nonce prefix) as ``iv``,
    with ``segment_size``, ``compressed`` and ``format_version=1`` given beside it."""
    blob = bytes.fromhex(vector["blob"])
    original = EncryptedData.from_bytes(blob)
    body = blob[4 + blob[3] :]
    stream = original.algorithm == "AES_256_GCM_STREAM"
    bare_iv = body[4:27] if stream else body[:12]
    rebuilt = five_fields(
        original,
        iv=bare_iv,
        segment_size=original.segment_size,
        compressed=bool(vector.get("flags")),
        format_version=blob[0],
    )
    assert rebuilt == original and rebuilt.to_bytes() == blob
    assert bytes(
        decrypt_bulk(data_key(vector), rebuilt, vector["context"].encode())
    ) == bytes.fromhex(vector["plaintext"])


def test_the_iv_of_a_plain_one_shot_blob_stays_its_nonce() -> None:
    vector = json.loads((VECTORS / "blobs_v2.json").read_text())[0]
    assert vector["flags"] == 0
    encrypted = EncryptedData.from_bytes(bytes.fromhex(vector["blob"]))
    assert encrypted.iv == bytes.fromhex(vector["random"])


def _edits(iv: bytes) -> list[bytes]:
    """Edits of a packed iv's head: version, flags, and a version 2 stream's segment
    size (version 1 does not authenticate it: docs/format.md)."""
    edits = [bytes((1 if iv[0] == 2 else 2,)) + iv[1:], iv[:1] + bytes((iv[1] ^ 1,)) + iv[2:]]
    if len(iv) == 29 and iv[0] == 2:
        (size,) = struct.unpack_from(">I", iv, 2)
        for other in (size * 2, size + 1, 1024 if size != 1024 else 2048):
            edits.append(iv[:2] + struct.pack(">I", other) + iv[6:])
    return edits


@pytest.mark.parametrize("name, vector", CASES, ids=IDS)
def test_an_edited_packed_iv_never_decrypts(name: str, vector: dict[str, Any]) -> None:
    """Whoever can write where the five fields are kept cannot relabel the version,
    drop or add the zstd flag, or change a stream's segment size: each is
    authenticated, so the rebuilt object is refused (or does not even build)."""
    original = EncryptedData.from_bytes(bytes.fromhex(vector["blob"]))
    if len(original.iv) == 12:
        pytest.skip("a bare nonce has no head to edit")
    dk, context = data_key(vector), vector["context"].encode()
    tried = 0
    for iv in _edits(original.iv):
        try:
            forged = five_fields(original, iv=iv)
        except ValueError:
            continue
        tried += 1
        with pytest.raises(DecryptionError):
            decrypt_bulk(dk, forged, context)
    assert tried >= 2


@pytest.mark.parametrize(
    "changes", [{"segment_size": 2048}, {"format_version": 1}, {"compressed": True}]
)
def test_fields_that_contradict_a_packed_iv_are_refused(changes: dict[str, Any]) -> None:
    vector = json.loads((VECTORS / "streams_v2.json").read_text())[0]
    original = EncryptedData.from_bytes(bytes.fromhex(vector["blob"]))
    with pytest.raises(ValueError, match="contradicts the iv"):
        five_fields(original, **changes)


def test_a_stream_without_its_segment_size_is_refused() -> None:
    vector = json.loads((VECTORS / "streams_v2.json").read_text())[0]
    original = EncryptedData.from_bytes(bytes.fromhex(vector["blob"]))
    with pytest.raises(ValueError, match="segment_size"):
        five_fields(original, iv=original.iv[6:])  # salt || prefix alone: size unknown
