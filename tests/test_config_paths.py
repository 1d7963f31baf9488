"""The rarer paths of the settings, the URL scrubbing, the legacy readers and the errors.

Each test reaches one branch the rest of the suite leaves alone (issue 21) and
checks what happens there: the message, the value returned, the state after.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from aiocrypt import (
    ConfigurationError,
    CryptoConfigManager,
    DecryptionFailure,
    DecryptionLocation,
    EncryptionConfig,
    KeyRotationPolicy,
    KeyStatus,
    KeyType,
    ReencryptionError,
)
from aiocrypt._config import decode_master_key
from aiocrypt._urls import redact_url, scrub
from aiocrypt.adapters import LegacyTokenError, SqlalchemyUtilsReader

# -- rotation policies -------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"grace_period_days": -1}, "grace_period_days cannot be negative"),
        (
            {"rotation_interval_days": 400, "max_key_age_days": 365},
            "rotation_interval_days cannot exceed max_key_age_days",
        ),
        ({"max_encryptions": 2**32 + 1}, r"max_encryptions cannot exceed 2\*\*32"),
    ],
)
def test_a_rotation_policy_out_of_range_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeyRotationPolicy(KeyType.PII, **fields)


def test_a_rotation_policy_at_the_bounds_is_accepted() -> None:
    policy = KeyRotationPolicy(KeyType.PII, 365, 365, grace_period_days=0, max_encryptions=2**32)
    assert (policy.rotation_interval_days, policy.grace_period_days) == (365, 0)
    assert policy.max_encryptions == 2**32


# -- the master key ----------------------------------------------------------


def test_a_44_byte_key_that_is_not_a_fernet_key_is_refused() -> None:
    # 44 bytes once decoded, but those bytes are not base64 (a Fernet key is)
    not_fernet = base64.b64encode(b"\x00" * 44).decode()
    with pytest.raises(ValueError, match=r"base64 of 32 bytes \(it decodes to 44 bytes\)"):
        decode_master_key(not_fernet)
    # 44 base64 characters that decode to 33 bytes, not 32
    wrong_length = base64.b64encode(b"A" * 44).decode()
    with pytest.raises(ValueError, match=r"it decodes to 44 bytes") as info:
        decode_master_key(wrong_length)
    assert wrong_length not in str(info.value)


def test_a_fernet_key_is_accepted_as_the_master_key() -> None:
    raw = os.urandom(32)
    fernet_key = base64.urlsafe_b64encode(raw)
    assert decode_master_key(base64.b64encode(fernet_key).decode()) == raw


def test_master_key_bytes_without_a_master_key() -> None:
    with pytest.raises(ConfigurationError, match="ENCRYPTION_MASTER_KEY is not set"):
        EncryptionConfig(master_key=None).master_key_bytes()


def test_a_key_type_of_another_type_is_refused() -> None:
    config = EncryptionConfig()
    with pytest.raises(TypeError, match="key type must be a KeyType or str, not int"):
        config.declared_key_type(7)  # type: ignore[arg-type]  # the wrong type on purpose


# -- validation of the AWS settings --------------------------------------------


def _aws(**fields: Any) -> EncryptionConfig:
    return EncryptionConfig(
        storage_backend="aws_kms", redis_url="redis://127.0.0.1:6379/15", **fields
    )


def test_an_aws_key_arn_needs_no_region() -> None:
    arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    assert _aws(aws_kms_key_id=arn).validate() == []
    assert _aws(aws_kms_key_id="alias/app").validate() == [
        "storage backend 'aws_kms' needs ENCRYPTION_AWS_REGION (not set)"
    ]


def test_an_aws_access_key_without_its_secret_is_refused() -> None:
    problems = _aws(
        aws_region="eu-west-1", aws_kms_key_id="alias/app", aws_access_key_id="AKIAEXAMPLE"
    ).validate()
    assert problems == [
        "ENCRYPTION_AWS_ACCESS_KEY_ID and ENCRYPTION_AWS_SECRET_ACCESS_KEY "
        "must be set together (or neither, to use the default chain)"
    ]


# -- a key store file this process cannot write ----------------------------------

NOBODY = 65534


def test_validate_reports_a_key_file_the_process_cannot_write(tmp_path: Path) -> None:
    """``os.access`` checks the real user id: as root, the check runs with the real id
    of ``nobody`` (effective id kept, restored after), on a root-owned 0600 file in a
    directory anyone may write; otherwise on a read-only file of the test's own."""
    directory = Path(tempfile.mkdtemp(prefix="aiocrypt-access-"))  # /tmp: nobody may enter
    try:
        directory.chmod(0o777)
        path = directory / "keys.json"
        path.write_text("{}")
        path.chmod(0o600 if os.geteuid() == 0 else 0o400)
        config = EncryptionConfig(
            master_key=base64.b64encode(os.urandom(32)).decode(), storage_path=str(path)
        )
        if os.geteuid() == 0:
            os.setresuid(NOBODY, 0, 0)
            try:
                problems = config.validate()
            finally:
                os.setresuid(0, 0, 0)
        else:
            problems = config.validate()
        assert problems == [
            f"ENCRYPTION_KEY_STORAGE_PATH: {path} is not readable and writable by this process"
        ]
        if os.geteuid() == 0:  # the same file, checked as root again: no problem
            assert config.validate() == []
    finally:
        shutil.rmtree(directory)


# -- CryptoConfigManager.update_config ---------------------------------------------


def test_update_config_with_a_whole_config() -> None:
    manager = CryptoConfigManager(EncryptionConfig())
    new = EncryptionConfig(storage_backend="redis", redis_url="redis://127.0.0.1:6379/15")
    assert manager.update_config(new) is new
    assert manager.get_config() is new


def test_update_config_merges_a_mapping_of_policies() -> None:
    manager = CryptoConfigManager(EncryptionConfig())
    updated = manager.update_config(
        {"rotation_policies": {"pii": KeyRotationPolicy(KeyType.PII, 10, 20, 5)}}
    )
    assert updated.rotation_policy("pii").rotation_interval_days == 10
    # the other key types keep their policies
    assert updated.rotation_policy("session").rotation_interval_days == 30
    assert manager.get_rotation_policy("pii").max_key_age_days == 20


def test_update_config_refuses_a_value_the_config_refuses() -> None:
    manager = CryptoConfigManager(EncryptionConfig())
    before = manager.get_config()
    with pytest.raises(
        ConfigurationError, match=r"^invalid settings: grace_period_days cannot be negative$"
    ):
        manager.update_config({"rotation_policies": {"pii": {"grace_period_days": -1}}})
    with pytest.raises(ConfigurationError, match=r"^invalid settings: .* is not a mapping$"):
        manager.update_config({"rotation_policies": {"pii": 5}})
    assert manager.get_config() is before


# -- errors and statuses -----------------------------------------------------------


def test_a_reencryption_error_names_its_location() -> None:
    error = ReencryptionError(
        "users", "email", 42, reason=DecryptionFailure.UNKNOWN_KEY, key_id="pii-k9"
    )
    assert error.location == DecryptionLocation("users", "email", 42)
    assert str(error.location) == "users.email, primary key 42"
    assert str(error) == (
        "users.email: a stored value could not be decrypted for re-encryption "
        "(token names a key this store does not hold) (row primary key in .primary_key)"
    )


def test_only_a_destroyed_key_cannot_decrypt() -> None:
    assert [s for s in KeyStatus if not s.can_decrypt] == [KeyStatus.DESTROYED]
    assert [s for s in KeyStatus if s.can_encrypt] == [KeyStatus.ACTIVE]


# -- URL redaction -------------------------------------------------------------------


def test_a_password_before_the_host_without_slashes_hides_it_all() -> None:
    assert redact_url("redis:admin:s3cret@cache.internal:6379") == "***"


def test_scrub_masks_a_password_holding_a_slash() -> None:
    url = "redis://admin:pa/ss@cache.internal:6379/0"
    message = "AUTH failed for admin:pa/ss (pa/ss rejected)"
    scrubbed = scrub(message, url)
    assert "pa/ss" not in scrubbed
    assert scrubbed == "AUTH failed for *** (*** rejected)"


def test_scrub_without_a_url_only_redacts_urls_in_the_text() -> None:
    text = "cannot reach redis://u:pw@h:6379/0; pw is right"
    assert scrub(text, None, "") == "cannot reach redis://u:***@h:6379/0; pw is right"


# -- sqlalchemy-utils legacy tokens ---------------------------------------------------

LEGACY_KEY = "legacy key of the test"


def _aes_token(plaintext: bytes) -> str:
    """A sqlalchemy-utils ``AesEngine`` token (its documented algorithm) of ``plaintext``."""
    secret = hashlib.sha256(LEGACY_KEY.encode()).digest()
    encryptor = Cipher(algorithms.AES(secret), modes.CBC(secret[:16])).encryptor()
    return base64.b64encode(encryptor.update(plaintext) + encryptor.finalize()).decode()


def test_a_legacy_token_of_bytes_that_are_not_utf8() -> None:
    secret = hashlib.sha256(LEGACY_KEY.encode()).digest()
    token = Fernet(base64.urlsafe_b64encode(secret)).encrypt(b"\xff\xfe")
    reader = SqlalchemyUtilsReader(LEGACY_KEY, "fernet")
    with pytest.raises(LegacyTokenError, match=r"^not a legacy token$"):
        reader.open(token.decode())
    good = Fernet(base64.urlsafe_b64encode(secret)).encrypt("héllo".encode())
    assert reader.open(good.decode()) == "héllo"


@pytest.mark.parametrize(
    ("padding", "block"),
    [
        ("pkcs5", b"A" * 16),  # last byte 0x41: no PKCS#5 padding
        ("pkcs5", b"A" * 14 + b"\x01\x02"),  # 2 bytes of padding claimed, 1 there
        ("zeroes", b"A" * 15 + b"\x00"),  # a count of 0
    ],
)
def test_a_legacy_aes_token_with_bad_padding(padding: str, block: bytes) -> None:
    reader = SqlalchemyUtilsReader(LEGACY_KEY, "aes", padding=padding)
    with pytest.raises(LegacyTokenError, match=r"^not a legacy token$"):
        reader.open(_aes_token(block))


def test_legacy_aes_tokens_with_good_padding_open() -> None:
    assert (
        SqlalchemyUtilsReader(LEGACY_KEY, "aes", padding="pkcs5").open(
            _aes_token(b"0123456789" + b"\x06" * 6)
        )
        == "0123456789"
    )
    assert (
        SqlalchemyUtilsReader(LEGACY_KEY, "aes", padding="zeroes").open(
            _aes_token(b"0123456789" + b"\x00" * 5 + b"\x06")
        )
        == "0123456789"
    )


def test_a_legacy_aes_token_not_a_whole_number_of_blocks() -> None:
    reader = SqlalchemyUtilsReader(LEGACY_KEY, "aes")
    whole = _aes_token(b"0123456789******")
    assert reader.open(whole) == "0123456789"
    cut = base64.b64encode(base64.b64decode(whole)[:15]).decode()
    with pytest.raises(LegacyTokenError, match=r"^not a legacy token$"):
        reader.open(cut)
    with pytest.raises(LegacyTokenError, match=r"^not a legacy token$"):
        reader.open("")
