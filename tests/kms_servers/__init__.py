"""Loopback test servers for the key-management services aiocrypt talks to.

These servers exist so that KEK providers can be tested with the *real*
client libraries (hvac, azure-keyvault-keys, google-cloud-kms, aiobotocore)
talking over real sockets on 127.0.0.1, instead of mocking the client objects.
Each server speaks a small, protocol-faithful subset of the real service and
does real cryptography, so wrong context/AAD, key versions and permission
errors behave like the real thing as far as the client library can tell.

Modules (each module docstring lists the exact API subset and the known
differences from the real service):

* :mod:`.vault`    -- HashiCorp Vault Transit over HTTP (``start_vault_server``)
* :mod:`.azure`    -- Azure Key Vault keys REST API over HTTPS with the
  bearer-challenge flow (``start_azure_keyvault_server``)
* :mod:`.gcp`      -- Google Cloud KMS gRPC service, insecure loopback channel
  (``start_gcp_kms_server``)
* :mod:`.moto_kms` -- moto's AWS KMS in server mode with call counting and an
  access-denied switch (``start_moto_kms_server``)

Common shape of every server object returned by a ``start_*`` function:

* it binds port 0 on 127.0.0.1 (never a fixed port) and serves from a daemon
  background thread, so it works from sync and async tests alike;
* ``server.url`` / ``server.address`` tell the client where to connect;
* ``server.calls`` is a thread-safe :class:`CallCounter`; ``server.calls["encrypt"]``
  is the number of (authenticated) requests that reached that operation,
  whether they succeeded or not; unknown names read as 0;
* ``server.access_denied = True`` makes every key operation answer with the
  service's own permission error; ``server.denied_operations`` (a set of
  operation names) denies only some operations;
* ``server.stop()`` stops it; servers are also context managers.

The ``start_*`` names are exported lazily so importing this package does not
pull in grpc, azure or moto unless the corresponding server is used.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Self

__all__ = [
    "CallCounter",
    "start_vault_server",
    "start_azure_keyvault_server",
    "start_gcp_kms_server",
    "start_moto_kms_server",
    "VaultTransitServer",
    "AzureKeyVaultServer",
    "GcpKmsServer",
    "MotoKmsServer",
    "AsyncStaticTokenCredential",
    "StaticTokenCredential",
]


class CallCounter:
    """Thread-safe per-operation call counter (``counter["encrypt"]`` -> int)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def incr(self, operation: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[operation] += amount

    def __getitem__(self, operation: str) -> int:
        with self._lock:
            return self._counts[operation]

    def get(self, operation: str, default: int = 0) -> int:
        with self._lock:
            return self._counts.get(operation, default)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def snapshot(self) -> dict[str, int]:
        """A plain-dict copy, safe to compare while the server keeps running."""
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def __repr__(self) -> str:
        return f"CallCounter({self.snapshot()!r})"


class ServerBase:
    """Bits every test server shares: counters, access-denied switch, context manager."""

    def __init__(self) -> None:
        self.calls = CallCounter()
        #: When true, every key operation answers with the service's permission error.
        self.access_denied = False
        #: Operation names (same names as in ``calls``) to deny even if ``access_denied`` is false.
        self.denied_operations: set[str] = set()

    def is_denied(self, operation: str) -> bool:
        return self.access_denied or operation in self.denied_operations

    def start(self) -> ServerBase:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class BackgroundHTTPServer:
    """Run an ``http.server`` handler class on 127.0.0.1:0 in a daemon thread.

    ``handler_class`` gets the owning service object as ``self.server.service``.
    With ``ssl_context`` the listening socket is wrapped for TLS; the handshake is
    done in the per-connection thread so a stalled client cannot block accept().
    """

    def __init__(self, handler_class: type, service: object, ssl_context: Any = None) -> None:
        from http.server import ThreadingHTTPServer

        class _Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._httpd = _Server(("127.0.0.1", 0), handler_class)
        self._httpd.service = service  # type: ignore[attr-defined]
        if ssl_context is not None:
            self._httpd.socket = ssl_context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        host, port = self._httpd.server_address[:2]
        self.host, self.port = str(host), int(port)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(service).__name__}-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._thread = None  # type: ignore[assignment]


_LAZY = {
    "start_vault_server": ".vault",
    "VaultTransitServer": ".vault",
    "start_azure_keyvault_server": ".azure",
    "AzureKeyVaultServer": ".azure",
    "AsyncStaticTokenCredential": ".azure",
    "StaticTokenCredential": ".azure",
    "start_gcp_kms_server": ".gcp",
    "GcpKmsServer": ".gcp",
    "start_moto_kms_server": ".moto_kms",
    "MotoKmsServer": ".moto_kms",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value
