"""A Google Cloud KMS gRPC test server (insecure channel, loopback).

Serves part of ``google.cloud.kms.v1.KeyManagementService`` using the real
protobuf messages shipped in ``google-cloud-kms`` (the raw ``*_pb2`` classes
behind the proto-plus types, reached with ``Type.pb()``), so the official
``KeyManagementServiceAsyncClient`` / ``KeyManagementServiceClient`` talk to
it unchanged:

* ``CreateKeyRing``, ``GetKeyRing``
* ``CreateCryptoKey`` (purpose ``ENCRYPT_DECRYPT``, algorithm
  ``GOOGLE_SYMMETRIC_ENCRYPTION``; honours ``skip_initial_version_creation``),
  ``GetCryptoKey``
* ``CreateCryptoKeyVersion`` (new version, *not* primary -- like the real
  service), ``GetCryptoKeyVersion``, ``UpdateCryptoKeyPrimaryVersion``
* ``Encrypt`` (``name`` = crypto key -> primary version, or an explicit
  crypto key version) and ``Decrypt`` (``name`` = crypto key)

Semantics kept from Cloud KMS:

* real AES-256-GCM under a random key per crypto key version; the opaque
  ciphertext names the key and version, so decrypting after a rotation works
  and reports ``used_primary=False``; ``EncryptResponse.name`` is the version used;
* ``additional_authenticated_data`` is bound into the GCM tag: a wrong AAD (or
  the wrong key) fails with ``INVALID_ARGUMENT "Decryption failed: verify that
  'name' refers to the correct CryptoKey."``;
* CRC32C integrity fields: ``plaintext_crc32c`` / ``ciphertext_crc32c`` /
  ``additional_authenticated_data_crc32c`` are verified when sent (mismatch ->
  ``INVALID_ARGUMENT "The checksum in field X did not match the data in field Y."``),
  ``verified_*`` flags and ``ciphertext_crc32c`` / ``plaintext_crc32c`` are filled;
* 64 KiB limits on plaintext and AAD; disabled versions -> ``FAILED_PRECONDITION``;
* unknown resources -> ``NOT_FOUND "CryptoKey <name> not found."``;
  ``access_denied`` / ``denied_operations`` -> ``PERMISSION_DENIED "Permission
  'cloudkms.cryptoKeyVersions.useToEncrypt' denied on resource '<name>' (or it may not exist)."``
  (checked before existence, as IAM is).

Differences from the real service: no authentication at all (insecure
channel, credentials are never looked at), no IAM policies, no asymmetric/
MAC/raw/HSM keys, no rotation schedule, destroy, import, list or update RPCs
(other RPCs answer ``UNIMPLEMENTED``), no long-running operations, and the
ciphertext format is this server's own.

Client side (the transport must get a ready channel; ``client_options=
{"api_endpoint": ...}`` alone would build a TLS channel with real credentials)::

    channel = grpc.aio.insecure_channel(server.target)  # inside the event loop
    client = kms_v1.KeyManagementServiceAsyncClient(
        transport=KeyManagementServiceGrpcAsyncIOTransport(channel=channel))

``server.async_client()`` / ``server.client()`` do exactly that.

Counters: ``create_key_ring``, ``get_key_ring``, ``create_crypto_key``,
``get_crypto_key``, ``create_crypto_key_version``, ``get_crypto_key_version``,
``update_crypto_key_primary_version``, ``encrypt``, ``decrypt``.
"""

from __future__ import annotations

import re
import secrets
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.cloud.kms_v1.types import resources, service

from . import ServerBase

if TYPE_CHECKING:
    from google.cloud import kms_v1

__all__ = ["GcpKmsServer", "start_gcp_kms_server", "crc32c"]

_SERVICE = "google.cloud.kms.v1.KeyManagementService"
_MAX_DATA = 64 * 1024
_MAGIC = b"GKT1"
_HEADER = struct.Struct(">4s16sI")  # magic, crypto key uid, version number
_NONCE = 12
_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,63}$")
_KEY_RING_RE = re.compile(r"^projects/[^/]+/locations/[^/]+/keyRings/[^/]+$")
_CRYPTO_KEY_RE = re.compile(r"^(projects/[^/]+/locations/[^/]+/keyRings/[^/]+)/cryptoKeys/[^/]+$")
_VERSION_RE = re.compile(
    r"^(projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+)/cryptoKeyVersions/(\d+)$"
)
_PARENT_RE = re.compile(r"^projects/[^/]+/locations/[^/]+$")

_ENABLED = int(resources.CryptoKeyVersion.CryptoKeyVersionState.ENABLED)
_DISABLED = int(resources.CryptoKeyVersion.CryptoKeyVersionState.DISABLED)
_ENCRYPT_DECRYPT = int(resources.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT)
_GOOGLE_SYMMETRIC = int(
    resources.CryptoKeyVersion.CryptoKeyVersionAlgorithm.GOOGLE_SYMMETRIC_ENCRYPTION
)
_SOFTWARE = int(resources.ProtectionLevel.SOFTWARE)

_PERMISSIONS = {
    "create_key_ring": "cloudkms.keyRings.create",
    "get_key_ring": "cloudkms.keyRings.get",
    "create_crypto_key": "cloudkms.cryptoKeys.create",
    "get_crypto_key": "cloudkms.cryptoKeys.get",
    "create_crypto_key_version": "cloudkms.cryptoKeyVersions.create",
    "get_crypto_key_version": "cloudkms.cryptoKeyVersions.get",
    "update_crypto_key_primary_version": "cloudkms.cryptoKeys.update",
    "encrypt": "cloudkms.cryptoKeyVersions.useToEncrypt",
    "decrypt": "cloudkms.cryptoKeyVersions.useToDecrypt",
}

try:  # google_crc32c ships with google-cloud-storage & co; not always present
    import google_crc32c as _google_crc32c  # type: ignore[import-not-found]

    def crc32c(data: bytes) -> int:
        """CRC32C (Castagnoli) as an unsigned int, as Cloud KMS uses it."""
        return int(_google_crc32c.value(bytes(data)))

except ImportError:  # pragma: no cover - depends on the environment
    _TABLE = []
    for _i in range(256):
        _c = _i
        for _ in range(8):
            _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
        _TABLE.append(_c)

    def crc32c(data: bytes) -> int:
        """CRC32C (Castagnoli) as an unsigned int, as Cloud KMS uses it (pure Python)."""
        crc = 0xFFFFFFFF
        table = _TABLE
        for byte in bytes(data):
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF


class _RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


@dataclass
class _Version:
    number: int
    key: bytes  # never leaves the server
    created: float
    state: int = _ENABLED


@dataclass
class _CryptoKey:
    name: str
    uid: bytes
    created: float
    labels: dict[str, str]
    versions: dict[int, _Version] = field(default_factory=dict)
    primary: int | None = None

    def add_version(self) -> _Version:
        number = max(self.versions, default=0) + 1
        version = _Version(number, secrets.token_bytes(32), time.time())
        self.versions[number] = version
        return version


def _set_time(ts_field: Any, when: float) -> None:
    ts_field.seconds = int(when)
    ts_field.nanos = int((when - int(when)) * 1e9)


class GcpKmsServer(ServerBase):
    """In-memory Cloud KMS over gRPC. See the module docstring."""

    def __init__(self, max_workers: int = 4) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self._key_rings: dict[str, float] = {}
        self._keys: dict[str, _CryptoKey] = {}
        self._max_workers = max_workers
        self._server: grpc.Server | None = None
        self.port: int | None = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> GcpKmsServer:
        if self._server is not None:
            return self
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="gcp-kms-test")
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, self._handlers()),)
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    @property
    def address(self) -> tuple[str, int]:
        assert self.port is not None, "server not started"
        return ("127.0.0.1", self.port)

    @property
    def target(self) -> str:
        """gRPC target string, ``127.0.0.1:<port>``."""
        host, port = self.address
        return f"{host}:{port}"

    url = target

    def async_client(self) -> kms_v1.KeyManagementServiceAsyncClient:
        """A ``KeyManagementServiceAsyncClient`` on a fresh insecure ``grpc.aio`` channel.

        Call it inside the running event loop; close it with ``await client.transport.close()``.
        """
        from google.cloud import kms_v1
        from google.cloud.kms_v1.services.key_management_service.transports import (
            KeyManagementServiceGrpcAsyncIOTransport,
        )

        channel = grpc.aio.insecure_channel(self.target)
        return kms_v1.KeyManagementServiceAsyncClient(
            transport=KeyManagementServiceGrpcAsyncIOTransport(channel=channel)
        )

    def client(self) -> kms_v1.KeyManagementServiceClient:
        """A sync ``KeyManagementServiceClient`` on an insecure channel."""
        from google.cloud import kms_v1
        from google.cloud.kms_v1.services.key_management_service.transports import (
            KeyManagementServiceGrpcTransport,
        )

        return kms_v1.KeyManagementServiceClient(
            transport=KeyManagementServiceGrpcTransport(channel=grpc.insecure_channel(self.target))
        )

    # -- test helpers (no RPC) ---------------------------------------------
    def create_crypto_key(
        self,
        project: str = "test-project",
        location: str = "global",
        key_ring: str = "test-ring",
        key: str = "kek",
    ) -> str:
        """Create key ring (if needed) + crypto key with a primary version; returns the key name."""
        ring = f"projects/{project}/locations/{location}/keyRings/{key_ring}"
        name = f"{ring}/cryptoKeys/{key}"
        with self._lock:
            self._key_rings.setdefault(ring, time.time())
            if name not in self._keys:
                ck = _CryptoKey(name, secrets.token_bytes(16), time.time(), {})
                ck.primary = ck.add_version().number
                self._keys[name] = ck
        return name

    def rotate(self, crypto_key_name: str) -> str:
        """Add a version and make it primary, like scheduled rotation; returns the version name."""
        with self._lock:
            ck = self._keys[crypto_key_name]
            ck.primary = ck.add_version().number
            return f"{crypto_key_name}/cryptoKeyVersions/{ck.primary}"

    def set_version_state(self, version_name: str, enabled: bool) -> None:
        m = _VERSION_RE.match(version_name)
        assert m, version_name
        with self._lock:
            self._keys[m.group(1)].versions[int(m.group(2))].state = (
                _ENABLED if enabled else _DISABLED
            )

    # -- gRPC plumbing -------------------------------------------------------
    def _handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        table: list[tuple[str, str, Any, Any, Callable[[Any], Any]]] = [
            (
                "CreateKeyRing",
                "create_key_ring",
                service.CreateKeyRingRequest,
                resources.KeyRing,
                self._create_key_ring,
            ),
            (
                "GetKeyRing",
                "get_key_ring",
                service.GetKeyRingRequest,
                resources.KeyRing,
                self._get_key_ring,
            ),
            (
                "CreateCryptoKey",
                "create_crypto_key",
                service.CreateCryptoKeyRequest,
                resources.CryptoKey,
                self._create_crypto_key,
            ),
            (
                "GetCryptoKey",
                "get_crypto_key",
                service.GetCryptoKeyRequest,
                resources.CryptoKey,
                self._get_crypto_key,
            ),
            (
                "CreateCryptoKeyVersion",
                "create_crypto_key_version",
                service.CreateCryptoKeyVersionRequest,
                resources.CryptoKeyVersion,
                self._create_crypto_key_version,
            ),
            (
                "GetCryptoKeyVersion",
                "get_crypto_key_version",
                service.GetCryptoKeyVersionRequest,
                resources.CryptoKeyVersion,
                self._get_crypto_key_version,
            ),
            (
                "UpdateCryptoKeyPrimaryVersion",
                "update_crypto_key_primary_version",
                service.UpdateCryptoKeyPrimaryVersionRequest,
                resources.CryptoKey,
                self._update_primary,
            ),
            ("Encrypt", "encrypt", service.EncryptRequest, service.EncryptResponse, self._encrypt),
            ("Decrypt", "decrypt", service.DecryptRequest, service.DecryptResponse, self._decrypt),
        ]
        handlers = {}
        for rpc, op, request_type, response_type, fn in table:
            handlers[rpc] = grpc.unary_unary_rpc_method_handler(
                self._wrap(op, fn),
                request_deserializer=request_type.pb().FromString,
                response_serializer=response_type.pb().SerializeToString,
            )
        return handlers

    def _wrap(
        self, op: str, fn: Callable[[Any], Any]
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            self.calls.incr(op)
            resource = getattr(request, "name", "") or getattr(request, "parent", "")
            try:
                if self.is_denied(op):
                    raise _RpcError(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"Permission '{_PERMISSIONS[op]}' denied on resource '{resource}' "
                        "(or it may not exist).",
                    )
                with self._lock:
                    return fn(request)
            except _RpcError as exc:
                context.abort(exc.code, exc.details)

        return handler

    # -- messages ------------------------------------------------------------
    # Requests and replies are raw protobuf messages (the ``.pb()`` classes), which
    # protobuf leaves untyped: Any here.
    def _version_pb(self, ck: _CryptoKey, version: _Version) -> Any:
        msg = resources.CryptoKeyVersion.pb()(
            name=f"{ck.name}/cryptoKeyVersions/{version.number}",
            state=version.state,
            protection_level=_SOFTWARE,
            algorithm=_GOOGLE_SYMMETRIC,
        )
        _set_time(msg.create_time, version.created)
        _set_time(msg.generate_time, version.created)
        return msg

    def _crypto_key_pb(self, ck: _CryptoKey) -> Any:
        msg = resources.CryptoKey.pb()(name=ck.name, purpose=_ENCRYPT_DECRYPT, labels=ck.labels)
        _set_time(msg.create_time, ck.created)
        msg.version_template.protection_level = _SOFTWARE
        msg.version_template.algorithm = _GOOGLE_SYMMETRIC
        if ck.primary is not None:
            msg.primary.CopyFrom(self._version_pb(ck, ck.versions[ck.primary]))
        return msg

    def _key_ring_pb(self, name: str) -> Any:
        msg = resources.KeyRing.pb()(name=name)
        _set_time(msg.create_time, self._key_rings[name])
        return msg

    # -- lookups -------------------------------------------------------------
    def _ring(self, name: str) -> str:
        if not _KEY_RING_RE.match(name):
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Resource name [{name}] does not represent a valid key ring.",
            )
        if name not in self._key_rings:
            raise _RpcError(grpc.StatusCode.NOT_FOUND, f"KeyRing {name} not found.")
        return name

    def _key(self, name: str) -> _CryptoKey:
        if not _CRYPTO_KEY_RE.match(name):
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{name} is not a valid resource type for this request.",
            )
        ck = self._keys.get(name)
        if ck is None:
            raise _RpcError(grpc.StatusCode.NOT_FOUND, f"CryptoKey {name} not found.")
        return ck

    def _version(self, name: str) -> tuple[_CryptoKey, _Version]:
        m = _VERSION_RE.match(name)
        if not m:
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{name} is not a valid resource type for this request.",
            )
        ck = self._key(m.group(1))
        version = ck.versions.get(int(m.group(2)))
        if version is None:
            raise _RpcError(grpc.StatusCode.NOT_FOUND, f"CryptoKeyVersion {name} not found.")
        return ck, version

    # -- RPCs ----------------------------------------------------------------
    def _create_key_ring(self, request: Any) -> Any:
        if not _PARENT_RE.match(request.parent):
            raise _RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid parent: {request.parent}")
        if not _ID_RE.match(request.key_ring_id):
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Invalid key ring id: {request.key_ring_id!r}"
            )
        name = f"{request.parent}/keyRings/{request.key_ring_id}"
        if name in self._key_rings:
            raise _RpcError(grpc.StatusCode.ALREADY_EXISTS, f"KeyRing {name} already exists.")
        self._key_rings[name] = time.time()
        return self._key_ring_pb(name)

    def _get_key_ring(self, request: Any) -> Any:
        return self._key_ring_pb(self._ring(request.name))

    def _create_crypto_key(self, request: Any) -> Any:
        ring = self._ring(request.parent)
        if not _ID_RE.match(request.crypto_key_id):
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Invalid crypto key id: {request.crypto_key_id!r}",
            )
        spec = request.crypto_key
        if spec.purpose != _ENCRYPT_DECRYPT:
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "This test server only supports CryptoKey purpose ENCRYPT_DECRYPT.",
            )
        if spec.version_template.algorithm not in (
            0,
            _GOOGLE_SYMMETRIC,
        ) or spec.version_template.protection_level not in (0, _SOFTWARE):
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "This test server only supports GOOGLE_SYMMETRIC_ENCRYPTION at protection "
                "level SOFTWARE.",
            )
        name = f"{ring}/cryptoKeys/{request.crypto_key_id}"
        if name in self._keys:
            raise _RpcError(grpc.StatusCode.ALREADY_EXISTS, f"CryptoKey {name} already exists.")
        ck = _CryptoKey(name, secrets.token_bytes(16), time.time(), dict(spec.labels))
        if not request.skip_initial_version_creation:
            ck.primary = ck.add_version().number
        self._keys[name] = ck
        return self._crypto_key_pb(ck)

    def _get_crypto_key(self, request: Any) -> Any:
        return self._crypto_key_pb(self._key(request.name))

    def _create_crypto_key_version(self, request: Any) -> Any:
        ck = self._key(request.parent)
        version = ck.add_version()
        if ck.primary is None:  # first version of a key created without one becomes primary
            ck.primary = version.number
        return self._version_pb(ck, version)

    def _get_crypto_key_version(self, request: Any) -> Any:
        ck, version = self._version(request.name)
        return self._version_pb(ck, version)

    def _update_primary(self, request: Any) -> Any:
        ck = self._key(request.name)
        try:
            number = int(request.crypto_key_version_id)
        except ValueError:
            number = -1
        version = ck.versions.get(number)
        if version is None:
            raise _RpcError(
                grpc.StatusCode.NOT_FOUND,
                f"CryptoKeyVersion {ck.name}/cryptoKeyVersions/"
                f"{request.crypto_key_version_id} not found.",
            )
        if version.state != _ENABLED:
            raise _RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{ck.name}/cryptoKeyVersions/{number} is not enabled.",
            )
        ck.primary = number
        return self._crypto_key_pb(ck)

    @staticmethod
    def _verify_crc(request: Any, crc_field: str, data_field: str) -> bool:
        if not request.HasField(crc_field):
            return False
        if getattr(request, crc_field).value != crc32c(getattr(request, data_field)):
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The checksum in field {crc_field} did not match the data in field {data_field}.",
            )
        return True

    @staticmethod
    def _check_enabled(name: str, version: _Version) -> None:
        if version.state != _ENABLED:
            state = resources.CryptoKeyVersion.CryptoKeyVersionState(version.state).name
            raise _RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{name}/cryptoKeyVersions/{version.number} is not enabled, "
                f"current state is: {state}.",
            )

    def _encrypt(self, request: Any) -> Any:
        if _VERSION_RE.match(request.name):
            ck, version = self._version(request.name)
        else:
            ck = self._key(request.name)
            if ck.primary is None:
                raise _RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"CryptoKey {ck.name} has no primary version.",
                )
            version = ck.versions[ck.primary]
        self._check_enabled(ck.name, version)
        if len(request.plaintext) > _MAX_DATA:
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The plaintext must be at most {_MAX_DATA} bytes.",
            )
        if len(request.additional_authenticated_data) > _MAX_DATA:
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"The additional authenticated data must be at most {_MAX_DATA} bytes.",
            )
        verified_pt = self._verify_crc(request, "plaintext_crc32c", "plaintext")
        verified_aad = self._verify_crc(
            request, "additional_authenticated_data_crc32c", "additional_authenticated_data"
        )
        header = _HEADER.pack(_MAGIC, ck.uid, version.number)
        nonce = secrets.token_bytes(_NONCE)
        sealed = AESGCM(version.key).encrypt(
            nonce, request.plaintext, header + request.additional_authenticated_data
        )
        ciphertext = header + nonce + sealed
        response = service.EncryptResponse.pb()(
            name=f"{ck.name}/cryptoKeyVersions/{version.number}",
            ciphertext=ciphertext,
            verified_plaintext_crc32c=verified_pt,
            verified_additional_authenticated_data_crc32c=verified_aad,
            protection_level=_SOFTWARE,
        )
        response.ciphertext_crc32c.value = crc32c(ciphertext)
        return response

    def _decrypt(self, request: Any) -> Any:
        ck = self._key(request.name)
        self._verify_crc(request, "ciphertext_crc32c", "ciphertext")
        self._verify_crc(
            request, "additional_authenticated_data_crc32c", "additional_authenticated_data"
        )
        wrong_key = _RpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "Decryption failed: verify that 'name' refers to the correct CryptoKey.",
        )
        data = request.ciphertext
        if len(data) < _HEADER.size + _NONCE + 16:
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, "Decryption failed: the ciphertext is invalid."
            )
        magic, uid, number = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise _RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, "Decryption failed: the ciphertext is invalid."
            )
        if uid != ck.uid or number not in ck.versions:
            raise wrong_key
        version = ck.versions[number]
        self._check_enabled(ck.name, version)
        header, nonce, sealed = (
            data[: _HEADER.size],
            data[_HEADER.size : _HEADER.size + _NONCE],
            data[_HEADER.size + _NONCE :],
        )
        try:
            plaintext = AESGCM(version.key).decrypt(
                nonce, sealed, header + request.additional_authenticated_data
            )
        except InvalidTag:
            raise wrong_key from None
        response = service.DecryptResponse.pb()(
            plaintext=plaintext, used_primary=(number == ck.primary), protection_level=_SOFTWARE
        )
        response.plaintext_crc32c.value = crc32c(plaintext)
        return response


def start_gcp_kms_server(max_workers: int = 4) -> GcpKmsServer:
    """Start a Cloud KMS gRPC test server on 127.0.0.1:<random port> (insecure)."""
    return GcpKmsServer(max_workers=max_workers).start()
