"""One boolean parser (aiocrypt.adapters.parse_bool) for every setting: the same
words everywhere, anything else refused naming the setting."""

from __future__ import annotations

import pytest

from aiocrypt import ConfigurationError, EncryptionConfig
from aiocrypt.adapters import FALSE_WORDS, TRUE_WORDS, parse_bool
from aiocrypt.reencrypt import parse_legacy

WORDS = sorted(TRUE_WORDS) + sorted(FALSE_WORDS)


@pytest.mark.parametrize("word", [*WORDS, " YES ", "Off"])
def test_the_environment_and_app_config_accept_the_same_words(word: str) -> None:
    expected = word.strip().lower() in TRUE_WORDS
    assert parse_bool("X", word) is expected
    config = EncryptionConfig.from_env({"ENCRYPTION_COMPRESSION_ENABLED": word})
    assert config.compression_enabled is expected
    pytest.importorskip("flask")
    from aiocrypt.integrations.sessions import WebSettings

    settings = WebSettings.from_config(
        {"SESSION_PERMANENT": word, "AIOCRYPT_REDIS_URL": "redis://127.0.0.1:6379/0"}
    )
    assert settings.session.permanent is expected


@pytest.mark.parametrize("value", ["maybe", "t", "y", "enabled", "", 1, None])
def test_other_values_are_refused_naming_the_setting(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"^SESSION_PERMANENT must be true or false"):
        parse_bool("SESSION_PERMANENT", value)


def test_a_bad_flag_names_its_variable_or_key() -> None:
    with pytest.raises(ConfigurationError, match="ENCRYPTION_ACCEPT_FORMAT_V1 must be true"):
        EncryptionConfig.from_env({"ENCRYPTION_ACCEPT_FORMAT_V1": "nope"})
    pytest.importorskip("flask")
    from aiocrypt.integrations.sessions import WebSettings

    with pytest.raises(ConfigurationError, match="SESSION_PERMANENT must be true or false"):
        WebSettings.from_config(
            {"SESSION_PERMANENT": "t", "AIOCRYPT_REDIS_URL": "redis://127.0.0.1:6379/0"}
        )


def test_stored_legacy_booleans_also_take_the_databases_short_forms() -> None:
    # data, not a setting: Postgres prints a boolean as t / f
    assert [parse_legacy("bool", v) for v in ("t", "f", "Y", "n", "yes", "0")] == [
        True,
        False,
        True,
        False,
        True,
        False,
    ]
    with pytest.raises(ValueError, match="not a valid bool"):
        parse_legacy("bool", "maybe")
