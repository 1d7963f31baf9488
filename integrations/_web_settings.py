"""The configuration of the Quart and Flask extensions: ``WebSettings.from_config``.

One place reads every key, once, at ``init_app``: the frameworks' own session
keys, Flask-Session's and Quart-Session's names where they map, and the
``AIOCRYPT_*`` overrides (docs/web.md has the table). A value that does not
fit raises ``ConfigurationError`` naming its key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

from aiocrypt import ConfigurationError, KeyType
from aiocrypt.adapters import parse_bool as _bool

from ._session_settings import (
    MAX_SID_BYTES,
    SESSION_INDEX_KEY_TYPE,
    SID_BYTES,
    SessionSettings,
)
from ._subject_ids import check_subject_prefix

logger = logging.getLogger("aiocrypt.web")

__all__ = ["WebSettings"]

_SAMESITE: Final = {"strict": "Strict", "lax": "Lax", "none": "None"}
_UNSET: Final[Any] = object()


def _seconds(name: str, value: Any) -> int:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name} must be a whole number of seconds") from None
    if isinstance(value, bool) or seconds < 1:
        raise ConfigurationError(f"{name} must be at least 1 second")
    return seconds


def _text_value(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{name} must be a non-empty string")
    return value


class _Config:
    """Looks keys up in order: the first one set (not None) wins; errors name that key."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = config

    def first(self, *names: str, default: Any = _UNSET) -> tuple[str, Any]:
        for name in names:
            value = self._config.get(name)
            if value is not None:
                return name, value
        return names[0], default


@dataclass(frozen=True)
class WebSettings:
    """The configuration of the Quart and Flask extensions, read once by ``init_app``.

    Each setting comes from the first key that is set (not ``None``) among an
    ``AIOCRYPT_*`` override, the framework's own key and Flask-Session's /
    Quart-Session's name; docs/web.md has the table. A Flask or Quart app's
    config always holds the framework keys, so their defaults are the
    framework's (``SESSION_COOKIE_SECURE`` False, ``SESSION_COOKIE_SAMESITE``
    None, ``PERMANENT_SESSION_LIFETIME`` 31 days); the defaults below apply
    to a bare mapping.
    """

    redis_url: str | None = field(default=None, repr=False)
    """``AIOCRYPT_REDIS_URL``, else ``SESSION_URI`` (when no ``SESSION_REDIS`` client)."""
    redis_client: Any = field(default=None, repr=False, compare=False)
    """``SESSION_REDIS``: a client the app built (the app closes it)."""
    session: SessionSettings = field(default_factory=SessionSettings)
    cache_prefix: str = "aiocrypt:cache:"
    cache_ttl: int = 300
    cookie_name: str = "session"
    cookie_domain: str | None = None
    cookie_path: str = "/"
    cookie_httponly: bool = True
    cookie_secure: bool = True
    cookie_samesite: str | None = "Lax"
    cookie_partitioned: bool = False
    cache_control: str | None = "private, no-store"
    """Set on responses that read a non-empty session (unless the view set its own)."""
    retry_after: int = 5
    """``Retry-After`` (seconds) of the 503 answered when Redis is unavailable."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, client_given: bool = False) -> WebSettings:  # noqa: C901 - one framework config key per line, each validated in place
        """Read the keys from an app's config; ``ConfigurationError`` names a bad key.

        ``client_given``: the extension was handed a Redis client, so no
        Redis needs to be configured; otherwise one must be.
        """
        default, session_default = cls(), SessionSettings()
        keys = _Config(config)

        name, session_type = keys.first("SESSION_TYPE", default="redis")
        if str(session_type).lower() != "redis":
            raise ConfigurationError(
                f"{name} must be 'redis' (aiocrypt stores sessions in Redis), or unset"
            )
        name, url = keys.first("AIOCRYPT_REDIS_URL", default=None)
        client = None
        if url is None:
            client = config.get("SESSION_REDIS")
            if client is None:
                name, url = keys.first("SESSION_URI", default=None)
        if url is not None:
            url = _text_value(name, url)
        if url is None and client is None and not client_given:
            raise ConfigurationError(
                "no Redis for sessions and the cache: set AIOCRYPT_REDIS_URL (or "
                "SESSION_REDIS / SESSION_URI), or pass redis= to AioCrypt"
            )

        def seconds(*names: str, default: int) -> int:
            name, value = keys.first(*names, default=default)
            return _seconds(name, value)

        def flag(*names: str, default: bool) -> bool:
            name, value = keys.first(*names, default=default)
            return _bool(name, value)

        def text(*names: str, default: str) -> str:
            name, value = keys.first(*names, default=default)
            return _text_value(name, value)

        name, samesite = keys.first(
            "AIOCRYPT_COOKIE_SAMESITE",
            "SESSION_COOKIE_SAMESITE",
            default=None if "SESSION_COOKIE_SAMESITE" in config else default.cookie_samesite,
        )
        if samesite is not None:
            if not isinstance(samesite, str) or samesite.lower() not in _SAMESITE:
                raise ConfigurationError(f"{name} must be Strict, Lax, None (the string) or unset")
            samesite = _SAMESITE[samesite.lower()]
        name_id, sid_bytes = keys.first("SESSION_ID_LENGTH", default=session_default.sid_bytes)
        if (
            isinstance(sid_bytes, bool)
            or not isinstance(sid_bytes, int)
            or not SID_BYTES <= sid_bytes <= MAX_SID_BYTES
        ):
            raise ConfigurationError(
                f"{name_id} must be a number of random bytes from {SID_BYTES} to {MAX_SID_BYTES}"
            )
        name_cc, cache_control = keys.first(
            "AIOCRYPT_SESSION_CACHE_CONTROL", default=default.cache_control
        )
        if cache_control is False or cache_control == "":
            cache_control = None
        # first() skips None and the default is a string: None only through the if above
        elif cache_control is not None:  # pragma: no branch - never None here
            cache_control = _text_value(name_cc, cache_control)
        name_subject, subject_field = keys.first("AIOCRYPT_SESSION_SUBJECT", default=None)
        if subject_field is not None:
            subject_field = _text_value(name_subject, subject_field)
        subject_prefix = text(
            "AIOCRYPT_SESSION_SUBJECT_PREFIX", default=session_default.subject_prefix
        )
        check_subject_prefix(subject_prefix, "AIOCRYPT_SESSION_SUBJECT_PREFIX")
        domain = config.get("SESSION_COOKIE_DOMAIN") or None  # Flask: False / None: no domain
        if domain is not None:
            domain = _text_value("SESSION_COOKIE_DOMAIN", domain)
        settings = cls(
            redis_url=url,
            redis_client=client,
            session=SessionSettings(
                ttl=seconds(
                    "AIOCRYPT_SESSION_TTL",
                    "PERMANENT_SESSION_LIFETIME",
                    default=session_default.ttl,
                ),
                lifetime=seconds("AIOCRYPT_SESSION_LIFETIME", default=session_default.lifetime),
                prefix=text(
                    "AIOCRYPT_SESSION_PREFIX", "SESSION_KEY_PREFIX", default=session_default.prefix
                ),
                sid_bytes=sid_bytes,
                refresh_each_request=flag("SESSION_REFRESH_EACH_REQUEST", default=True),
                permanent=flag("SESSION_PERMANENT", default=False),
                subject_field=subject_field,
                subject_prefix=subject_prefix,
            ),
            cache_prefix=text("AIOCRYPT_CACHE_PREFIX", default=default.cache_prefix),
            cache_ttl=seconds("AIOCRYPT_CACHE_TTL", default=default.cache_ttl),
            cookie_name=text("SESSION_COOKIE_NAME", default=default.cookie_name),
            cookie_domain=domain,
            cookie_path=text(
                "SESSION_COOKIE_PATH", "APPLICATION_ROOT", default=default.cookie_path
            ),
            cookie_httponly=flag("SESSION_COOKIE_HTTPONLY", default=default.cookie_httponly),
            cookie_secure=flag(
                "AIOCRYPT_COOKIE_SECURE", "SESSION_COOKIE_SECURE", default=default.cookie_secure
            ),
            cookie_samesite=samesite,
            cookie_partitioned=flag(
                "SESSION_COOKIE_PARTITIONED", default=default.cookie_partitioned
            ),
            cache_control=cache_control,
            retry_after=seconds("AIOCRYPT_RETRY_AFTER", default=default.retry_after),
        )
        if not settings.cookie_secure:
            # the frameworks' default: fine on http://localhost, not in production
            logger.warning(
                "the session cookie is sent without Secure (SESSION_COOKIE_SECURE "
                "is off): set it on behind HTTPS, or the cookie travels in clear "
                "text over any plain-HTTP request"
            )
        if settings.cookie_samesite == "None" and not settings.cookie_secure:
            raise ConfigurationError(
                "SESSION_COOKIE_SAMESITE=None needs SESSION_COOKIE_SECURE "
                "(browsers drop such a cookie)"
            )
        if settings.cache_prefix == settings.session.prefix:
            raise ConfigurationError(
                "the session and cache Redis prefixes must differ "
                "(AIOCRYPT_SESSION_PREFIX / SESSION_KEY_PREFIX and "
                "AIOCRYPT_CACHE_PREFIX)"
            )
        return settings

    @staticmethod
    def key_types() -> Iterable[KeyType]:
        """Key types the extensions make sure exist at startup."""
        return (KeyType.SESSION, SESSION_INDEX_KEY_TYPE, KeyType.CACHE)

    def outage_body(self) -> tuple[str, dict[str, str]]:
        """The JSON body and headers of the default 503 for ``StoreUnavailableError``."""
        return (
            '{"error": "temporarily unavailable"}',
            {"Retry-After": str(self.retry_after), "Cache-Control": "no-store"},
        )
