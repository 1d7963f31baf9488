"""Encrypted server-side sessions in Redis, for any web framework.

A session id is 256 random bits (43 URL-safe characters) and lives only in
the client's cookie. Redis never sees it:

* the Redis key is ``prefix + HMAC-SHA256(index key, session id)``, with an
  index key derived from a key type of its own (``session_index``), so a dump
  of Redis holds nothing a client could present as a cookie;
* the value is the session dict encrypted with the ``session`` key type and
  bound to the session id (AES-GCM associated data), so a payload copied to
  another session's Redis key, or from another application, fails to decrypt.

Expiry is sliding (``ttl``: every load refreshes the Redis TTL) and absolute
(``lifetime``: counted from creation or the last ``regenerate()``, checked
inside the encrypted payload). A missing, corrupt, foreign or expired payload
gives a fresh empty session, never an error. Writes to an existing session
only succeed while its Redis key exists, so a request racing with a logout
cannot bring the session back.

When the index key rotates, lookups try the active version first, then every
older live version in one round trip, and move a session found under an old
version to its new Redis key (the payload is bound to the id, not the Redis
key, so it moves without re-encryption). When the session key rotates, old
payloads still decrypt and are re-encrypted with the new key on their next
write.

``RedisSessionStore`` is the asyncio store (``redis.asyncio`` and the
``EncryptionService``); ``SyncRedisSessionStore`` is its twin for sync code
(Flask's session interface) over ``redis.Redis`` and a ``Keyring`` snapshot.
Both read and write the same format. ``WebSettings`` reads the documented
``AIOCRYPT_*`` configuration keys of the Quart and Flask extensions.
"""

from __future__ import annotations

import enum
import functools
import hmac
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

from aiocrypt import (
    ConfigurationError,
    DecryptionError,
    Keyring,
    KeyStatus,
    KeyType,
    Purpose,
    UnknownKeyError,
)

if TYPE_CHECKING:
    import redis
    import redis.asyncio

    from aiocrypt import EncryptionService

__all__ = [
    "SESSION_INDEX_KEY_TYPE",
    "CookieAction",
    "EncryptedSession",
    "RedisSessionStore",
    "SaveResult",
    "SessionSettings",
    "SyncRedisSessionStore",
    "WebSettings",
    "apply_cookie",
    "new_session_id",
]

SESSION_INDEX_KEY_TYPE: Final = KeyType("session_index")
"""Key type of the HMAC keys that turn session ids into Redis keys."""

_SID_BYTES: Final = 32
_SID_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
_CONTEXT_PREFIX: Final = b"aiocrypt/session:"
_HMAC_INFO: Final = b"session-id-hmac"
_UNUSABLE: Final = frozenset({KeyStatus.REVOKED, KeyStatus.COMPROMISED, KeyStatus.DESTROYED})
_KEY_TYPES: Final = (KeyType.SESSION, SESSION_INDEX_KEY_TYPE)

_S = TypeVar("_S", bound="EncryptedSession")


@dataclass(frozen=True)
class SessionSettings:
    """How long sessions live and where they go in Redis."""

    ttl: int = 3600
    """Idle timeout in seconds: the Redis TTL, refreshed by every request (sliding)."""
    lifetime: int = 86400
    """Absolute lifetime in seconds since creation or the last ``regenerate()``."""
    prefix: str = "aiocrypt:session:"
    """Prefix of every Redis key the store writes."""

    def __post_init__(self) -> None:
        for name in ("ttl", "lifetime"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"session {name} must be a positive number of seconds")
        if not isinstance(self.prefix, str) or not self.prefix:
            raise ConfigurationError("session key prefix must be a non-empty string")


class EncryptedSession(dict[str, Any]):
    """A session dict that knows whether it was changed.

    Assignments, deletions and ``update()`` mark it ``modified``; changes made
    inside a nested value (``session["cart"].append(x)``) do not, so set
    ``session.modified = True`` after them. ``regenerate()`` gives the session
    a new id on save (call it at login, against session fixation); ``clear()``
    empties it and also drops its id (logout). Tuples are stored as lists.
    The session id is never exposed here, nor in the repr.
    """

    new: bool
    """No stored session was found for the request (there was no cookie, or it was unusable)."""
    modified: bool
    accessed: bool

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(data or {})
        self.new = True
        self.modified = False
        self.accessed = False
        self._sid: str | None = None
        self._redis_key: str | None = None
        self._created_ms = 0
        self._had_cookie = False
        self._regenerate = False

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} keys={len(self)} new={self.new} "
                f"modified={self.modified}>")

    def _bind(self, data: Mapping[str, Any], sid: str, redis_key: str, created_ms: int) -> None:
        dict.update(self, data)
        self.new = False
        self._sid = sid
        self._redis_key = redis_key
        self._created_ms = created_ms

    def can_save_without_cookie(self) -> bool:
        """True if saving keeps the current id (nothing to tell the client)."""
        return self._redis_key is not None and not self._regenerate and bool(self)

    def regenerate(self) -> None:
        """Move the data to a new session id when saved; the old id stops working."""
        self._regenerate = True
        self.modified = True

    # -- change tracking -----------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self.accessed = True
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.accessed = True
        return super().get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self.accessed = self.modified = True
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.accessed = self.modified = True
        super().__delitem__(key)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self.accessed = True
        if key not in self:
            self.modified = True
        return super().setdefault(key, default)

    def pop(self, key: str, *default: Any) -> Any:
        self.accessed = True
        if key in self:
            self.modified = True
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, Any]:
        self.accessed = self.modified = True
        return super().popitem()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.accessed = self.modified = True
        super().update(*args, **kwargs)

    def __ior__(self, other: Any) -> EncryptedSession:  # type: ignore[override,misc]
        self.update(other)
        return self

    def clear(self) -> None:
        """Empty the session and drop its id (on save the stored session is deleted)."""
        self.accessed = True
        super().clear()
        self.regenerate()


class CookieAction(enum.Enum):
    """What the framework layer does with the session cookie after a save."""

    NONE = "none"
    """Leave the cookie alone (and set none)."""
    KEEP = "keep"
    """Same id as before: only refresh the cookie if it is persistent."""
    SET = "set"
    """Set the cookie to ``SaveResult.session_id`` (a new id)."""
    DELETE = "delete"
    """Delete the cookie: the session is gone."""


@dataclass(frozen=True, slots=True)
class SaveResult:
    action: CookieAction
    session_id: str | None = field(default=None, repr=False)


def new_session_id() -> str:
    """256 random bits, URL-safe base64 without padding (43 characters)."""
    return secrets.token_urlsafe(_SID_BYTES)


def _context(sid: str) -> bytes:
    return _CONTEXT_PREFIX + sid.encode("ascii")


def _plain(value: Any) -> Any:
    """Tuples (Flask's flashed messages) become lists: the value codec refuses tuples."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _no_keys(sid: str) -> list[str]:
    raise AssertionError("a session keeping its id needs no new Redis key")


def _text(raw: bytes | str) -> str | None:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


class _SessionCodec:
    """The pure part shared by both stores: Redis keys, envelopes and save plans."""

    def __init__(self, settings: SessionSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self._index: tuple[Keyring, tuple[bytes, ...]] | None = None

    def _hmac_keys(self, keyring: Keyring) -> tuple[bytes, ...]:
        cached = self._index
        if cached is not None and cached[0] is keyring:
            return cached[1]
        active = keyring.active(SESSION_INDEX_KEY_TYPE)
        older = sorted((dk for dk in keyring
                        if dk.key.key_type == SESSION_INDEX_KEY_TYPE and dk is not active
                        and dk.key.status not in _UNUSABLE),
                       key=lambda dk: dk.key.version, reverse=True)
        keys = tuple(dk.derive(_HMAC_INFO) for dk in (active, *older))
        self._index = (keyring, keys)
        return keys

    def redis_keys(self, keyring: Keyring, sid: str) -> list[str]:
        """Redis keys ``sid`` may live under: the active index key's first."""
        message = sid.encode("ascii")
        prefix = self.settings.prefix
        return [prefix + hmac.digest(key, message, "sha256").hex()
                for key in self._hmac_keys(keyring)]

    @staticmethod
    def usable_cookie(value: str | None) -> str | None:
        return value if value is not None and _SID_RE.fullmatch(value) else None

    def envelope(self, session: EncryptedSession) -> dict[str, Any]:
        return {"d": _plain(dict(session)), "c": session._created_ms}

    def unpack(self, envelope: Any) -> tuple[dict[str, Any], int] | None:
        """(data, created ms), or None when the payload is malformed or past its lifetime."""
        if not isinstance(envelope, dict):
            return None
        data, created = envelope.get("d"), envelope.get("c")
        if not isinstance(data, dict) or not isinstance(created, int):
            return None
        if self.now_ms() - created >= self.settings.lifetime * 1000:
            return None
        return data, created

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    @staticmethod
    def unchanged(session: EncryptedSession) -> bool:
        """Stored, not modified, keeping its id: nothing to write (the load refreshed the TTL)."""
        return (session._redis_key is not None and not session.modified
                and not session._regenerate and bool(session))

    @staticmethod
    def needs_new_id(session: EncryptedSession) -> bool:
        return bool(session) and (session._redis_key is None or session._regenerate)

    def plan(self, session: EncryptedSession, redis_key_for: Callable[[str], str]) \
            -> tuple[list[str], tuple[str, str] | None, SaveResult]:
        """(Redis keys to delete, (Redis key, session id) to write or None, result)."""
        delete: list[str] = []
        sid, redis_key = session._sid, session._redis_key
        if session._regenerate and redis_key is not None:
            delete.append(redis_key)
            sid = redis_key = None
        if not session:
            if redis_key is not None:
                delete.append(redis_key)
            action = CookieAction.DELETE if session._had_cookie else CookieAction.NONE
            return delete, None, SaveResult(action)
        if redis_key is not None and not session.modified:
            return delete, None, SaveResult(CookieAction.KEEP, sid)
        if sid is None or redis_key is None:
            sid = new_session_id()
            redis_key = redis_key_for(sid)
            session._created_ms = self.now_ms()
            session._regenerate = False
        session._sid, session._redis_key = sid, redis_key
        return delete, (redis_key, sid), SaveResult(CookieAction.SET, sid)


class RedisSessionStore:
    """Encrypted sessions over ``redis.asyncio`` and an ``EncryptionService``.

    ``await store.load(cookie_value)`` gives a session (a fresh one when the
    cookie is missing or unusable); ``await store.save(session)`` writes it
    and says what to do with the cookie.
    """

    def __init__(self, service: EncryptionService, redis: redis.asyncio.Redis,
                 settings: SessionSettings | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self.redis = redis
        self.settings = settings if settings is not None else SessionSettings()
        self._codec = _SessionCodec(self.settings, clock)

    def __repr__(self) -> str:
        return f"<RedisSessionStore prefix={self.settings.prefix!r} ttl={self.settings.ttl}>"

    # The three steps that involve keys; everything else is shared with the sync store.

    async def _redis_keys(self) -> Callable[[str], list[str]]:
        """Session id -> the Redis keys it may live under (the active index key's first)."""
        keyring = await self.service.key_manager.ensure_active(_KEY_TYPES)
        return functools.partial(self._codec.redis_keys, keyring)

    async def _seal(self, envelope: dict[str, Any], sid: str) -> str:
        return await self.service.encrypt_session_data(envelope, context=_context(sid))

    async def _open(self, token: str, sid: str) -> Any:
        """The envelope; ``DecryptionError`` if the token is not this session's."""
        return await self.service.decrypt_session_data(token, context=_context(sid))

    async def load(self, cookie_value: str | None,
                   session_class: type[_S] = EncryptedSession) -> _S:  # type: ignore[assignment]
        session = session_class()
        session._had_cookie = cookie_value is not None
        sid = self._codec.usable_cookie(cookie_value)
        if sid is None:
            return session
        keys = (await self._redis_keys())(sid)
        raw = await self.redis.getex(keys[0], ex=self.settings.ttl)
        if raw is None and len(keys) > 1:
            for old_key, value in zip(keys[1:], await self.redis.mget(keys[1:]), strict=True):
                if value is not None:
                    raw = value
                    await self._move(old_key, keys[0])
                    break
        if raw is None:
            return session
        token = _text(raw)
        unpacked = None
        if token is not None:
            try:
                envelope = await self._open(token, sid)
            except DecryptionError:
                pass
            else:
                unpacked = self._codec.unpack(envelope)
        if unpacked is None:
            await self.redis.delete(keys[0])
            return session
        session._bind(unpacked[0], sid, keys[0], unpacked[1])
        return session

    async def _move(self, old_key: str, new_key: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rename(old_key, new_key)
            pipe.expire(new_key, self.settings.ttl)
            # A concurrent request may have moved it already: then RENAME fails, harmlessly.
            await pipe.execute(raise_on_error=False)

    async def save(self, session: EncryptedSession) -> SaveResult:
        if self._codec.unchanged(session):
            return SaveResult(CookieAction.KEEP, session._sid)
        redis_keys = await self._redis_keys() if self._codec.needs_new_id(session) else _no_keys
        existed = session._redis_key is not None and not session._regenerate
        delete, write, result = self._codec.plan(session, lambda sid: redis_keys(sid)[0])
        if write is None:
            if delete:
                await self.redis.delete(*delete)
            return result
        redis_key, sid = write
        token = await self._seal(self._codec.envelope(session), sid)
        async with self.redis.pipeline(transaction=False) as pipe:
            if delete:
                pipe.delete(*delete)
            pipe.set(redis_key, token, ex=self.settings.ttl, xx=existed)
            written = (await pipe.execute())[-1]
        if not written:  # deleted meanwhile (a concurrent logout): stay logged out
            return SaveResult(CookieAction.DELETE)
        return result

    async def delete(self, session: EncryptedSession) -> None:
        """Remove the stored session now (the cookie is deleted when the session is saved)."""
        if session._redis_key is not None:
            await self.redis.delete(session._redis_key)
        dict.clear(session)
        session.regenerate()


class SyncRedisSessionStore:
    """The same store for sync code: ``redis.Redis`` and a ``Keyring`` snapshot.

    ``keyring`` returns the current snapshot (for example
    ``lambda: service.keyring`` while something keeps the service refreshed);
    ``load_key(key_id)`` is called once when a payload names a key the snapshot
    does not hold (rotated by another process) and should load it.
    """

    def __init__(self, keyring: Callable[[], Keyring], redis: redis.Redis,
                 settings: SessionSettings | None = None, *,
                 load_key: Callable[[str], object] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._get_keyring = keyring
        self.redis = redis
        self.settings = settings if settings is not None else SessionSettings()
        self._load_key = load_key
        self._codec = _SessionCodec(self.settings, clock)

    def __repr__(self) -> str:
        return f"<SyncRedisSessionStore prefix={self.settings.prefix!r} ttl={self.settings.ttl}>"

    def load(self, cookie_value: str | None,
             session_class: type[_S] = EncryptedSession) -> _S:  # type: ignore[assignment]
        session = session_class()
        session._had_cookie = cookie_value is not None
        sid = self._codec.usable_cookie(cookie_value)
        if sid is None:
            return session
        keys = self._codec.redis_keys(self._get_keyring(), sid)
        raw: Any = self.redis.getex(keys[0], ex=self.settings.ttl)
        if raw is None and len(keys) > 1:
            older: list[Any] = self.redis.mget(keys[1:])  # type: ignore[assignment]
            for old_key, value in zip(keys[1:], older, strict=True):
                if value is not None:
                    raw = value
                    with self.redis.pipeline(transaction=True) as pipe:
                        pipe.rename(old_key, keys[0])
                        pipe.expire(keys[0], self.settings.ttl)
                        pipe.execute(raise_on_error=False)
                    break
        if raw is None:
            return session
        token = _text(raw)
        unpacked = None if token is None else self._codec.unpack(self._decrypt(token, sid))
        if unpacked is None:
            self.redis.delete(keys[0])
            return session
        session._bind(unpacked[0], sid, keys[0], unpacked[1])
        return session

    def _decrypt(self, token: str, sid: str) -> Any:
        try:
            try:
                return self._get_keyring().decrypt(token, KeyType.SESSION, _context(sid),
                                                   purpose=Purpose.SESSION)
            except UnknownKeyError as exc:
                if self._load_key is None:
                    return None
                self._load_key(exc.key_id)
                return self._get_keyring().decrypt(token, KeyType.SESSION, _context(sid),
                                                   purpose=Purpose.SESSION)
        except DecryptionError:
            return None

    def save(self, session: EncryptedSession) -> SaveResult:
        if self._codec.unchanged(session):
            return SaveResult(CookieAction.KEEP, session._sid)
        keyring = self._get_keyring()
        existed = session._redis_key is not None and not session._regenerate
        delete, write, result = self._codec.plan(
            session, lambda sid: self._codec.redis_keys(keyring, sid)[0])
        if write is None:
            if delete:
                self.redis.delete(*delete)
            return result
        redis_key, sid = write
        token = keyring.encrypt(self._codec.envelope(session), KeyType.SESSION, _context(sid),
                                purpose=Purpose.SESSION)
        with self.redis.pipeline(transaction=False) as pipe:
            if delete:
                pipe.delete(*delete)
            pipe.set(redis_key, token, ex=self.settings.ttl, xx=existed)
            written = pipe.execute()[-1]
        if not written:
            return SaveResult(CookieAction.DELETE)
        return result

    def delete(self, session: EncryptedSession) -> None:
        """Remove the stored session now (the cookie is deleted when the session is saved)."""
        if session._redis_key is not None:
            self.redis.delete(session._redis_key)
        dict.clear(session)
        session.regenerate()


# -- configuration of the web extensions --------------------------------------

_SAMESITE: Final = {"strict": "Strict", "lax": "Lax", "none": "None"}


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be true or false")


def _seconds(name: str, value: Any) -> int:
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name} must be a whole number of seconds") from None
    if seconds < 1:
        raise ConfigurationError(f"{name} must be at least 1 second")
    return seconds


@dataclass(frozen=True)
class WebSettings:
    """The ``AIOCRYPT_*`` configuration keys of the Quart and Flask extensions.

    ========================  ==========================  ==========================================
    key                       default                     meaning
    ========================  ==========================  ==========================================
    AIOCRYPT_REDIS_URL        redis://127.0.0.1:6379/0    Redis for sessions and the cache
    AIOCRYPT_SESSION_TTL      3600                        idle timeout (s), sliding
    AIOCRYPT_SESSION_LIFETIME 86400                       absolute lifetime (s)
    AIOCRYPT_SESSION_PREFIX   aiocrypt:session:           Redis key prefix of sessions
    AIOCRYPT_CACHE_PREFIX     aiocrypt:cache:             Redis key prefix of the cache
    AIOCRYPT_CACHE_TTL        300                         default cache TTL (s)
    AIOCRYPT_COOKIE_SECURE    True                        Secure flag of the session cookie
    AIOCRYPT_COOKIE_SAMESITE  Lax                         SameSite: Strict, Lax or None
    ========================  ==========================  ==========================================

    The cookie's name, domain and path are the framework's own
    ``SESSION_COOKIE_NAME`` / ``_DOMAIN`` / ``_PATH``; it is always HttpOnly.
    """

    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    session: SessionSettings = field(default_factory=SessionSettings)
    cache_prefix: str = "aiocrypt:cache:"
    cache_ttl: int = 300
    cookie_secure: bool = True
    cookie_samesite: str = "Lax"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> WebSettings:
        """Read the keys above from an app's config (missing keys take the defaults)."""
        default = cls()

        def get(name: str, fallback: Any) -> Any:
            value = config.get(name)
            return fallback if value is None else value

        samesite = str(get("AIOCRYPT_COOKIE_SAMESITE", default.cookie_samesite))
        if samesite.lower() not in _SAMESITE:
            raise ConfigurationError("AIOCRYPT_COOKIE_SAMESITE must be Strict, Lax or None")
        settings = cls(
            redis_url=str(get("AIOCRYPT_REDIS_URL", default.redis_url)),
            session=SessionSettings(
                ttl=_seconds("AIOCRYPT_SESSION_TTL",
                             get("AIOCRYPT_SESSION_TTL", default.session.ttl)),
                lifetime=_seconds("AIOCRYPT_SESSION_LIFETIME",
                                  get("AIOCRYPT_SESSION_LIFETIME", default.session.lifetime)),
                prefix=str(get("AIOCRYPT_SESSION_PREFIX", default.session.prefix)),
            ),
            cache_prefix=str(get("AIOCRYPT_CACHE_PREFIX", default.cache_prefix)),
            cache_ttl=_seconds("AIOCRYPT_CACHE_TTL", get("AIOCRYPT_CACHE_TTL",
                                                         default.cache_ttl)),
            cookie_secure=_bool("AIOCRYPT_COOKIE_SECURE",
                                get("AIOCRYPT_COOKIE_SECURE", default.cookie_secure)),
            cookie_samesite=_SAMESITE[samesite.lower()],
        )
        if settings.cookie_samesite == "None" and not settings.cookie_secure:
            raise ConfigurationError("AIOCRYPT_COOKIE_SAMESITE=None needs AIOCRYPT_COOKIE_SECURE")
        if settings.cache_prefix == settings.session.prefix:
            raise ConfigurationError("the session and cache Redis prefixes must differ")
        return settings

    @staticmethod
    def key_types() -> Iterable[KeyType]:
        """Key types the extensions make sure exist at startup."""
        return (KeyType.SESSION, SESSION_INDEX_KEY_TYPE, KeyType.CACHE)


def apply_cookie(interface: Any, app: Any, settings: WebSettings, session: EncryptedSession,
                 result: SaveResult, response: Any) -> None:
    """Set, refresh or delete the session cookie on a werkzeug-style response.

    ``interface`` is the framework's session interface (Flask and Quart share
    its ``get_cookie_*`` helpers). The cookie is always HttpOnly; it is
    persistent (``Max-Age`` = the idle TTL, refreshed on each response) only
    when ``session.permanent`` is set, else it ends with the browser session.
    """
    name = interface.get_cookie_name(app)
    options: dict[str, Any] = {
        "domain": interface.get_cookie_domain(app),
        "path": interface.get_cookie_path(app),
        "secure": settings.cookie_secure,
        "samesite": settings.cookie_samesite,
        "httponly": True,
        "partitioned": interface.get_cookie_partitioned(app),
    }
    permanent = bool(dict.get(session, "_permanent", False))  # without marking it accessed
    if session.accessed or result.action is not CookieAction.NONE:
        response.vary.add("Cookie")
    if result.action is CookieAction.DELETE:
        response.delete_cookie(name, **options)
    elif result.action is CookieAction.SET or (result.action is CookieAction.KEEP and permanent):
        response.set_cookie(name, result.session_id or "",
                            max_age=settings.session.ttl if permanent else None, **options)
