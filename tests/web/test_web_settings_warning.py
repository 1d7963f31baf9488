"""A session cookie without Secure is allowed (the frameworks' default, needed on
http://localhost) but never silent: configuring it logs a warning."""

from __future__ import annotations

import logging

import pytest

from aiocrypt.integrations.sessions import WebSettings

URL = {"AIOCRYPT_REDIS_URL": "redis://127.0.0.1:6379/0"}


def test_secure_off_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aiocrypt.web"):
        settings = WebSettings.from_config({**URL, "SESSION_COOKIE_SECURE": False})
    assert settings.cookie_secure is False
    assert any("without Secure" in r.getMessage() for r in caplog.records)


def test_secure_on_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aiocrypt.web"):
        settings = WebSettings.from_config({**URL, "SESSION_COOKIE_SECURE": True})
    assert settings.cookie_secure is True
    assert not [r for r in caplog.records if "without Secure" in r.getMessage()]
