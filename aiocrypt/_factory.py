"""Build stores, KEK providers, managers and services from an ``EncryptionConfig``.

Process-wide defaults (``get_crypto_config()``, ``get_key_manager()``,
``get_encryption_service()``) are built from the environment on first use;
explicit construction is always possible instead.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._config import CryptoConfigManager, EncryptionConfig
from ._errors import ConfigurationError
from ._manager import KeyManager
from ._service import EncryptionService
from .kek._base import KekProvider
from .kek.local import LocalKekProvider
from .keystore._base import KeyStore
from .keystore.file import FileKeyStore

__all__ = [
    "build_kek_provider",
    "build_key_manager",
    "build_key_store",
    "get_crypto_config",
    "get_encryption_service",
    "get_key_manager",
    "reset_defaults",
]

# backend -> (module, factory function, extra)
_KEK_BACKENDS: dict[str, tuple[str, str, str]] = {
    "vault": ("aiocrypt.kek.vault", "from_config", "vault"),
    "aws_kms": ("aiocrypt.kek.aws", "from_config", "aws"),
    "azure_kv": ("aiocrypt.kek.azure", "from_config", "azure"),
    "gcp_kms": ("aiocrypt.kek.gcp", "from_config", "gcp"),
}
_STORE_BACKENDS: dict[str, tuple[str, str, str]] = {
    "redis": ("aiocrypt.keystore.redis", "from_config", "redis"),
    "postgres": ("aiocrypt.keystore.postgres", "from_config", "postgres"),
}


def _load(module: str, attr: str, extra: str, backend: str) -> Any:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise ConfigurationError(
                f"backend {backend!r} is not available in this version of aiocrypt"
            ) from None
        # Every backend module turns its own missing dependency into an ImportError
        # naming its extra, never a ModuleNotFoundError: only a missing transitive
        # import outside those guards would land here.
        raise ImportError(  # pragma: no cover - backends translate their own
            f"backend {backend!r} needs extra dependencies: pip install 'aiocrypt[{extra}]'"
        ) from exc
    return getattr(mod, attr)


def build_kek_provider(config: EncryptionConfig) -> KekProvider:
    backend = config.storage_backend
    if backend in _KEK_BACKENDS:
        provider: KekProvider = _load(*_KEK_BACKENDS[backend], backend)(config)
        return provider
    return LocalKekProvider(config.master_key_bytes())


def build_key_store(config: EncryptionConfig, kek: KekProvider) -> KeyStore:
    if config.redis_url and config.storage_backend not in ("file", "postgres"):
        store: KeyStore = _load(*_STORE_BACKENDS["redis"], "redis")(config)
        return store
    if config.postgres_dsn and config.storage_backend != "file":
        store = _load(*_STORE_BACKENDS["postgres"], "postgres")(config)
        return store
    if config.storage_backend in _STORE_BACKENDS:
        # only without the backend's URL (the branches above take it): from_config
        # then raises the ConfigurationError that names the variable to set
        store = _load(*_STORE_BACKENDS[config.storage_backend], config.storage_backend)(config)
        return store  # pragma: no cover - from_config raises without its URL
    return FileKeyStore(config.key_store_file(), kek)


def build_key_manager(config: EncryptionConfig, **kwargs: Any) -> KeyManager:
    """A KeyManager for ``config`` (validated first: every problem is reported at once)."""
    config.require_valid()
    kek = build_kek_provider(config)
    return KeyManager(build_key_store(config, kek), kek, config, **kwargs)


_config_manager: CryptoConfigManager | None = None
_key_manager: KeyManager | None = None
_service: EncryptionService | None = None


def get_crypto_config() -> CryptoConfigManager:
    """The process-wide ``CryptoConfigManager``, read from the environment once."""
    global _config_manager
    if _config_manager is None:
        _config_manager = CryptoConfigManager()
    return _config_manager


def get_key_manager() -> KeyManager:
    """The process-wide ``KeyManager`` (opens itself on first use)."""
    global _key_manager
    if _key_manager is None:
        _key_manager = build_key_manager(get_crypto_config().get_config())
    return _key_manager


def get_encryption_service() -> EncryptionService:
    """The process-wide ``EncryptionService`` (starts itself on first use)."""
    global _service
    if _service is None:
        _service = EncryptionService(get_key_manager())
    return _service


async def reset_defaults() -> None:
    """Close and forget the process-wide objects (tests, or after changing the environment)."""
    global _config_manager, _key_manager, _service
    if _service is not None:
        await _service.close()
    elif _key_manager is not None:
        await _key_manager.close()
    _config_manager = _key_manager = _service = None
