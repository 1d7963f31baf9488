"""aiocrypt: field-level encryption and key lifecycle for asyncio web applications.

>>> service = get_encryption_service()          # built from ENCRYPTION_* variables
>>> token = await service.encrypt_field(75000.0, KeyType.FINANCIAL_DATA, context="users.income")
>>> await service.decrypt_field(token, KeyType.FINANCIAL_DATA, context="users.income")
75000.0
"""

from ._bulk import EncryptedData
from ._config import (
    CryptoConfigManager,
    EncryptionConfig,
    KeyRotationPolicy,
    PerformanceMode,
    PerformanceSettings,
)
from ._errors import (
    AiocryptError,
    CacheEntryExpiredError,
    ConcurrentModificationError,
    ConfigurationError,
    DecryptionError,
    DecryptionFailure,
    DecryptionLocation,
    KekProviderError,
    KeyNotFoundError,
    KeyStateError,
    KeyStoreError,
    KeyStoreIntegrityError,
    LockTimeoutError,
    ReencryptionError,
    StoreUnavailableError,
    UnknownKeyTypeError,
    UnsupportedTypeError,
)
from ._factory import (
    build_key_manager,
    get_crypto_config,
    get_encryption_service,
    get_key_manager,
    reset_defaults,
)
from ._format import Purpose
from ._health import HealthCheck, HealthReport, health
from ._key_lifecycle import Rotation, RotationRun
from ._key_reports import ActiveKeyInfo, KeyStatistics, RotationNeed
from ._keyring import Keyring, UnknownKeyError
from ._keys import EncryptionKey
from ._manager import (
    AdoptionReport,
    Census,
    CleanupEntry,
    CleanupReport,
    KeyManager,
    KeyRetirement,
    RetiredKey,
    RetirementReason,
)
from ._service import EncryptionService
from ._subjects_keys import ForgetReport, SubjectRewrapReport
from ._types import KeyStatus, KeyType
from .reencrypt import (
    AsyncpgDatabase,
    Checkpoint,
    ColumnSpec,
    KeyRange,
    ReencryptionDatabase,
    ReencryptionEngine,
    ReencryptionProgress,
    ReencryptionResult,
    TableCensus,
    TableSpec,
)

__version__ = "0.2.0.dev0"  # the one place; pyproject.toml reads it (CHANGELOG.md)

__all__ = [
    "ActiveKeyInfo",
    "AdoptionReport",
    "AiocryptError",
    "AsyncpgDatabase",
    "Census",
    "Checkpoint",
    "CleanupEntry",
    "CleanupReport",
    "ColumnSpec",
    "CacheEntryExpiredError",
    "ConcurrentModificationError",
    "ConfigurationError",
    "CryptoConfigManager",
    "DecryptionError",
    "DecryptionFailure",
    "DecryptionLocation",
    "EncryptedData",
    "EncryptionConfig",
    "EncryptionKey",
    "EncryptionService",
    "ForgetReport",
    "HealthCheck",
    "HealthReport",
    "KekProviderError",
    "KeyManager",
    "KeyNotFoundError",
    "KeyRange",
    "KeyRetirement",
    "KeyRotationPolicy",
    "KeyStateError",
    "KeyStatistics",
    "KeyStatus",
    "KeyStoreError",
    "KeyStoreIntegrityError",
    "KeyType",
    "Keyring",
    "LockTimeoutError",
    "PerformanceMode",
    "PerformanceSettings",
    "Purpose",
    "ReencryptionDatabase",
    "ReencryptionEngine",
    "ReencryptionError",
    "ReencryptionProgress",
    "ReencryptionResult",
    "RetiredKey",
    "RetirementReason",
    "Rotation",
    "RotationNeed",
    "RotationRun",
    "StoreUnavailableError",
    "SubjectRewrapReport",
    "TableCensus",
    "TableSpec",
    "UnknownKeyError",
    "UnknownKeyTypeError",
    "UnsupportedTypeError",
    "build_key_manager",
    "get_crypto_config",
    "get_encryption_service",
    "get_key_manager",
    "health",
    "reset_defaults",
]
