"""Key purposes and key states.

Which key types an application may create keys for is configuration
(``EncryptionConfig.key_types`` and friends): ``KeyType`` only checks that a name
is well formed, and :func:`unknown_key_type` words the refusal of any other.
"""

from __future__ import annotations

import difflib
import enum
import re
from collections.abc import Iterable
from typing import ClassVar, Final

from ._errors import UnknownKeyTypeError

__all__ = ["KeyStatus", "KeyType", "KeyTypeLike", "unknown_key_type"]

_KEY_TYPE_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: Names repeated in an error message: a typo or a capitalised name. Anything else
#: (spaces, dashes, digits first, long) may be a value passed in the wrong argument.
_SHOWN_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_NAME_RULE: Final = "key type names are 1-32 characters of [a-z0-9_] starting with a letter"


class KeyType(str):
    """The purpose a key serves: one active key per purpose, each rotated on its own policy.

    The five purposes of the design are class attributes (``KeyType.FINANCIAL_DATA``
    ...), with the library's own (``CACHE``, ``SESSION_INDEX``, ``BLIND_INDEX``);
    ``KeyType("tax_ids")`` names a user-defined one, which gets keys only once the
    configuration declares it (``ENCRYPTION_KEY_TYPES``). Instances are interned,
    compare equal to their string name and can be used wherever a ``str`` is.
    Names are 1-32 characters of ``[a-z0-9_]`` starting with a letter; any other
    raises ``UnknownKeyTypeError`` (a ``ValueError``) naming the nearest predefined one.
    """

    __slots__ = ()

    FINANCIAL_DATA: ClassVar[KeyType]
    PII: ClassVar[KeyType]
    SESSION: ClassVar[KeyType]
    API_KEYS: ClassVar[KeyType]
    AUDIT_LOGS: ClassVar[KeyType]
    CACHE: ClassVar[KeyType]
    SESSION_INDEX: ClassVar[KeyType]
    BLIND_INDEX: ClassVar[KeyType]

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
            raise unknown_key_type(name, cls.predefined())
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

    @classmethod
    def predefined(cls) -> tuple[KeyType, ...]:
        """The key types valid without any declaration: :meth:`builtin` and the library's
        own (cache entries, session-id lookups, blind indexes)."""
        return (*cls.builtin(), cls.CACHE, cls.SESSION_INDEX, cls.BLIND_INDEX)


KeyType.FINANCIAL_DATA = KeyType("financial_data")
KeyType.PII = KeyType("pii")
KeyType.SESSION = KeyType("session")
KeyType.API_KEYS = KeyType("api_keys")
KeyType.AUDIT_LOGS = KeyType("audit_logs")
# Cache entries get keys of their own, never shared with field encryption.
KeyType.CACHE = KeyType("cache")
# Lookup keys of their own: session-id HMACs (sessions) and blind indexes (SQLAlchemy).
KeyType.SESSION_INDEX = KeyType("session_index")
KeyType.BLIND_INDEX = KeyType("blind_index")

KeyTypeLike = KeyType | str


def unknown_key_type(
    name: str, known: Iterable[str], *, declared_in: str | None = None
) -> UnknownKeyTypeError:
    """The error refusing key type ``name``: malformed, or not among ``known``.

    The message names the nearest ``known`` names, compared case-insensitively (so
    ``FINANCIAL_DATA`` suggests ``financial_data``). ``declared_in`` says where new
    key types are declared; with it the message also lists every known name.
    """
    name = str(name)  # a KeyType's repr would say KeyType('...')
    names = sorted({str(k) for k in known})
    by_lower = {k.lower(): k for k in names}
    suggestions = tuple(
        by_lower[m]
        for m in difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    )
    shown = repr(name) if _SHOWN_RE.fullmatch(name) else f"[{len(name)} characters, not repeated]"
    malformed = not _KEY_TYPE_RE.fullmatch(name)
    message = f"{'invalid key type name' if malformed else 'unknown key type'} {shown}"
    if suggestions:
        alternatives = ", ".join(suggestions[:-1])
        alternatives = f"{alternatives} or {suggestions[-1]}" if alternatives else suggestions[0]
        message += f": did you mean {alternatives}?"
    if malformed:
        message += f" ({_NAME_RULE})"
    if declared_in is not None:
        message += (
            f"{'' if message.endswith('?') else '.'} Known key types: "
            f"{', '.join(names)}; declare another in {declared_in}."
        )
    return UnknownKeyTypeError(message, suggestions=suggestions)


class KeyStatus(enum.StrEnum):
    """Life-cycle state of a data-encryption key (docs/keys.md)."""

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
