"""Flask extension: encrypted Redis sessions, an encrypted cache, async views on one loop.

>>> crypt = AioCrypt(app, service=service)
>>> @app.get("/report")
... async def report():
...     return await crypt.cache.get_or_set("report", compute_report, ttl=60)

Flask is sync (WSGI), so the extension keeps one asyncio event loop in a
daemon thread and runs everything async there: the ``EncryptionService`` (started
on the first request, or by ``crypt.start(app)``), a task that keeps its key
snapshot fresh, the ``redis.asyncio`` client of the cache, and the app's
``async def`` views (``app.async_to_sync`` is replaced, so awaited clients
such as the service, the cache or an async database engine are always used
on the loop they were created on, and the request context is visible inside
the view). Sync code reaches it with ``crypt.run(coroutine)``.

Sessions stay sync: ``SyncRedisSessionStore`` over ``redis.Redis`` and the
service's keyring snapshot, so a request pays no thread hop for its session,
and they are read lazily: a request that never touches ``flask.session``
makes no Redis call. A Redis outage raises ``StoreUnavailableError``, which
the extension answers with 503 and ``Retry-After`` unless the app registers
its own handler for it.
``crypt.close(app)`` (also run at interpreter exit) stops it all. Configuration
keys: see ``WebSettings`` and docs/web.md.

Just over 500 lines: what Flask needs beyond the shared base
(``_extension``): a private event loop thread for the async core and the
sync session interface over it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import datetime
import functools
import json
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final, TypeVar

try:
    import redis
    import redis.asyncio as aioredis
    from flask import Flask, Request, Response, current_app
    from flask.json.tag import TaggedJSONSerializer
    from flask.sessions import SessionInterface, SessionMixin
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "aiocrypt.integrations.flask needs extra dependencies: pip install 'aiocrypt[flask]'"
    ) from exc

from aiocrypt import (
    ConfigurationError,
    EncryptionService,
    HealthCheck,
    HealthReport,
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
from .sessions import EncryptedSession, SyncRedisSessionStore, WebSettings, apply_cookie

__all__ = ["AioCrypt", "AioCryptState", "EncryptedSessionInterface", "FlaskSession"]

_T = TypeVar("_T")
#: connection settings a sync client given for sessions lends the cache's asyncio client
_TWIN_KWARGS: Final = (
    "host",
    "port",
    "db",
    "username",
    "password",
    "path",
    "socket_timeout",
    "socket_connect_timeout",
)

logger = logging.getLogger("aiocrypt.flask")


class FlaskSession(EncryptedSession, SessionMixin):
    """An encrypted server-side session (``flask.session`` inside requests)."""


class _LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run ``coro`` on the loop, in a copy of the caller's context, and wait for it."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "AioCrypt.run() called from the extension's own event loop "
                "(await the coroutine instead)"
            )
        context = contextvars.copy_context()
        done: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def finish(task: asyncio.Task[_T]) -> None:
            if task.cancelled():
                # done is running (start() said so): cancel() would be a no-op there and
                # leave the caller waiting for ever
                done.set_exception(concurrent.futures.CancelledError())
            elif (error := task.exception()) is not None:
                done.set_exception(error)
            else:
                done.set_result(task.result())

        def start() -> None:
            if done.set_running_or_notify_cancel():
                self.loop.create_task(coro, context=context).add_done_callback(finish)
            # done is local to run(): nothing cancels it before start() runs
            else:  # pragma: no cover - done is never cancelled
                coro.close()

        self.loop.call_soon_threadsafe(start)
        return done.result(timeout)

    def stop(self) -> None:
        # stop() follows a run() on this loop (which waits for the loop to answer), so
        # the loop is running by then
        if self.loop.is_running():  # pragma: no branch - running after a run()
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()


class AioCryptState:
    """Per-app state, in ``app.extensions["aiocrypt"]``."""

    def __init__(
        self,
        settings: WebSettings,
        service: EncryptionService,
        *,
        redis_client: redis.Redis | None = None,
        async_redis_client: aioredis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self._given_redis = redis_client
        self._given_async_redis = async_redis_client
        self._lock = threading.Lock()
        self._loop: _LoopThread | None = None
        self._redis: redis.Redis | None = None
        self._async_redis: aioredis.Redis | None = None
        self._sessions: SyncRedisSessionStore | None = None
        self._cache: EncryptedCache | None = None
        self._refresher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<AioCryptState {'running' if self.started else 'stopped'}>"

    @property
    def started(self) -> bool:
        return self._sessions is not None

    @property
    def sessions(self) -> SyncRedisSessionStore:
        self.start()
        assert self._sessions is not None
        return self._sessions

    @property
    def cache(self) -> EncryptedCache:
        """The encrypted cache (its coroutines run on the extension's loop: async views)."""
        self.start()
        assert self._cache is not None
        return self._cache

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread, the service and the Redis clients (idempotent)."""
        if self._sessions is not None:
            return
        with self._lock:
            # a thread that found no sessions, then waited here while another started them:
            # a race a fast test cannot order
            if self._sessions is not None:  # pragma: no cover - a race between two threads
                return
            loop = _LoopThread("aiocrypt-flask")
            try:
                loop.run(self._start())
            except BaseException:
                loop.stop()
                raise
            self._loop = loop
            self._redis = self._sync_client()
            self._sessions = SyncRedisSessionStore(
                lambda: self.service.keyring,
                self._redis,
                self.settings.session,
                load_key=self._load_key,
                serializer=TaggedJSONSerializer(),
                service=self.service,
                run=self.run,
            )  # subject-bound sessions
            atexit.register(self.close)

    def _sync_client(self) -> redis.Redis:
        if self._given_redis is not None:
            return self._given_redis
        if self.settings.redis_client is not None:
            client: redis.Redis = self.settings.redis_client
            return client
        return redis.Redis.from_url(
            self._url(), socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT
        )

    def _url(self) -> str:
        assert self.settings.redis_url is not None  # from_config made sure of one
        return self.settings.redis_url

    def _owns_sync_client(self) -> bool:
        return self._given_redis is None and self.settings.redis_client is None

    def _async_client(self) -> aioredis.Redis:
        if self._given_async_redis is not None:
            return self._given_async_redis
        if self.settings.redis_url is not None:
            client: aioredis.Redis = aioredis.Redis.from_url(
                self.settings.redis_url,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=SOCKET_TIMEOUT,
            )
            return client
        # A sync client was given (redis= or SESSION_REDIS): the same server for the cache.
        given = self._given_redis if self._given_redis is not None else self.settings.redis_client
        kwargs = given.connection_pool.connection_kwargs
        twin: aioredis.Redis = aioredis.Redis(
            **{name: kwargs[name] for name in _TWIN_KWARGS if name in kwargs}
        )
        return twin

    async def _start(self) -> None:
        await self.service.start()
        await self.service.key_manager.ensure_active(self.settings.key_types())
        self._async_redis = self._async_client()
        self._cache = EncryptedCache(
            self.service,
            self._async_redis,
            prefix=self.settings.cache_prefix,
            default_ttl=self.settings.cache_ttl,
        )
        self._refresher = asyncio.create_task(self._keep_keys_fresh())

    async def _keep_keys_fresh(self) -> None:
        # Sync code reads service.keyring directly, so refresh it here, in the background.
        manager = self.service.key_manager
        while True:
            await asyncio.sleep(manager.refresh_interval)
            try:
                await manager.refresh()
            except Exception as exc:  # keep the last good keys; say so, without details
                logger.warning(
                    "refreshing aiocrypt keys failed (%s); will retry", type(exc).__name__
                )

    # The store is given service= and run= too, and reads a key rotated elsewhere through
    # the service: it never calls load_key (test_web_paths_flask's rotated-key test)
    def _load_key(self, key_id: str) -> object:  # pragma: no cover - the store never calls it
        return self.run(self.service.key_manager.load_key(key_id))

    def redis_check(self) -> HealthCheck:
        """PING the sessions' Redis: ``failing`` with the error class when it does not answer."""
        assert self._redis is not None
        try:
            self._redis.ping()
        except OUTAGE_ERRORS as exc:
            return HealthCheck("failing", {"error": type(exc).__name__})
        return HealthCheck("ok")

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run a coroutine on the extension's loop from sync code and return its result."""
        self.start()
        assert self._loop is not None
        return self._loop.run(coro, timeout)

    def close(self) -> None:
        """Stop the refresher, close the clients this extension opened and the service."""
        with self._lock:
            loop, self._loop = self._loop, None
            if loop is None:
                return
            atexit.unregister(self.close)
            self._sessions = None
            try:
                loop.run(self._close())
            finally:
                loop.stop()
                if self._redis is not None and self._owns_sync_client():
                    self._redis.close()
                self._redis = None

    async def _close(self) -> None:
        # _start() always creates the refresher, and close() runs only after a start()
        if self._refresher is not None:  # pragma: no branch - set by every start()
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        self._cache = None
        try:
            if self._async_redis is not None and self._given_async_redis is None:
                await self._async_redis.aclose()
            self._async_redis = None
        finally:
            await self.service.close()

    def async_to_sync(self, func: Callable[..., Coroutine[Any, Any, _T]]) -> Callable[..., _T]:
        """Flask's hook for async views: run them on the extension's loop."""

        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> _T:
            self.start()
            return self.run(func(*args, **kwargs))

        return call


class AioCrypt(AioCryptBase[AioCryptState]):
    """The Flask extension (``AioCrypt(app)`` or ``AioCrypt()`` then ``init_app(app)``).

    ``service``: the ``EncryptionService`` to use (default: the process-wide
    one from the environment); the extension starts and closes it.
    ``redis`` / ``async_redis``: clients to use instead of connecting to
    ``AIOCRYPT_REDIS_URL`` (the async one must not have been used on another
    loop; the caller closes clients it passed). ``SESSION_REDIS`` in the
    config is the Flask-Session way to pass the sync one. ``service`` and
    ``cache`` are the current app's (await them in async views only).
    """

    framework = "Flask"

    def __init__(
        self,
        app: Flask | None = None,
        *,
        service: EncryptionService | None = None,
        redis: redis.Redis | None = None,
        async_redis: aioredis.Redis | None = None,
    ) -> None:
        self._async_redis = async_redis
        super().__init__(app, service=service, redis=redis)

    def _new_state(self, settings: WebSettings) -> AioCryptState:
        if settings.redis_client is not None and (
            not isinstance(settings.redis_client, redis.Redis)
        ):
            raise ConfigurationError(
                "SESSION_REDIS must be a redis.Redis client (sync, as "
                "Flask-Session's; pass async_redis= for the cache)"
            )
        return AioCryptState(
            settings,
            self._service_to_use(),
            redis_client=self._redis,
            async_redis_client=self._async_redis,
        )

    def _session_interface(self) -> EncryptedSessionInterface:
        return EncryptedSessionInterface()

    def _outage_handler(self) -> Callable[[StoreUnavailableError], Response]:
        return _answer_outage

    def _install(self, app: Flask, state: AioCryptState) -> None:
        app.async_to_sync = state.async_to_sync  # type: ignore[method-assign]

    @staticmethod
    def _current_app() -> Flask:
        return current_app

    def start(self, app: Flask | None = None) -> None:
        """Start now rather than on the first request."""
        self.state(app).start()

    def close(self, app: Flask | None = None) -> None:
        """Stop the extension's loop and close the service (also run at exit)."""
        self.state(app).close()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run ``coro`` on the extension's loop from sync code (not from an async view)."""
        return self.state().run(coro, timeout)

    @property
    def sessions(self) -> SyncRedisSessionStore:
        """The current app's session store."""
        return self.state().sessions

    def add_health_routes(
        self,
        app: Flask,
        *,
        health_path: str = "/healthz",
        metrics_path: str | None = "/metrics",
        registry: Any = None,
        key_types: Iterable[str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Serve ``aiocrypt.health()`` as JSON (200, or 503 when failing) at ``health_path``.

        The check runs on the extension's loop (starting it if needed: a service
        that cannot start is reported ``failing``), waiting at most ``timeout``.
        With prometheus-client installed, also serve metrics at ``metrics_path``
        (``None``: no metrics route): ``registry`` as it is when given (call
        ``aiocrypt.metrics.instrument`` on it yourself), else a registry of this
        app's service alone. Call after ``init_app``. See docs/metrics.md.
        """
        state = self.state(app)
        wanted = None if key_types is None else list(key_types)

        def aiocrypt_health() -> Response:
            try:
                state.start()  # first: a coroutine made before a failed start never runs
                report = state.run(health(state.service, key_types=wanted), timeout)
            except Exception as exc:  # it could not even start (or answer in time)
                report = HealthReport(
                    "failing",
                    {
                        "service": HealthCheck(
                            "failing", {"state": "stopped", "error": type(exc).__name__}
                        )
                    },
                    datetime.datetime.now(datetime.UTC),
                )
            else:
                report = report.with_check("redis", state.redis_check())
            return Response(
                json.dumps(report.to_dict()),
                status=report.http_status,
                mimetype="application/json",
                headers=NO_STORE,
            )

        def metrics_view(registry: Any) -> Callable[[], Response]:
            from aiocrypt.metrics import render

            def aiocrypt_metrics() -> Response:
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


def _answer_outage(exc: StoreUnavailableError) -> Response:
    """The default answer to a Redis outage: 503, ``Retry-After``, no details."""
    body, headers = outage_answer(logger, AioCrypt.state(), exc)
    return Response(body, status=503, mimetype="application/json", headers=headers)


class EncryptedSessionInterface(SessionInterfaceBase, SessionInterface):
    """Flask session interface over ``SyncRedisSessionStore``.

    The session is read from Redis on first access; ``regenerate(session)``
    (Flask-Session 0.7's name) is ``session.regenerate()``.
    """

    session_class = FlaskSession

    def open_session(self, app: Flask, request: Request) -> FlaskSession | None:
        if sessionless(app, request.path):
            return None  # a probe gets a null session, and answers even if keys are down
        state = AioCrypt.state(app)
        return state.sessions.open(
            request.cookies.get(state.settings.cookie_name), self.session_class
        )

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if not isinstance(session, EncryptedSession) or not session.accessed:
            return
        state = AioCrypt.state(app)
        try:
            result = state.sessions.save(session)
        except StoreUnavailableError as exc:  # the view ran, its session cannot be kept
            _replace(response, app.make_response(app.handle_user_exception(exc)))
            return
        apply_cookie(state.settings, session, result, response)


def _replace(response: Response, answer: Response) -> None:
    """Turn ``response`` into ``answer`` (save_session can only change it in place)."""
    response.status = answer.status
    response.headers = answer.headers.copy()
    response.set_data(answer.get_data())
