"""Known-answer tests: NIST's and Wycheproof's AES-GCM and AES-SIV vectors, through aiocrypt.

aiocrypt never seals with a caller's associated data as such: its AAD is the
token's header and purpose, the key type and then the caller's context. So a
vector's (key, nonce, AAD, plaintext) cannot be fed to ``Keyring.encrypt`` as
is. The vectors reach aiocrypt's own code in three ways:

1. Directly, where aiocrypt's code takes the raw parameters: ``DataKey`` built
   from the vector's key, ``DataKey.gcm_decrypt`` (the function the fast decrypt
   path calls) on the vector's nonce, ciphertext, tag and AAD; and the vector's
   ciphertext (AES-GCM's CTR part does not depend on the AAD) as the ciphertext
   of ``seal_text`` / ``gcm_parts`` given the vector's key and nonce.
2. Through small reference implementations written here from the standards
   (GCM from SP 800-38D over an AES block function, AES-SIV from RFC 5297 over
   CMAC), which must reproduce every vector, valid and invalid.
3. aiocrypt's sealing and opening checked against those references with
   aiocrypt's real associated data, spelled out byte by byte from
   docs/format.md: every token ``seal_text``, ``seal_deterministic`` and
   ``gcm_parts`` make equals the reference, ``Keyring.decrypt`` (fast path
   included) and ``decrypt_bytes`` open the reference's tokens, and each
   invalid vector's corruption, carried over to an aiocrypt token, is refused.

Sources: ``cryptography-vectors`` (CAVP ``gcmEncryptExtIV256.rsp`` and
``gcmDecrypt256.rsp``) and tests/vectors/wycheproof/ (see its README).
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cryptography_vectors
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.cmac import CMAC

from aiocrypt import DecryptionError, EncryptionKey, KeyStatus, KeyType
from aiocrypt._bulk import EncryptedData, decrypt_bulk
from aiocrypt._crypto import DataKey
from aiocrypt._errors import DecryptionFailure
from aiocrypt._keyring import Keyring

WYCHEPROOF = Path(__file__).parent / "vectors" / "wycheproof"
KEY_ID, KEY_TYPE = "kat-v1", "pii"
CONTEXT = b"users.ssn"


@dataclass(frozen=True)
class Vector:
    name: str
    key: bytes
    iv: bytes
    aad: bytes
    msg: bytes
    ct: bytes
    tag: bytes
    valid: bool


# -- reading the vectors -------------------------------------------------------


def _nist(filename: str) -> Iterator[Vector]:
    """AES-256, 96-bit IV, 128-bit tag entries of a CAVP GCM response file."""
    section: dict[str, str] = {}
    entry: dict[str, str] = {}
    with cryptography_vectors.open_vector_file(f"ciphers/AES/GCM/{filename}", "r") as f:
        lines = [line.strip() for line in f] + [""]
    for line in lines:
        if line.startswith("["):
            name, _, value = line.strip("[]").partition(" = ")
            section[name] = value
        elif " = " in line or line.endswith(" ="):
            name, _, value = line.partition(" =")
            entry[name] = value.strip()
        elif line == "FAIL":
            entry["FAIL"] = "1"
        elif not line and "Key" in entry:
            if (section.get("Keylen"), section.get("IVlen"), section.get("Taglen")) == (
                "256",
                "96",
                "128",
            ):
                # six fields from the generator, which mypy cannot count
                yield Vector(
                    f"{filename}:{section['PTlen']}/{section['AADlen']}/"  # type: ignore[call-arg]
                    f"{entry['Count']}",
                    *(
                        bytes.fromhex(entry[k])
                        for k in (  # type: ignore[arg-type]
                            "Key",
                            "IV",
                            "AAD",
                            "PT" if "PT" in entry else "CT",
                            "CT",
                            "Tag",
                        )
                    ),
                    "FAIL" not in entry,
                )
            entry = {}


def _wycheproof_gcm() -> Iterator[Vector]:
    data = json.loads((WYCHEPROOF / "aes_gcm_test.json").read_text())
    for group in data["testGroups"]:
        if (group["keySize"], group["ivSize"], group["tagSize"]) != (256, 96, 128):
            continue
        for t in group["tests"]:
            # six fields from the generator, which mypy cannot count
            yield Vector(
                f"wycheproof-gcm:{t['tcId']}",
                *(
                    bytes.fromhex(t[k])
                    for k in (  # type: ignore[call-arg, arg-type]
                        "key",
                        "iv",
                        "aad",
                        "msg",
                        "ct",
                        "tag",
                    )
                ),
                t["result"] != "invalid",
            )


def _wycheproof_siv() -> Iterator[Vector]:
    data = json.loads((WYCHEPROOF / "aes_siv_cmac_test.json").read_text())
    for group in data["testGroups"]:
        if group["keySize"] != 512:  # AES-256-SIV, as aiocrypt's deterministic mode
            continue
        for t in group["tests"]:
            ct = bytes.fromhex(t["ct"])
            yield Vector(
                f"wycheproof-siv:{t['tcId']}",
                bytes.fromhex(t["key"]),
                b"",
                bytes.fromhex(t["aad"]),
                bytes.fromhex(t["msg"]),
                ct[16:],
                ct[:16],
                t["result"] != "invalid",
            )


NIST_GCM = [*_nist("gcmEncryptExtIV256.rsp"), *_nist("gcmDecrypt256.rsp")]
WYCHEPROOF_GCM = list(_wycheproof_gcm())
GCM = NIST_GCM + WYCHEPROOF_GCM
SIV = list(_wycheproof_siv())


def test_the_vector_sets_are_there() -> None:
    # 375 entries per CAVP file, 66 Wycheproof GCM tests, 147 Wycheproof SIV tests
    assert len(NIST_GCM) == 750 and sum(not v.valid for v in NIST_GCM) > 100
    assert len(WYCHEPROOF_GCM) == 66 and sum(not v.valid for v in WYCHEPROOF_GCM) > 10
    assert len(SIV) == 147 and sum(not v.valid for v in SIV) > 10


# -- reference implementations (from the standards) ---------------------------


def _aes_block(key: bytes, block: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=False))


def _gf_mult(x: int, y: int) -> int:
    """Multiplication in GF(2^128), GCM's bit order (SP 800-38D, algorithm 1)."""
    z, v = 0, y
    for i in range(127, -1, -1):
        if x >> i & 1:
            z ^= v
        v = v >> 1 ^ (0xE1 << 120) if v & 1 else v >> 1
    return z


def _ghash(h: bytes, aad: bytes, ct: bytes) -> bytes:
    def blocks(data: bytes) -> list[bytes]:
        padded = data + bytes(-len(data) % 16)
        return [padded[i : i + 16] for i in range(0, len(padded), 16)]

    hk, y = int.from_bytes(h, "big"), 0
    lengths = (8 * len(aad)).to_bytes(8, "big") + (8 * len(ct)).to_bytes(8, "big")
    for block in [*blocks(aad), *blocks(ct), lengths]:
        y = _gf_mult(y ^ int.from_bytes(block, "big"), hk)
    return y.to_bytes(16, "big")


def gcm_reference(key: bytes, iv: bytes, aad: bytes, msg: bytes) -> tuple[bytes, bytes]:
    """AES-GCM with a 96-bit IV: (ciphertext, 128-bit tag)."""
    assert len(iv) == 12
    h = _aes_block(key, bytes(16))
    stream = b"".join(
        _aes_block(key, iv + (2 + i).to_bytes(4, "big")) for i in range(-(-len(msg) // 16))
    )
    ct = _xor(msg, stream)
    tag = _xor(_aes_block(key, iv + (1).to_bytes(4, "big")), _ghash(h, aad, ct))
    return ct, tag


def _cmac(key: bytes, data: bytes) -> bytes:
    mac = CMAC(algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


def _dbl(block: bytes) -> bytes:
    n = int.from_bytes(block, "big") << 1
    return ((n & (2**128 - 1)) ^ (0x87 if n >> 128 else 0)).to_bytes(16, "big")


def siv_reference(key: bytes, aad: bytes, msg: bytes) -> tuple[bytes, bytes]:
    """AES-SIV (RFC 5297) with one associated-data component: (ciphertext, SIV)."""
    k1, k2 = key[: len(key) // 2], key[len(key) // 2 :]
    d = _dbl(_cmac(k1, bytes(16)))
    d = _xor(d, _cmac(k1, aad))
    if len(msg) >= 16:
        t = msg[:-16] + _xor(msg[-16:], d)
    else:
        t = _xor(_dbl(d), msg + b"\x80" + bytes(15 - len(msg)))
    siv = _cmac(k1, t)
    q = int.from_bytes(siv, "big") & ~((1 << 63) | (1 << 31))
    ctr = Cipher(algorithms.AES(k2), modes.CTR(q.to_bytes(16, "big"))).encryptor()
    return ctr.update(msg) + ctr.finalize(), siv


def _ids(vectors: list[Vector]) -> list[str]:
    return [v.name for v in vectors]


@pytest.mark.parametrize("v", GCM, ids=_ids(GCM))
def test_the_gcm_reference_reproduces_every_vector(v: Vector) -> None:
    assert (gcm_reference(v.key, v.iv, v.aad, v.msg) == (v.ct, v.tag)) is v.valid


@pytest.mark.parametrize("v", SIV, ids=_ids(SIV))
def test_the_siv_reference_reproduces_every_vector(v: Vector) -> None:
    ct, siv = siv_reference(v.key, v.aad, v.msg)
    assert (ct == v.ct and siv == v.tag) is v.valid


# -- aiocrypt: directly on the vectors -----------------------------------------


def _data_key(material: bytes) -> DataKey:
    now = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)
    return DataKey(
        EncryptionKey(KEY_ID, KeyType(KEY_TYPE), 1, KeyStatus.ACTIVE, now, now), material
    )


@pytest.mark.parametrize("v", GCM, ids=_ids(GCM))
def test_data_key_opens_the_vectors_as_the_fast_path_does(v: Vector) -> None:
    dk = _data_key(v.key)
    if v.valid:
        assert dk.gcm_decrypt(v.iv, v.ct + v.tag, v.aad) == v.msg
    else:
        with pytest.raises(InvalidTag):
            dk.gcm_decrypt(v.iv, v.ct + v.tag, v.aad)


def _body(token: str, dk: DataKey) -> bytes:
    assert token.startswith(dk.text_prefix)
    return base64.urlsafe_b64decode(token[len(dk.text_prefix) :])


@pytest.mark.parametrize("v", [v for v in GCM if v.valid], ids=_ids([v for v in GCM if v.valid]))
def test_aiocrypt_seals_the_vectors_ciphertext(v: Vector) -> None:
    # the CTR part of GCM does not depend on the AAD: aiocrypt's ciphertext under the
    # vector's key and nonce is the vector's, whatever aiocrypt binds as AAD
    dk = _data_key(v.key)
    body = _body(dk.seal_text(v.msg, CONTEXT, nonce=v.iv), dk)
    assert body[:2] == b"\x01\x00" and body[2:14] == v.iv and body[14:-16] == v.ct
    nonce, sealed = dk.gcm_parts(v.msg, CONTEXT, nonce=v.iv)
    assert nonce == v.iv and sealed[:-16] == v.ct


# -- aiocrypt against the references, with its own associated data -------------


def _aad(purpose: int, algorithm: int, context: bytes, flags: int = 0) -> bytes:
    """aiocrypt's version-2 AAD, spelled out from docs/format.md."""
    kid, kt = KEY_ID.encode(), KEY_TYPE.encode()
    return bytes((2, algorithm, flags, len(kid))) + kid + bytes((purpose, len(kt))) + kt + context


FIELD, BLOB = 1, 2
ALG_GCM, ALG_SIV = 1, 2


def _token(dk: DataKey, algorithm: int, body: bytes) -> str:
    return dk.text_prefix + base64.urlsafe_b64encode(bytes((algorithm, 0)) + body).decode()


@pytest.mark.parametrize("v", GCM, ids=_ids(GCM))
def test_aiocrypt_gcm_tokens_match_the_reference(v: Vector) -> None:
    dk = _data_key(v.key)
    keyring = Keyring([dk])
    ct, tag = gcm_reference(v.key, v.iv, _aad(FIELD, ALG_GCM, CONTEXT), v.msg)
    # sealing: the whole token, tag included
    assert _body(dk.seal_text(v.msg, CONTEXT, nonce=v.iv), dk) == b"\x01\x00" + v.iv + ct + tag
    # opening: decrypt_bytes, and Keyring.decrypt's fast path on a bytes value
    assert keyring.decrypt_bytes(_token(dk, ALG_GCM, v.iv + ct + tag), KEY_TYPE, CONTEXT) == v.msg
    value_ct, value_tag = gcm_reference(v.key, v.iv, _aad(FIELD, ALG_GCM, CONTEXT), b"\x02" + v.msg)
    value_token = _token(dk, ALG_GCM, v.iv + value_ct + value_tag)
    assert keyring.decrypt(value_token, KEY_TYPE, CONTEXT.decode()) == v.msg
    # both on the fast path, but for an empty plaintext (no value encodes to nothing):
    # decrypt_bytes opens that one the general way
    assert keyring.general_decrypts == (0 if v.msg else 1)
    # a bulk blob (purpose BLOB), sealed and opened
    nonce, sealed = dk.gcm_parts(v.msg, CONTEXT, nonce=v.iv)
    assert sealed == b"".join(gcm_reference(v.key, v.iv, _aad(BLOB, ALG_GCM, CONTEXT), v.msg))
    blob = EncryptedData(sealed[:-16], KEY_ID, "AES_256_GCM", nonce, sealed[-16:])
    assert decrypt_bulk(dk, blob, CONTEXT) == v.msg
    if not v.valid:
        # the vector's corruption of its (ciphertext, tag), carried over to aiocrypt's
        good_ct, good_tag = gcm_reference(v.key, v.iv, v.aad, v.msg)
        bad_ct = _xor(ct, _xor(v.ct, good_ct)) + ct[len(v.ct) :]
        bad_tag = _xor(tag, _xor(v.tag, good_tag))
        assert (bad_ct, bad_tag) != (ct, tag)
        with pytest.raises(DecryptionError) as exc:
            keyring.decrypt_bytes(_token(dk, ALG_GCM, v.iv + bad_ct + bad_tag), KEY_TYPE, CONTEXT)
        assert exc.value.reason is DecryptionFailure.AUTHENTICATION_FAILED


@pytest.mark.parametrize("v", SIV, ids=_ids(SIV))
def test_aiocrypt_siv_tokens_match_the_reference(v: Vector) -> None:
    # aiocrypt's AES-SIV key is HKDF(DEK, "aes-siv"): the vector's key serves as the DEK
    # and the reference runs under the derived key, with aiocrypt's AAD as its one component
    dk = _data_key(v.key[:32])
    keyring = Keyring([dk])
    siv_key = dk.derive(b"aes-siv", 64)
    aad = _aad(FIELD, ALG_SIV, CONTEXT)
    ct, siv = siv_reference(siv_key, aad, v.msg)
    assert _body(dk.seal_deterministic(v.msg, CONTEXT), dk) == b"\x02\x00" + siv + ct
    assert keyring.decrypt_bytes(_token(dk, ALG_SIV, siv + ct), KEY_TYPE, CONTEXT) == v.msg
    if not v.valid:
        good_ct, good_siv = siv_reference(v.key, v.aad, v.msg)
        bad_ct = _xor(ct, _xor(v.ct, good_ct)) + ct[len(v.ct) :] if len(v.ct) >= len(ct) else v.ct
        bad_siv = _xor(siv, _xor(v.tag, good_siv)) if len(v.tag) == 16 else v.tag
        if (bad_ct, bad_siv) == (ct, siv):  # the vector changes nothing aiocrypt carries
            bad_siv = _xor(siv, b"\x80" + bytes(15))
        with pytest.raises(DecryptionError):
            keyring.decrypt_bytes(_token(dk, ALG_SIV, bad_siv + bad_ct), KEY_TYPE, CONTEXT)
