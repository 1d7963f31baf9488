"""How long sessions live and where they go in Redis: ``SessionSettings``, read by the stores.

Apart from ``sessions.py`` so that the web extensions' configuration
(``_web_settings.py``) can build one without importing the stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiocrypt import ConfigurationError, KeyType

from ._subject_ids import check_subject_prefix, subject_id

__all__ = ["MAX_SID_BYTES", "SESSION_INDEX_KEY_TYPE", "SID_BYTES", "SessionSettings"]

SESSION_INDEX_KEY_TYPE: Final = KeyType("session_index")
"""Key type of the HMAC keys that turn session ids into Redis keys."""

SID_BYTES: Final = 32
"""Random bytes of a session id, and the least ``SESSION_ID_LENGTH`` accepts."""
MAX_SID_BYTES: Final = 128


@dataclass(frozen=True)
class SessionSettings:
    """How long sessions live and where they go in Redis."""

    ttl: int = 3600
    """Idle timeout in seconds: the Redis TTL, refreshed by every request (sliding)."""
    lifetime: int = 86400
    """Absolute lifetime in seconds since creation or the last ``regenerate()``."""
    prefix: str = "aiocrypt:session:"
    """Prefix of every Redis key the store writes."""
    sid_bytes: int = SID_BYTES
    """Random bytes in a new session id (at least 32)."""
    refresh_each_request: bool = True
    """Every load of a session resets its Redis TTL (False: only writes do)."""
    permanent: bool = False
    """``session.permanent`` of a session that never set it."""
    subject_field: str | None = None
    """The session field whose value names the data subject (``"user_id"``): a session
    holding it is sealed under ``"<subject_prefix>:<value>"``'s subject key, so
    ``forget_subject`` on that id empties it. None: sessions belong to no subject."""
    subject_prefix: str = "user"
    """The kind of subject ``subject_field`` names: the subject id is ``prefix:value``."""

    def __post_init__(self) -> None:
        for name in ("ttl", "lifetime"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"session {name} must be a positive number of seconds")
        if not isinstance(self.prefix, str) or not self.prefix:
            raise ConfigurationError("session key prefix must be a non-empty string")
        if self.subject_field is not None and (
            not isinstance(self.subject_field, str) or not self.subject_field
        ):
            raise ConfigurationError("the session subject field must be a non-empty string")
        check_subject_prefix(self.subject_prefix, "session settings")
        if (
            isinstance(self.sid_bytes, bool)
            or not isinstance(self.sid_bytes, int)
            or not SID_BYTES <= self.sid_bytes <= MAX_SID_BYTES
        ):
            raise ConfigurationError(
                f"session id length must be {SID_BYTES} to {MAX_SID_BYTES} random bytes"
            )

    def subject_of(self, data: Mapping[str, Any]) -> str | None:
        """The subject id a session with ``data`` is sealed under, or None.

        ``"<subject_prefix>:<value>"`` for a ``subject_field`` holding a str, an int
        or a UUID; a session without the field (or with None) belongs to no subject.
        """
        if self.subject_field is None:
            return None
        return subject_id(
            self.subject_prefix,
            data.get(self.subject_field),
            f"session field {self.subject_field!r}",
        )
