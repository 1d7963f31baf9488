"""Quart extension: encrypted Redis sessions, an encrypted cache, the service's lifecycle.

>>> crypt = AioCrypt(app, service=service)   # or AioCrypt() ... crypt.init_app(app)
>>> @app.get("/report")
... async def report():
...     return await crypt.cache.get_or_set("report", compute_report, ttl=60)

On startup (``before_serving``) the extension starts the ``EncryptionService``
(the one given, else ``aiocrypt.get_encryption_service()``), makes sure the
session, session-index and cache keys exist and connects to Redis; on shutdown
(``after_serving``) it closes what it opened. It replaces ``app.session_interface``
with encrypted server-side sessions (see ``aiocrypt.integrations.sessions``).
Configuration keys: see ``WebSettings`` and docs/web.md.

Quart hands views its session synchronously, so a request that carries the
session cookie reads the session from Redis before the view runs (one
``GETEX``); a request without the cookie makes no Redis call. A Redis outage
raises ``StoreUnavailableError`` when the view first touches the session
(a view that does not still answers), and the extension answers it with 503
and ``Retry-After`` unless the app registers its own handler for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

try:
    import redis.asyncio as aioredis
    from quart import Quart, current_app
    from quart.json.tag import TaggedJSONSerializer
    from quart.sessions import SessionInterface, SessionMixin
    from quart.wrappers import BaseRequestWebsocket, Response
    from werkzeug.wrappers import Response as WerkzeugResponse
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "aiocrypt.integrations.quart needs extra dependencies: pip install 'aiocrypt[quart]'"
    ) from exc

from aiocrypt import (
    ConfigurationError,
    EncryptionService,
    HealthCheck,
    StoreUnavailableError,
    health,
)

from ._extension import (
    NO_STORE,
    AioCryptBase,
    SessionInterfaceBase,
    add_routes,
    outage_answer,
    sessionless,
)
from ._outage import OUTAGE_ERRORS, SOCKET_TIMEOUT
from .cache import EncryptedCache
from .sessions import EncryptedSession, RedisSessionStore, WebSettings, apply_cookie

__all__ = ["AioCrypt", "AioCryptState", "EncryptedSessionInterface", "QuartSession"]

logger = logging.getLogger("aiocrypt.quart")


class QuartSession(EncryptedSession, SessionMixin):
    """An encrypted server-side session (``quart.session`` inside requests)."""


@dataclass(eq=False)
class AioCryptState:
    """Per-app state, in ``app.extensions["aiocrypt"]``."""

    settings: WebSettings
    service: EncryptionService
    redis_client: aioredis.Redis | None = field(default=None, repr=False)
    owns_redis: bool = True
    _sessions: RedisSessionStore | None = field(default=None, repr=False)
    _cache: EncryptedCache | None = field(default=None, repr=False)

    @property
    def started(self) -> bool:
        return self._sessions is not None

    @property
    def sessions(self) -> RedisSessionStore:
        if self._sessions is None:
            raise RuntimeError(
                "AioCrypt is not started: serve the app (before_serving runs "
                "it) or use 'async with app.test_app()'"
            )
        return self._sessions

    @property
    def cache(self) -> EncryptedCache:
        if self._cache is None:
            raise RuntimeError(
                "AioCrypt is not started: serve the app (before_serving runs "
                "it) or use 'async with app.test_app()'"
            )
        return self._cache

    async def start(self) -> None:
        if self.started:
            return
        await self.service.start()
        await self.service.key_manager.ensure_active(self.settings.key_types())
        if self.redis_client is None:
            assert self.settings.redis_url is not None  # from_config made sure of one
            self.redis_client = aioredis.Redis.from_url(
                self.settings.redis_url,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=SOCKET_TIMEOUT,
            )
            self.owns_redis = True
        self._sessions = RedisSessionStore(
            self.service,
            self.redis_client,
            self.settings.session,
            serializer=TaggedJSONSerializer(),
        )
        self._cache = EncryptedCache(
            self.service,
            self.redis_client,
            prefix=self.settings.cache_prefix,
            default_ttl=self.settings.cache_ttl,
        )

    async def redis_check(self) -> HealthCheck:
        """PING Redis: ``failing`` with the error class when it does not answer."""
        if self.redis_client is None:
            return HealthCheck("failing", {"state": "stopped"})
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT):  # a given client too
                await self.redis_client.ping()
        except (*OUTAGE_ERRORS, TimeoutError) as exc:
            return HealthCheck("failing", {"error": type(exc).__name__})
        return HealthCheck("ok")

    async def close(self) -> None:
        self._sessions = self._cache = None
        try:
            if self.owns_redis and self.redis_client is not None:
                client, self.redis_client = self.redis_client, None
                await client.aclose()
        finally:
            await self.service.close()


class AioCrypt(AioCryptBase[AioCryptState]):
    """The Quart extension (``AioCrypt(app)`` or ``AioCrypt()`` then ``init_app(app)``).

    ``service``: the ``EncryptionService`` to use (default: the process-wide
    one from the environment); the extension starts it before serving and
    closes it after. ``redis``: a ``redis.asyncio.Redis`` client to use instead
    of connecting to ``AIOCRYPT_REDIS_URL`` (the caller then closes it);
    ``SESSION_REDIS`` in the config is the Quart-Session way to pass one.
    ``service`` and ``cache`` are the current app's.
    """

    framework = "Quart"

    def __init__(
        self,
        app: Quart | None = None,
        *,
        service: EncryptionService | None = None,
        redis: aioredis.Redis | None = None,
    ) -> None:
        super().__init__(app, service=service, redis=redis)

    def _new_state(self, settings: WebSettings) -> AioCryptState:
        client = self._redis if self._redis is not None else settings.redis_client
        if client is not None and not isinstance(client, aioredis.Redis):
            raise ConfigurationError("SESSION_REDIS must be a redis.asyncio.Redis client")
        return AioCryptState(
            settings=settings,
            service=self._service_to_use(),
            redis_client=client,
            owns_redis=client is None,
        )

    def _session_interface(self) -> EncryptedSessionInterface:
        return EncryptedSessionInterface()

    def _outage_handler(self) -> Callable[[StoreUnavailableError], Awaitable[Response]]:
        return _answer_outage

    def _install(self, app: Quart, state: AioCryptState) -> None:
        app.before_serving(state.start)
        app.after_serving(state.close)

    @staticmethod
    def _current_app() -> Quart:
        return current_app

    @property
    def sessions(self) -> RedisSessionStore:
        """The current app's session store."""
        return self.state().sessions

    def add_health_routes(
        self,
        app: Quart,
        *,
        health_path: str = "/healthz",
        metrics_path: str | None = "/metrics",
        registry: Any = None,
        key_types: Iterable[str] | None = None,
    ) -> None:
        """Serve ``aiocrypt.health()`` as JSON (200, or 503 when failing) at ``health_path``.

        With prometheus-client installed, also serve metrics at ``metrics_path``
        (``None``: no metrics route): ``registry`` as it is when given (call
        ``aiocrypt.metrics.instrument`` on it yourself), else a registry of this
        app's service alone. Call after ``init_app``. See docs/metrics.md.
        """
        state = self.state(app)

        async def aiocrypt_health() -> Response:
            report = await health(state.service, key_types=key_types)
            report = report.with_check("redis", await state.redis_check())
            return Response(
                json.dumps(report.to_dict()),
                status=report.http_status,
                content_type="application/json",
                headers=NO_STORE,
            )

        def metrics_view(registry: Any) -> Callable[[], Awaitable[Response]]:
            from aiocrypt.metrics import render

            async def aiocrypt_metrics() -> Response:
                body, content_type = render(registry)
                return Response(body, content_type=content_type, headers=NO_STORE)

            return aiocrypt_metrics

        add_routes(
            app,
            state.service,
            health_path=health_path,
            health_view=aiocrypt_health,
            metrics_path=metrics_path,
            registry=registry,
            metrics_view=metrics_view,
        )


async def _answer_outage(exc: StoreUnavailableError) -> Response:
    """The default answer to a Redis outage: 503, ``Retry-After``, no details."""
    body, headers = outage_answer(logger, AioCrypt.state(), exc)
    return Response(body, status=503, content_type="application/json", headers=headers)


def _unavailable(session: EncryptedSession, exc: StoreUnavailableError) -> None:
    """Make the first access to ``session`` raise ``exc`` (the view may never touch it)."""

    def fail() -> None:
        raise StoreUnavailableError(exc.store) from exc.__cause__

    session._pending = fail


class EncryptedSessionInterface(SessionInterfaceBase, SessionInterface):
    """Quart session interface over ``RedisSessionStore``.

    ``regenerate(session)`` (Flask-Session 0.7's name) is ``session.regenerate()``.
    """

    session_class = QuartSession

    async def open_session(self, app: Quart, request: BaseRequestWebsocket) -> QuartSession | None:
        if sessionless(app, request.path):
            return None  # a probe gets a null session, and answers even if keys are down
        state = AioCrypt.state(app)
        cookie = request.cookies.get(state.settings.cookie_name)
        try:
            return await state.sessions.load(cookie, self.session_class)
        except StoreUnavailableError as exc:
            session = self.session_class()
            _unavailable(session, exc)
            return session

    async def save_session(
        self, app: Quart, session: SessionMixin, response: Response | WerkzeugResponse | None
    ) -> None:
        if not isinstance(session, EncryptedSession) or not session.accessed:
            return
        state = AioCrypt.state(app)
        if response is None and not session.can_save_without_cookie():
            return  # a websocket cannot set a cookie: a new session id would be lost
        try:
            result = await state.sessions.save(session)
        except StoreUnavailableError as exc:  # the view ran, its session cannot be kept
            if response is None:
                raise
            answer = await app.make_response(await app.handle_user_exception(exc))
            response.status_code = answer.status_code
            response.headers = answer.headers.copy()
            response.set_data(await answer.get_data())  # type: ignore[misc]
            return
        # test_a_websocket_saves_a_stored_session takes the other way; in the whole suite
        # coverage on CPython 3.11 can lose this frame's events after the await above
        # (coveragepy issue 2124, cpython gh-106749; docs/testing.md)
        if response is not None:  # pragma: no branch - the tracer gap described above
            apply_cookie(state.settings, session, result, response)
