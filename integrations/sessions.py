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
Both read and write the same format. ``WebSettings`` (from ``_web_settings``,
re-exported here) reads the configuration keys of the Quart and Flask
extensions; ``apply_cookie`` turns a save's result into the response's cookie
and headers.

Given a ``serializer`` (the extensions pass the frameworks' tagged JSON), the
session dict is serialised by it and the resulting text is what gets
encrypted (envelope version 2), so tuples, bytes, ``Markup``, UUIDs and
datetimes keep their type. Without one, the values go through aiocrypt's
value codec (version 1, the original envelope); both versions stay readable.

A Redis that does not answer (connection refused or reset, timeout) raises
``StoreUnavailableError``, never a fresh session handed out as if valid.

With ``SessionSettings.subject_field`` (``AIOCRYPT_SESSION_SUBJECT = "user_id"``)
a session holding that field is sealed under its user's subject key
(``"user:<value>"``, ``subject_prefix`` naming the kind): after
``forget_subject("user:42")`` every session of user 42 fails to decrypt, so the
next request gets a fresh empty session (and the dead payload is deleted), in
every process and in any dump of Redis. Sessions without the field (before login)
stay under the session key alone.

Over 500 lines on purpose: the async store (Quart) and the sync store (Flask) share
the payload envelope, the Redis layout and the outage handling, and must stay byte
for byte the same; they live side by side so one change reaches both.
"""

from __future__ import annotations

import enum
import functools
import hmac
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, overload

from aiocrypt import (
    ConfigurationError,
    DecryptionError,
    Keyring,
    KeyStatus,
    KeyType,
    Purpose,
    UnknownKeyError,
)

from ._outage import translate_outage
from ._session_settings import SESSION_INDEX_KEY_TYPE, SID_BYTES, SessionSettings
from ._web_settings import WebSettings

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
    "SessionSerializer",
    "SessionSettings",
    "SyncRedisSessionStore",
    "WebSettings",
    "apply_cookie",
    "new_session_id",
]

_SID_RE: Final = re.compile(r"[A-Za-z0-9_-]{43,171}")  # token_urlsafe of 32 to 128 bytes
_ENVELOPE_V2: Final = 2
_CONTEXT_PREFIX: Final = b"aiocrypt/session:"
_HMAC_INFO: Final = b"session-id-hmac"
_UNUSABLE: Final = frozenset({KeyStatus.REVOKED, KeyStatus.COMPROMISED, KeyStatus.DESTROYED})
_KEY_TYPES: Final = (KeyType.SESSION, SESSION_INDEX_KEY_TYPE)

_S = TypeVar("_S", bound="EncryptedSession")


class SessionSerializer(Protocol):
    """Turns a session dict into text and back (Flask's ``TaggedJSONSerializer`` is one)."""

    def dumps(self, value: Any) -> str: ...

    def loads(self, value: str) -> Any: ...


class EncryptedSession(dict[str, Any]):
    """A session dict that knows whether it was changed.

    Assignments, deletions and ``update()`` mark it ``modified``; changes made
    inside a nested value (``session["cart"].append(x)``) do not, so set
    ``session.modified = True`` after them. Reading it (``[]``, ``get``,
    ``in``, iterating) marks it ``accessed``. ``regenerate()`` gives the
    session a new id on save (call it at login, against session fixation);
    ``clear()`` empties it and also drops its id (logout). The session id is
    never exposed here, nor in the repr.

    A session opened lazily (``SyncRedisSessionStore.open``) is read from
    Redis the first time it is accessed, so a request that never touches it
    costs no Redis call.
    """

    new: bool
    """No stored session was found for the request (there was no cookie, or it was unusable)."""
    modified: bool

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(data or {})
        self._pending: Callable[[], None] | None = None
        self._accessed = False
        self.new = True
        self.modified = False
        self._default_permanent = False
        self._sid: str | None = None
        self._redis_key: str | None = None
        self._created_ms = 0
        self._had_cookie = False
        self._regenerate = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} keys={len(self)} new={self.new} modified={self.modified}>"

    def _bind(self, data: Mapping[str, Any], sid: str, redis_key: str, created_ms: int) -> None:
        dict.update(self, data)
        self.new = False
        self._sid = sid
        self._redis_key = redis_key
        self._created_ms = created_ms

    @property
    def accessed(self) -> bool:
        """The session was read or written during this request."""
        return self._accessed

    @accessed.setter
    def accessed(self, value: bool) -> None:
        pending = self._pending
        if value and pending is not None:
            pending()  # the lazy load (or the outage it met): raises before marking anything
            self._pending = None
        self._accessed = value

    @property
    def permanent(self) -> bool:
        """A persistent cookie (``Max-Age``) rather than one that ends with the browser."""
        return bool(dict.get(self, "_permanent", self._default_permanent))

    @permanent.setter
    def permanent(self, value: bool) -> None:
        self["_permanent"] = bool(value)

    def can_save_without_cookie(self) -> bool:
        """True if saving keeps the current id (nothing to tell the client)."""
        return self._redis_key is not None and not self._regenerate and bool(self)

    def regenerate(self) -> None:
        """Move the data to a new session id when saved; the old id stops working."""
        self.accessed = True  # loads a lazy session first: its data moves
        self._regenerate = True
        self.modified = True

    # -- change tracking -----------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self.accessed = True
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.accessed = True
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        self.accessed = True
        return super().__iter__()

    def keys(self) -> Any:
        self.accessed = True
        return super().keys()

    def values(self) -> Any:
        self.accessed = True
        return super().values()

    def items(self) -> Any:
        self.accessed = True
        return super().items()

    def copy(self) -> dict[str, Any]:
        self.accessed = True
        return dict(super().items())

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


def new_session_id(nbytes: int = SID_BYTES) -> str:
    """``nbytes`` (default 32: 256 bits) random bytes, URL-safe base64 without padding."""
    return secrets.token_urlsafe(max(nbytes, SID_BYTES))


def _context(sid: str) -> bytes:
    return _CONTEXT_PREFIX + sid.encode("ascii")


def _plain(value: Any) -> Any:
    """Tuples (Flask's flashed messages) become lists: the value codec refuses tuples."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# plan() asks for a new Redis key only when needs_new_id() is true: then this is not used
def _no_keys(sid: str) -> list[str]:  # pragma: no cover - plan() never calls it then
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

    def __init__(
        self,
        settings: SessionSettings,
        clock: Callable[[], float],
        serializer: SessionSerializer | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.serializer = serializer
        self._index: tuple[Keyring, tuple[bytes, ...]] | None = None

    def _hmac_keys(self, keyring: Keyring) -> tuple[bytes, ...]:
        cached = self._index
        if cached is not None and cached[0] is keyring:
            return cached[1]
        active = keyring.active(SESSION_INDEX_KEY_TYPE)
        older = sorted(
            (
                dk
                for dk in keyring
                if dk.key.key_type == SESSION_INDEX_KEY_TYPE
                and dk is not active
                and dk.key.status not in _UNUSABLE
            ),
            key=lambda dk: dk.key.version,
            reverse=True,
        )
        keys = tuple(dk.derive(_HMAC_INFO) for dk in (active, *older))
        self._index = (keyring, keys)
        return keys

    def redis_keys(self, keyring: Keyring, sid: str) -> list[str]:
        """Redis keys ``sid`` may live under: the active index key's first."""
        message = sid.encode("ascii")
        prefix = self.settings.prefix
        return [
            prefix + hmac.digest(key, message, "sha256").hex() for key in self._hmac_keys(keyring)
        ]

    @staticmethod
    def usable_cookie(value: str | None) -> str | None:
        return value if value is not None and _SID_RE.fullmatch(value) else None

    def new_session(self, session_class: type[_S], cookie_value: str | None) -> _S:
        session = session_class()
        session._had_cookie = cookie_value is not None
        session._default_permanent = self.settings.permanent
        return session

    def subject(self, session: EncryptedSession) -> str | None:
        """The subject id the session is sealed under (None: the session key alone)."""
        field = self.settings.subject_field
        if field is None:
            return None
        return self.settings.subject_of({field: dict.get(session, field)})  # no access mark

    def envelope(self, session: EncryptedSession) -> dict[str, Any]:
        data = dict(dict.items(session))  # not session.items(): saving is no access
        if self.serializer is None:  # version 1: the value codec, tuples as lists
            return {"d": _plain(data), "c": session._created_ms}
        return {"v": _ENVELOPE_V2, "s": self.serializer.dumps(data), "c": session._created_ms}

    def unpack(self, envelope: Any) -> tuple[dict[str, Any], int] | None:
        """(data, created ms), or None when the payload is malformed or past its lifetime."""
        if not isinstance(envelope, dict):
            return None
        data, created = envelope.get("d"), envelope.get("c")
        if (
            envelope.get("v") == _ENVELOPE_V2
            and self.serializer is not None
            and isinstance(envelope.get("s"), str)
        ):
            try:
                data = self.serializer.loads(envelope["s"])
            except (ValueError, TypeError, KeyError):
                return None
        if not isinstance(data, dict) or not isinstance(created, int):
            return None
        if self.now_ms() - created >= self.settings.lifetime * 1000:
            return None
        return data, created

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def fetch_ttl(self) -> int | None:
        """The TTL a load resets (GETEX), or None: a plain GET."""
        return self.settings.ttl if self.settings.refresh_each_request else None

    @staticmethod
    def unchanged(session: EncryptedSession) -> bool:
        """Stored, not modified, keeping its id: nothing to write (the load refreshed the TTL)."""
        return (
            session._redis_key is not None
            and not session.modified
            and not session._regenerate
            and bool(session)
        )

    @staticmethod
    def needs_new_id(session: EncryptedSession) -> bool:
        return bool(session) and (session._redis_key is None or session._regenerate)

    def plan(
        self, session: EncryptedSession, redis_key_for: Callable[[str], str]
    ) -> tuple[list[str], tuple[str, str] | None, SaveResult]:
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
        # both stores' save() return before plan() for this case (unchanged())
        if redis_key is not None and not session.modified:  # pragma: no cover - caught by save()
            return delete, None, SaveResult(CookieAction.KEEP, sid)
        if sid is None or redis_key is None:
            sid = new_session_id(self.settings.sid_bytes)
            redis_key = redis_key_for(sid)
            session._created_ms = self.now_ms()
            session._regenerate = False
        session._sid, session._redis_key = sid, redis_key
        return delete, (redis_key, sid), SaveResult(CookieAction.SET, sid)


class RedisSessionStore:
    """Encrypted sessions over ``redis.asyncio`` and an ``EncryptionService``.

    ``await store.load(cookie_value)`` gives a session (a fresh one when the
    cookie is missing or unusable); ``await store.save(session)`` writes it
    and says what to do with the cookie. Redis not answering raises
    ``StoreUnavailableError``.
    """

    def __init__(
        self,
        service: EncryptionService,
        redis: redis.asyncio.Redis,
        settings: SessionSettings | None = None,
        *,
        serializer: SessionSerializer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.redis = redis
        self.settings = settings if settings is not None else SessionSettings()
        self._codec = _SessionCodec(self.settings, clock, serializer)

    def __repr__(self) -> str:
        return f"<RedisSessionStore prefix={self.settings.prefix!r} ttl={self.settings.ttl}>"

    # The three steps that involve keys; everything else is shared with the sync store.

    async def _redis_keys(self) -> Callable[[str], list[str]]:
        """Session id -> the Redis keys it may live under (the active index key's first)."""
        keyring = await self.service.key_manager.ensure_active(_KEY_TYPES)
        return functools.partial(self._codec.redis_keys, keyring)

    async def _seal(self, envelope: dict[str, Any], sid: str, subject: str | None) -> str:
        return await self.service.encrypt_session_data(
            envelope, context=_context(sid), subject=subject
        )

    async def _open(self, token: str, sid: str) -> Any:
        """The envelope; ``DecryptionError`` if the token is not this session's."""
        return await self.service.decrypt_session_data(token, context=_context(sid))

    @overload
    async def load(self, cookie_value: str | None) -> EncryptedSession: ...
    @overload
    async def load(self, cookie_value: str | None, session_class: type[_S]) -> _S: ...

    async def load(
        self, cookie_value: str | None, session_class: type[EncryptedSession] = EncryptedSession
    ) -> EncryptedSession:
        session = self._codec.new_session(session_class, cookie_value)
        sid = self._codec.usable_cookie(cookie_value)
        if sid is None:
            return session
        with translate_outage("session"):
            await self._load_into(session, sid)
        return session

    async def _load_into(self, session: EncryptedSession, sid: str) -> None:
        keys = (await self._redis_keys())(sid)
        ttl = self._codec.fetch_ttl()
        raw = await (self.redis.getex(keys[0], ex=ttl) if ttl else self.redis.get(keys[0]))
        if raw is None and len(keys) > 1:
            for old_key, value in zip(keys[1:], await self.redis.mget(keys[1:]), strict=True):
                if value is not None:
                    raw = value
                    await self._move(old_key, keys[0])
                    break
        if raw is None:
            return
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
            return
        session._bind(unpacked[0], sid, keys[0], unpacked[1])

    async def _move(self, old_key: str, new_key: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rename(old_key, new_key)
            pipe.expire(new_key, self.settings.ttl)
            # A concurrent request may have moved it already: then RENAME fails, harmlessly.
            await pipe.execute(raise_on_error=False)

    async def save(self, session: EncryptedSession) -> SaveResult:
        # This store loads eagerly; the one lazy session is Quart's outage placeholder,
        # whose save_session returns before saving a session never accessed.
        if session._pending is not None:  # pragma: no cover - never read: nothing to write
            return SaveResult(CookieAction.NONE)
        if self._codec.unchanged(session):
            return SaveResult(CookieAction.KEEP, session._sid)
        with translate_outage("session"):
            return await self._write(session)

    async def _write(self, session: EncryptedSession) -> SaveResult:
        redis_keys = await self._redis_keys() if self._codec.needs_new_id(session) else _no_keys
        existed = session._redis_key is not None and not session._regenerate
        delete, write, result = self._codec.plan(session, lambda sid: redis_keys(sid)[0])
        if write is None:
            if delete:
                await self.redis.delete(*delete)
            return result
        redis_key, sid = write
        token = await self._seal(self._codec.envelope(session), sid, self._codec.subject(session))
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
            with translate_outage("session"):
                await self.redis.delete(session._redis_key)
        dict.clear(session)
        session.regenerate()


class SyncRedisSessionStore:
    """The same store for sync code: ``redis.Redis`` and a ``Keyring`` snapshot.

    ``keyring`` returns the current snapshot (for example
    ``lambda: service.keyring`` while something keeps the service refreshed);
    ``load_key(key_id)`` is called once when a payload names a key the snapshot
    does not hold (rotated by another process) and should load it.
    ``open(cookie_value)`` is ``load`` deferred to the session's first access.

    Sessions bound to a subject (``settings.subject_field``) are sealed and opened
    by ``service`` on its event loop through ``run(coroutine)`` (the Flask
    extension's ``crypt.run``): a subject key may have to be created or loaded,
    which sync code cannot do. Sessions bound to no subject never take that hop.
    """

    def __init__(
        self,
        keyring: Callable[[], Keyring],
        redis: redis.Redis,
        settings: SessionSettings | None = None,
        *,
        load_key: Callable[[str], object] | None = None,
        serializer: SessionSerializer | None = None,
        clock: Callable[[], float] = time.time,
        service: EncryptionService | None = None,
        run: Callable[[Coroutine[Any, Any, Any]], Any] | None = None,
    ) -> None:
        self._get_keyring = keyring
        self.redis = redis
        self.settings = settings if settings is not None else SessionSettings()
        self._load_key = load_key
        self._codec = _SessionCodec(self.settings, clock, serializer)
        if self.settings.subject_field is not None and (service is None or run is None):
            raise ConfigurationError(
                "sessions bound to a subject (AIOCRYPT_SESSION_SUBJECT) need the service "
                "and a way to run its coroutines: pass service= and run= to the sync store"
            )
        self._service = service
        self._run = run

    def __repr__(self) -> str:
        return f"<SyncRedisSessionStore prefix={self.settings.prefix!r} ttl={self.settings.ttl}>"

    @overload
    def load(self, cookie_value: str | None) -> EncryptedSession: ...
    @overload
    def load(self, cookie_value: str | None, session_class: type[_S]) -> _S: ...

    def load(
        self, cookie_value: str | None, session_class: type[EncryptedSession] = EncryptedSession
    ) -> EncryptedSession:
        session = self.open(cookie_value, session_class)
        pending, session._pending = session._pending, None
        if pending is not None:
            pending()
        return session

    @overload
    def open(self, cookie_value: str | None) -> EncryptedSession: ...
    @overload
    def open(self, cookie_value: str | None, session_class: type[_S]) -> _S: ...

    def open(
        self, cookie_value: str | None, session_class: type[EncryptedSession] = EncryptedSession
    ) -> EncryptedSession:
        """A session that reads Redis only when first accessed (``StoreUnavailableError`` then)."""
        session = self._codec.new_session(session_class, cookie_value)
        sid = self._codec.usable_cookie(cookie_value)
        if sid is not None:
            session._pending = functools.partial(self._load_into, session, sid)
        return session

    def _load_into(self, session: EncryptedSession, sid: str) -> None:
        with translate_outage("session"):
            keys = self._codec.redis_keys(self._get_keyring(), sid)
            ttl = self._codec.fetch_ttl()
            raw: Any = self.redis.getex(keys[0], ex=ttl) if ttl else self.redis.get(keys[0])
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
                return
            token = _text(raw)
            unpacked = None if token is None else self._codec.unpack(self._decrypt(token, sid))
            if unpacked is None:
                self.redis.delete(keys[0])
                return
        session._bind(unpacked[0], sid, keys[0], unpacked[1])

    def _decrypt(self, token: str, sid: str) -> Any:
        try:
            try:
                return self._get_keyring().decrypt(
                    token, KeyType.SESSION, _context(sid), purpose=Purpose.SESSION
                )
            except UnknownKeyError as exc:
                if self._service is not None and self._run is not None:
                    # a subject's key: cached here (no hop), else the service finds it (as
                    # it does a key rotated elsewhere) or says the subject was forgotten
                    ring = self._service.key_manager.subjects.ring_of(token)
                    if ring is not None:
                        return ring.decrypt(
                            token, KeyType.SESSION, _context(sid), purpose=Purpose.SESSION
                        )
                    return self._run(
                        self._service.decrypt_session_data(token, context=_context(sid))
                    )
                if self._load_key is None:
                    return None
                self._load_key(exc.key_id)
                return self._get_keyring().decrypt(
                    token, KeyType.SESSION, _context(sid), purpose=Purpose.SESSION
                )
        except DecryptionError:
            return None

    def save(self, session: EncryptedSession) -> SaveResult:
        if session._pending is not None:  # never read: nothing to write, nothing to tell
            return SaveResult(CookieAction.NONE)
        if self._codec.unchanged(session):
            return SaveResult(CookieAction.KEEP, session._sid)
        with translate_outage("session"):
            return self._write(session)

    def _write(self, session: EncryptedSession) -> SaveResult:
        keyring = self._get_keyring()
        existed = session._redis_key is not None and not session._regenerate
        delete, write, result = self._codec.plan(
            session, lambda sid: self._codec.redis_keys(keyring, sid)[0]
        )
        if write is None:
            if delete:
                self.redis.delete(*delete)
            return result
        redis_key, sid = write
        subject = self._codec.subject(session)
        ring: Keyring | None = keyring
        if subject is not None:
            assert self._service is not None and self._run is not None  # checked at init
            subjects = self._service.key_manager.subjects
            key = subjects.cached(KeyType.SESSION, subject)
            ring = None if key is None else subjects.cached_ring(key.key_id)
        if ring is not None:
            token = ring.encrypt(
                self._codec.envelope(session),
                KeyType.SESSION,
                _context(sid),
                purpose=Purpose.SESSION,
            )
        else:  # a subject key to load or create first: on the service's loop
            assert self._service is not None and self._run is not None
            token = self._run(
                self._service.encrypt_session_data(
                    self._codec.envelope(session), context=_context(sid), subject=subject
                )
            )
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
            with translate_outage("session"):
                self.redis.delete(session._redis_key)
        dict.clear(session)
        session.regenerate()


def apply_cookie(
    settings: WebSettings, session: EncryptedSession, result: SaveResult, response: Any
) -> None:
    """Set, refresh or delete the session cookie on a werkzeug-style response.

    Nothing happens for a session the request never accessed (no cookie, no
    ``Vary``). Otherwise: ``Vary: Cookie``; ``Cache-Control`` (``settings.cache_control``)
    when the session holds or held data and the view set none; the cookie is
    persistent (``Max-Age`` = the idle TTL) when ``session.permanent``,
    refreshed on each such response if ``refresh_each_request``, else only
    when the session was written.
    """
    if not session.accessed:
        return
    response.vary.add("Cookie")
    if (
        settings.cache_control is not None
        and "Cache-Control" not in response.headers
        and (not session.new or dict.__len__(session))
    ):
        response.headers["Cache-Control"] = settings.cache_control
    options: dict[str, Any] = {
        "domain": settings.cookie_domain,
        "path": settings.cookie_path,
        "secure": settings.cookie_secure,
        "samesite": settings.cookie_samesite,
        "httponly": settings.cookie_httponly,
        "partitioned": settings.cookie_partitioned,
    }
    permanent = session.permanent
    refresh = permanent and settings.session.refresh_each_request
    if result.action is CookieAction.DELETE:
        response.delete_cookie(settings.cookie_name, **options)
    elif result.action is CookieAction.SET or (result.action is CookieAction.KEEP and refresh):
        response.set_cookie(
            settings.cookie_name,
            result.session_id or "",
            max_age=settings.session.ttl if permanent else None,
            **options,
        )
