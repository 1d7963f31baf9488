"""The keyset high-water mark, kept on the application host (``ENCRYPTION_KEYSET_STATE_PATH``).

A restored copy of the key store (an older backup of the key file, a Redis RDB, a
Postgres dump) is authentic: its seal verifies. What makes it an attack is that
it is *older* than what the application has already seen: a key marked
compromised there is still active, a usage counter is lower. A running
``KeyManager`` refuses a lower revision by memory. This file carries that memory
across restarts: the highest store revision seen and each key's highest usage
total, merged (never lowered) by every process on the host under ``flock``.

It holds no secret, but it must live where the store's attacker cannot write (the
application host, not the key store's directory or volume): whoever can lower it
can replay a backup to a freshly started process. Mode 0600, replaced
atomically. Deleting it is the operator's explicit way to accept a restored
backup (see docs/runbook.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ._errors import ConfigurationError
from .keystore.file import replace_file

__all__ = ["KeysetState", "KeysetStateFile"]

_FORMAT: Final = "aiocrypt.keyset-state"
_MAX_BYTES: Final = 16 * 1024 * 1024


@dataclass(slots=True)
class KeysetState:
    """Highest revision seen per store, and highest usage total per key id."""

    revisions: dict[str, int] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)

    def merge(self, other: KeysetState) -> None:
        for name, revision in other.revisions.items():
            self.revisions[name] = max(revision, self.revisions.get(name, 0))
        for key_id, total in other.usage.items():
            self.usage[key_id] = max(total, self.usage.get(key_id, 0))


class KeysetStateFile:
    """Reads and raises the high-water marks in one JSON file (blocking: call in a thread)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"<KeysetStateFile {str(self.path)!r}>"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self.path.parent.is_dir():
            raise ConfigurationError(
                f"keyset state directory {self.path.parent} does not exist "
                "(ENCRYPTION_KEYSET_STATE_PATH): create it on the application host"
            )
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_unlocked(self) -> KeysetState:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read(_MAX_BYTES + 1)
        except FileNotFoundError:
            return KeysetState()
        try:
            doc = json.loads(data)
            if len(data) > _MAX_BYTES or not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError
            return KeysetState(
                revisions={str(k): int(v) for k, v in dict(doc["revisions"]).items()},
                usage={str(k): int(v) for k, v in dict(doc["usage"]).items()},
            )
        except (KeyError, TypeError, ValueError, RecursionError):
            raise ConfigurationError(
                f"keyset state file {self.path} is unreadable: it is refused rather than "
                "trusted as empty; restore it, or delete it to accept the store as it is "
                "now"
            ) from None

    def read(self) -> KeysetState:
        with self._locked():
            return self._read_unlocked()

    def raise_to(self, revisions: Mapping[str, int], usage: Mapping[str, int]) -> KeysetState:
        """Merge these marks in (never lowering any); return what the file now holds."""
        with self._locked():
            state = self._read_unlocked()
            before = (dict(state.revisions), dict(state.usage))
            state.merge(KeysetState(dict(revisions), dict(usage)))
            if (state.revisions, state.usage) != before:
                self._write(state)
            return state

    def _write(self, state: KeysetState) -> None:
        doc: dict[str, Any] = {
            "format": _FORMAT,
            "revisions": state.revisions,
            "usage": state.usage,
        }
        replace_file(self.path, json.dumps(doc, sort_keys=True).encode("utf-8"))
