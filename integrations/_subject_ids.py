"""The one rule by which the integrations name a data subject: ``"<prefix>:<value>"``.

An ORM column (``subject_column=`` / ``subject_prefix=``) and a session field
(``AIOCRYPT_SESSION_SUBJECT``) name the same person the same way, so
``forget_subject("user:42")`` reaches the rows, the sessions and the cache entries
of user 42 alike. The value is a str, an int or a UUID (as text); anything else
(a bool, a float, an empty string) is refused rather than given an id that another
spelling of the same value would not match.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from aiocrypt import ConfigurationError

__all__ = ["check_subject_prefix", "subject_id"]


def check_subject_prefix(prefix: Any, where: str) -> str:
    """``prefix`` if it can start a subject id (non-empty, no ``:``), else ConfigurationError."""
    if not isinstance(prefix, str) or not prefix or ":" in prefix:
        raise ConfigurationError(
            f"{where}: the subject prefix must be a non-empty string "
            "without ':' (subject ids read '<prefix>:<value>')"
        )
    return prefix


def subject_id(prefix: str, value: Any, where: str) -> str | None:
    """``"<prefix>:<value>"``, None for a None value; TypeError (naming ``where``, never
    the value) for a value that is not a non-empty str, an int or a UUID."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, UUID)) or value == "":
        raise TypeError(
            f"{where} names the data subject: it must hold a non-empty str, "
            f"an int or a UUID, not {type(value).__name__}"
        )
    return f"{prefix}:{value}"
