"""``aiocrypt._keyring``: tests for the survivors of ``./dev mutate aiocrypt/_keyring.py``.

Each test names the mutant it kills; the equivalent ones are listed, with the
reason, in tools/mutate_equivalent.toml.
"""

from __future__ import annotations

import pytest

from aiocrypt import DecryptionError, KeyStatus, KeyType
from aiocrypt._errors import DecryptionFailure
from aiocrypt._format import MAX_TOKEN_CHARS
from aiocrypt._keyring import Keyring, UnknownKeyError

from ._core_keys import data_key

PII = KeyType.PII


def test_an_unhashable_context_takes_the_fast_path() -> None:
    # `type(context) is str` negated: bytearray would be looked up in the AAD cache
    kr = Keyring([data_key()])
    token = kr.encrypt("v", PII, b"ctx")
    for context in (bytearray(b"ctx"), memoryview(b"ctx"), b"ctx"):
        assert kr.decrypt(token, PII, context) == "v"  # type: ignore[arg-type]
    assert kr.general_decrypts == 0


@pytest.mark.parametrize("value", [1, 257, -255, b"\x01", [1], {"k": 1}, 1.0000000000000002, True])
def test_values_whose_encoding_ends_in_the_str_tag_byte(value: object) -> None:
    # the str shortcut must test the first byte: `plaintext[-1]` would return 1 as "\x01"
    kr = Keyring([data_key()])
    decoded = kr.decrypt(kr.encrypt(value, PII), PII)
    assert decoded == value and type(decoded) is type(value)


@pytest.mark.parametrize("status", [KeyStatus.REVOKED, KeyStatus.COMPROMISED])
def test_decrypt_bytes_refuses_withdrawn_keys_by_default(status: KeyStatus) -> None:
    # the service's general path calls decrypt_bytes without for_reencryption
    dk = data_key(status=status)
    token = dk.seal_field(b"\x01v", None)
    with pytest.raises(DecryptionError) as exc:
        Keyring([dk]).decrypt_bytes(token, PII)
    assert exc.value.reason is DecryptionFailure.KEY_NOT_READABLE
    assert Keyring([dk]).decrypt_bytes(token, PII, for_reencryption=True) == b"\x01v"


def test_a_foreign_prefix_on_a_valid_body_is_malformed() -> None:
    dk = data_key()
    token = dk.seal_field(b"\x01v", None)
    for prefix in ("ac3.", "zz9.", "AC2.", "ac2:"):
        with pytest.raises(DecryptionError) as exc:
            Keyring([dk]).decrypt_bytes(prefix + token[4:], PII)
        assert exc.value.reason is DecryptionFailure.MALFORMED


def test_the_general_path_finds_one_character_key_ids() -> None:
    dk = data_key(key_id="k")
    token = dk.seal_field(b"\x01v", "c")
    assert Keyring([dk]).decrypt_bytes(token, PII, "c") == b"\x01v"


@pytest.mark.parametrize("token", ["ac2.nope-v1", "ac2.pii-v1", "ac2.pii-v1AAAA", "ac1.abc"])
def test_a_token_without_the_key_ids_dot_is_malformed_not_an_unknown_key(token: str) -> None:
    kr = Keyring([data_key()])
    for call in (kr.decrypt, kr.decrypt_bytes):
        with pytest.raises(DecryptionError) as exc:
            call(token, PII)
        assert not isinstance(exc.value, UnknownKeyError)
        assert exc.value.reason is DecryptionFailure.MALFORMED


def test_an_authentication_failure_names_the_key() -> None:
    dk = data_key()
    token = dk.seal_field(b"\x01v", "c")
    for call in (Keyring([dk]).decrypt, Keyring([dk]).decrypt_bytes):
        with pytest.raises(DecryptionError) as exc:
            call(token, PII, "other")
        assert exc.value.reason is DecryptionFailure.AUTHENTICATION_FAILED
        assert exc.value.key_id == dk.key_id


@pytest.mark.parametrize("context", ["\U0001f600" * 1025, "é" * 2049])
def test_a_str_context_over_4096_bytes_is_malformed(context: str) -> None:
    # the <= 1024 characters shortcut must not take a longer str unchecked
    dk = data_key()
    token = dk.seal_field(b"\x01v", "c")
    with pytest.raises(DecryptionError) as exc:
        Keyring([dk]).decrypt_bytes(token, PII, context)
    assert exc.value.reason is DecryptionFailure.MALFORMED


def test_a_str_context_of_1024_four_byte_characters_is_read() -> None:
    dk = data_key()
    context = "\U0001f600" * 1024  # 4096 bytes: the most a context may be
    token = dk.seal_field(b"\x01v", context)
    assert Keyring([dk]).decrypt_bytes(token, PII, context) == b"\x01v"


def test_a_token_of_exactly_max_token_chars_is_read_past_the_length_check() -> None:
    # at the limit the token is parsed (here: its key found, its all-zero body refused as
    # an unknown algorithm, naming the key); one character more is refused unread
    dk = data_key(key_id="k1x")
    kr = Keyring([dk])
    at_limit = dk.text_prefix + "A" * (MAX_TOKEN_CHARS - len(dk.text_prefix))
    with pytest.raises(DecryptionError) as exc:
        kr.decrypt_bytes(at_limit, PII)
    assert exc.value.reason is DecryptionFailure.MALFORMED and exc.value.key_id == "k1x"
    with pytest.raises(DecryptionError) as exc:
        kr.decrypt_bytes(at_limit + "AAAA", PII)
    assert exc.value.reason is DecryptionFailure.MALFORMED and exc.value.key_id is None


@pytest.mark.parametrize(
    "seal",
    [lambda kr: kr.encrypt("v", PII, "c"), lambda kr: kr.encrypt_bytes(b"\x01v", PII, "c")],
    ids=["encrypt", "encrypt_bytes"],
)
def test_tokens_sealed_within_the_allowance_are_tokens(seal: object) -> None:
    dk = data_key()
    dk.refill_at = 10
    kr = Keyring([dk])
    token = seal(kr)  # type: ignore[operator]
    assert kr.decrypt(token, PII, "c") == "v" and dk.encryptions == 1


def test_a_str_session_value_within_the_allowance_is_sealed_as_a_session() -> None:
    from aiocrypt._format import Purpose

    dk = data_key()
    dk.refill_at = 10
    kr = Keyring([dk])
    token = kr.encrypt("v", PII, "sid", purpose=Purpose.SESSION)
    assert kr.decrypt(token, PII, "sid", purpose=Purpose.SESSION) == "v"
    with pytest.raises(DecryptionError):
        kr.decrypt(token, PII, "sid")


def test_the_largest_field_is_sealed_and_one_byte_more_is_refused() -> None:
    from aiocrypt._format import MAX_FIELD_PLAINTEXT

    kr = Keyring([data_key(key_id="k" * 64)])
    token = kr.encrypt_bytes(bytes(MAX_FIELD_PLAINTEXT), PII)
    assert len(token) <= MAX_TOKEN_CHARS
    del token
    with pytest.raises(ValueError, match="a field holds at most"):
        kr.encrypt_bytes(bytes(MAX_FIELD_PLAINTEXT + 1), PII)


def test_undecodable_names_a_one_character_key_id() -> None:
    from aiocrypt._keyring import undecodable

    assert undecodable("ac2.k.AAAA").key_id == "k"
