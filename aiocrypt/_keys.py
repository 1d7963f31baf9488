"""Key metadata: what the key store keeps about each data-encryption key."""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ._format import validate_key_id
from ._types import KeyStatus, KeyType

__all__ = ["EncryptionKey", "utcnow"]


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _ts(value: _dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_ts(value: str | None) -> _dt.datetime | None:
    return None if value is None else _dt.datetime.fromisoformat(value)


@dataclass(frozen=True, slots=True)
class EncryptionKey:
    """One version of a data-encryption key (DEK), as the key store holds it.

    The DEK itself is never here in the clear: ``wrapped_key`` is the DEK
    encrypted by the KEK provider named by ``kek_id`` (and is left out of the
    repr all the same). Instances refuse to be pickled so they cannot leak into
    job queues or caches by accident.
    """

    key_id: str
    key_type: KeyType
    version: int
    status: KeyStatus
    created_at: _dt.datetime
    expires_at: _dt.datetime
    kek_id: str = ""
    wrapped_key: bytes | None = field(default=None, repr=False)
    algorithm: str = "AES_256_GCM"
    key_size_bits: int = 256
    activated_at: _dt.datetime | None = None
    retired_at: _dt.datetime | None = None
    status_changed_at: _dt.datetime | None = None
    status_reason: str = ""
    decrypt_disabled: bool = False
    """Below its type's minimum decryption version: refuses every decryption."""
    reencrypt_required: bool = False
    """Its data must be re-encrypted (set when the key is marked compromised)."""

    def __post_init__(self) -> None:
        validate_key_id(self.key_id)
        object.__setattr__(self, "key_type", KeyType(self.key_type))
        object.__setattr__(self, "status", KeyStatus(self.status))
        if self.version < 1:
            raise ValueError("key version starts at 1")
        if self.created_at.tzinfo is None or self.expires_at.tzinfo is None:
            raise ValueError("key timestamps must be timezone-aware")

    # -- safety -------------------------------------------------------------

    def __reduce__(self) -> NoReturn:
        raise TypeError("EncryptionKey objects cannot be pickled")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("EncryptionKey objects cannot be pickled")

    def __copy__(self) -> EncryptionKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> EncryptionKey:
        return self

    # -- convenience --------------------------------------------------------

    @property
    def is_active(self) -> bool:
        return self.status is KeyStatus.ACTIVE

    def age(self, now: _dt.datetime | None = None) -> _dt.timedelta:
        return (now or utcnow()) - self.created_at

    def replace(self, **changes: Any) -> EncryptionKey:
        return dataclasses.replace(self, **changes)

    # -- storage form -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for key stores (the wrapped key as base64)."""
        return {
            "key_id": self.key_id,
            "key_type": self.key_type.value,
            "version": self.version,
            "status": self.status.value,
            "created_at": _ts(self.created_at),
            "expires_at": _ts(self.expires_at),
            "kek_id": self.kek_id,
            "wrapped_key": (
                None
                if self.wrapped_key is None
                else base64.b64encode(self.wrapped_key).decode("ascii")
            ),
            "algorithm": self.algorithm,
            "key_size_bits": self.key_size_bits,
            "activated_at": _ts(self.activated_at),
            "retired_at": _ts(self.retired_at),
            "status_changed_at": _ts(self.status_changed_at),
            "status_reason": self.status_reason,
            "decrypt_disabled": self.decrypt_disabled,
            "reencrypt_required": self.reencrypt_required,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncryptionKey:
        wrapped = data.get("wrapped_key")
        return cls(
            key_id=data["key_id"],
            key_type=KeyType(data["key_type"]),
            version=int(data["version"]),
            status=KeyStatus(data["status"]),
            created_at=_parse_ts(data["created_at"]),  # type: ignore[arg-type]
            expires_at=_parse_ts(data["expires_at"]),  # type: ignore[arg-type]
            kek_id=data.get("kek_id", ""),
            wrapped_key=None if wrapped is None else base64.b64decode(wrapped, validate=True),
            algorithm=data.get("algorithm", "AES_256_GCM"),
            key_size_bits=int(data.get("key_size_bits", 256)),
            activated_at=_parse_ts(data.get("activated_at")),
            retired_at=_parse_ts(data.get("retired_at")),
            status_changed_at=_parse_ts(data.get("status_changed_at")),
            status_reason=data.get("status_reason", ""),
            decrypt_disabled=bool(data.get("decrypt_disabled", False)),
            reencrypt_required=bool(data.get("reencrypt_required", False)),
        )
