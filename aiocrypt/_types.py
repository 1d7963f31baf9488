"""Key purposes and key states."""

from __future__ import annotations

import enum
import re
from typing import ClassVar, Final

__all__ = ["KeyStatus", "KeyType", "KeyTypeLike"]

_KEY_TYPE_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")


class KeyType(str):
    """The purpose a key serves: one active key per purpose, each rotated on its own policy.

    The five purposes of the design are class attributes (``KeyType.FINANCIAL_DATA``
    ...); ``KeyType("tax_ids")`` names a user-defined one. Instances are interned,
    compare equal to their string name and can be used wherever a ``str`` is.
    Names are 1-32 characters of ``[a-z0-9_]`` starting with a letter.
    """

    __slots__ = ()

    FINANCIAL_DATA: ClassVar[KeyType]
    PII: ClassVar[KeyType]
    SESSION: ClassVar[KeyType]
    API_KEYS: ClassVar[KeyType]
    AUDIT_LOGS: ClassVar[KeyType]
    CACHE: ClassVar[KeyType]

    _interned: ClassVar[dict[str, KeyType]] = {}

    def __new__(cls, name: str | KeyType) -> KeyType:
        if type(name) is cls:
            return name
        if not isinstance(name, str):
            raise TypeError(f"key type must be a KeyType or str, not {type(name).__name__}")
        existing = cls._interned.get(name)
        if existing is not None:
            return existing
        if not _KEY_TYPE_RE.fullmatch(name):
            raise ValueError(
                f"invalid key type name {name!r}: use 1-32 characters of [a-z0-9_] "
                "starting with a letter"
            )
        instance = super().__new__(cls, name)
        cls._interned[str(name)] = instance
        return instance

    @property
    def value(self) -> str:
        """The plain string name (mirrors ``Enum.value``)."""
        return str.__str__(self)

    @property
    def name(self) -> str:
        """The upper-case constant name (mirrors ``Enum.name``)."""
        return self.value.upper()

    def __repr__(self) -> str:
        return f"KeyType({self.value!r})"

    def __str__(self) -> str:
        return self.value

    def __reduce__(self) -> tuple[type[KeyType], tuple[str]]:
        return (KeyType, (self.value,))

    @classmethod
    def builtin(cls) -> tuple[KeyType, ...]:
        """The five field-encryption purposes of the design, in their documented order."""
        return (cls.FINANCIAL_DATA, cls.PII, cls.SESSION, cls.API_KEYS, cls.AUDIT_LOGS)


KeyType.FINANCIAL_DATA = KeyType("financial_data")
KeyType.PII = KeyType("pii")
KeyType.SESSION = KeyType("session")
KeyType.API_KEYS = KeyType("api_keys")
KeyType.AUDIT_LOGS = KeyType("audit_logs")
# Cache entries get keys of their own, never shared with field encryption.
KeyType.CACHE = KeyType("cache")

KeyTypeLike = KeyType | str


class KeyStatus(enum.StrEnum):
    """Life-cycle state of a data-encryption key (DESIGN.md section 2)."""

    ACTIVE = "active"
    """Encrypts and decrypts; one per key type."""
    DECRYPT_ONLY = "decrypt_only"
    """Replaced by a newer version; still decrypts."""
    EXPIRED = "expired"
    """Past its maximum age; decrypts during the grace period only."""
    REVOKED = "revoked"
    """Withdrawn by an operator; never encrypts again."""
    COMPROMISED = "compromised"
    """Believed exposed; never encrypts, data must be re-encrypted."""
    DESTROYED = "destroyed"
    """Material erased (crypto-shredding); nothing can be decrypted with it."""

    @property
    def can_encrypt(self) -> bool:
        return self is KeyStatus.ACTIVE

    @property
    def can_decrypt(self) -> bool:
        return self is not KeyStatus.DESTROYED
