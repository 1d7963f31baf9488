"""An Azure Key Vault *keys* REST API test server (HTTPS, loopback).

Speaks the subset of the Key Vault data-plane API (any ``api-version``, the
SDK sends ``2025-07-01`` or ``7.x``) that ``azure-keyvault-keys``'
``KeyClient`` and ``CryptographyClient`` (sync and ``.aio``) use for key
wrapping, with the service's JSON shapes:

* ``POST /keys/{name}/create``   ``{"kty": "RSA"|"RSA-HSM", "key_size", "key_ops", ...}``
  -> KeyBundle ``{"key": {JWK kid/kty/key_ops/n/e}, "attributes": {...}}``
* ``POST /keys/{name}/rotate``   new version -> KeyBundle
* ``GET  /keys/{name}[/{version}]`` (empty version = latest) -> KeyBundle
* ``GET  /keys/{name}/versions`` -> ``{"value": [KeyItem...], "nextLink": null}``
* ``POST /keys/{name}/{version}/wrapkey|unwrapkey|encrypt|decrypt``
  ``{"alg": "RSA-OAEP-256"|"RSA-OAEP"|"RSA1_5", "value": base64url}``
  -> ``{"kid": ..., "value": base64url}``
* ``POST /keys/{name}/{version}/sign``   ``{"alg": "RS256"|"PS256"|..., "value": base64url
  digest}`` -> ``{"kid": ..., "value": base64url signature}`` (with the private key; PSS
  salt as long as the digest, as RFC 7518 and the SDK's local verify have it)
* ``POST /keys/{name}/{version}/verify`` ``{"alg", "digest", "value": signature}``
  -> ``{"value": true|false}``

Authentication is Key Vault's bearer *challenge* protocol: a request without
(or with a wrong) ``Authorization: Bearer`` header gets ``401`` with
``WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/{tenant}",
resource="https://vault.azure.net"``; the SDK then asks its credential for a
token for ``https://vault.azure.net/.default`` and retries. The server accepts
only ``server.token``; use :class:`AsyncStaticTokenCredential` (or the sync
:class:`StaticTokenCredential`) from ``server.async_credential()``.

Because the challenge resource (``vault.azure.net``) is not a parent domain of
``127.0.0.1``, the SDK must be built with ``verify_challenge_resource=False``;
TLS uses a throw-away CA generated at start, whose PEM is at
``server.ca_cert_path`` -- pass ``connection_verify=server.ca_cert_path`` to
the client (works for both the aiohttp and requests transports), or set
``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE``. ``server.client_kwargs`` holds both.

Note the real SDK behaviour this reproduces: ``CryptographyClient`` first GETs
the key; with the public JWK it wraps (and encrypts) *locally* and only sends
unwrap/decrypt to the vault. When ``get_key`` is denied (403) it falls back to
the remote ``wrapkey`` endpoint. So ``calls["wrap_key"]`` stays 0 in the
normal path -- that is what a real vault sees too.

Errors use Key Vault's body ``{"error": {"code": ..., "message": ...}}``:
401 ``Unauthorized``, 403 ``Forbidden`` (``access_denied`` /
``denied_operations``; innererror ``AccessDenied``), 404 ``KeyNotFound``,
400 ``BadParameter`` (bad alg, undecryptable ciphertext, a digest of the wrong
length, missing api-version, operation not in ``key_ops``).

Differences from the real service: RSA keys only (no EC/oct/Managed HSM), no
soft-delete/backup/import/release, no key attributes updates, no paging, and
the 400 message texts are approximations. :meth:`AzureKeyVaultServer.import_rsa_key`
installs a fixed key (for frozen vectors) without HTTP.

Counters: ``challenge`` (401 answers), ``create_key``, ``rotate_key``,
``get_key``, ``list_key_versions``, ``wrap_key``, ``unwrap_key``,
``encrypt``, ``decrypt``, ``sign``, ``verify`` -- operation counters only count
authenticated requests.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import BackgroundHTTPServer, ServerBase

if TYPE_CHECKING:  # azure-core is imported where a credential is used
    from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions

__all__ = [
    "AzureKeyVaultServer",
    "start_azure_keyvault_server",
    "AsyncStaticTokenCredential",
    "StaticTokenCredential",
]

_NAME_RE = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
_ALL_KEY_OPS = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
# operation counter name -> (Key Vault permission name, JWK key_op)
_OPS = {
    "create_key": ("create", None),
    "rotate_key": ("rotate", None),
    "get_key": ("get", None),
    "list_key_versions": ("list", None),
    "wrap_key": ("wrapKey", "wrapKey"),
    "unwrap_key": ("unwrapKey", "unwrapKey"),
    "encrypt": ("encrypt", "encrypt"),
    "decrypt": ("decrypt", "decrypt"),
    "sign": ("sign", "sign"),
    "verify": ("verify", "verify"),
}
_ACTIONS = {
    "wrapkey": "wrap_key",
    "unwrapkey": "unwrap_key",
    "encrypt": "encrypt",
    "decrypt": "decrypt",
    "sign": "sign",
    "verify": "verify",
}
# JWA signature algorithm -> (hash, PSS or PKCS#1 v1.5), RSA keys only
_SIGNATURE_ALGORITHMS: dict[str, tuple[type[hashes.HashAlgorithm], bool]] = {
    "RS256": (hashes.SHA256, False),
    "RS384": (hashes.SHA384, False),
    "RS512": (hashes.SHA512, False),
    "PS256": (hashes.SHA256, True),
    "PS384": (hashes.SHA384, True),
    "PS512": (hashes.SHA512, True),
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


class KeyVaultError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        inner: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.body: dict[str, Any] = {"error": {"code": code, "message": message}}
        if inner:
            self.body["error"]["innererror"] = {"code": inner}
        self.headers = headers or {}


@dataclass
class _KeyVersion:
    version: str
    kty: str
    private_key: rsa.RSAPrivateKey  # never leaves the server
    key_ops: list[str]
    created: int
    tags: dict[str, str] | None = None
    enabled: bool = True


@dataclass
class _Key:
    name: str
    versions: list[_KeyVersion] = field(default_factory=list)


class AzureKeyVaultServer(ServerBase):
    """In-memory Key Vault (keys only) behind HTTPS. See the module docstring."""

    def __init__(
        self,
        token: str | None = None,
        tenant_id: str = "00000000-0000-0000-0000-00000000aaaa",
        challenge_resource: str = "https://vault.azure.net",
    ) -> None:
        super().__init__()
        self.token = token or "eyJ0eXAiOiJKV1QifQ." + secrets.token_urlsafe(32)
        self.tenant_id = tenant_id
        self.challenge_resource = challenge_resource
        self._keys: dict[str, _Key] = {}
        self._lock = threading.RLock()
        self._http: BackgroundHTTPServer | None = None
        self._tmpdir: str | None = None
        self.ca_cert_path: str = ""

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> AzureKeyVaultServer:
        if self._http is None:
            self._tmpdir = tempfile.mkdtemp(prefix="azure-kv-test-")
            ctx = self._make_tls_context(self._tmpdir)
            self._http = BackgroundHTTPServer(_KeyVaultHandler, self, ssl_context=ctx)
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._http is not None, "server not started"
        return (self._http.host, self._http.port)

    @property
    def url(self) -> str:
        """The vault URL (``https://127.0.0.1:<port>``), as ``vault_url`` for ``KeyClient``."""
        host, port = self.address
        return f"https://{host}:{port}"

    vault_url = url

    @property
    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every SDK client needs to talk to this server."""
        return {"connection_verify": self.ca_cert_path, "verify_challenge_resource": False}

    def async_credential(self, token: str | None = None) -> AsyncStaticTokenCredential:
        return AsyncStaticTokenCredential(token or self.token)

    def credential(self, token: str | None = None) -> StaticTokenCredential:
        return StaticTokenCredential(token or self.token)

    def key_id(self, name: str, version: str | None = None) -> str:
        with self._lock:
            key = self._keys[name]
            ver = version or key.versions[-1].version
        return f"{self.url}/keys/{name}/{ver}"

    def create_rsa_key(self, name: str, size: int = 2048) -> str:
        """Create (or add a version to) a key without going through HTTP; returns its kid."""
        with self._lock:
            version = self._new_version(name, "RSA", size, list(_ALL_KEY_OPS), None)
        return f"{self.url}/keys/{name}/{version.version}"

    def import_rsa_key(
        self, name: str, private_key: rsa.RSAPrivateKey, version: str | None = None
    ) -> str:
        """Add a given RSA key as a new version of ``name`` (no HTTP); returns its kid.

        For frozen test vectors, which need the same private key in every run.
        """
        with self._lock:
            ver = _KeyVersion(
                version or uuid.uuid4().hex,
                "RSA",
                private_key,
                list(_ALL_KEY_OPS),
                int(time.time()),
            )
            self._keys.setdefault(name, _Key(name)).versions.append(ver)
        return f"{self.url}/keys/{name}/{ver.version}"

    def public_key(self, name: str, version: str | None = None) -> rsa.RSAPublicKey:
        """The public half of a key version (what ``get`` hands out to anyone allowed)."""
        with self._lock:
            return self._version(name, version or "").private_key.public_key()

    def _make_tls_context(self, tmpdir: str) -> ssl.SSLContext:
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aiocrypt test Key Vault CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_cert_path = os.path.join(tmpdir, "ca.pem")
        with open(self.ca_cert_path, "wb") as fh:
            fh.write(ca_cert.public_bytes(serialization.Encoding.PEM))
        cert_path = os.path.join(tmpdir, "server.pem")
        key_path = os.path.join(tmpdir, "server-key.pem")
        with open(cert_path, "wb") as fh:
            fh.write(leaf_cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                leaf_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_path, key_path)
        return ctx

    # -- request handling ----------------------------------------------------
    def _challenge(self, message: str) -> KeyVaultError:
        self.calls.incr("challenge")
        header = (
            f'Bearer authorization="https://login.microsoftonline.com/{self.tenant_id}", '
            f'resource="{self.challenge_resource}"'
        )
        return KeyVaultError(401, "Unauthorized", message, headers={"WWW-Authenticate": header})

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], headers: Any, raw: bytes
    ) -> tuple[int, dict[str, Any]]:
        auth = headers.get("Authorization") or ""
        if not auth.lower().startswith("bearer "):
            raise self._challenge("AKV10000: Request is missing a Bearer or PoP token.")
        if not secrets.compare_digest(auth[7:].strip(), self.token):
            raise self._challenge("AKV10022: Invalid token: it was not issued for this test vault.")
        if not query.get("api-version", [""])[0]:
            raise KeyVaultError(
                400, "BadParameter", "The 'api-version' query parameter is missing."
            )

        parts = [unquote(p) for p in path.split("/")[1:]]
        if len(parts) < 2 or parts[0] != "keys":
            raise KeyVaultError(404, "NotFound", f"The requested path {path} was not found.")
        name = parts[1]
        if not _NAME_RE.match(name):
            raise KeyVaultError(
                400, "BadParameter", f"The request URI contains an invalid name: {name}"
            )
        rest = parts[2:]

        if method == "POST" and rest == ["create"]:
            return self._op("create_key", name, lambda: self._create(name, self._json(raw)))
        if method == "POST" and rest == ["rotate"]:
            return self._op("rotate_key", name, lambda: self._rotate(name))
        if method == "GET" and rest == ["versions"]:
            return self._op("list_key_versions", name, lambda: self._list_versions(name))
        if method == "GET" and len(rest) <= 1:
            version = rest[0] if rest else ""
            return self._op(
                "get_key", name, lambda: self._bundle(name, self._version(name, version))
            )
        if method == "POST" and len(rest) == 2 and rest[1] in _ACTIONS:
            op = _ACTIONS[rest[1]]
            return self._op(op, name, lambda: self._crypto(op, name, rest[0], self._json(raw)))
        raise KeyVaultError(404, "NotFound", f"The requested path {path} was not found.")

    def _op(
        self, op: str, name: str, fn: Callable[[], dict[str, Any]]
    ) -> tuple[int, dict[str, Any]]:
        self.calls.incr(op)
        if self.is_denied(op):
            host, port = self.address
            raise KeyVaultError(
                403,
                "Forbidden",
                "The user, group or application "
                "'appid=00000000-0000-0000-0000-000000000001;"
                "oid=00000000-0000-0000-0000-000000000002;"
                f"iss=https://sts.windows.net/{self.tenant_id}/' "
                f"does not have keys {_OPS[op][0]} permission on key vault "
                f"'{host}:{port};location=local'. For help resolving this issue, "
                "please see https://go.microsoft.com/fwlink/?linkid=2125287",
                inner="AccessDenied",
            )
        with self._lock:
            return 200, fn()

    @staticmethod
    def _json(raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise KeyVaultError(
                400, "BadParameter", "The request body is not valid JSON."
            ) from None
        if not isinstance(body, dict):
            raise KeyVaultError(400, "BadParameter", "The request body must be a JSON object.")
        return body

    def _not_found(self, name: str, version: str = "") -> KeyVaultError:
        ident = f"{name}/{version}" if version else name
        return KeyVaultError(
            404,
            "KeyNotFound",
            f"A key with (name/id) {ident} was not found in this key vault. If you recently "
            "deleted this key you may be able to recover it using the correct recovery command. "
            "For help resolving this issue, please see "
            "https://go.microsoft.com/fwlink/?linkid=2125182",
        )

    def _version(self, name: str, version: str) -> _KeyVersion:
        key = self._keys.get(name)
        if key is None:
            raise self._not_found(name)
        if not version:
            return key.versions[-1]
        for ver in key.versions:
            if ver.version == version:
                return ver
        raise self._not_found(name, version)

    def _new_version(
        self, name: str, kty: str, size: int, key_ops: list[str], tags: dict[str, str] | None
    ) -> _KeyVersion:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=size)
        version = _KeyVersion(uuid.uuid4().hex, kty, private_key, key_ops, int(time.time()), tags)
        self._keys.setdefault(name, _Key(name)).versions.append(version)
        return version

    def _create(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        kty = body.get("kty")
        if kty not in ("RSA", "RSA-HSM"):
            raise KeyVaultError(
                400,
                "BadParameter",
                f"Key type {kty!r} is not supported by this test server (RSA, RSA-HSM only).",
            )
        size = body.get("key_size") or 2048
        if size not in (2048, 3072, 4096):
            raise KeyVaultError(
                400, "BadParameter", f"The key size {size} is not supported for key type {kty}."
            )
        if body.get("public_exponent") not in (None, 65537):
            raise KeyVaultError(
                400, "BadParameter", "Only public exponent 65537 is supported by this test server."
            )
        key_ops = body.get("key_ops") or list(_ALL_KEY_OPS)
        bad = [op for op in key_ops if op not in _ALL_KEY_OPS]
        if bad:
            raise KeyVaultError(400, "BadParameter", f"Invalid key operation(s): {bad}")
        return self._bundle(
            name, self._new_version(name, kty, size, list(key_ops), body.get("tags"))
        )

    def _rotate(self, name: str) -> dict[str, Any]:
        latest = self._version(name, "")
        size = latest.private_key.key_size
        return self._bundle(
            name, self._new_version(name, latest.kty, size, list(latest.key_ops), latest.tags)
        )

    def _attributes(self, ver: _KeyVersion) -> dict[str, Any]:
        return {
            "enabled": ver.enabled,
            "created": ver.created,
            "updated": ver.created,
            "recoveryLevel": "Recoverable+Purgeable",
            "recoverableDays": 90,
            "exportable": False,
        }

    def _bundle(self, name: str, ver: _KeyVersion) -> dict[str, Any]:
        numbers = ver.private_key.public_key().public_numbers()
        bundle: dict[str, Any] = {
            "key": {
                "kid": f"{self.url}/keys/{name}/{ver.version}",
                "kty": ver.kty,
                "key_ops": list(ver.key_ops),
                "n": _b64url(_int_bytes(numbers.n)),
                "e": _b64url(_int_bytes(numbers.e)),
            },
            "attributes": self._attributes(ver),
        }
        if ver.tags:
            bundle["tags"] = dict(ver.tags)
        return bundle

    def _list_versions(self, name: str) -> dict[str, Any]:
        key = self._keys.get(name)
        if key is None:
            raise self._not_found(name)
        items = [
            {"kid": f"{self.url}/keys/{name}/{v.version}", "attributes": self._attributes(v)}
            for v in key.versions
        ]
        return {"value": items, "nextLink": None}

    def _crypto(self, op: str, name: str, version: str, body: dict[str, Any]) -> dict[str, Any]:
        ver = self._version(name, version)
        jwk_op = _OPS[op][1]
        if jwk_op not in ver.key_ops:
            raise KeyVaultError(
                400, "BadParameter", f"Operation {jwk_op} is not allowed on this key."
            )
        alg = body.get("alg")
        data = self._b64_property(body, "value")
        if op in ("sign", "verify"):
            return self._signature(op, name, ver, alg, body, data)
        pad: padding.AsymmetricPadding
        if alg == "RSA-OAEP-256":
            pad = padding.OAEP(
                mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
            )
        elif alg == "RSA-OAEP":
            pad = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
        elif alg == "RSA1_5":
            pad = padding.PKCS1v15()
        else:
            raise KeyVaultError(
                400, "BadParameter", f"Algorithm {alg!r} is not supported by key type {ver.kty}."
            )
        if op in ("wrap_key", "encrypt"):
            try:
                result = ver.private_key.public_key().encrypt(data, pad)
            except ValueError:
                raise KeyVaultError(
                    400, "BadParameter", "The value is too long for this key and algorithm."
                ) from None
        else:
            try:
                result = ver.private_key.decrypt(data, pad)
            except ValueError:
                raise KeyVaultError(
                    400,
                    "BadParameter",
                    "Decryption failed: the ciphertext is not valid for this key and algorithm.",
                ) from None
        return {"kid": f"{self.url}/keys/{name}/{ver.version}", "value": _b64url(result)}

    @staticmethod
    def _b64_property(body: dict[str, Any], prop: str) -> bytes:
        value = body.get(prop)
        if not isinstance(value, str):
            raise KeyVaultError(400, "BadParameter", f"Property '{prop}' is required.")
        try:
            return _unb64url(value)
        except (binascii.Error, ValueError):
            raise KeyVaultError(
                400, "BadParameter", f"Property '{prop}' is not valid base64url."
            ) from None

    def _signature(
        self, op: str, name: str, ver: _KeyVersion, alg: Any, body: dict[str, Any], value: bytes
    ) -> dict[str, Any]:
        """``sign`` (value = digest) or ``verify`` (digest, value = signature)."""
        if alg not in _SIGNATURE_ALGORITHMS:
            raise KeyVaultError(
                400, "BadParameter", f"Algorithm {alg!r} is not supported by key type {ver.kty}."
            )
        hash_type, pss = _SIGNATURE_ALGORITHMS[alg]
        algorithm = hash_type()  # digest_size is an instance property to the type checker
        digest = value if op == "sign" else self._b64_property(body, "digest")
        if len(digest) != algorithm.digest_size:
            raise KeyVaultError(
                400,
                "BadParameter",
                f"Invalid digest length {len(digest)} for algorithm {alg} "
                f"(expected {algorithm.digest_size}).",
            )
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
            if pss
            else padding.PKCS1v15()
        )
        prehashed = Prehashed(algorithm)
        if op == "sign":
            signature = ver.private_key.sign(digest, pad, prehashed)
            return {"kid": f"{self.url}/keys/{name}/{ver.version}", "value": _b64url(signature)}
        try:
            ver.private_key.public_key().verify(value, digest, pad, prehashed)
        except InvalidSignature:
            return {"value": False}
        return {"value": True}


class _KeyVaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "AzureKeyVaultTestServer"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        try:
            self.request.do_handshake()
        except (ssl.SSLError, OSError):
            self.close_connection = True
            self._tls_failed = True
        else:
            self._tls_failed = False

    def handle(self) -> None:
        if not self._tls_failed:
            try:
                super().handle()
            except (ssl.SSLError, ConnectionError):
                pass

    def _dispatch(self) -> None:
        service: AzureKeyVaultServer = self.server.service  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        extra: dict[str, str] = {}
        try:
            status, payload = service.handle(
                self.command, split.path, parse_qs(split.query), self.headers, raw
            )
        except KeyVaultError as exc:
            status, payload, extra = exc.status, exc.body, exc.headers
        except Exception as exc:  # pragma: no cover
            status, payload = (
                500,
                {
                    "error": {
                        "code": "InternalServerError",
                        "message": f"{type(exc).__name__}: {exc}",
                    }
                },
            )
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        self.send_header("x-ms-keyvault-service-version", "1.9.0.0-test")
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class AsyncStaticTokenCredential:
    """Minimal async ``TokenCredential`` returning a fixed bearer token.

    Implements both ``get_token`` and ``get_token_info`` (azure-core >= 1.31) and
    records what the SDK asked for in ``self.requests`` as ``(scopes, tenant_id)``.
    """

    def __init__(self, token: str, expires_in: int = 3600) -> None:
        self.token = token
        self.expires_in = expires_in
        self.requests: list[tuple[tuple[str, ...], str | None]] = []

    def _expiry(self) -> int:
        return int(time.time()) + self.expires_in

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        from azure.core.credentials import AccessToken

        self.requests.append((scopes, tenant_id))
        return AccessToken(self.token, self._expiry())

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        from azure.core.credentials import AccessTokenInfo

        self.requests.append((scopes, (options or {}).get("tenant_id")))
        return AccessTokenInfo(self.token, self._expiry())

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> AsyncStaticTokenCredential:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass


class StaticTokenCredential:
    """Sync twin of :class:`AsyncStaticTokenCredential` for the sync SDK clients."""

    def __init__(self, token: str, expires_in: int = 3600) -> None:
        self.token = token
        self.expires_in = expires_in
        self.requests: list[tuple[tuple[str, ...], str | None]] = []

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        from azure.core.credentials import AccessToken

        self.requests.append((scopes, tenant_id))
        return AccessToken(self.token, int(time.time()) + self.expires_in)

    def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        from azure.core.credentials import AccessTokenInfo

        self.requests.append((scopes, (options or {}).get("tenant_id")))
        return AccessTokenInfo(self.token, int(time.time()) + self.expires_in)

    def close(self) -> None:
        pass

    def __enter__(self) -> StaticTokenCredential:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def start_azure_keyvault_server(
    token: str | None = None,
    tenant_id: str = "00000000-0000-0000-0000-00000000aaaa",
    challenge_resource: str = "https://vault.azure.net",
) -> AzureKeyVaultServer:
    """Start an HTTPS Key Vault test server on 127.0.0.1:<random port>."""
    return AzureKeyVaultServer(
        token=token, tenant_id=tenant_id, challenge_resource=challenge_resource
    ).start()
