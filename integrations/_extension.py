"""What the Flask and Quart extensions share.

``init_app`` (the configuration read once into ``WebSettings``, the per-app state
in ``app.extensions["aiocrypt"]``, the encrypted session interface, the answer to
a Redis outage), the state lookup, the health and metrics routes, and the paths
served without a session. ``flask.py`` and ``quart.py`` add what differs: Flask
runs the service on an event loop in a thread and keeps sessions sync; Quart
starts and stops with the server and awaits everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar, Final, Generic, Protocol, TypeVar

from aiocrypt import EncryptionService, StoreUnavailableError, get_encryption_service

from .cache import EncryptedCache
from .sessions import EncryptedSession, WebSettings

__all__ = [
    "EXTENSION",
    "NO_STORE",
    "AioCryptBase",
    "ExtensionState",
    "SessionInterfaceBase",
    "add_routes",
    "outage_answer",
    "sessionless",
]

#: app.extensions key of the per-app state
EXTENSION: Final = "aiocrypt"
#: app.extensions key: paths served without a session (health probes and metrics)
_SESSIONLESS: Final = "aiocrypt.sessionless"
NO_STORE: Final = {"Cache-Control": "no-store"}


class ExtensionState(Protocol):
    """What both frameworks' per-app states offer."""

    settings: WebSettings
    service: EncryptionService

    @property
    def cache(self) -> EncryptedCache: ...


StateT = TypeVar("StateT", bound=ExtensionState)


class AioCryptBase(Generic[StateT]):
    """``AioCrypt(app)`` or ``AioCrypt()`` then ``init_app(app)``: the frameworks'
    extensions, less their state, session interface and hooks."""

    framework: ClassVar[str]

    def __init__(
        self, app: Any = None, *, service: EncryptionService | None = None, redis: Any = None
    ) -> None:
        self._service = service
        self._redis = redis
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"<AioCrypt ({self.framework})>"

    def init_app(self, app: Any) -> None:
        if EXTENSION in app.extensions:
            raise RuntimeError("AioCrypt is already set up on this app")
        settings = WebSettings.from_config(app.config, client_given=self._redis is not None)
        state = self._new_state(settings)
        app.extensions[EXTENSION] = state
        app.session_interface = self._session_interface()
        app.register_error_handler(StoreUnavailableError, self._outage_handler())
        self._install(app, state)

    # -- what each framework provides -----------------------------------------

    def _new_state(self, settings: WebSettings) -> StateT:
        """The per-app state (raises ``ConfigurationError`` for a client of the wrong kind)."""
        raise NotImplementedError

    def _session_interface(self) -> Any:
        raise NotImplementedError

    def _outage_handler(self) -> Callable[..., Any]:
        raise NotImplementedError

    def _install(self, app: Any, state: StateT) -> None:
        """Framework hooks beyond the session interface and the outage handler."""

    @staticmethod
    def _current_app() -> Any:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------

    def _service_to_use(self) -> EncryptionService:
        return self._service if self._service is not None else get_encryption_service()

    @classmethod
    def state(cls, app: Any = None) -> StateT:
        """The extension's state for ``app`` (default: the current app)."""
        target = app if app is not None else cls._current_app()
        try:
            state: StateT = target.extensions[EXTENSION]
        except KeyError:
            raise RuntimeError("AioCrypt.init_app() was not called for this app") from None
        return state

    @property
    def service(self) -> EncryptionService:
        """The current app's ``EncryptionService``."""
        return self.state().service

    @property
    def cache(self) -> EncryptedCache:
        """The current app's encrypted cache."""
        return self.state().cache


def add_routes(
    app: Any,
    service: EncryptionService,
    *,
    health_path: str,
    health_view: Callable[..., Any],
    metrics_path: str | None,
    registry: Any,
    metrics_view: Callable[[Any], Callable[..., Any]],
) -> None:
    """Route ``health_view`` at ``health_path`` and, with prometheus-client installed,
    ``metrics_view(registry)`` at ``metrics_path``; both served without a session."""
    app.add_url_rule(health_path, "aiocrypt_health", health_view, methods=["GET"])
    app.extensions.setdefault(_SESSIONLESS, set()).add(health_path)
    if metrics_path is None:
        return
    from aiocrypt.metrics import route_registry

    registry = route_registry(service, registry)
    # the dev environment the suite runs in installs prometheus-client (the metrics extra)
    if registry is None:  # pragma: no cover - the metrics extra is not installed: health only
        return
    app.add_url_rule(metrics_path, "aiocrypt_metrics", metrics_view(registry), methods=["GET"])
    app.extensions[_SESSIONLESS].add(metrics_path)


def sessionless(app: Any, path: str) -> bool:
    """Whether ``path`` is a probe: it gets a null session, and answers even if keys
    are down."""
    return path in app.extensions.get(_SESSIONLESS, ())


def outage_answer(
    logger: logging.Logger, state: ExtensionState, exc: StoreUnavailableError
) -> tuple[str, dict[str, str]]:
    """The default answer to a Redis outage (503, ``Retry-After``, no details): its body
    and headers; the outage is logged."""
    logger.warning(
        "the %s Redis is unavailable (%s): answering 503", exc.store, type(exc.__cause__).__name__
    )
    return state.settings.outage_body()


class SessionInterfaceBase:
    """Mixed into both frameworks' session interfaces."""

    def regenerate(self, session: Any) -> None:
        """Give ``session`` a new id when saved; the old one stops working (login)."""
        if isinstance(session, EncryptedSession):
            session.regenerate()
