"""Configuration from the environment and the JSON file; validate_environment."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from aiocrypt import (
    ConfigurationError,
    CryptoConfigManager,
    EncryptionConfig,
    KeyType,
    PerformanceMode,
)
from aiocrypt._config import decode_master_key

ALL_VARS = {
    "ENCRYPTION_KEY_ID": "primary",
    "ENCRYPTION_KEY_VERSION": "3",
    "ENCRYPTION_KEY_STORAGE_BACKEND": "file",
    "ENCRYPTION_KEY_STORAGE_PATH": "/tmp/k.json",
    "ENCRYPTION_REDIS_URL": "redis://127.0.0.1:6379/0",
    "ENCRYPTION_VAULT_URL": "http://127.0.0.1:8200",
    "ENCRYPTION_VAULT_TOKEN": "tok",
    "ENCRYPTION_AWS_REGION": "eu-west-1",
    "ENCRYPTION_AWS_ACCESS_KEY_ID": "AKIA",
    "ENCRYPTION_AWS_SECRET_ACCESS_KEY": "shh",
    "ENCRYPTION_AZURE_TENANT_ID": "t",
    "ENCRYPTION_AZURE_CLIENT_ID": "c",
    "ENCRYPTION_AZURE_CLIENT_SECRET": "s",
    "ENCRYPTION_GCP_PROJECT_ID": "p",
    "ENCRYPTION_GCP_LOCATION": "global",
    "ENCRYPTION_GCP_KEYRING": "ring",
}


def test_every_seed_variable_is_accepted(master_key_b64: str, clean_env: None) -> None:
    config = EncryptionConfig.from_env({**ALL_VARS, "ENCRYPTION_MASTER_KEY": master_key_b64})
    assert config.key_id == "primary" and config.key_version == "3"
    assert config.storage_path == "/tmp/k.json"
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert (config.vault_url, config.vault_token) == ("http://127.0.0.1:8200", "tok")
    assert (config.aws_region, config.aws_access_key_id, config.aws_secret_access_key) == (
        "eu-west-1",
        "AKIA",
        "shh",
    )
    assert (config.azure_tenant_id, config.azure_client_id, config.azure_client_secret) == (
        "t",
        "c",
        "s",
    )
    assert (config.gcp_project_id, config.gcp_location, config.gcp_keyring) == (
        "p",
        "global",
        "ring",
    )
    assert config.master_key_bytes() == base64.b64decode(master_key_b64)


def test_master_key_forms(master_key: bytes) -> None:
    assert decode_master_key(base64.b64encode(master_key).decode()) == master_key
    assert decode_master_key(base64.urlsafe_b64encode(master_key).decode()) == master_key
    fernet_key = Fernet.generate_key()
    assert decode_master_key(fernet_key.decode()) == base64.urlsafe_b64decode(fernet_key)
    assert decode_master_key(base64.b64encode(fernet_key).decode()) == base64.urlsafe_b64decode(
        fernet_key
    )
    with pytest.raises(ValueError, match="16 bytes") as info:
        decode_master_key(base64.b64encode(master_key[:16]).decode())
    assert base64.b64encode(master_key[:16]).decode() not in str(info.value)
    with pytest.raises(ValueError, match="not valid base64"):
        decode_master_key("not base64 at all!")


def problems(env: dict[str, str], tmp_path: Path) -> list[str]:
    env = {"ENCRYPTION_KEY_STORAGE_PATH": str(tmp_path / "keys.json"), **env}
    return CryptoConfigManager(environ=env).validate_environment()


def test_validate_environment_reports_each_problem(
    tmp_path: Path, master_key_b64: str, clean_env: None
) -> None:
    assert problems({"ENCRYPTION_MASTER_KEY": master_key_b64}, tmp_path) == []
    missing = problems({}, tmp_path)
    assert len(missing) == 1 and "ENCRYPTION_MASTER_KEY is missing" in missing[0]
    short = problems({"ENCRYPTION_MASTER_KEY": base64.b64encode(b"x" * 20).decode()}, tmp_path)
    assert short == ["ENCRYPTION_MASTER_KEY must be base64 of 32 bytes (it decodes to 20 bytes)"]
    unknown = problems(
        {"ENCRYPTION_MASTER_KEY": master_key_b64, "ENCRYPTION_KEY_STORAGE_BACKEND": "floppy"},
        tmp_path,
    )
    assert any("'floppy' is unknown" in p for p in unknown)
    nodir = problems(
        {
            "ENCRYPTION_MASTER_KEY": master_key_b64,
            "ENCRYPTION_KEY_STORAGE_PATH": str(tmp_path / "no" / "k.json"),
        },
        tmp_path,
    )
    assert nodir[0].startswith(
        f"ENCRYPTION_KEY_STORAGE_PATH: directory {tmp_path / 'no'} does not exist: create it"
    )
    vault = problems(
        {
            "ENCRYPTION_KEY_STORAGE_BACKEND": "vault",
            "ENCRYPTION_VAULT_URL": "http://127.0.0.1:8200",
        },
        tmp_path,
    )
    assert vault == ["storage backend 'vault' needs ENCRYPTION_VAULT_TOKEN (not set)"]
    redis = problems(
        {"ENCRYPTION_KEY_STORAGE_BACKEND": "redis", "ENCRYPTION_MASTER_KEY": master_key_b64},
        tmp_path,
    )
    assert redis == ["storage backend 'redis' needs ENCRYPTION_REDIS_URL (not set)"]
    aws = problems({"ENCRYPTION_KEY_STORAGE_BACKEND": "aws_kms"}, tmp_path)
    assert aws == [
        "storage backend 'aws_kms' needs ENCRYPTION_AWS_REGION, ENCRYPTION_AWS_KMS_KEY_ID (not set)"
    ]


def test_unusable_storage_path(tmp_path: Path, master_key_b64: str) -> None:
    (tmp_path / "adir" / "keys.json").mkdir(parents=True)  # a directory holds keys.json ...
    found = problems(
        {
            "ENCRYPTION_MASTER_KEY": master_key_b64,
            "ENCRYPTION_KEY_STORAGE_PATH": str(tmp_path / "adir"),
        },
        tmp_path,
    )
    assert found == [  # ... which must then be a file
        f"ENCRYPTION_KEY_STORAGE_PATH: {tmp_path / 'adir' / 'keys.json'} is not a regular file"
    ]
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    found = problems(
        {
            "ENCRYPTION_MASTER_KEY": master_key_b64,
            "ENCRYPTION_KEY_STORAGE_PATH": str(locked / "k.json"),
        },
        tmp_path,
    )
    assert found == [
        f"ENCRYPTION_KEY_STORAGE_PATH: directory {locked} is not writable by "
        "this process (the key store writes k.json and its lock files there)"
    ]


def test_json_file_overrides_defaults(tmp_path: Path, master_key_b64: str) -> None:
    path = tmp_path / "encryption.json"
    path.write_text(
        json.dumps(
            {
                "algorithm": "AES_256_GCM",
                "key_size_bits": 256,
                "performance_mode": "security",
                "compression_enabled": True,
                "rotation_policies": [
                    {
                        "key_type": "pii",
                        "rotation_interval_days": 60,
                        "max_key_age_days": 120,
                        "grace_period_days": 10,
                        "auto_rotation": False,
                        "batch_size": 500,
                    }
                ],
            }
        )
    )
    manager = CryptoConfigManager(
        environ={"ENCRYPTION_MASTER_KEY": master_key_b64}, config_file=path
    )
    config = manager.get_config()
    assert config.performance_mode is PerformanceMode.SECURITY
    assert config.compression_enabled is True
    pii = manager.get_rotation_policy(KeyType.PII)
    assert (
        pii.rotation_interval_days,
        pii.max_key_age_days,
        pii.grace_period_days,
        pii.auto_rotation,
        pii.batch_size,
    ) == (60, 120, 10, False, 500)
    assert manager.get_rotation_policy("financial_data").rotation_interval_days == 90
    assert manager.get_performance_settings()["inline_threshold"] == 16 * 1024


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"colour": "blue"}', "unknown keys: colour"),
        (
            '{"rotation_policies": [{"key_type": "pii", "rotation_interval_days": 0}]}',
            "bad rotation policy",
        ),
        ('{"performance_mode": "turbo"}', "unknown performance_mode"),
    ],
)
def test_bad_json_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "encryption.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        CryptoConfigManager(environ={}, config_file=path)


def test_default_policies_match_the_design() -> None:
    config = EncryptionConfig()
    expected = {
        "financial_data": (90, 365, 30),
        "pii": (180, 730, 30),
        "session": (30, 90, 30),
        "api_keys": (90, 365, 30),
        "audit_logs": (365, 1825, 30),
    }
    for key_type, (rotate, age, grace) in expected.items():
        policy = config.rotation_policy(key_type)
        assert (
            policy.rotation_interval_days,
            policy.max_key_age_days,
            policy.grace_period_days,
        ) == (rotate, age, grace)
        assert policy.max_encryptions == 2**31


def test_update_config(master_key_b64: str) -> None:
    manager = CryptoConfigManager(EncryptionConfig(master_key=master_key_b64))
    updated = manager.update_config(
        {
            "performance_mode": "performance",
            "rotation_policies": [
                {"key_type": "session", "rotation_interval_days": 7, "max_key_age_days": 14}
            ],
        }
    )
    assert updated.performance_mode is PerformanceMode.PERFORMANCE
    assert manager.get_rotation_policy("session").rotation_interval_days == 7
    assert manager.get_rotation_policy("pii").rotation_interval_days == 180
    with pytest.raises(ConfigurationError):
        manager.update_config({"performance_mode": "turbo"})
    with pytest.raises(ConfigurationError, match="unknown settings"):
        manager.update_config({"colour": "blue"})
    with pytest.raises(ConfigurationError):
        manager.update_config({"key_size_bits": 128})
    assert manager.get_config() is updated


def test_performance_modes_never_change_the_cipher() -> None:
    for mode in PerformanceMode:
        config = EncryptionConfig(performance_mode=mode)
        assert config.algorithm == "AES_256_GCM" and config.key_size_bits == 256
        assert config.performance.segment_size >= 256 * 1024


def test_compressed_key_types_from_env_and_file(tmp_path: Path, master_key_b64: str) -> None:
    env = {
        "ENCRYPTION_MASTER_KEY": master_key_b64,
        "ENCRYPTION_COMPRESSED_KEY_TYPES": " audit_logs, cache ,",
    }
    config = EncryptionConfig.from_env(env)
    assert config.compressed_key_types == {KeyType.AUDIT_LOGS, KeyType.CACHE}
    level = config.performance.compression_level
    assert config.compression_level_for("audit_logs") == level
    assert config.compression_level_for(KeyType.PII) is None
    assert config.compression_level is None  # not every key type
    assert config.to_public_dict()["compressed_key_types"] == ["audit_logs", "cache"]
    assert EncryptionConfig(compression_enabled=True).compression_level_for("pii") == level
    path = tmp_path / "encryption.json"
    path.write_text(json.dumps({"compressed_key_types": ["pii"]}))
    assert EncryptionConfig.from_env(
        {"ENCRYPTION_CONFIG_FILE": str(path)}
    ).compressed_key_types == {KeyType.PII}
    path.write_text(json.dumps({"compressed_key_types": [1, 2]}))
    with pytest.raises(ConfigurationError, match="compressed_key_types"):
        EncryptionConfig.from_env({"ENCRYPTION_CONFIG_FILE": str(path)})
    with pytest.raises(ConfigurationError, match="compressed_key_types"):
        EncryptionConfig.from_env({"ENCRYPTION_COMPRESSED_KEY_TYPES": "NOT a key type!"})


def test_master_key_file_is_read_instead_of_the_variable(tmp_path: Path) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    key_file = tmp_path / "master.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    config = EncryptionConfig.from_env({"ENCRYPTION_MASTER_KEY_FILE": str(key_file)})
    assert config.master_key_bytes() == base64.b64decode(key)
    assert key not in repr(config)
    with pytest.raises(ConfigurationError, match="both ENCRYPTION_MASTER_KEY and "):
        EncryptionConfig.from_env(
            {"ENCRYPTION_MASTER_KEY_FILE": str(key_file), "ENCRYPTION_MASTER_KEY": key}
        )
    with pytest.raises(ConfigurationError, match=r"cannot read .*No such file") as missing:
        EncryptionConfig.from_env({"ENCRYPTION_MASTER_KEY_FILE": str(tmp_path / "nope")})
    assert "ENCRYPTION_MASTER_KEY_FILE" in str(missing.value)
    (tmp_path / "empty.key").write_text("\n")
    with pytest.raises(ConfigurationError, match="does not hold a master key"):
        EncryptionConfig.from_env({"ENCRYPTION_MASTER_KEY_FILE": str(tmp_path / "empty.key")})
    (tmp_path / "bin.key").write_bytes(b"\xff" * 40)
    with pytest.raises(ConfigurationError, match="does not hold a master key") as binary:
        EncryptionConfig.from_env({"ENCRYPTION_MASTER_KEY_FILE": str(tmp_path / "bin.key")})
    assert "\\xff" not in str(binary.value)
