"""File key store: one JSON document, authenticated, replaced atomically.

* Writes go to a temporary file (mode 0600) in the same directory, are fsynced,
  renamed over the store and the directory is fsynced, so a crash leaves the old
  or the new document, never half of one.
* The document carries an HMAC-SHA256 over its canonical form. The MAC key is
  random, stored wrapped by the KEK provider, so the wrong master key or an edit
  made outside aiocrypt is detected on read, with a message saying which.
* ``flock`` on side files gives process-safe write serialisation and the
  rotation lock; the kernel releases a lock when its holder dies.

A failed read never modifies the file. Rolling the whole file back to an older
authentic version is not detected by the MAC: the ``KeyManager`` refuses a
revision lower than the highest it has seen (and persists that high-water mark
when given a state file), and seals the records themselves (``_keyset_seal``),
as for every store.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Final

import anyio

from .._errors import (
    ConcurrentModificationError,
    KekProviderError,
    KeyStoreError,
    KeyStoreIntegrityError,
    LockTimeoutError,
)
from .._keys import EncryptionKey
from ..kek._base import KekProvider
from ._base import KeySet, KeyStore, decode_records, merge
from ._subjects_file import FileSubjectKeyStore

__all__ = ["FileKeyStore"]

logger = logging.getLogger("aiocrypt.keystore.file")

_FORMAT: Final = "aiocrypt.keystore"
_MAC_CONTEXT: Final = {"aiocrypt_purpose": "file-keystore-mac"}
MAX_FILE_BYTES: Final = 64 * 1024 * 1024
#: (path, mode) pairs already warned about: a loose mode is said once per process, not
#: at every read (a long-lived service reads the file at every refresh).
_warned_modes: set[tuple[Path, int]] = set()


def replace_file(target: Path, payload: bytes) -> None:
    """Replace ``target`` with ``payload`` (mode 0600) so a crash leaves the old or the new
    file: a temporary file beside it, fsynced, renamed over it, the directory fsynced."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        with suppress(OSError):
            tmp.unlink()
        raise


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


class FileKeyStore(KeyStore):
    """Key records in a JSON file (``ENCRYPTION_KEY_STORAGE_PATH``)."""

    name = "file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        kek: KekProvider,
        *,
        previous_keks: Sequence[KekProvider] = (),
        lock_poll_interval: float = 0.02,
    ) -> None:
        self.path = Path(path)
        self._kek = kek
        # KEKs the file may still be sealed under (an interrupted master-key rotation)
        self._previous = {p.kek_id: p for p in previous_keks}
        self._poll = lock_poll_interval
        self._mac_key: bytes | None = None
        self._mac_key_wrapped: bytes | None = None
        self._subjects: FileSubjectKeyStore | None = None

    def __repr__(self) -> str:
        return f"<FileKeyStore {str(self.path)!r}>"

    # -- reading ------------------------------------------------------------

    def _read_bytes(self) -> bytes | None:
        directory = self.path.parent
        if not directory.is_dir():
            raise KeyStoreError(
                f"key store directory {directory} does not exist: create it (mode 0700) "
                "or set ENCRYPTION_KEY_STORAGE_PATH"
            )
        try:
            with open(self.path, "rb") as fh:
                mode = os.fstat(fh.fileno()).st_mode
                if mode & 0o077 and (self.path, mode) not in _warned_modes:
                    _warned_modes.add((self.path, mode))
                    logger.warning(
                        "key store %s is accessible by group/others (mode %o); it should be 0600",
                        self.path,
                        mode & 0o777,
                    )
                data = fh.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyStoreError(f"cannot read key store {self.path}: {exc.strerror}") from None
        if len(data) > MAX_FILE_BYTES:
            raise KeyStoreIntegrityError(f"key store {self.path} is larger than 64 MiB")
        return data

    def _parse(self, data: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):  # bad JSON or UTF-8, 4300+ digit ints, deep nesting
            raise KeyStoreIntegrityError(
                f"key store {self.path} is corrupt (not valid JSON; truncated?): restore it "
                "from a backup; it was left untouched"
            ) from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("version") != 1:
            raise KeyStoreIntegrityError(f"key store {self.path} is not an aiocrypt v1 key store")
        for name in ("kek_id", "mac_key", "mac", "revision", "keys"):
            if name not in doc:
                raise KeyStoreIntegrityError(f"key store {self.path} is missing {name!r}")
        if not isinstance(doc["kek_id"], str):
            raise KeyStoreIntegrityError(f"key store {self.path} has an invalid kek_id")
        return doc

    async def _verify(self, doc: dict[str, Any]) -> None:
        sealer = (
            self._kek if doc["kek_id"] == self._kek.kek_id else self._previous.get(doc["kek_id"])
        )
        if sealer is None:
            raise KeyStoreIntegrityError(
                f"key store {self.path} is sealed under KEK {doc['kek_id']} but the configured "
                f"KEK is {self._kek.kek_id}: wrong ENCRYPTION_MASTER_KEY (or KMS key)?"
            )
        try:
            wrapped = base64.b64decode(doc["mac_key"], validate=True)
            claimed = bytes.fromhex(doc["mac"])
        except (binascii.Error, ValueError, TypeError):
            raise KeyStoreIntegrityError(f"key store {self.path} is corrupt") from None
        if wrapped != self._mac_key_wrapped:
            try:
                mac_key = await sealer.unwrap(wrapped, _MAC_CONTEXT)
            except KekProviderError:
                raise KeyStoreIntegrityError(
                    f"key store {self.path}: the configured master key cannot open it (wrong "
                    "ENCRYPTION_MASTER_KEY, or the file was tampered with)"
                ) from None
            self._mac_key, self._mac_key_wrapped = mac_key, wrapped
        assert self._mac_key is not None
        body = {k: v for k, v in doc.items() if k != "mac"}
        expected = hmac.new(self._mac_key, _canonical(body), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, claimed):
            raise KeyStoreIntegrityError(
                f"key store {self.path} failed authentication: it was modified outside "
                "aiocrypt; restore it from a backup (it was left untouched)"
            )

    async def _load(self) -> tuple[dict[str, Any] | None, KeySet]:
        data = await anyio.to_thread.run_sync(self._read_bytes)
        if data is None:
            return None, KeySet(0, ())
        doc = self._parse(data)
        await self._verify(doc)
        try:
            revision = int(doc["revision"])
        except (TypeError, ValueError):
            raise KeyStoreIntegrityError(f"key store {self.path} has an invalid revision") from None
        if not isinstance(doc["keys"], list):
            raise KeyStoreIntegrityError(f"key store {self.path} has no list of keys")
        seal = doc.get("seal")
        if seal is not None and not isinstance(seal, str):
            raise KeyStoreIntegrityError(f"key store {self.path} has an invalid seal")
        return doc, KeySet(revision, decode_records(doc["keys"], f"key store {self.path}"), seal)

    async def read(self) -> KeySet:
        return (await self._load())[1]

    # -- writing ------------------------------------------------------------

    async def write(
        self, keys: Sequence[EncryptionKey], *, expected_revision: int, seal: str | None = None
    ) -> int:
        async with self.lock("write", timeout=30.0):
            doc, current = await self._load()
            if current.revision != expected_revision:
                raise ConcurrentModificationError(
                    f"key store {self.path} is at revision {current.revision}, "
                    f"not {expected_revision}"
                )
            if doc is None:
                mac_key = secrets.token_bytes(32)
                wrapped = await self._kek.wrap(mac_key, _MAC_CONTEXT)
                self._mac_key, self._mac_key_wrapped = mac_key, wrapped
            assert self._mac_key is not None and self._mac_key_wrapped is not None
            new_doc: dict[str, Any] = {
                "format": _FORMAT,
                "version": 1,
                "kek_id": doc["kek_id"] if doc is not None else self._kek.kek_id,
                "mac_key": base64.b64encode(self._mac_key_wrapped).decode("ascii"),
                "revision": current.revision + 1,
                "keys": [k.to_dict() for k in merge(current.keys, keys)],
            }
            if seal is not None:
                new_doc["seal"] = seal
            new_doc["mac"] = hmac.new(
                self._mac_key, _canonical(new_doc), hashlib.sha256
            ).hexdigest()
            payload = json.dumps(new_doc, sort_keys=True, indent=1).encode("utf-8")
            await anyio.to_thread.run_sync(self._replace, payload)
            return int(new_doc["revision"])

    async def rekey(self, kek: KekProvider, *, seal: str, expected_revision: int) -> int:
        """Reseal the file under ``kek`` (the last step of a master-key rotation).

        The MAC key is rewrapped by ``kek`` and the document's KEK id changed in
        one atomic replace; from then on the old KEK cannot open the store. The
        revision goes up by one, and ``seal`` (the keyset seal for it) is stored.
        """
        new_kek = kek
        async with self.lock("write", timeout=30.0):
            doc, current = await self._load()
            if doc is None:
                self._previous[self._kek.kek_id] = self._kek
                self._kek = new_kek
                return current.revision
            if current.revision != expected_revision:
                raise ConcurrentModificationError(
                    f"key store {self.path} changed (revision {current.revision}, "
                    f"expected {expected_revision})"
                )
            assert self._mac_key is not None
            wrapped = await new_kek.wrap(self._mac_key, _MAC_CONTEXT)
            new_doc = {k: v for k, v in doc.items() if k != "mac"}
            new_doc["kek_id"] = new_kek.kek_id
            new_doc["mac_key"] = base64.b64encode(wrapped).decode("ascii")
            new_doc["revision"] = current.revision + 1
            if seal is not None:  # pragma: no branch - typed str; _key_rewrap always passes one
                new_doc["seal"] = seal
            new_doc["mac"] = hmac.new(
                self._mac_key, _canonical(new_doc), hashlib.sha256
            ).hexdigest()
            payload = json.dumps(new_doc, sort_keys=True, indent=1).encode("utf-8")
            await anyio.to_thread.run_sync(self._replace, payload)
            self._mac_key_wrapped = wrapped
            self._previous.pop(new_kek.kek_id, None)
            self._previous[self._kek.kek_id] = self._kek
            self._kek = new_kek
            return int(new_doc["revision"])

    def _replace(self, payload: bytes, target: Path | None = None) -> None:
        """Atomically replace ``target`` (default: the store) with ``payload``, mode 0600."""
        target = target or self.path
        try:
            replace_file(target, payload)
        except OSError as exc:
            raise KeyStoreError(f"cannot write {target}: {exc.strerror}") from None

    def subject_store(self) -> FileSubjectKeyStore:
        """Subject keys in ``.<name>.subjects.json`` beside the key file (docs/subjects.md)."""
        if self._subjects is None:
            self._subjects = FileSubjectKeyStore(
                self.path.with_name(f".{self.path.name}.subjects.json")
            )
        return self._subjects

    # -- usage counters -----------------------------------------------------

    @property
    def _usage_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.usage.json")

    def _read_usage(self) -> dict[str, int]:
        try:
            data = json.loads(self._usage_path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            raise KeyStoreError(f"usage counters {self._usage_path} are unreadable") from None
        if not isinstance(data, dict):
            raise KeyStoreError(f"usage counters {self._usage_path} are malformed")
        return {str(k): int(v) for k, v in data.items()}

    async def add_usage(self, increments: Mapping[str, int]) -> dict[str, int]:
        async with self.lock("usage", timeout=30.0):

            def update() -> dict[str, int]:
                usage = self._read_usage()
                for key_id, n in increments.items():
                    usage[key_id] = usage.get(key_id, 0) + int(n)
                self._replace(json.dumps(usage, sort_keys=True).encode("utf-8"), self._usage_path)
                return {key_id: usage[key_id] for key_id in increments}

            return await anyio.to_thread.run_sync(update)

    async def get_usage(self) -> dict[str, int]:
        return await anyio.to_thread.run_sync(self._read_usage)

    # -- locking ------------------------------------------------------------

    @asynccontextmanager
    async def lock(self, name: str = "rotation", *, timeout: float = 30.0) -> AsyncIterator[None]:
        lock_path = self.path.with_name(f".{self.path.name}.{name}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyStoreError(f"cannot open lock file {lock_path}: {exc.strerror}") from None
        try:
            deadline = anyio.current_time() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if anyio.current_time() >= deadline:
                        raise LockTimeoutError(
                            f"key store {self.path}: lock {name!r} held elsewhere for over "
                            f"{timeout}s"
                        ) from None
                    await anyio.sleep(self._poll)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
