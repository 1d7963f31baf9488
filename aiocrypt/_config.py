"""Settings: one typed object built from the environment and the JSON file (docs/configuration.md).

``EncryptionConfig.from_env()`` reads every variable once. Parsing is lenient so
that ``validate()`` can report every problem at once, as readable sentences;
``require_valid()`` raises ``ConfigurationError`` with all of them. Secret
fields are left out of the repr and never appear in a message.

Over 500 lines on purpose: every setting, with its default, its variable, how it
is parsed and what ``validate()`` says about it, lives here and nowhere else
(one typed settings object, read once; docs/configuration.md is its table).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import functools
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ._errors import ConfigurationError
from ._parse import parse_bool
from ._types import KeyType, KeyTypeLike, unknown_key_type
from ._urls import redact_url

__all__ = [
    "BACKENDS",
    "DEFAULT_ROTATION_POLICIES",
    "MASTER_KEY_FILE_VAR",
    "CryptoConfigManager",
    "EncryptionConfig",
    "KeyRotationPolicy",
    "PerformanceMode",
    "PerformanceSettings",
    "decode_master_key",
]

BACKENDS: Final = ("file", "redis", "postgres", "vault", "aws_kms", "azure_kv", "gcp_kms")
DEFAULT_STORAGE_PATH: Final = "./.aiocrypt/keys.json"
KEY_STORE_FILE_NAME: Final = "keys.json"
"""The file a directory given as ENCRYPTION_KEY_STORAGE_PATH holds (the seed's form)."""
DEFAULT_CONFIG_FILE: Final = "config/encryption.json"
DEFAULT_USAGE_LIMIT: Final = 2**31


class PerformanceMode(enum.StrEnum):
    """Operational trade-offs; never changes the strength of the cipher."""

    SECURITY = "security"
    BALANCED = "balanced"
    PERFORMANCE = "performance"


@dataclass(frozen=True, slots=True)
class PerformanceSettings:
    """What a performance mode sets."""

    mode: PerformanceMode
    inline_threshold: int
    """Values up to this many bytes are encrypted inline; larger ones in a worker thread."""
    segment_size: int
    """Segment size of streams and large bulk data."""
    dek_cache_seconds: float
    """How long an unwrapped DEK stays cached before it is reloaded from the store."""
    compression_level: int
    """zstd level when compression is enabled."""
    thread_limit: int
    """Concurrent worker threads for large payloads."""


_PERFORMANCE: Final = {
    PerformanceMode.SECURITY: PerformanceSettings(
        PerformanceMode.SECURITY, 16 * 1024, 256 * 1024, 300.0, 3, 2
    ),
    PerformanceMode.BALANCED: PerformanceSettings(
        PerformanceMode.BALANCED, 64 * 1024, 1024 * 1024, 3600.0, 3, 4
    ),
    PerformanceMode.PERFORMANCE: PerformanceSettings(
        PerformanceMode.PERFORMANCE, 256 * 1024, 4 * 1024 * 1024, 86400.0, 1, 8
    ),
}


@dataclass(frozen=True, slots=True)
class KeyRotationPolicy:
    """When keys of one type rotate, expire and may be destroyed."""

    key_type: KeyType
    rotation_interval_days: int = 90
    max_key_age_days: int = 365
    grace_period_days: int = 30
    auto_rotation: bool = True
    batch_size: int = 1000
    max_encryptions: int = DEFAULT_USAGE_LIMIT

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_type", KeyType(self.key_type))
        for name in ("rotation_interval_days", "max_key_age_days", "batch_size", "max_encryptions"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.grace_period_days < 0:
            raise ValueError("grace_period_days cannot be negative")
        if self.rotation_interval_days > self.max_key_age_days:
            raise ValueError("rotation_interval_days cannot exceed max_key_age_days")
        if self.max_encryptions > 2**32:
            raise ValueError("max_encryptions cannot exceed 2**32 (random 96-bit GCM nonces)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyRotationPolicy:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown rotation policy fields: {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["key_type"] = self.key_type.value
        return data


DEFAULT_ROTATION_POLICIES: Final[dict[str, KeyRotationPolicy]] = {
    p.key_type: p
    for p in (
        KeyRotationPolicy(KeyType.FINANCIAL_DATA, 90, 365, 30),
        KeyRotationPolicy(KeyType.PII, 180, 730, 30),
        KeyRotationPolicy(KeyType.SESSION, 30, 90, 30),
        KeyRotationPolicy(KeyType.API_KEYS, 90, 365, 30),
        KeyRotationPolicy(KeyType.AUDIT_LOGS, 365, 1825, 30),
        KeyRotationPolicy(KeyType.CACHE, 30, 90, 30),
        # keys of their own for lookups: session-id HMACs and blind indexes
        KeyRotationPolicy(KeyType("session_index"), 30, 90, 30),
        KeyRotationPolicy(KeyType("blind_index"), 365, 1825, 30),
    )
}


def decode_master_key(text: str) -> bytes:
    """Decode ENCRYPTION_MASTER_KEY: base64 of 32 bytes, or base64 of a Fernet key.

    A Fernet key is itself URL-safe base64 of 32 bytes and is accepted as is.
    Raises ``ValueError`` with a message that never repeats the input.
    """

    def b64(value: str | bytes) -> bytes:
        if isinstance(value, str):
            value = value.strip().encode("ascii", "strict")
        value = value.replace(b"-", b"+").replace(b"_", b"/")
        return base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)

    try:
        raw = b64(text)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ValueError("ENCRYPTION_MASTER_KEY is not valid base64") from None
    if len(raw) == 32:
        return raw
    if len(raw) == 44:  # base64 of a Fernet key: the Fernet key is base64 of 32 bytes
        try:
            inner = b64(raw)
        except (binascii.Error, ValueError):
            inner = b""
        if len(inner) == 32:
            return inner
    raise ValueError(
        f"ENCRYPTION_MASTER_KEY must be base64 of 32 bytes (it decodes to {len(raw)} bytes)"
    )


def _secret(default: Any = None) -> Any:
    return field(default=default, repr=False, compare=False)


@dataclass(frozen=True)
class EncryptionConfig:
    """Every aiocrypt setting, from ``ENCRYPTION_*`` variables and the JSON config file."""

    algorithm: str = "AES_256_GCM"
    key_size_bits: int = 256
    performance_mode: PerformanceMode = PerformanceMode.BALANCED
    compression_enabled: bool = False
    accept_format_v1: bool = True
    """Whether tokens, blobs and streams of format version 1 still open (the migration
    window to version 2; close it once the re-encryption census counts no v1 rows)."""
    """zstd before encryption for every key type (off: compressed length leaks content)."""
    compressed_key_types: Collection[str] = frozenset()
    """zstd for these key types only (e.g. audit logs, exports), when not enabled for all.
    Any collection of names (or one comma-separated string), kept as a frozenset."""
    key_types: Collection[str] = frozenset()
    """Key types of the application's own beyond the predefined ones (``tax_ids``): only
    declared key types get keys (see :attr:`known_key_types`). Any collection of names
    (or one comma-separated string), kept as a frozenset."""
    rotation_policies: Mapping[str, KeyRotationPolicy] = field(
        default_factory=lambda: dict(DEFAULT_ROTATION_POLICIES)
    )

    master_key: str | None = _secret()
    """ENCRYPTION_MASTER_KEY as given (decoded by ``master_key_bytes()``)."""
    key_id: str | None = None
    key_version: str | None = None
    storage_backend: str = "file"
    storage_path: str = DEFAULT_STORAGE_PATH
    keyset_state_path: str | None = None
    """Where the key store's high-water marks persist on this host (refuses a rolled-back
    store after a restart); None keeps them in memory only."""
    redis_url: str | None = _secret()
    redis_key_prefix: str = "aiocrypt:"
    postgres_dsn: str | None = _secret()
    postgres_schema: str = "aiocrypt"
    vault_url: str | None = None
    vault_token: str | None = _secret()
    vault_transit_key: str = "aiocrypt"
    vault_mount_point: str = "transit"
    vault_namespace: str | None = None
    aws_region: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = _secret()
    aws_kms_key_id: str | None = None
    aws_endpoint_url: str | None = None
    azure_tenant_id: str | None = None
    azure_client_id: str | None = None
    azure_client_secret: str | None = _secret()
    azure_vault_url: str | None = None
    azure_key_name: str | None = None
    azure_allow_unsigned_legacy: bool = False
    """Also unwrap Azure's unsigned 0x01 envelopes (forgeable): only for the adopting rewrap."""
    gcp_project_id: str | None = None
    gcp_location: str | None = None
    gcp_keyring: str | None = None
    gcp_key_name: str | None = None
    gcp_endpoint: str | None = None
    config_file: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.performance_mode, PerformanceMode):  # e.g. a number in the file
            try:
                object.__setattr__(self, "performance_mode", PerformanceMode(self.performance_mode))
            except ValueError:
                raise ConfigurationError(
                    f"unknown performance_mode {self.performance_mode!r}: use "
                    "security, balanced or performance"
                ) from None
        for name in ("key_types", "compressed_key_types"):
            object.__setattr__(self, name, _key_type_set(name, getattr(self, name)))
        policies = dict(DEFAULT_ROTATION_POLICIES)
        for key_type, policy in dict(self.rotation_policies).items():
            if not isinstance(policy, KeyRotationPolicy):
                policy = KeyRotationPolicy.from_dict({"key_type": key_type, **policy})
            policies[KeyType(key_type)] = policy
        object.__setattr__(self, "rotation_policies", policies)

    def __repr__(self) -> str:
        # the generated repr, but a password inside a (non-secret) URL field is masked
        shown = ", ".join(
            f"{f.name}={_mask_url(getattr(self, f.name))!r}"
            for f in dataclasses.fields(self)
            if f.repr
        )
        return f"{type(self).__name__}({shown})"

    # -- constructors -------------------------------------------------------

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        config_file: str | os.PathLike[str] | None = None,
    ) -> EncryptionConfig:
        """Build from ``ENCRYPTION_*`` variables, then the JSON file's overrides.

        The file is ``config_file``, else ``ENCRYPTION_CONFIG_FILE``, else
        ``config/encryption.json`` when it exists.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = config_file or env.get("ENCRYPTION_CONFIG_FILE")
        if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
            path = DEFAULT_CONFIG_FILE
        if path is not None:
            values.update(_read_config_file(Path(path)))
            values["config_file"] = str(path)
        for name, var in _ENV_VARS.items():
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                values[name] = raw.strip()
        key_file = env.get(MASTER_KEY_FILE_VAR, "").strip()
        if key_file:
            if "master_key" in values:
                raise ConfigurationError(
                    f"both ENCRYPTION_MASTER_KEY and {MASTER_KEY_FILE_VAR} are set: keep one"
                )
            values["master_key"] = _read_master_key_file(Path(key_file).expanduser())
        if "storage_backend" in values:
            values["storage_backend"] = values["storage_backend"].lower()
        for flag in ("compression_enabled", "azure_allow_unsigned_legacy", "accept_format_v1"):
            if flag in values:
                values[flag] = parse_bool(_ENV_VARS[flag], values[flag])
        return cls(**values)

    def replace(self, **changes: Any) -> EncryptionConfig:
        return dataclasses.replace(self, **changes)

    # -- derived values -----------------------------------------------------

    def key_store_file(self) -> Path:
        """The file key store's file: ``storage_path`` itself, or ``keys.json`` inside it
        when it names a directory (an existing one, or a value ending in ``/``).

        The one place the path is resolved: the store, ``validate()`` and the CLI use it.
        """
        path = Path(self.storage_path).expanduser()
        if self.storage_path.endswith(("/", os.sep)) or path.is_dir():
            return path / KEY_STORE_FILE_NAME
        return path

    def master_key_bytes(self) -> bytes:
        if not self.master_key:
            raise ConfigurationError("ENCRYPTION_MASTER_KEY is not set")
        try:
            return decode_master_key(self.master_key)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None

    @property
    def performance(self) -> PerformanceSettings:
        return _PERFORMANCE[self.performance_mode]

    @property
    def compression_level(self) -> int | None:
        """The zstd level when compression is on for every key type, else None."""
        return self.performance.compression_level if self.compression_enabled else None

    def compression_level_for(self, key_type: KeyTypeLike) -> int | None:
        """The zstd level for ``key_type``'s data, or None when it is not compressed."""
        if self.compression_enabled or KeyType(key_type) in self.compressed_key_types:
            return self.performance.compression_level
        return None

    @functools.cached_property
    def known_key_types(self) -> frozenset[KeyType]:
        """Every key type that may get keys: the predefined ones (``KeyType.predefined()``)
        and those this configuration declares in ``key_types``, ``rotation_policies`` or
        ``compressed_key_types``."""
        declared = (*self.key_types, *self.rotation_policies, *self.compressed_key_types)
        return frozenset((*KeyType.predefined(), *map(KeyType, declared)))

    def declared_key_type(self, key_type: KeyTypeLike) -> KeyType:
        """``key_type`` as a ``KeyType`` when it is one of :attr:`known_key_types`; else
        ``UnknownKeyTypeError`` naming the nearest (``FINANCIAL_DATA``: ``financial_data``).

        Checked where a key type is first turned into a key, never per encryption.
        """
        if key_type in self.known_key_types:
            return KeyType(key_type)
        if not isinstance(key_type, str):
            raise TypeError(f"key type must be a KeyType or str, not {type(key_type).__name__}")
        raise unknown_key_type(
            key_type,
            self.known_key_types,
            declared_in=f'{_ENV_VARS["key_types"]} or "key_types" in '
            f"{self.config_file or DEFAULT_CONFIG_FILE}",
        )

    def rotation_policy(self, key_type: KeyTypeLike) -> KeyRotationPolicy:
        kt = KeyType(key_type)
        policy = self.rotation_policies.get(kt)
        return policy if policy is not None else KeyRotationPolicy(kt)

    # -- validation ---------------------------------------------------------

    def validate(self) -> list[str]:
        """Every problem found, one readable sentence each; empty when all is well."""
        problems: list[str] = []
        if self.algorithm != "AES_256_GCM":
            problems.append(f"algorithm {self.algorithm!r} is not supported (use AES_256_GCM)")
        if self.key_size_bits != 256:
            problems.append(f"key_size_bits {self.key_size_bits} is not supported (use 256)")
        backend = self.storage_backend
        if backend not in BACKENDS:
            problems.append(
                f"ENCRYPTION_KEY_STORAGE_BACKEND={backend!r} is unknown: use one of "
                + ", ".join(BACKENDS)
            )
        uses_master_key = backend in ("file", "redis", "postgres")
        if uses_master_key and not self.master_key:
            problems.append(
                "ENCRYPTION_MASTER_KEY is missing: set it to base64 of 32 random bytes "
                "(run 'aiocrypt init', or 'aiocrypt new-master-key' prints one)"
            )
        elif self.master_key:
            try:
                decode_master_key(self.master_key)
            except ValueError as exc:
                problems.append(str(exc))
        if self._uses_file_store():
            problems.extend(_check_storage_path(self.key_store_file()))
        required = {
            "redis": ("redis_url",),
            "postgres": ("postgres_dsn",),
            "vault": ("vault_url", "vault_token"),
            "aws_kms": ("aws_region", "aws_kms_key_id"),
            "azure_kv": (
                "azure_vault_url",
                "azure_key_name",
                "azure_tenant_id",
                "azure_client_id",
                "azure_client_secret",
            ),
            "gcp_kms": ("gcp_project_id", "gcp_location", "gcp_keyring", "gcp_key_name"),
        }.get(backend, ())
        if backend == "aws_kms" and (self.aws_kms_key_id or "").startswith("arn:"):
            required = ("aws_kms_key_id",)  # the region is part of the ARN
        missing = [_ENV_VARS[name] for name in required if not getattr(self, name)]
        if missing:
            problems.append(
                f"storage backend {backend!r} needs " + ", ".join(missing) + " (not set)"
            )
        if backend == "aws_kms" and bool(self.aws_access_key_id) != bool(
            self.aws_secret_access_key
        ):
            problems.append(
                "ENCRYPTION_AWS_ACCESS_KEY_ID and ENCRYPTION_AWS_SECRET_ACCESS_KEY "
                "must be set together (or neither, to use the default chain)"
            )
        return problems

    def _uses_file_store(self) -> bool:
        """Whether the key store is the file (as ``build_key_store`` decides): always for
        ``file`` (a Redis URL then serves the job queue), for a KMS backend when neither
        Redis nor Postgres holds the records."""
        if self.storage_backend == "file":
            return True
        return self.storage_backend in ("vault", "aws_kms", "azure_kv", "gcp_kms") and not (
            self.redis_url or self.postgres_dsn
        )

    def storage_warnings(self) -> list[str]:
        """What works but should be fixed: a key store file group/others can read."""
        if not self._uses_file_store():
            return []
        path = self.key_store_file()
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            return []
        if mode & 0o077:
            return [f"ENCRYPTION_KEY_STORAGE_PATH: {path} has mode {mode:04o}: run chmod 600 on it"]
        return []

    def require_valid(self) -> None:
        problems = self.validate()
        if problems:
            raise ConfigurationError("invalid aiocrypt configuration:\n- " + "\n- ".join(problems))

    def to_public_dict(self) -> dict[str, Any]:
        """Settings with secrets replaced by whether they are set."""
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.repr:
                data[f.name] = "<set>" if value else None
            elif f.name == "rotation_policies":
                data[f.name] = [p.to_dict() for p in value.values()]
            elif f.name in ("key_types", "compressed_key_types"):
                data[f.name] = sorted(value)
            else:
                data[f.name] = _mask_url(value)
        return data


_ENV_VARS: Final = {
    "master_key": "ENCRYPTION_MASTER_KEY",
    "key_id": "ENCRYPTION_KEY_ID",
    "key_version": "ENCRYPTION_KEY_VERSION",
    "storage_backend": "ENCRYPTION_KEY_STORAGE_BACKEND",
    "storage_path": "ENCRYPTION_KEY_STORAGE_PATH",
    "keyset_state_path": "ENCRYPTION_KEYSET_STATE_PATH",
    "redis_url": "ENCRYPTION_REDIS_URL",
    "redis_key_prefix": "ENCRYPTION_REDIS_KEY_PREFIX",
    "postgres_dsn": "ENCRYPTION_POSTGRES_DSN",
    "postgres_schema": "ENCRYPTION_POSTGRES_SCHEMA",
    "vault_url": "ENCRYPTION_VAULT_URL",
    "vault_token": "ENCRYPTION_VAULT_TOKEN",
    "vault_transit_key": "ENCRYPTION_VAULT_TRANSIT_KEY",
    "vault_mount_point": "ENCRYPTION_VAULT_MOUNT_POINT",
    "vault_namespace": "ENCRYPTION_VAULT_NAMESPACE",
    "aws_region": "ENCRYPTION_AWS_REGION",
    "aws_access_key_id": "ENCRYPTION_AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "ENCRYPTION_AWS_SECRET_ACCESS_KEY",
    "aws_kms_key_id": "ENCRYPTION_AWS_KMS_KEY_ID",
    "aws_endpoint_url": "ENCRYPTION_AWS_ENDPOINT_URL",
    "azure_tenant_id": "ENCRYPTION_AZURE_TENANT_ID",
    "azure_client_id": "ENCRYPTION_AZURE_CLIENT_ID",
    "azure_client_secret": "ENCRYPTION_AZURE_CLIENT_SECRET",
    "azure_vault_url": "ENCRYPTION_AZURE_VAULT_URL",
    "azure_key_name": "ENCRYPTION_AZURE_KEY_NAME",
    "azure_allow_unsigned_legacy": "ENCRYPTION_AZURE_ALLOW_UNSIGNED_LEGACY",
    "gcp_project_id": "ENCRYPTION_GCP_PROJECT_ID",
    "gcp_location": "ENCRYPTION_GCP_LOCATION",
    "gcp_keyring": "ENCRYPTION_GCP_KEYRING",
    "gcp_key_name": "ENCRYPTION_GCP_KEY_NAME",
    "gcp_endpoint": "ENCRYPTION_GCP_ENDPOINT",
    "performance_mode": "ENCRYPTION_PERFORMANCE_MODE",
    "compression_enabled": "ENCRYPTION_COMPRESSION_ENABLED",
    "accept_format_v1": "ENCRYPTION_ACCEPT_FORMAT_V1",
    "compressed_key_types": "ENCRYPTION_COMPRESSED_KEY_TYPES",
    "key_types": "ENCRYPTION_KEY_TYPES",
}

#: A file holding the master key (``aiocrypt init`` writes one; a Docker or Kubernetes
#: secret mounts one): read instead of ENCRYPTION_MASTER_KEY, so the key is not in the
#: environment of every child process.
MASTER_KEY_FILE_VAR: Final = "ENCRYPTION_MASTER_KEY_FILE"


def _read_master_key_file(path: Path) -> str:
    """The master key in ``path`` (its text, stripped); never echoed in an error."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(4097)
    except OSError as exc:
        raise ConfigurationError(
            f"{MASTER_KEY_FILE_VAR}: cannot read {path}: {exc.strerror}"
        ) from None
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if not text or len(data) > 4096:
        raise ConfigurationError(
            f"{MASTER_KEY_FILE_VAR}: {path} does not hold a master key (base64 of 32 bytes "
            "on one line, as 'aiocrypt init' writes)"
        )
    return text


_FILE_KEYS: Final = {
    "algorithm",
    "key_size_bits",
    "performance_mode",
    "compression_enabled",
    "compressed_key_types",
    "rotation_policies",
    "key_types",
}


def _key_type_set(name: str, value: Any) -> frozenset[KeyType]:
    """A set of key types from a list or a comma-separated string (the variable's form)."""
    if isinstance(value, str):
        value = [t for t in (part.strip() for part in value.split(",")) if t]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
        isinstance(t, str) for t in value
    ):
        raise ConfigurationError(f"{name} must be a list of key type names")
    try:
        return frozenset(KeyType(t) for t in value)
    except ValueError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"config file {path} is not valid JSON (line {exc.lineno})"
        ) from None
    except (ValueError, RecursionError):  # not UTF-8, NUL in the path, huge ints, deep nesting
        raise ConfigurationError(
            f"config file {path!r} is not a readable UTF-8 JSON file"
        ) from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"config file {path} must hold a JSON object")
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise ConfigurationError(
            f"config file {path} has unknown keys: {', '.join(sorted(unknown))}"
        )
    values = dict(data)
    if "rotation_policies" in values:
        try:
            policies = [KeyRotationPolicy.from_dict(p) for p in values["rotation_policies"]]
        except (TypeError, ValueError, KeyError, ArithmeticError) as exc:
            raise ConfigurationError(f"config file {path}: bad rotation policy: {exc}") from None
        values["rotation_policies"] = {p.key_type: p for p in policies}
    return values


def _mask_url(value: Any) -> Any:
    """A URL without its secrets (password, secret query parameters)."""
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


def _check_storage_path(path: Path) -> list[str]:
    """What the file store will need at ``path``, checked without opening or creating
    anything: its directory exists and the process may create files in it (the store
    writes a temporary file, lock files and usage counters beside it), and the file,
    if there, is a regular file the process can read and replace."""
    var = "ENCRYPTION_KEY_STORAGE_PATH"
    directory = path.parent
    if not directory.exists():
        return [
            f"{var}: directory {directory} does not exist: create it (mode 0700), or "
            f"point {var} at an existing directory (keys.json is created inside it)"
        ]
    if not directory.is_dir():
        return [f"{var}: {directory} is not a directory"]
    if not os.access(directory, os.W_OK | os.X_OK):
        return [
            f"{var}: directory {directory} is not writable by this process "
            f"(the key store writes {path.name} and its lock files there)"
        ]
    if path.exists() and not path.is_file():
        return [f"{var}: {path} is not a regular file"]
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return [f"{var}: {path} is not readable and writable by this process"]
    return []


class CryptoConfigManager:
    """Holds the current ``EncryptionConfig``; the API the seed code used."""

    def __init__(
        self,
        config: EncryptionConfig | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        config_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self._config = (
            config if config is not None else EncryptionConfig.from_env(environ, config_file)
        )

    def __repr__(self) -> str:
        return f"<CryptoConfigManager backend={self._config.storage_backend!r}>"

    def get_config(self) -> EncryptionConfig:
        return self._config

    def get_rotation_policy(self, key_type: KeyTypeLike) -> KeyRotationPolicy:
        return self._config.rotation_policy(key_type)

    def update_config(self, new_config: EncryptionConfig | Mapping[str, Any]) -> EncryptionConfig:
        """Replace settings (a whole config, or a mapping of fields to change); validated first."""
        if isinstance(new_config, EncryptionConfig):
            candidate = new_config
        else:
            changes = dict(new_config)
            if "rotation_policies" in changes:
                policies = changes["rotation_policies"]
                if isinstance(policies, list):
                    policies = {p["key_type"]: p for p in policies}
                merged = dict(self._config.rotation_policies)
                merged.update(policies)
                changes["rotation_policies"] = merged
            unknown = set(changes) - {f.name for f in dataclasses.fields(EncryptionConfig)}
            if unknown:
                raise ConfigurationError(f"unknown settings: {', '.join(sorted(unknown))}")
            try:
                candidate = self._config.replace(**changes)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"invalid settings: {exc}") from None
        if candidate.algorithm != "AES_256_GCM" or candidate.key_size_bits != 256:
            raise ConfigurationError("only algorithm AES_256_GCM with 256-bit keys is supported")
        self._config = candidate
        return candidate

    def validate_environment(self) -> list[str]:
        return self._config.validate()

    @property
    def performance(self) -> PerformanceSettings:
        """The performance mode's settings, typed (``EncryptionConfig.performance``)."""
        return self._config.performance

    def get_performance_settings(self) -> dict[str, Any]:
        """The performance mode's settings as a plain dict, as the seed's signature has it.

        Built from :attr:`performance` (the typed form, which the library reads):
        ``mode`` is the mode's name, the other keys are ``PerformanceSettings``' fields.
        """
        settings = dataclasses.asdict(self._config.performance)
        settings["mode"] = self._config.performance.mode.value
        return settings
