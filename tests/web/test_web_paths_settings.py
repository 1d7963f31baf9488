"""Paths of the web settings and the shared extension code the wider suite leaves
unrun: session settings' checks, the subject of a session without subject field,
and regenerate() of a session that is not aiocrypt's."""

from __future__ import annotations

from typing import Any

import pytest
from flask.sessions import NullSession

from aiocrypt import ConfigurationError
from aiocrypt.integrations.flask import EncryptedSessionInterface, FlaskSession
from aiocrypt.integrations.sessions import SessionSettings


@pytest.mark.parametrize("prefix", ["", 5])
def test_session_prefix_must_be_a_non_empty_string(prefix: Any) -> None:
    with pytest.raises(ConfigurationError, match="session key prefix must be a non-empty string"):
        SessionSettings(prefix=prefix)


@pytest.mark.parametrize("field", ["", 7])
def test_session_subject_field_must_be_a_non_empty_string(field: Any) -> None:
    with pytest.raises(ConfigurationError, match="the session subject field must be a non-empty"):
        SessionSettings(subject_field=field)


def test_a_session_without_subject_field_belongs_to_no_subject() -> None:
    assert SessionSettings().subject_of({"user_id": 42}) is None
    assert SessionSettings(subject_field="user_id").subject_of({"user_id": 42}) == "user:42"


def test_regenerate_leaves_a_foreign_session_alone() -> None:
    interface = EncryptedSessionInterface()
    null = NullSession()
    interface.regenerate(null)  # not aiocrypt's: nothing to move
    assert dict(null) == {}
    ours = FlaskSession({"a": 1})
    ours.modified = False
    interface.regenerate(ours)
    assert ours.modified and dict(ours) == {"a": 1}


@pytest.mark.parametrize(("name", "value"), [("ttl", 0), ("ttl", "60"), ("lifetime", True)])
def test_session_lifetimes_must_be_positive_seconds(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"session {name} must be a positive number"):
        SessionSettings(**{name: value})
