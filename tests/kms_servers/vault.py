"""A HashiCorp Vault *Transit* secrets-engine test server (HTTP, loopback).

Speaks the subset of the Vault HTTP API that ``hvac`` uses for envelope
encryption, with Vault's wire formats:

* ``GET|HEAD /v1/sys/health``                      (no token needed)
* ``GET /v1/auth/token/lookup-self``               (``client.is_authenticated()``)
* ``POST /v1/sys/mounts/<path>`` ``{"type": "transit"}`` (enable another mount)
* ``POST|PUT /v1/<mount>/keys/<name>``             create (idempotent, like Vault)
* ``GET /v1/<mount>/keys/<name>``                  read key (404 ``{"errors": []}`` if absent)
* ``DELETE /v1/<mount>/keys/<name>``               delete (needs ``deletion_allowed``)
* ``LIST /v1/<mount>/keys`` or ``GET ...?list=true``
* ``POST /v1/<mount>/keys/<name>/rotate``
* ``POST /v1/<mount>/keys/<name>/config``          ``min_decryption_version`` etc.
* ``POST /v1/<mount>/encrypt/<name>``              ``plaintext``, ``context``,
  ``associated_data``, ``key_version`` (all base64 like Vault)
* ``POST /v1/<mount>/decrypt/<name>``

Semantics kept from Vault:

* ``X-Vault-Token`` (or ``Authorization: Bearer``) is checked; a missing or
  wrong token gets ``403 {"errors": ["permission denied"]}``.
* Ciphertext is ``vault:v<N>:<base64(nonce || ciphertext || tag)>`` with real
  AES-256-GCM (or AES-128-GCM / ChaCha20-Poly1305) under a random key per
  version; ``rotate`` adds a version, old versions keep decrypting until
  ``min_decryption_version`` excludes them ("ciphertext or signature version is
  disallowed by policy (too old)").
* ``derived=true`` keys need ``context`` on every call ("missing 'context' for
  key derivation; ...") and derive the per-context key with HKDF-SHA256
  (salt empty, info = context), which is Vault's ``hkdf_sha256`` KDF. A wrong
  context fails the GCM tag check: ``400 {"errors": ["cipher: message
  authentication failed"]}``. As in Vault, ``context`` is ignored for keys
  that are not derived.
* Encrypting with an unknown key *creates* it (Vault's upsert; derived when a
  context is given) unless ``upsert=False``; decrypting with an unknown key
  gives ``400 {"errors": ["encryption key not found"]}``; reading one gives 404.
* All error bodies are ``{"errors": [...]}`` with ``Content-Type:
  application/json`` (hvac only parses errors with exactly that header).

Differences from real Vault: single-item requests only (no ``batch_input``),
no convergent encryption, no asymmetric/HMAC/managed key types, no ACL
policies (one token for everything; ``access_denied`` simulates a token whose
policy lacks the transit paths), no leases, seal state or namespaces.

Counters (``server.calls[...]``), counted after the token check:
``health``, ``lookup_self``, ``enable_mount``, ``create_key``, ``read_key``,
``delete_key``, ``list_keys``, ``rotate_key``, ``update_key_config``,
``encrypt``, ``decrypt``; requests with a bad token count as
``permission_denied``. ``access_denied``/``denied_operations`` apply to the
transit operations only (health and lookup-self keep working, as with a real
token that merely lacks a transit policy).

Usage::

    with start_vault_server() as vault:
        client = hvac.Client(url=vault.url, token=vault.token)
        client.secrets.transit.create_key("kek", derived=True)
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import BackgroundHTTPServer, ServerBase

__all__ = ["VaultTransitServer", "start_vault_server"]

_KEY_SIZES = {"aes256-gcm96": 32, "aes128-gcm96": 16, "chacha20-poly1305": 32}
# framework.GenericNameRegex in Vault
_NAME_RE = re.compile(r"^\w(([\w\-.@]+)?\w)?$")
_MISSING_CONTEXT = (
    "missing 'context' for key derivation; the key was created using a derived key, "
    "which means additional, per-request information must be included in order to "
    "perform operations with the key"
)
_TOO_OLD = "ciphertext or signature version is disallowed by policy (too old)"
_TRANSIT_OPS = {
    "create_key",
    "read_key",
    "delete_key",
    "list_keys",
    "rotate_key",
    "update_key_config",
    "encrypt",
    "decrypt",
}


class VaultError(Exception):
    """An error answered as ``{"errors": [...]}`` with the given status."""

    def __init__(self, status: int, *errors: str) -> None:
        super().__init__(status, errors)
        self.status = status
        self.errors = list(errors)


@dataclass
class _TransitKey:
    name: str
    type: str = "aes256-gcm96"
    derived: bool = False
    exportable: bool = False
    allow_plaintext_backup: bool = False
    deletion_allowed: bool = False
    auto_rotate_period: int = 0
    min_decryption_version: int = 1
    min_encryption_version: int = 0
    # version -> (key bytes, unix creation time); never exposed over the API
    versions: dict[int, tuple[bytes, int]] = field(default_factory=dict)

    @property
    def latest_version(self) -> int:
        return max(self.versions)

    def add_version(self) -> int:
        version = (max(self.versions) + 1) if self.versions else 1
        self.versions[version] = (secrets.token_bytes(_KEY_SIZES[self.type]), int(time.time()))
        return version

    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "allow_plaintext_backup": self.allow_plaintext_backup,
            "auto_rotate_period": self.auto_rotate_period,
            "deletion_allowed": self.deletion_allowed,
            "derived": self.derived,
            "exportable": self.exportable,
            "imported_key": False,
            "keys": {str(v): created for v, (_, created) in sorted(self.versions.items())},
            "latest_version": self.latest_version,
            "min_available_version": 0,
            "min_decryption_version": self.min_decryption_version,
            "min_encryption_version": self.min_encryption_version,
            "name": self.name,
            "supports_decryption": True,
            "supports_derivation": True,
            "supports_encryption": True,
            "supports_signing": False,
            "type": self.type,
        }
        if self.derived:
            data["kdf"] = "hkdf_sha256"
            data["convergent_encryption"] = False
        return data

    def _cipher_key(self, version: int, context: bytes | None) -> bytes:
        key = self.versions[version][0]
        if not self.derived:
            return key  # Vault ignores context for non-derived keys
        if not context:
            raise VaultError(400, _MISSING_CONTEXT)
        return HKDF(algorithm=hashes.SHA256(), length=len(key), salt=None, info=context).derive(key)

    def _aead(self, key: bytes) -> AESGCM | ChaCha20Poly1305:
        return ChaCha20Poly1305(key) if self.type == "chacha20-poly1305" else AESGCM(key)

    def encrypt(
        self, plaintext: bytes, context: bytes | None, aad: bytes | None, version: int
    ) -> str:
        if version == 0:
            version = self.latest_version
        elif version < 0:
            raise VaultError(400, "requested version for encryption is negative")
        elif version > self.latest_version:
            raise VaultError(
                400, "requested version for encryption is higher than the latest key version"
            )
        elif self.min_encryption_version > 0 and version < self.min_encryption_version:
            raise VaultError(
                400,
                "requested version for encryption is less than the minimum encryption key version",
            )
        key = self._cipher_key(version, context)
        nonce = secrets.token_bytes(12)
        sealed = self._aead(key).encrypt(nonce, plaintext, aad or None)
        return f"vault:v{version}:" + base64.b64encode(nonce + sealed).decode()

    def decrypt(self, ciphertext: str, context: bytes | None, aad: bytes | None) -> bytes:
        if not ciphertext.startswith("vault:v"):
            raise VaultError(400, "invalid ciphertext: no prefix")
        parts = ciphertext[len("vault:v") :].split(":", 1)
        if len(parts) != 2:
            raise VaultError(400, "invalid ciphertext: wrong number of fields")
        try:
            version = int(parts[0])
        except ValueError:
            raise VaultError(
                400, "invalid ciphertext: version number could not be decoded"
            ) from None
        version = version or 1
        if version > self.latest_version:
            raise VaultError(400, "invalid ciphertext: version is too new")
        if self.min_decryption_version > 0 and version < self.min_decryption_version:
            raise VaultError(400, _TOO_OLD)
        try:
            raw = base64.b64decode(parts[1], validate=True)
        except (binascii.Error, ValueError):
            raise VaultError(400, "invalid ciphertext: could not decode base64") from None
        if len(raw) < 12:
            raise VaultError(400, "invalid ciphertext length")
        key = self._cipher_key(version, context)
        try:
            return self._aead(key).decrypt(raw[:12], raw[12:], aad or None)
        except InvalidTag:
            raise VaultError(400, "cipher: message authentication failed") from None


def _b64_field(body: dict[str, Any], name: str) -> bytes | None:
    value = body.get(name)
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise VaultError(400, f"failed to base64-decode {name}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise VaultError(400, f"failed to base64-decode {name}") from None


def _bool_field(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if isinstance(value, str):
        return value.lower() in ("1", "t", "true", "yes")
    return bool(value)


def _int_field(body: dict[str, Any], name: str, default: int = 0) -> int:
    value = body.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise VaultError(400, f"error converting input {value!r} for field {name!r}") from None


class VaultTransitServer(ServerBase):
    """In-memory Vault with transit mounts. See the module docstring."""

    def __init__(
        self, token: str | None = None, mounts: tuple[str, ...] = ("transit",), upsert: bool = True
    ):
        super().__init__()
        self.token = token or "hvs." + secrets.token_urlsafe(24)
        self.upsert = upsert
        self._lock = threading.RLock()
        self._mounts: dict[str, dict[str, _TransitKey]] = {m.strip("/"): {} for m in mounts}
        self._http: BackgroundHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> VaultTransitServer:
        if self._http is None:
            self._http = BackgroundHTTPServer(_VaultHandler, self)
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._http is not None, "server not started"
        return (self._http.host, self._http.port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    # -- test helpers (no HTTP) --------------------------------------------
    def key_names(self, mount: str = "transit") -> list[str]:
        with self._lock:
            return sorted(self._mounts[mount])

    def latest_version(self, name: str, mount: str = "transit") -> int:
        with self._lock:
            return self._mounts[mount][name].latest_version

    # -- request dispatch ----------------------------------------------------
    def handle(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: Any,
        body: dict[str, Any],
    ) -> tuple[int, dict[str, Any] | None]:
        """Return ``(status, payload_or_None)``; raise VaultError for errors."""
        if not path.startswith("/v1/"):
            raise VaultError(404)
        route = path[len("/v1/") :].strip("/")
        if method == "GET" and query.get("list", [""])[0].lower() == "true":
            method = "LIST"

        if route == "sys/health":
            self.calls.incr("health")
            return 200, {
                "initialized": True,
                "sealed": False,
                "standby": False,
                "performance_standby": False,
                "replication_performance_mode": "disabled",
                "replication_dr_mode": "disabled",
                "server_time_utc": int(time.time()),
                "version": "1.15.0+test",
                "cluster_name": "aiocrypt-test-cluster",
                "cluster_id": "00000000-0000-0000-0000-000000000000",
            }

        supplied = headers.get("X-Vault-Token")
        auth = headers.get("Authorization", "")
        if not supplied and auth.lower().startswith("bearer "):
            supplied = auth[7:].strip()
        if not supplied or not secrets.compare_digest(supplied, self.token):
            self.calls.incr("permission_denied")
            raise VaultError(403, "permission denied")

        if route == "auth/token/lookup-self" and method in ("GET", "POST", "PUT"):
            self.calls.incr("lookup_self")
            return 200, self._envelope(
                {
                    "accessor": "test-accessor",
                    "display_name": "token",
                    "entity_id": "",
                    "expire_time": None,
                    "id": self.token,
                    "meta": None,
                    "num_uses": 0,
                    "orphan": True,
                    "path": "auth/token/create",
                    "policies": ["root"],
                    "renewable": False,
                    "ttl": 0,
                    "type": "service",
                },
                mount_type="token",
            )

        if route.startswith("sys/mounts/") and method in ("POST", "PUT"):
            self.calls.incr("enable_mount")
            mount = route[len("sys/mounts/") :].strip("/")
            if body.get("type") != "transit":
                raise VaultError(400, f"plugin not found in the catalog: {body.get('type')}")
            with self._lock:
                if mount in self._mounts:
                    raise VaultError(400, f"path is already in use at {mount}/")
                self._mounts[mount] = {}
            return 204, None

        parts = route.split("/")
        with self._lock:
            for size in range(len(parts) - 1, 0, -1):
                mount = "/".join(parts[:size])
                if mount in self._mounts:
                    return self._transit(method, mount, parts[size:], body)
        raise VaultError(404, f'no handler for route "{route}". route entry not found.')

    def _envelope(
        self,
        data: dict[str, Any] | None,
        mount_type: str = "transit",
        warnings: list[str] | None = None,
    ) -> dict[str, Any]:
        return {
            "request_id": str(uuid.uuid4()),
            "lease_id": "",
            "renewable": False,
            "lease_duration": 0,
            "data": data,
            "wrap_info": None,
            "warnings": warnings,
            "auth": None,
            "mount_type": mount_type,
        }

    def _check(self, op: str) -> None:
        self.calls.incr(op)
        if self.is_denied(op):
            raise VaultError(403, "permission denied")

    def _transit(
        self, method: str, mount: str, rest: list[str], body: dict[str, Any]
    ) -> tuple[int, dict[str, Any] | None]:
        keys = self._mounts[mount]
        unsupported = VaultError(404, "1 error occurred:\n\t* unsupported path\n\n")

        if rest == ["keys"] and method == "LIST":
            self._check("list_keys")
            if not keys:
                raise VaultError(404)
            return 200, self._envelope({"keys": sorted(keys)})

        if len(rest) < 2 or not _NAME_RE.match(rest[1]):
            raise unsupported
        name = rest[1]

        if rest[0] == "keys" and len(rest) == 2:
            if method in ("POST", "PUT"):
                self._check("create_key")
                return 200, self._create(keys, name, body)
            if method == "GET":
                self._check("read_key")
                if name not in keys:
                    raise VaultError(404)
                return 200, self._envelope(keys[name].info())
            if method == "DELETE":
                self._check("delete_key")
                key = keys.get(name)
                if key is None:
                    raise VaultError(400, "could not delete key; not found")
                if not key.deletion_allowed:
                    raise VaultError(400, "deletion is not allowed for this key")
                del keys[name]
                return 204, None
            raise VaultError(405)

        if rest[0] == "keys" and len(rest) == 3 and method in ("POST", "PUT"):
            if rest[2] == "rotate":
                self._check("rotate_key")
                key = keys.get(name)
                if key is None:
                    raise VaultError(400, "key not found")
                key.add_version()
                return 200, self._envelope(key.info())
            if rest[2] == "config":
                self._check("update_key_config")
                key = keys.get(name)
                if key is None:
                    raise VaultError(400, f"no existing key named {name} could be found")
                return 200, self._configure(key, body)
            raise unsupported

        if rest[0] in ("encrypt", "decrypt") and len(rest) == 2 and method in ("POST", "PUT"):
            self._check(rest[0])
            if "batch_input" in body:
                raise VaultError(400, "batch_input is not supported by this test server")
            context = _b64_field(body, "context")
            aad = _b64_field(body, "associated_data")
            key = keys.get(name)
            if rest[0] == "encrypt":
                if "plaintext" not in body:
                    raise VaultError(400, "missing plaintext to encrypt")
                plaintext = _b64_field(body, "plaintext") or b""
                if key is None:
                    if not self.upsert:
                        raise VaultError(400, "encryption key not found")
                    key = self._new_key(
                        name, body.get("type") or "aes256-gcm96", derived=bool(context)
                    )
                    keys[name] = key
                ciphertext = key.encrypt(plaintext, context, aad, _int_field(body, "key_version"))
                return 200, self._envelope(
                    {"ciphertext": ciphertext, "key_version": int(ciphertext.split(":")[1][1:])}
                )
            given = body.get("ciphertext")
            if not isinstance(given, str) or not given:
                raise VaultError(400, "missing ciphertext to decrypt")
            if key is None:
                raise VaultError(400, "encryption key not found")
            plaintext = key.decrypt(given, context, aad)
            return 200, self._envelope({"plaintext": base64.b64encode(plaintext).decode()})

        raise unsupported

    def _new_key(self, name: str, key_type: str, derived: bool) -> _TransitKey:
        if key_type not in _KEY_SIZES:
            raise VaultError(
                400, f"unknown key type {key_type} (this test server supports {sorted(_KEY_SIZES)})"
            )
        key = _TransitKey(name=name, type=key_type, derived=derived)
        key.add_version()
        return key

    def _create(
        self, keys: dict[str, _TransitKey], name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        derived = _bool_field(body, "derived")
        if _bool_field(body, "convergent_encryption"):
            if not derived:
                raise VaultError(400, "convergent encryption requires derivation to be enabled")
            raise VaultError(400, "convergent encryption is not supported by this test server")
        existing = keys.get(name)
        if existing is not None:
            return self._envelope(existing.info(), warnings=[f"key {name} already existed"])
        key = self._new_key(name, body.get("type") or "aes256-gcm96", derived)
        key.exportable = _bool_field(body, "exportable")
        key.allow_plaintext_backup = _bool_field(body, "allow_plaintext_backup")
        keys[name] = key
        return self._envelope(key.info())

    def _configure(self, key: _TransitKey, body: dict[str, Any]) -> dict[str, Any]:
        warnings = []
        min_dec = key.min_decryption_version
        min_enc = key.min_encryption_version
        if "min_decryption_version" in body:
            min_dec = _int_field(body, "min_decryption_version")
            if min_dec < 0:
                raise VaultError(400, "min decryption version cannot be negative")
            if min_dec == 0:
                min_dec = 1
                warnings.append(
                    "since Vault 0.3, transit key numbering starts at 1; forcing minimum to 1"
                )
            if min_dec > key.latest_version:
                raise VaultError(
                    400,
                    f"cannot set min decryption version of {min_dec}, "
                    f"latest key version is {key.latest_version}",
                )
        if "min_encryption_version" in body:
            min_enc = _int_field(body, "min_encryption_version")
            if min_enc < 0:
                raise VaultError(400, "min encryption version cannot be negative")
            if min_enc > key.latest_version:
                raise VaultError(
                    400,
                    f"cannot set min encryption version of {min_enc}, "
                    f"latest key version is {key.latest_version}",
                )
        if min_enc > 0 and min_enc < min_dec:
            raise VaultError(
                400,
                "cannot set min encryption/decryption values; "
                "min encryption version is less than min decryption version",
            )
        key.min_decryption_version = min_dec
        key.min_encryption_version = min_enc
        if "deletion_allowed" in body:
            key.deletion_allowed = _bool_field(body, "deletion_allowed")
        if "exportable" in body:
            if key.exportable and not _bool_field(body, "exportable"):
                raise VaultError(
                    400, "export cannot be disabled on a key that already has it enabled"
                )
            key.exportable = _bool_field(body, "exportable")
        if "allow_plaintext_backup" in body:
            key.allow_plaintext_backup = _bool_field(body, "allow_plaintext_backup")
        if "auto_rotate_period" in body:
            key.auto_rotate_period = _int_field(body, "auto_rotate_period")
        return self._envelope(key.info(), warnings=warnings or None)


class _VaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "VaultTransitTestServer"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        service: VaultTransitServer = self.server.service  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        payload: dict[str, Any] | None
        status, payload = 500, {"errors": ["internal error"]}
        try:
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError as exc:
                raise VaultError(400, f"failed to parse JSON input: {exc}") from None
            if not isinstance(body, dict):
                raise VaultError(400, "failed to parse JSON input: expected an object")
            status, payload = service.handle(
                self.command, split.path, parse_qs(split.query), self.headers, body
            )
        except VaultError as exc:
            status, payload = exc.status, {"errors": exc.errors}
        except Exception as exc:  # pragma: no cover - surfaced to the client as Vault would
            status, payload = (
                500,
                {"errors": [f"1 error occurred:\n\t* {type(exc).__name__}: {exc}\n\n"]},
            )
        self._reply(status, payload)

    def _reply(self, status: int, payload: dict[str, Any] | None) -> None:
        data = b"" if payload is None or status == 204 else json.dumps(payload).encode()
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD" and status != 204:
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_LIST = do_HEAD = _dispatch


def start_vault_server(
    token: str | None = None, mounts: tuple[str, ...] = ("transit",), upsert: bool = True
) -> VaultTransitServer:
    """Start a Vault transit test server on 127.0.0.1:<random port>.

    ``server.url`` and ``server.token`` are what ``hvac.Client(url=..., token=...)`` needs.
    """
    return VaultTransitServer(token=token, mounts=mounts, upsert=upsert).start()
