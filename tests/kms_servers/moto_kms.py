"""moto's AWS KMS in *server mode* on loopback, with call counting and an access-denied switch.

This is moto's own ``ThreadedMotoServer`` (the werkzeug server behind
``moto_server``) bound to ``127.0.0.1:0``, with a thin WSGI layer in front of
moto's app that

* counts KMS calls by their ``X-Amz-Target`` (``TrentService.Encrypt`` ->
  ``calls["encrypt"]``; names are botocore's snake_case operation names:
  ``create_key``, ``encrypt``, ``decrypt``, ``generate_data_key``, ``re_encrypt``,
  ``describe_key`` ...), and
* when ``access_denied`` is set (or the operation is in ``denied_operations``)
  answers like IAM does for a caller without the ``kms:<Action>`` permission:
  HTTP 400, ``{"__type": "AccessDeniedException", "message": "User: ... is not
  authorized to perform: kms:Encrypt on resource: ... because no identity-based
  policy allows the kms:Encrypt action"}``, which botocore raises as a
  ``ClientError`` with code ``AccessDeniedException``.

Everything else is moto: real KMS wire protocol (JSON 1.1, SigV4 accepted
without checking), ``EncryptionContext`` bound into the ciphertext (a wrong
context raises ``InvalidCiphertextException``), key states, aliases, data keys.

Differences from real AWS KMS are moto's (no signature/credential checks, no
IAM/grant evaluation; key policies only deny ``DescribeKey``). moto keeps its
state in process-global backends: every moto server and ``mock_aws`` in the
same process share it -- ``server.reset()`` wipes it (all services) via
``/moto-api/reset``.

Usage::

    with start_moto_kms_server() as aws:
        async with get_session().create_client("kms", **aws.client_kwargs) as kms:
            key_id = (await kms.create_key())["KeyMetadata"]["KeyId"]
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from collections.abc import Iterable
from typing import Any
from wsgiref.types import WSGIApplication

from botocore import xform_name
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

from . import ServerBase

__all__ = ["MotoKmsServer", "start_moto_kms_server"]

_ACCOUNT_ID = "123456789012"  # moto's default account
_REGION_RE = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/")


class _KmsGate:
    """WSGI middleware: count KMS calls and answer AccessDenied when told to."""

    def __init__(self, app: WSGIApplication, owner: MotoKmsServer) -> None:
        self._app = app
        self._owner = owner

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target.startswith("TrentService."):
            action = target.split(".", 1)[1]
            op = xform_name(action)
            self._owner.calls.incr(op)
            if self._owner.is_denied(op):
                return self._deny(environ, start_response, action)
        return self._app(environ, start_response)

    @staticmethod
    def _deny(environ: dict[str, Any], start_response: Any, action: str) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        try:
            key_id = json.loads(raw or b"{}").get("KeyId")
        except (ValueError, AttributeError):
            key_id = None
        m = _REGION_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
        region = m.group(1) if m else "us-east-1"
        if not key_id:
            resource = "*"
        elif key_id.startswith("arn:"):
            resource = key_id
        elif key_id.startswith("alias/"):
            resource = f"arn:aws:kms:{region}:{_ACCOUNT_ID}:{key_id}"
        else:
            resource = f"arn:aws:kms:{region}:{_ACCOUNT_ID}:key/{key_id}"
        body = json.dumps(
            {
                "__type": "AccessDeniedException",
                "message": (
                    f"User: arn:aws:iam::{_ACCOUNT_ID}:user/test is not authorized to perform: "
                    f"kms:{action} on resource: {resource} because no identity-based policy "
                    f"allows the kms:{action} action"
                ),
            }
        ).encode()
        start_response(
            "400 Bad Request",
            [
                ("Content-Type", "application/x-amz-json-1.1"),
                ("Content-Length", str(len(body))),
                ("x-amzn-RequestId", str(uuid.uuid4())),
            ],
        )
        return [body]


class _QuietRequestHandler(MotoRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:  # no access log on stderr
        pass


class _GatedThreadedMotoServer(ThreadedMotoServer):
    """``ThreadedMotoServer`` whose WSGI app is wrapped by :class:`_KmsGate`."""

    def __init__(self, owner: MotoKmsServer) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self._owner = owner

    def _server_entry(self) -> None:  # mirrors ThreadedMotoServer._server_entry
        app = _KmsGate(DomainDispatcherApplication(create_backend_app), self._owner)
        self._server = make_server(
            self._ip_address, self._port, app, True, request_handler=_QuietRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever(poll_interval=0.05)


class MotoKmsServer(ServerBase):
    """moto server mode on 127.0.0.1:<random port>. See the module docstring."""

    def __init__(self, region_name: str = "us-east-1") -> None:
        super().__init__()
        self.region_name = region_name
        self._moto: _GatedThreadedMotoServer | None = None

    def start(self) -> MotoKmsServer:
        if self._moto is None:
            self._moto = _GatedThreadedMotoServer(self)
            self._moto.start()
        return self

    def stop(self) -> None:
        if self._moto is not None:
            self._moto.stop()
            self._moto = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._moto is not None, "server not started"
        return self._moto.get_host_and_port()

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    endpoint_url = url

    @property
    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``session.create_client("kms", **server.client_kwargs)``."""
        return {
            "endpoint_url": self.url,
            "region_name": self.region_name,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }

    def reset(self) -> None:
        """Wipe moto's (process-global) state for all services; counters are kept."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


def start_moto_kms_server(region_name: str = "us-east-1") -> MotoKmsServer:
    """Start moto in server mode on 127.0.0.1:<random port>; ``server.url`` is the endpoint URL."""
    return MotoKmsServer(region_name=region_name).start()
