"""``aiocrypt._keyring``: every line and branch, and the fast decrypt path held to itself.

``Keyring.decrypt`` tries a one-frame fast path first and falls back to the
general path when the fast one does not return. A broken fast path would still
give the right answers, only slower, so ``general_decrypts`` counts the
fallbacks: a well-formed field token of a readable key must never add to it
(issue 21). The refusals (wrong key type, purpose, key status, grace period)
are checked through ``decrypt`` itself, where the fast path would otherwise
answer first.
"""

from __future__ import annotations

import base64
import string
from collections.abc import Callable
from typing import Any

import pytest

from aiocrypt import DecryptionError, KeyNotFoundError, KeyStateError, KeyStatus, KeyType
from aiocrypt._codec import encode_value
from aiocrypt._compression import compress
from aiocrypt._crypto import DataKey
from aiocrypt._errors import DecryptionFailure
from aiocrypt._format import (
    B64_CANONICAL_LAST,
    FLAG_ZSTD,
    MAX_FIELD_PLAINTEXT,
    MAX_KEY_ID_LEN,
    Purpose,
    b64encode_urlsafe,
)
from aiocrypt._keyring import Keyring, UnknownKeyError, undecodable

from ._core_keys import data_key

PII, FIN = KeyType.PII, KeyType.FINANCIAL_DATA
GCM_MESSAGE_LIMIT = 2**32  # NIST SP 800-38D, random 96-bit nonces (not imported: pinned)
_FAST_TOKEN_CHARS = 64 * 1024


def ring(*keys: DataKey, **kwargs: Any) -> Keyring:
    return Keyring(keys, **kwargs)


def reason(exc: pytest.ExceptionInfo[DecryptionError]) -> DecryptionFailure | None:
    return exc.value.reason


# -- the fast path does not fall back for well-formed tokens ------------------

VALUES: list[Any] = [
    "",
    "a",
    "ab",
    "abc",
    "héllo",
    0,
    -1,
    2**70,
    1.5,
    None,
    True,
    b"\x00\xff",
    [1, "x"],
    {"k": [None]},
]
CONTEXTS: list[str | bytes | None] = [None, "users.ssn", b"users.ssn", "x" * 2000, b""]


@pytest.mark.parametrize("context", CONTEXTS, ids=repr)
def test_well_formed_tokens_of_the_active_key_never_fall_back(context: str | bytes | None) -> None:
    kr = ring(data_key())
    for value in VALUES:
        token = kr.encrypt(value, PII, context)
        assert kr.decrypt(token, PII, context) == value
    assert kr.general_decrypts == 0


def test_well_formed_tokens_of_other_readable_keys_never_fall_back() -> None:
    # found by their "ac2.<key id>." prefix, not as the active key: the key id's end
    # must be found exactly, for the shortest and the longest key ids too
    old = data_key(version=1, status=KeyStatus.DECRYPT_ONLY)
    shortest = data_key(key_id="k", status=KeyStatus.DECRYPT_ONLY)
    longest = data_key(key_id="L" * MAX_KEY_ID_LEN, status=KeyStatus.DECRYPT_ONLY)
    expired_status = data_key(version=3, status=KeyStatus.EXPIRED)  # within grace: readable
    active = data_key(version=9)
    kr = ring(old, shortest, longest, expired_status, active)
    for dk in (old, shortest, longest, expired_status):
        for value in VALUES:
            for context in CONTEXTS:
                token = dk.seal_field(encode_value(value), context)
                assert kr.decrypt(token, PII, context) == value
    assert kr.general_decrypts == 0


def test_the_fast_path_takes_tokens_up_to_64_kib() -> None:
    dk = data_key(key_id="k-1")  # "ac2.k-1." is 8 characters: whole base64 quads follow
    kr = ring(dk)
    prefix = len(dk.text_prefix)
    assert prefix % 4 == 0
    raw = (_FAST_TOKEN_CHARS - prefix) // 4 * 3
    value = "v" * (raw - 2 - 12 - 16 - 1)  # algorithm, flags, nonce, tag, str tag
    token = kr.encrypt(value, PII)
    assert len(token) == _FAST_TOKEN_CHARS
    assert kr.decrypt(token, PII) == value
    assert kr.general_decrypts == 0
    longer = kr.encrypt(value + "vvv", PII)
    assert len(longer) == _FAST_TOKEN_CHARS + 4
    assert kr.decrypt(longer, PII) == value + "vvv"
    assert kr.general_decrypts == 1


@pytest.mark.parametrize(
    ("make", "purpose"),
    [
        (lambda kr: kr.encrypt("v", PII, compression_level=1), Purpose.FIELD),  # flags 1
        (lambda kr: kr.encrypt_deterministic("v", PII), Purpose.FIELD),  # AES-SIV
        (lambda kr: kr.encrypt("v", PII, purpose=Purpose.SESSION), Purpose.SESSION),
    ],
    ids=["compressed", "deterministic", "session"],
)
def test_tokens_the_fast_path_does_not_take_are_counted(
    make: Callable[[Keyring], str], purpose: Purpose
) -> None:
    kr = ring(data_key())
    token = make(kr)
    assert kr.decrypt(token, PII, purpose=purpose) == "v"
    assert kr.general_decrypts == 1


def test_version_1_tokens_take_the_general_path() -> None:
    dk = data_key()
    kr = ring(dk)
    token = dk.deterministic_tokens(b"\x01v", b"")[1]
    assert token.startswith("ac1.")
    assert kr.decrypt(token, PII) == "v"
    assert kr.general_decrypts == 1


def test_decrypt_bytes_takes_the_same_fast_path() -> None:
    # re-encryption opens tokens with decrypt_bytes: well-formed field tokens of
    # readable keys (active or not) are opened inline, without counting
    old = data_key(version=1, status=KeyStatus.DECRYPT_ONLY)
    active = data_key(version=2)
    kr = ring(old, active)
    for dk in (old, active):
        for value in VALUES:
            for context in CONTEXTS:
                plaintext = encode_value(value)
                token = dk.seal_field(plaintext, context)
                assert kr.decrypt_bytes(token, PII, context) == plaintext
                assert kr.decrypt_bytes(token, PII, context, for_reencryption=True) == plaintext
    assert kr.general_decrypts == 0
    # up to 64 KiB, as decrypt
    edge = data_key(key_id="k-1")
    edge_ring = ring(edge)
    raw = (_FAST_TOKEN_CHARS - len(edge.text_prefix)) // 4 * 3
    largest = edge_ring.encrypt("v" * (raw - 2 - 12 - 16 - 1), PII)
    assert len(largest) == _FAST_TOKEN_CHARS
    assert edge_ring.decrypt_bytes(largest, PII) == encode_value("v" * (raw - 31))
    assert edge_ring.general_decrypts == 0
    # and only those: the others are counted, and opened all the same
    big = kr.encrypt("v" * _FAST_TOKEN_CHARS, PII)
    assert len(big) > _FAST_TOKEN_CHARS
    assert kr.decrypt_bytes(big, PII) == encode_value("v" * _FAST_TOKEN_CHARS)
    assert kr.general_decrypts == 1
    session = kr.encrypt("s", PII, purpose=Purpose.SESSION)
    assert kr.decrypt_bytes(session, PII, purpose=Purpose.SESSION) == encode_value("s")
    assert kr.general_decrypts == 2
    with pytest.raises(DecryptionError) as exc:  # a field token is not a session token
        kr.decrypt_bytes(kr.encrypt("f", PII), PII, purpose=Purpose.SESSION)
    assert reason(exc) is DecryptionFailure.AUTHENTICATION_FAILED
    assert kr.general_decrypts == 3


def test_decrypt_bytes_refuses_what_is_not_a_str_without_other_errors() -> None:
    kr = ring(data_key())
    token = kr.encrypt("v", PII)
    for bad in (token.encode(), memoryview(token.encode()), None, 7):
        with pytest.raises(DecryptionError) as exc:
            kr.decrypt_bytes(bad, PII)  # type: ignore[arg-type]  # what a driver may hand
        assert reason(exc) is DecryptionFailure.MALFORMED


# -- refusals the fast path must not get past ----------------------------------


def test_a_key_past_its_grace_period_refuses_plain_reads_on_the_fast_path() -> None:
    dk = data_key()
    kr = ring(dk)
    token = kr.encrypt("v", PII, "c")
    dk.expired = dk.past_grace = True
    with pytest.raises(DecryptionError) as exc:
        kr.decrypt(token, PII, "c")
    assert reason(exc) is DecryptionFailure.KEY_NOT_READABLE
    assert "grace" in str(exc.value)
    # re-encryption still reads it
    assert kr.decrypt(token, PII, "c", for_reencryption=True) == "v"


def test_a_key_in_its_grace_period_reads_loudly_on_every_path() -> None:
    used: list[str] = []
    dk = data_key(status=KeyStatus.DECRYPT_ONLY)
    active = data_key(version=2)
    kr = ring(dk, active, on_expired_use=lambda k: used.append(k.key_id))
    token = dk.seal_field(b"\x01v", "c")
    dk.expired = True
    assert kr.decrypt(token, PII, "c") == "v"
    assert used == [dk.key_id]
    assert kr.decrypt_bytes(token, PII, "c") == b"\x01v"
    assert used == [dk.key_id] * 2
    # no hook: still reads
    assert ring(dk, active).decrypt(token, PII, "c") == "v"


@pytest.mark.parametrize("status", [KeyStatus.REVOKED, KeyStatus.COMPROMISED])
def test_withdrawn_keys_serve_re_encryption_only(status: KeyStatus) -> None:
    withdrawn = data_key(status=status)
    kr = ring(withdrawn)
    token = withdrawn.seal_field(b"\x01w", None)
    assert withdrawn.readable is False
    with pytest.raises(DecryptionError) as exc:
        kr.decrypt(token, PII)
    assert reason(exc) is DecryptionFailure.KEY_NOT_READABLE
    assert f"is {status.value} (only re-encryption reads it)" in str(exc.value)
    assert kr.decrypt(token, PII, for_reencryption=True) == "w"


def test_destroyed_and_disabled_keys_read_for_no_one() -> None:
    destroyed = data_key(status=KeyStatus.DESTROYED)
    disabled = data_key(version=2, status=KeyStatus.DECRYPT_ONLY, decrypt_disabled=True)
    kr = ring(destroyed, disabled)
    for dk, why in ((destroyed, "was destroyed"), (disabled, "minimum decryption version")):
        token = dk.seal_field(b"\x01v", None)
        for again in (False, True):
            with pytest.raises(DecryptionError, match=why) as exc:
                kr.decrypt(token, PII, for_reencryption=again)
            assert reason(exc) is DecryptionFailure.KEY_NOT_READABLE


def test_a_token_of_another_key_type_is_refused_on_both_paths() -> None:
    active, old = data_key(version=2), data_key(version=1, status=KeyStatus.DECRYPT_ONLY)
    kr = ring(active, old)
    for dk in (active, old):
        token = dk.seal_field(b"\x01v", None)
        with pytest.raises(DecryptionError) as exc:
            kr.decrypt(token, FIN)
        assert reason(exc) is DecryptionFailure.WRONG_KEY_TYPE
        assert "token is for key type pii, not financial_data" in str(exc.value)


def test_a_field_token_is_not_a_session_token() -> None:
    kr = ring(data_key())
    token = kr.encrypt("v", PII)
    with pytest.raises(DecryptionError) as exc:
        kr.decrypt(token, PII, purpose=Purpose.SESSION)
    assert reason(exc) is DecryptionFailure.AUTHENTICATION_FAILED


def test_empty_and_undecodable_plaintexts_are_malformed_not_index_errors() -> None:
    dk = data_key()
    kr = ring(dk)
    for plaintext in (b"", b"\xff", b"\x03"):
        token = dk.seal_field(plaintext, "c")
        with pytest.raises(DecryptionError, match="does not decode") as exc:
            kr.decrypt(token, PII, "c")
        assert reason(exc) is DecryptionFailure.MALFORMED
        assert exc.value.key_id == dk.key_id
    assert kr.decrypt_bytes(dk.seal_field(b"", "c"), PII, "c") == b""


def test_undecodable_names_the_key_id_only_when_the_token_shows_one() -> None:
    assert undecodable("ac2.pii-v1.AAAA").key_id == "pii-v1"
    assert "(key pii-v1)" in str(undecodable("ac2.pii-v1.AAAA"))
    bare = undecodable("garbage")
    assert bare.key_id is None and "(key" not in str(bare)


@pytest.mark.parametrize("tail", [1, 2])
def test_every_non_canonical_last_character_is_refused(tail: int) -> None:
    dk = data_key()
    kr = ring(dk)
    # a str value whose raw token body leaves ``tail`` bytes in the last quad
    value = next("v" * n for n in range(8) if (2 + 12 + 16 + 1 + n) % 3 == tail)
    token = kr.encrypt(value, PII)
    pad = 3 - tail
    last = len(token) - pad - 1
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    accepted = set()
    for char in alphabet:
        forged = token[:last] + char + token[last + 1 :]
        try:
            kr.decrypt(forged, PII)
        except DecryptionError as exc:
            assert exc.reason in (
                DecryptionFailure.MALFORMED,
                DecryptionFailure.AUTHENTICATION_FAILED,
            )
        else:
            accepted.add(char)
    assert accepted == {token[last]}
    assert token[last] in B64_CANONICAL_LAST[tail]


def test_padding_after_a_whole_quad_is_refused() -> None:
    kr = ring(data_key())
    value = next("v" * n for n in range(8) if (2 + 12 + 16 + 1 + n) % 3 == 0)
    token = kr.encrypt(value, PII)
    for extra in ("=", "==", "===="):
        with pytest.raises(DecryptionError) as exc:
            kr.decrypt(token + extra, PII)
        assert reason(exc) is DecryptionFailure.MALFORMED


def test_a_body_too_short_for_nonce_and_tag_is_malformed() -> None:
    dk = data_key()
    kr = ring(dk)
    for body in (b"", b"\x01", b"\x01\x00", bytes((1, 0)) + bytes(27)):
        with pytest.raises(DecryptionError) as exc:
            kr.decrypt(dk.text_prefix + b64encode_urlsafe(body), PII)
        assert reason(exc) is DecryptionFailure.MALFORMED


def test_unknown_key_ids_are_named_and_bad_ones_malformed() -> None:
    kr = ring(data_key())
    with pytest.raises(UnknownKeyError) as exc:
        kr.decrypt("ac2.nope-v1." + "A" * 40, PII)
    assert exc.value.key_id == "nope-v1"
    for token in (
        "ac2.b@d." + "A" * 40,
        "ac2." + "A" * 80,
        "ac3.pii-v1.AAAA",
        "",
        "ac2.",
        "ac2..AAAA",
    ):
        with pytest.raises(DecryptionError) as info:
            kr.decrypt(token, PII)
        assert reason(info) is DecryptionFailure.MALFORMED
    with pytest.raises(DecryptionError):
        kr.decrypt(b"ac2.pii-v1.AAAA", PII)  # type: ignore[arg-type]


def test_compressed_tokens_that_do_not_decompress_are_malformed() -> None:
    dk = data_key()
    kr = ring(dk)
    good = dk.seal_text(compress(b"\x01v" * 10, 1), b"c", FLAG_ZSTD)
    assert kr.decrypt(good, PII, "c") == "v" + "\x01v" * 9
    bad = dk.seal_text(b"not zstd", b"c", FLAG_ZSTD)
    with pytest.raises(DecryptionError, match="decompress") as exc:
        kr.decrypt(bad, PII, "c")
    assert reason(exc) is DecryptionFailure.MALFORMED


def test_unknown_flags_and_algorithms_are_malformed() -> None:
    dk = data_key()
    kr = ring(dk)
    body = bytes(12 + 16 + 4)
    for head in (bytes((1, 2)), bytes((1, 0x81)), bytes((3, 0)), bytes((9, 0))):
        token = dk.text_prefix + base64.urlsafe_b64encode(head + body).decode()
        with pytest.raises(DecryptionError) as exc:
            kr.decrypt(token, PII)
        assert reason(exc) is DecryptionFailure.MALFORMED


def test_version_1_is_refused_when_the_keyring_says_so() -> None:
    dk = data_key()
    token = dk.deterministic_tokens(b"\x01v", b"")[1]
    with pytest.raises(DecryptionError, match="accept_format_v1=False") as exc:
        ring(dk, accept_format_v1=False).decrypt(token, PII)
    assert reason(exc) is DecryptionFailure.MALFORMED


# -- snapshot, active keys, encryption -------------------------------------------


def test_the_highest_active_version_is_the_active_key_in_any_order() -> None:
    v1, v3, v2 = data_key(version=1), data_key(version=3), data_key(version=2)
    for order in ((v1, v3, v2), (v3, v1, v2), (v2, v3, v1)):
        kr = ring(*order)
        assert kr.active(PII) is v3 and kr.get_active("pii") is v3 and kr.has_active("pii")
    assert kr.active_keys == {"pii": v3}
    assert len(kr) == 3 and set(kr) == {v1, v2, v3}
    assert v1.key_id in kr and "nope" not in kr and kr.get("nope") is None
    assert repr(kr) == "<Keyring revision=0 keys=3>"


def test_no_active_key_is_a_key_not_found_error() -> None:
    kr = ring(data_key(status=KeyStatus.DECRYPT_ONLY))
    assert not kr.has_active("pii") and kr.get_active("pii") is None
    for call in (
        lambda: kr.active(PII),
        lambda: kr.encrypt("v", PII),
        lambda: kr.encrypt(5, PII),
        lambda: kr.encrypt_bytes(b"v", PII),
        lambda: kr.encrypt("v", PII, compression_level=1),
        lambda: kr.encrypt_deterministic("v", PII),
        lambda: kr.require_encryptable(PII),
    ):
        with pytest.raises(KeyNotFoundError, match="no active key of type 'pii'"):
            call()


def test_require_encryptable() -> None:
    dk = data_key()
    kr = ring(dk)
    assert kr.require_encryptable(PII) is dk
    dk.rebind(dk.key.replace(status=KeyStatus.REVOKED))  # revoked under a live snapshot
    with pytest.raises(KeyStateError, match="is revoked"):
        kr.require_encryptable(PII)


def test_a_field_holds_at_most_max_field_plaintext() -> None:
    kr = ring(data_key())
    with pytest.raises(ValueError, match="encrypt_bulk_data or encrypt_stream"):
        kr.encrypt_bytes(bytes(MAX_FIELD_PLAINTEXT + 1), PII)


def test_a_hand_built_keyring_is_held_to_the_gcm_message_limit() -> None:
    dk = data_key()
    kr = ring(dk)
    dk.encryptions = GCM_MESSAGE_LIMIT - 1
    kr.encrypt("v", PII)
    assert dk.encryptions == GCM_MESSAGE_LIMIT
    call: Callable[[], str]
    for call in (
        lambda: kr.encrypt("v", PII),
        lambda: kr.encrypt_bytes(b"v", PII),
        lambda: kr.encrypt(1, PII, compression_level=1),
    ):
        with pytest.raises(KeyStateError, match=r"reached 2\*\*32 encryptions"):
            call()
    assert dk.encryptions == GCM_MESSAGE_LIMIT


# -- usage accounting: exactly one per message ---------------------------------


@pytest.mark.parametrize("refill_at", [0, 10**6], ids=["asks", "allowance"])
@pytest.mark.parametrize(
    ("seal", "in_place"),
    [
        (lambda kr: kr.encrypt("v", PII), True),
        (lambda kr: kr.encrypt(5, PII, b"c"), True),
        (lambda kr: kr.encrypt_bytes(b"\x01v", PII, "c"), True),
        (lambda kr: kr.encrypt("v" * 100, PII, compression_level=3), False),
        (lambda kr: kr.encrypt_bytes(b"\x01v" * 100, PII, compression_level=3), False),
        (lambda kr: kr.encrypt({"a": 1}, PII, purpose=Purpose.SESSION), False),
        (lambda kr: kr.encrypt_bytes(b"\x01v", PII, purpose=Purpose.CACHE), False),
    ],
    ids=["str", "value", "bytes", "compressed", "compressed-bytes", "session", "cache"],
)
def test_each_sealed_token_counts_exactly_once(
    seal: Callable[[Keyring], str], in_place: bool, refill_at: int
) -> None:
    asked: list[str] = []

    def allowance(dk: DataKey, sealer: Callable[[DataKey], str]) -> str:
        asked.append(dk.key_id)
        return sealer(dk)

    dk = data_key()
    dk.refill_at = refill_at
    kr = ring(dk, on_allowance=allowance)
    for n in range(1, 4):
        seal(kr)
        assert dk.encryptions == n
    # plain field tokens claim the allowance in place below refill_at; the rest ask
    assert len(asked) == (0 if refill_at and in_place else 3)


def test_the_allowance_is_claimed_up_to_refill_at_and_then_asked_for() -> None:
    asked: list[int] = []

    def allowance(dk: DataKey, sealer: Callable[[DataKey], str]) -> str:
        asked.append(dk.encryptions)
        return sealer(dk)

    seal: Callable[[Keyring], str]
    for seal in (lambda kr: kr.encrypt("v", PII), lambda kr: kr.encrypt_bytes(b"\x01v", PII)):
        dk = data_key()
        dk.refill_at = 2
        kr = ring(dk, on_allowance=allowance)
        seal(kr)
        seal(kr)
        assert asked == [] and dk.encryptions == 2
        seal(kr)  # the third is past refill_at: on_allowance decides
        assert asked == [2] and dk.encryptions == 3
        asked.clear()


def test_deterministic_tokens_do_not_spend_the_gcm_allowance() -> None:
    # AES-SIV has no random nonce: the 2**32 GCM limit does not apply to it
    dk = data_key()
    kr = ring(dk)
    assert kr.encrypt_deterministic("v", PII) == kr.encrypt_deterministic("v", PII)
    assert dk.encryptions == 0


# -- check_decryptable (bulk data and streams) ------------------------------------


def test_check_decryptable_refuses_what_plain_reads_may_not_use() -> None:
    used: list[str] = []
    kr = Keyring(on_expired_use=lambda dk: used.append(dk.key_id))
    kr.check_decryptable(data_key(), PII)
    with pytest.raises(DecryptionError) as exc:
        kr.check_decryptable(data_key(), FIN)
    assert reason(exc) is DecryptionFailure.WRONG_KEY_TYPE
    for status in (KeyStatus.REVOKED, KeyStatus.COMPROMISED):
        dk = data_key(status=status)
        with pytest.raises(DecryptionError, match=f"is {status.value}") as exc:
            kr.check_decryptable(dk, PII)
        assert reason(exc) is DecryptionFailure.KEY_NOT_READABLE
        kr.check_decryptable(dk, PII, for_reencryption=True)  # re-encryption may
    for dk in (
        data_key(status=KeyStatus.DESTROYED),
        data_key(status=KeyStatus.DECRYPT_ONLY, decrypt_disabled=True),
    ):
        for again in (False, True):
            with pytest.raises(DecryptionError):
                kr.check_decryptable(dk, PII, for_reencryption=again)
    assert used == []
    expired = data_key(status=KeyStatus.EXPIRED)
    expired.expired = True
    kr.check_decryptable(expired, PII)  # in grace: loudly
    assert used == [expired.key_id]
    expired.past_grace = True
    with pytest.raises(DecryptionError, match="grace"):
        kr.check_decryptable(expired, PII)
    assert used == [expired.key_id]
    kr.check_decryptable(expired, PII, for_reencryption=True)  # re-encryption may, loudly
    assert used == [expired.key_id] * 2
    Keyring().check_decryptable(expired, PII, for_reencryption=True)  # no hook: quiet
