"""EncryptionService: the async API applications call (docs/architecture.md).

Small values are encrypted inline in the coroutine: the AES work for a field
takes microseconds, far less than a hop to a thread. Anything above the
performance mode's ``inline_threshold`` runs in a worker thread (anyio, with
its own capacity limiter), and bulk data above it is segmented so no single
cryptography call holds the GIL for long.

Every ciphertext is bound to its purpose (format version 2): fields, bulk
blobs, streams, session payloads and cache entries each open only as what they
were written as. Bulk data and streams open only under the key type the caller
names (``key_type=`` is required). Format version 1 (no purpose binding) is read
until ``accept_format_v1=False`` closes the migration window.

Over 500 lines on purpose: this is the one class applications call, and each of its
methods is a thin, documented entry point (fields, batches, bulk data, streams, files,
sessions, cache, subjects, statistics) over the core; the work lives in the modules
they call (docs/architecture.md), so splitting the class would split its API.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import functools
import hashlib
import logging
import os
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from . import _compression
from ._bulk import (
    BulkOpener,
    BulkSealer,
    EncryptedData,
    StreamEncryptor,
    decrypt_bulk,
    encrypt_bulk,
    output_buffer,
    sealed_size,
)
from ._codec import STR_TAG, decode_value, encode_value
from ._config import EncryptionConfig
from ._crypto import DataKey
from ._errors import (
    CacheEntryExpiredError,
    DecryptionError,
    DecryptionFailure,
    KeyStateError,
    decryption_failed,
)
from ._format import (
    FLAG_ZSTD,
    FORMAT_V1,
    MAX_FIELD_PLAINTEXT,
    TEXT_PREFIX_V1,
    Purpose,
    context_bytes,
)
from ._gil import aead_releases_gil, usable_cores
from ._keyring import GCM_MESSAGE_LIMIT, Keyring, UnknownKeyError, undecodable
from ._keys import utcnow
from ._manager import KeyManager
from ._prefault import Prefaulter
from ._prefault import supported as prefault_supported
from ._streams import (
    BATCH_BYTES,
    DEFAULT_MAX_SEGMENT,
    INLINE_BYTES,
    INLINE_SEGMENT_LIMIT,
    open_stream,
    read_file,
    seal_stream,
    write_file_atomically,
)
from ._subjects import SUBJECT_TOKEN_PREFIX, is_subject_key_id, token_key_id
from ._subjects_keys import ForgetReport, SubjectRewrapReport
from ._types import KeyStatus, KeyType, KeyTypeLike

__all__ = ["EncryptionService"]

logger = logging.getLogger("aiocrypt.service")

T = TypeVar("T")
_CACHE_KEY_CONTEXT: Final = b"aiocrypt/cache-key"
_CACHE_VALUE_CONTEXT: Final = b"aiocrypt/cache-value:"
_NO_EXPIRY: Final = 0


def _aes_ni_available() -> bool | None:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return " aes " in f" {line.split(':', 1)[1]} "
    except OSError:  # pragma: no cover - no /proc/cpuinfo: macOS and Windows only
        return None
    # ARM's /proc/cpuinfo lists "Features", not "flags"; the test machines are x86
    return None  # pragma: no cover - a cpuinfo without flags (ARM)


class EncryptionService:
    """Encrypts fields, bulk data, session dicts and cache entries with managed keys.

    Build it from a ``KeyManager`` (explicit) or get the process-wide one with
    ``get_encryption_service()``. Methods start the service on first use;
    ``async with service`` or ``await service.start()`` / ``close()`` manage it
    explicitly. ``service.keyring`` is a snapshot sync code can use once started.
    """

    def __init__(
        self,
        key_manager: KeyManager,
        config: EncryptionConfig | None = None,
        *,
        clock: Callable[[], _dt.datetime] = utcnow,
        preload: Sequence[KeyTypeLike] = (),
        accept_format_v1: bool = True,
        parallel_bulk: bool | None = None,
    ) -> None:
        self.key_manager = key_manager
        self.config = config if config is not None else key_manager.config
        self._clock = clock
        self._preload = tuple(KeyType(k) for k in preload)
        perf = self.config.performance
        self._threshold = perf.inline_threshold
        self._segment_size = perf.segment_size
        # whether any key type is compressed: the field hot path checks this bool only
        self._compressing = self.config.compression_enabled or bool(
            self.config.compressed_key_types
        )
        self._limiter = anyio.CapacityLimiter(perf.thread_limit)
        #: Whether bulk data is sealed and opened by several worker threads at once
        #: (None: probe whether the installed cryptography releases the GIL, once).
        self._parallel_bulk = parallel_bulk
        # False once every stored token was moved to format version 2 (the keyring's
        # own flag, from the config, says the same for sync readers)
        self._refuse_v1 = not accept_format_v1
        self._started = False
        self._closed = False
        self.counters: Counter[str] = Counter()
        # the two hottest counters are plain ints (merged into ``counters`` by stats)
        self._encryptions = 0
        self._decryptions = 0

    def __repr__(self) -> str:
        state = "running" if self._started else "stopped"
        return f"<EncryptionService {state} mode={self.config.performance_mode.value}>"

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        if not self._started:
            await self.key_manager.open()
            if self._preload:
                await self.key_manager.ensure_active(self._preload)
            self._started = True
            self._closed = False

    async def close(self) -> None:
        if self._started:
            self._started = False
            self._closed = True
            await self.key_manager.close()

    async def __aenter__(self) -> EncryptionService:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def started(self) -> bool:
        """Whether keys are loaded (sync code may then use :attr:`keyring`)."""
        return self._started

    @property
    def keyring(self) -> Keyring:
        return self.key_manager.keyring

    async def _keyring(self, key_type: str | None) -> Keyring:
        """The current keyring: started, fresh, and holding an active ``key_type`` key."""
        if not self._started:
            await self.start()
        manager = self.key_manager
        keyring = manager.keyring
        if manager.is_stale():
            keyring = await manager.refresh()
        if key_type is not None:
            dk = keyring.get_active(key_type)
            if dk is None:
                keyring = await manager.ensure_active([key_type])
                dk = keyring.active(key_type)
            if dk.encryptions >= dk.allowance:
                keyring = await manager.reserve_usage(key_type)
        return keyring

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        self.counters["threaded_operations"] += 1
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)

    async def parallel_bulk(self) -> bool:
        """Whether large bulk data is spread over worker threads (see :mod:`aiocrypt._gil`):
        True only where the cipher releases the GIL, more than one core is usable and
        the service may run more than one thread; else it is sealed inline."""
        if self._parallel_bulk is None:
            releases = await anyio.to_thread.run_sync(aead_releases_gil)
            self._parallel_bulk = releases and usable_cores() > 1 and self._limiter.total_tokens > 1
        return self._parallel_bulk

    async def _stream_workers(self) -> int:
        """Batches of a stream's segments sealed or opened at once: several worker
        threads where the cipher releases the GIL (:meth:`parallel_bulk`), else 1 (inline)."""
        if not await self.parallel_bulk():
            return 1
        return max(2, min(int(self._limiter.total_tokens), usable_cores()))

    def bulk_output_size(self, size: int) -> int:
        """Bytes an ``out=`` buffer needs for :meth:`encrypt_bulk_data` of ``size`` bytes
        (uncompressed): the ciphertext and its tags, whatever the size."""
        if size < 0:
            raise ValueError("size must be >= 0")
        return size + 16 if size <= self._threshold else sealed_size(size, self._segment_size)

    async def _bulk_parts(self, job: BulkSealer | BulkOpener) -> None:
        """Run every segment of ``job``: inline, a MiB at a time with a yield to the loop
        after each (cryptography holds the GIL, so a thread would add a hand-off and no
        parallelism); or spread over worker threads when the cipher releases the GIL;
        or in worker-thread hops when segments are too large to run inline."""
        if job.segments > 1 and await self.parallel_bulk():
            try:
                async with anyio.create_task_group() as group:
                    for first, stop in job.ranges(
                        min(int(self._limiter.total_tokens), usable_cores())
                    ):
                        group.start_soon(self._run, job.run_range, first, stop)
            except BaseExceptionGroup as failed:  # a part failed: the others were cancelled
                first_error = failed.exceptions[0]
                # run_range raises plain exceptions, which the task group wraps once:
                # a nested group needs a part that raises a group itself
                while isinstance(first_error, BaseExceptionGroup):
                    first_error = first_error.exceptions[0]  # pragma: no cover - never nested here
                raise first_error.with_traceback(None) from None
            job.ranges_done()
        elif job.segment_size > INLINE_SEGMENT_LIMIT:
            while not await self._run(job.step, BATCH_BYTES):
                pass
        elif job.fresh_output and job.segments > 2 and prefault_supported():
            await self._bulk_steps_prefaulted(job)
        else:
            while not job.step(INLINE_BYTES):
                await anyio.lowlevel.checkpoint()

    async def _bulk_steps_prefaulted(self, job: BulkSealer | BulkOpener) -> None:
        """The inline steps, with a worker thread faulting in the fresh output's pages
        ahead of them (:mod:`aiocrypt._prefault`): the loop's thread only seals."""
        self.counters["prefaulted_buffers"] += 1
        prefault = Prefaulter(job.output, asyncio.get_running_loop())
        worker = asyncio.ensure_future(
            anyio.to_thread.run_sync(prefault.run, limiter=self._limiter)
        )
        try:
            while True:
                await prefault.wait_for(job.step_output_end(INLINE_BYTES))
                if job.step(INLINE_BYTES):
                    break
                await anyio.lowlevel.checkpoint()
        finally:
            prefault.stop()
            with anyio.CancelScope(shield=True):
                await worker

    # -- fields -------------------------------------------------------------

    async def encrypt_field(
        self,
        value: Any,
        key_type: KeyTypeLike = KeyType.FINANCIAL_DATA,
        *,
        context: str | bytes | None = None,
        subject: str | None = None,
    ) -> str:
        """Encrypt one value (any codec type) to a text token bound to ``context``.

        ``subject``: seal it under that data subject's own key of ``key_type``
        (created on first use), so :meth:`forget_subject` erases it (docs/subjects.md).
        """
        kt = key_type if type(key_type) is KeyType else KeyType(key_type)
        if subject is not None:
            return await self._encrypt_subject_value(value, kt, context, Purpose.FIELD, subject)
        manager = self.key_manager
        keyring = manager.keyring
        dk = keyring.get_active(kt)
        if dk is None or dk.encryptions >= dk.allowance or not self._started or manager.is_stale():
            keyring = await self._keyring(kt)
            dk = keyring.active(kt)
        if (
            type(value) is str and not self._compressing and len(value) <= self._threshold >> 2
        ):  # UTF-8: at most 4 bytes a character
            plaintext = STR_TAG + value.encode()  # the common case
            claimed = dk.encryptions + 1  # check and count with no call between (threads
            # sealing with this key too cannot pass the limit); only such a thread, sealing
            # since the check above, gets here: nothing awaits in between to order it
            if claimed > dk.allowance:  # pragma: no cover - a sync caller's thread race
                return await self.encrypt_field(value, kt, context=context)
            dk.encryptions = claimed
            token = dk.seal_field(plaintext, context, 0)
            self._encryptions += 1
            return token
        plaintext = encode_value(value)
        level = self.compression_level_for(kt)
        if len(plaintext) > self._threshold:
            token = await self._run(self._encrypt_bytes, keyring, plaintext, kt, context)
        elif level is None:
            claimed = dk.encryptions + 1
            if claimed > dk.allowance:  # pragma: no cover - a sync caller's thread race
                return await self.encrypt_field(value, kt, context=context)
            dk.encryptions = claimed
            token = dk.seal_field(plaintext, context, 0)
        else:
            token = keyring.encrypt_bytes(plaintext, kt, context, compression_level=level)
        self._encryptions += 1
        return token

    async def _subject_key(self, kt: KeyType, subject: str) -> DataKey:
        """``subject``'s DEK of key type ``kt`` (cached; else read or made, see _subjects_keys)."""
        manager = self.key_manager
        dk = manager.subjects.cached(kt, subject)
        if dk is None or not self._started or manager.is_stale():
            await self._keyring(kt)
            dk = await manager.subjects.key_for(kt, subject)
        return dk

    def _seal_subject(
        self,
        dk: DataKey,
        plaintext: bytes,
        kt: KeyType,
        context: str | bytes | None,
        purpose: Purpose = Purpose.FIELD,
    ) -> str:
        """A text token of ``plaintext`` under the subject key ``dk`` (as the keyring seals)."""
        if len(plaintext) > MAX_FIELD_PLAINTEXT:
            raise ValueError(
                f"a field holds at most {MAX_FIELD_PLAINTEXT} bytes; "
                "use encrypt_bulk_data or encrypt_stream"
            )
        if dk.encryptions >= GCM_MESSAGE_LIMIT:
            raise KeyStateError(f"subject key {dk.key_id} reached 2**32 encryptions")
        level = self.compression_level_for(kt)
        if level is None and purpose is Purpose.FIELD:
            return dk.seal_field(plaintext, context)
        if level is None:
            return dk.seal_text(plaintext, context_bytes(context), purpose=purpose)
        return dk.seal_text(
            _compression.compress(plaintext, level),
            context_bytes(context),
            FLAG_ZSTD,
            purpose=purpose,
        )

    async def _subject_ring(self, token: str) -> Keyring:
        """The one-key keyring of the subject key ``token`` names (``DecryptionError`` if
        it was forgotten or cannot be read)."""
        manager = self.key_manager
        ring = manager.subjects.ring_of(token)
        if ring is None:
            if not self._started or manager.is_stale():
                await self._keyring(None)
            ring = await manager.subjects.ring(token_key_id(token))
        return ring

    def compression_level_for(self, key_type: KeyTypeLike) -> int | None:
        """The zstd level for ``key_type``'s data (None: not compressed); see the config's."""
        return self.config.compression_level_for(key_type) if self._compressing else None

    def _encrypt_bytes(
        self,
        keyring: Keyring,
        plaintext: bytes,
        kt: KeyType,
        context: str | bytes | None,
        purpose: Purpose = Purpose.FIELD,
    ) -> str:
        return keyring.encrypt_bytes(
            plaintext,
            kt,
            context,
            compression_level=self.compression_level_for(kt),
            purpose=purpose,
        )

    async def _encrypt_value(
        self, value: Any, kt: KeyType, context: str | bytes | None, purpose: Purpose
    ) -> str:
        """:meth:`encrypt_field` for another purpose (sessions): the general path only."""
        keyring = await self._keyring(kt)
        plaintext = encode_value(value)
        if len(plaintext) > self._threshold:
            token = await self._run(self._encrypt_bytes, keyring, plaintext, kt, context, purpose)
        else:
            token = self._encrypt_bytes(keyring, plaintext, kt, context, purpose)
        self._encryptions += 1
        return token

    async def _encrypt_subject_value(
        self, value: Any, kt: KeyType, context: str | bytes | None, purpose: Purpose, subject: str
    ) -> str:
        """:meth:`_encrypt_value` under ``subject``'s key of ``kt``."""
        dk = await self._subject_key(kt, subject)
        plaintext = encode_value(value)
        if len(plaintext) > self._threshold:
            token = await self._run(self._seal_subject, dk, plaintext, kt, context, purpose)
        else:
            token = self._seal_subject(dk, plaintext, kt, context, purpose)
        self._encryptions += 1
        return token

    async def decrypt_field(
        self,
        token: str,
        key_type: KeyTypeLike = KeyType.FINANCIAL_DATA,
        *,
        context: str | bytes | None = None,
    ) -> Any:
        """Decrypt a token from :meth:`encrypt_field`; any failure is ``DecryptionError``."""
        kt = key_type if type(key_type) is KeyType else KeyType(key_type)
        manager = self.key_manager
        if self._refuse_v1 and type(token) is str and token.startswith(TEXT_PREFIX_V1):
            await self._record_failures(kt, 1)
            raise _v1_refused()
        if self._started and not manager.is_stale() and len(token) <= self._threshold:
            keyring: Keyring | None = manager.keyring
            if type(token) is str and token.startswith(SUBJECT_TOKEN_PREFIX):
                keyring = manager.subjects.ring_of(token)  # cached, or the general path
        else:
            keyring = None
        if keyring is not None:
            try:  # the common case: started, fresh, small, key loaded
                value = keyring.decrypt(token, kt, context)
            except UnknownKeyError:
                pass  # rotated elsewhere (load it) or not in the store: the general path
            except DecryptionError:
                await self._record_failures(kt, 1)  # the keyring is fresh: it stays bad
                raise
            else:
                self._decryptions += 1
                if manager.auditor.pending:  # e.g. an expired key was used
                    await manager.auditor.flush()
                return value
        return await self._decrypt_value(token, kt, context, Purpose.FIELD)

    async def _decrypt_value(
        self, token: str, kt: KeyType, context: str | bytes | None, purpose: Purpose
    ) -> Any:
        """:meth:`decrypt_field`'s general path, for any purpose (sessions use it too)."""
        plaintext = await self._decrypt_bytes(token, kt, context, purpose)
        try:
            return decode_value(plaintext)
        except ValueError:
            self.counters["decrypt_failures"] += 1
            raise undecodable(token) from None

    async def _decrypt_bytes(
        self, token: str, kt: KeyType, context: str | bytes | None, purpose: Purpose = Purpose.FIELD
    ) -> bytes:
        if not isinstance(token, str):
            raise TypeError(f"token must be str, not {type(token).__name__}")
        manager = self.key_manager
        if not self._started or manager.is_stale():
            await self._keyring(None)
        keyring = manager.keyring
        try:
            if token.startswith(SUBJECT_TOKEN_PREFIX):
                keyring = await self._subject_ring(token)
            if self._refuse_v1 and token.startswith(TEXT_PREFIX_V1):
                raise _v1_refused()
            try:
                if len(token) > self._threshold:
                    plaintext = await self._run(
                        functools.partial(
                            keyring.decrypt_bytes, token, kt, context, purpose=purpose
                        )
                    )
                else:
                    plaintext = keyring.decrypt_bytes(token, kt, context, purpose=purpose)
            except UnknownKeyError as exc:
                if await manager.load_key(exc.key_id) is None:
                    raise self._missing_key(exc.key_id) from None
                plaintext = manager.keyring.decrypt_bytes(token, kt, context, purpose=purpose)
        except DecryptionError:
            await self._flush_audit()
            await self._record_failures(kt, 1)
            raise
        self._decryptions += 1
        await self._flush_audit()
        return plaintext

    async def _flush_audit(self) -> None:
        """Deliver the audit events sync code queued during a decrypt (an expired key
        was read in its grace period): every decrypt path calls it before returning."""
        auditor = self.key_manager.auditor
        if auditor.pending:
            await auditor.flush()

    def _missing_key(self, key_id: str) -> DecryptionError:
        """Why ``key_id`` is not in the keyring after a reload: destroyed, or never here.

        Reads the records the reload just authenticated (no further store read, so
        a flood of unknown ids costs what ``load_key`` lets it cost).
        """
        record = self.key_manager._records.by_id().get(key_id)
        if record is not None and record.status is KeyStatus.DESTROYED:
            return decryption_failed(
                DecryptionFailure.KEY_NOT_READABLE, key_id, f"key {key_id} was destroyed"
            )
        return decryption_failed(
            DecryptionFailure.UNKNOWN_KEY, key_id, f"key {key_id} is not in this key store"
        )

    async def _record_failures(self, kt: KeyType, failures: int, batch_size: int = 1) -> None:
        self.counters["decrypt_failures"] += failures
        self.counters[f"decrypt_failures:{kt.value}"] += failures
        await self.key_manager.auditor.record_failures(
            kt.value, failures, successes_total=self._decryptions, batch_size=batch_size
        )

    async def encrypt_many(
        self,
        values: Sequence[Any],
        key_type: KeyTypeLike = KeyType.FINANCIAL_DATA,
        *,
        context: str | bytes | None = None,
        contexts: Sequence[str | bytes | None] | None = None,
        subject: str | None = None,
        subjects: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Encrypt a batch with one keyring lookup; ``contexts`` gives one context per value.

        ``subject`` seals the whole batch under one data subject's key, ``subjects``
        gives one subject (or None: the key type's key) per value.
        """
        kt = KeyType(key_type)
        ctxs = self._contexts(len(values), context, contexts)
        if subject is not None or subjects is not None:
            return await self._encrypt_many_subjects(values, kt, ctxs, subject, subjects)
        plaintexts = [STR_TAG + v.encode() if type(v) is str else encode_value(v) for v in values]
        tokens: list[str] = []
        level = self.compression_level_for(kt)
        while len(tokens) < len(plaintexts):
            # each chunk fits the key's reserved allowance (a rotation may come between)
            keyring = await self._keyring(kt)
            dk = keyring.active(kt)
            start = len(tokens)
            end = min(len(plaintexts), start + dk.allowance - dk.encryptions)
            chunk = plaintexts[start:end]

            def work(
                keyring: Keyring = keyring,
                start: int = start,
                end: int = end,
                chunk: list[bytes] = chunk,
                dk: DataKey = dk,
            ) -> list[str]:
                if level is None:
                    return dk.seal_fields(chunk, ctxs[start:end])
                return [
                    keyring.encrypt_bytes(p, kt, ctxs[start + i], compression_level=level)
                    for i, p in enumerate(chunk)
                ]

            large = sum(len(p) for p in chunk) > self._threshold
            tokens.extend(await self._run(work) if large else work())
        self._encryptions += len(tokens)
        return tokens

    async def _encrypt_many_subjects(
        self,
        values: Sequence[Any],
        kt: KeyType,
        ctxs: Sequence[str | bytes | None],
        subject: str | None,
        subjects: Sequence[str | None] | None,
    ) -> list[str]:
        if subjects is None:
            subjects = [subject] * len(values)
        elif subject is not None:
            raise ValueError("pass subject or subjects, not both")
        elif len(subjects) != len(values):
            raise ValueError(f"{len(subjects)} subjects for {len(values)} values")
        keys = {s: await self._subject_key(kt, s) for s in dict.fromkeys(subjects) if s is not None}
        tokens: list[str | None] = [None] * len(values)
        plain = [i for i, s in enumerate(subjects) if s is None]
        if plain:
            for i, token in zip(
                plain,
                await self.encrypt_many(
                    [values[i] for i in plain], kt, contexts=[ctxs[i] for i in plain]
                ),
                strict=True,
            ):
                tokens[i] = token
        plaintexts = {
            i: (keys[s], STR_TAG + v.encode() if type(v) is str else encode_value(v))
            for i, (v, s) in enumerate(zip(values, subjects, strict=True))
            if s is not None
        }

        def work() -> None:
            for i, (dk, plaintext) in plaintexts.items():
                tokens[i] = self._seal_subject(dk, plaintext, kt, ctxs[i])

        if sum(len(p) for _, p in plaintexts.values()) > self._threshold:
            await self._run(work)
        else:
            work()
        self._encryptions += len(plaintexts)
        return [t for t in tokens if t is not None]

    async def decrypt_many(  # noqa: C901 - the batch decrypt: fast path, per-token fallback and failure counting in one loop for speed
        self,
        tokens: Sequence[str],
        key_type: KeyTypeLike = KeyType.FINANCIAL_DATA,
        *,
        context: str | bytes | None = None,
        contexts: Sequence[str | bytes | None] | None = None,
    ) -> list[Any]:
        """Decrypt a batch; if any token fails, ``DecryptionError`` (after auditing the batch).

        A batch in which more than half the tokens fail is reported as one
        ``decrypt_failure_spike`` audit event, not one line per token.
        """
        kt = KeyType(key_type)
        ctxs = self._contexts(len(tokens), context, contexts)
        keyring = await self._keyring(None)
        if self._refuse_v1:
            refused = sum(1 for t in tokens if type(t) is str and t.startswith(TEXT_PREFIX_V1))
            if refused:
                await self._record_failures(kt, refused, batch_size=len(tokens))
                raise _v1_refused()
        errors: dict[int, DecryptionError] = {}
        # subject keys: one keyring (or the reason it cannot be read) per key id named
        rings = await self.key_manager.subjects.rings(
            {
                token_key_id(t)
                for t in tokens
                if type(t) is str and t.startswith(SUBJECT_TOKEN_PREFIX)
            }
        )

        def ring_for(keyring: Keyring, token: str) -> Keyring:
            if not rings or not token.startswith(SUBJECT_TOKEN_PREFIX):
                return keyring
            ring = rings[token_key_id(token)]
            if isinstance(ring, DecryptionError):
                raise ring.with_traceback(None)
            return ring

        def work(keyring: Keyring, indexes: Sequence[int]) -> tuple[dict[int, Any], set[str]]:
            done: dict[int, Any] = {}
            unknown: set[str] = set()
            for i in indexes:
                try:
                    done[i] = ring_for(keyring, tokens[i]).decrypt(tokens[i], kt, ctxs[i])
                except UnknownKeyError as exc:
                    unknown.add(exc.key_id)
                    errors[i] = exc
                except DecryptionError as exc:
                    errors[i] = exc
            return done, unknown

        def all_or_nothing(keyring: Keyring) -> list[Any] | None:  # the common case
            decrypt = keyring.decrypt
            try:
                return [decrypt(t, kt, c) for t, c in zip(tokens, ctxs, strict=True)]
            except DecryptionError:
                return None

        large = sum(len(t) for t in tokens) > self._threshold
        values = (
            None
            if rings
            else await self._run(all_or_nothing, keyring)
            if large
            else all_or_nothing(keyring)
        )
        if values is not None:
            self._decryptions += len(values)
            await self._flush_audit()
            return values
        everything = range(len(tokens))
        done, unknown = (
            await self._run(work, keyring, everything) if large else work(keyring, everything)
        )
        if unknown:  # keys rotated elsewhere: load each once, retry what is left
            for key_id in unknown:
                await self.key_manager.load_key(key_id)
            more, _ = work(self.key_manager.keyring, [i for i in everything if i not in done])
            done.update(more)
        await self._flush_audit()
        failures = len(tokens) - len(done)
        if failures:
            await self._record_failures(kt, failures, batch_size=len(tokens))
            # the first failing token's reason (a batch fails as a whole)
            first = errors[min(i for i in everything if i not in done)]
            if isinstance(first, UnknownKeyError):
                raise self._missing_key(first.key_id)
            raise first.with_traceback(None)
        self._decryptions += len(done)
        return [done[i] for i in everything]

    @staticmethod
    def _contexts(
        n: int, context: str | bytes | None, contexts: Sequence[str | bytes | None] | None
    ) -> Sequence[str | bytes | None]:
        if contexts is None:
            return [context] * n
        if context is not None:
            raise ValueError("pass context or contexts, not both")
        if len(contexts) != n:
            raise ValueError(f"{len(contexts)} contexts for {n} values")
        return contexts

    # -- bulk data ----------------------------------------------------------

    async def encrypt_bulk_data(
        self,
        data: bytes | bytearray | memoryview,
        key_type: KeyTypeLike = KeyType.FINANCIAL_DATA,
        *,
        context: str | bytes | None = None,
        out: Any = None,
        subject: str | None = None,
    ) -> EncryptedData:
        """Encrypt a blob: one GCM message when small, 1 MiB segments when large.

        Large payloads are sealed inline with a yield to the event loop every MiB
        (or by several worker threads where the cipher releases the GIL: see
        :meth:`parallel_bulk`). For a segmented result ``encrypted_data`` is a
        read-only memoryview over the buffer the segments were written into (no
        copy); ``to_bytes()`` gives a blob.

        ``out=``: a writable buffer of at least :meth:`bulk_output_size` bytes to
        write the ciphertext into instead of fresh memory (a fresh mapping costs a
        page fault per 4 KiB on first touch: reusing one is several times faster
        for large payloads, see docs/performance.md). ``encrypted_data`` is then a
        view over ``out``: keep ``out`` unchanged while the result is in use. Not
        with compression (the size is not known in advance): ``ValueError``.
        ``subject``: seal it under that data subject's key (docs/subjects.md).
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"bulk data must be bytes-like, not {type(data).__name__}")
        kt = KeyType(key_type)
        level = self.compression_level_for(kt)
        if out is not None and level is not None:
            raise ValueError(
                f"out= cannot take compressed bulk data: {kt.value} is "
                "compressed, so its size is not known in advance"
            )
        keyring = await self._keyring(kt)
        dk = keyring.active(kt) if subject is None else await self._subject_key(kt, subject)
        ctx = context_bytes(context)
        large = len(data) > self._threshold

        payload: bytes | memoryview = memoryview(data)
        if not large:
            if level is not None:
                payload = _compression.compress(payload, level)
            target = None if out is None else output_buffer(out, len(payload) + 16, "the result")
            result = encrypt_bulk(dk, payload, ctx, flags=0 if level is None else FLAG_ZSTD)
            if target is not None:
                size = len(result.encrypted_data)
                target[:size] = result.encrypted_data
                target[size:] = result.tag
                result = EncryptedData(
                    target[:size].toreadonly(),
                    result.key_id,
                    result.algorithm,
                    result.iv,
                    result.tag,
                )
        else:
            if level is not None:
                # one zstd record per segment, as compressed streams hold
                payload = memoryview(
                    await self._run(
                        _compression.compress_records, payload, level, self._segment_size
                    )
                )
            job = BulkSealer(
                dk,
                payload,
                ctx,
                flags=0 if level is None else FLAG_ZSTD,
                segment_size=self._segment_size,
                out=out,
            )
            await self._bulk_parts(job)
            result = job.result()
        self.counters["bulk_encryptions"] += 1
        return result

    async def decrypt_bulk_data(  # noqa: C901 - argument checks (bytes or EncryptedData, out=, key type) before the one job
        self,
        encrypted: EncryptedData | bytes,
        *,
        key_type: KeyTypeLike,
        context: str | bytes | None = None,
        out: Any = None,
    ) -> bytes | memoryview:
        """Decrypt :meth:`encrypt_bulk_data` output (the object or its ``to_bytes()`` blob).

        ``key_type`` is required: data of any other key type is refused, as is
        anything that is not a bulk blob or stream (a field token turned into bytes).
        Small payloads come back as ``bytes``. Segmented (large) ones come back as a
        read-only ``memoryview`` over one buffer the segments were decrypted into,
        so no GIL-holding copy of the whole payload is ever made; ``bytes(result)``
        makes one if you need it.

        ``out=``: a writable buffer of at least ``encrypted.plaintext_size`` bytes to
        decrypt into; the result is then a read-only view over its first bytes. If
        any part fails to authenticate, what was written to ``out`` is zeroed before
        ``DecryptionError`` is raised. Not for compressed data (``ValueError``).
        """
        kt = _required_key_type(key_type)
        if isinstance(encrypted, (bytes, bytearray, memoryview)):
            encrypted = EncryptedData.from_bytes(encrypted)
        if not isinstance(encrypted, EncryptedData):
            raise TypeError("expected EncryptedData or its to_bytes() blob")
        if out is not None and encrypted.compressed:
            raise ValueError(
                "out= cannot take compressed bulk data: its size is known only once decompressed"
            )
        if not self._started:
            await self.start()
        dk = await self._data_key(encrypted.key_id)
        if encrypted.format_version == FORMAT_V1 and not self._accepts_v1():
            self.counters["decrypt_failures"] += 1
            raise _v1_refused()
        try:
            self.keyring.check_decryptable(dk, kt)
        except DecryptionError:
            self.counters["decrypt_failures"] += 1
            raise
        await self._flush_audit()
        ctx = context_bytes(context)
        large = len(encrypted.encrypted_data) > self._threshold

        try:
            if encrypted.algorithm == "AES_256_GCM":  # one message
                target = (
                    None
                    if out is None
                    else output_buffer(out, len(encrypted.encrypted_data), "the plaintext")
                )
                plaintext = (
                    await self._run(decrypt_bulk, dk, encrypted, ctx)
                    if large
                    else decrypt_bulk(dk, encrypted, ctx)
                )
                if target is not None:
                    target[:] = plaintext
                    plaintext = target.toreadonly()
            else:
                job = BulkOpener(dk, encrypted, ctx, out=out)
                try:
                    await self._bulk_parts(job)
                except DecryptionError:
                    if out is not None:
                        job.scrub()
                    raise
                plaintext = job.result()
            if encrypted.compressed:
                plaintext = (
                    await self._run(_decompress, plaintext) if large else _decompress(plaintext)
                )
        except DecryptionError:
            self.counters["decrypt_failures"] += 1
            raise
        self.counters["bulk_decryptions"] += 1
        return plaintext

    # -- streams ------------------------------------------------------------

    async def encrypt_stream(
        self,
        source: AsyncIterable[bytes] | Iterable[bytes],
        key_type: KeyTypeLike = KeyType.FINANCIAL_DATA,
        *,
        context: str | bytes | None = None,
        compress: bool | None = None,
        segment_size: int | None = None,
        subject: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Encrypt chunks of any size as they come; memory stays O(segment).

        The concatenated output is the ``to_bytes()`` blob of a segmented
        ``EncryptedData``: stream it to a file or object store, and read it back
        with :meth:`decrypt_stream` (or :meth:`decrypt_bulk_data` when it fits in
        memory). Each yielded part is an immutable ``bytes``. ``compress`` (default:
        whether the config compresses ``key_type``: ``compression_enabled`` or
        ``compressed_key_types``) zstd-compresses each segment before it is sealed;
        ``segment_size`` (1 KiB..64 MiB) overrides the performance mode's. ``subject``:
        seal it under that data subject's key (docs/subjects.md).
        """
        kt = KeyType(key_type)
        level = self._stream_compression(compress, kt)
        keyring = await self._keyring(kt)
        dk = keyring.active(kt) if subject is None else await self._subject_key(kt, subject)
        enc = StreamEncryptor(
            dk,
            context_bytes(context),
            self._segment_size if segment_size is None else segment_size,
            flags=FLAG_ZSTD if level is not None else 0,
        )
        self.counters["stream_encryptions"] += 1
        async for part in seal_stream(
            enc, source, self._run, self._threshold, level, workers=await self._stream_workers()
        ):
            yield part

    def _stream_compression(self, compress: bool | None, kt: KeyType) -> int | None:
        if compress is None:
            return self.compression_level_for(kt)
        return self.config.performance.compression_level if compress else None

    async def decrypt_stream(
        self,
        source: AsyncIterable[bytes] | Iterable[bytes],
        *,
        key_type: KeyTypeLike,
        context: str | bytes | None = None,
        max_segment_size: int = DEFAULT_MAX_SEGMENT,
    ) -> AsyncIterator[bytes]:
        """Decrypt what :meth:`encrypt_stream` produced, yielding authenticated plaintext.

        ``key_type`` is required (a stream of another key type is refused). A stream
        whose header declares segments larger than ``max_segment_size`` (default 4
        MiB, the largest any performance mode writes; raise it for streams written
        with a larger ``segment_size=``) is refused before anything is buffered.
        """
        kt = _required_key_type(key_type)
        if not self._started:
            await self.start()

        async def find_key(key_id: str) -> DataKey:
            dk = await self._data_key(key_id)
            self.keyring.check_decryptable(dk, kt)
            await self._flush_audit()
            return dk

        try:
            async for part in open_stream(
                source,
                find_key,
                context_bytes(context),
                self._run,
                self._threshold,
                max_segment_size=max_segment_size,
                accept_v1=self._accepts_v1(),
                workers=await self._stream_workers(),
            ):
                yield part
        except DecryptionError:
            self.counters["decrypt_failures"] += 1
            raise
        self.counters["stream_decryptions"] += 1

    # -- files --------------------------------------------------------------

    async def encrypt_file(
        self,
        src: str | os.PathLike[str],
        dst: str | os.PathLike[str],
        key_type: KeyTypeLike = KeyType.FINANCIAL_DATA,
        *,
        context: str | bytes | None = None,
        compress: bool | None = None,
        segment_size: int | None = None,
        subject: str | None = None,
    ) -> int:
        """Encrypt the file ``src`` into ``dst`` as a stream; returns the bytes written.

        Reads, seals and writes segment by segment in worker threads (memory stays
        O(segment)). ``dst`` appears, mode 0600, only once it is complete: the
        output goes to a temporary file beside it that is renamed over it.
        """
        size = self._segment_size if segment_size is None else segment_size
        async with contextlib.aclosing(read_file(src, size, self._run)) as chunks:
            parts = self.encrypt_stream(
                chunks,
                key_type,
                context=context,
                compress=compress,
                segment_size=size,
                subject=subject,
            )
            return await write_file_atomically(dst, parts, self._run)

    async def decrypt_file(
        self,
        src: str | os.PathLike[str],
        dst: str | os.PathLike[str],
        *,
        key_type: KeyTypeLike,
        context: str | bytes | None = None,
        max_segment_size: int = DEFAULT_MAX_SEGMENT,
    ) -> int:
        """Decrypt :meth:`encrypt_file` output into ``dst`` (mode 0600); returns the bytes written.

        If any segment fails to authenticate, ``DecryptionError`` is raised and
        ``dst`` is left untouched: no partial plaintext is ever left behind.
        ``key_type`` and ``max_segment_size`` are as for :meth:`decrypt_stream`.
        """
        kt = _required_key_type(key_type)
        chunks = read_file(
            src,
            self._segment_size,
            self._run,
            stream_aligned=True,
            max_segment_size=max_segment_size,
        )
        async with contextlib.aclosing(chunks):
            parts = self.decrypt_stream(
                chunks, context=context, key_type=kt, max_segment_size=max_segment_size
            )
            return await write_file_atomically(dst, parts, self._run)

    def _accepts_v1(self) -> bool:
        return not self._refuse_v1 and self.keyring.accept_format_v1

    async def _data_key(self, key_id: str) -> DataKey:
        if is_subject_key_id(key_id):
            try:
                dk = (await self.key_manager.subjects.ring(key_id)).get(key_id)
            except DecryptionError:
                self.counters["decrypt_failures"] += 1
                raise
            assert dk is not None
            return dk
        dk = self.key_manager.keyring.get(key_id) or await self.key_manager.load_key(key_id)
        if dk is None:
            self.counters["decrypt_failures"] += 1
            raise self._missing_key(key_id)
        return dk

    # -- sessions -----------------------------------------------------------

    async def encrypt_session_data(
        self,
        data: dict[str, Any],
        *,
        context: str | bytes | None = None,
        subject: str | None = None,
    ) -> str:
        """Encrypt a session dict with the session key (bind it to the session via ``context``).

        ``subject``: under that data subject's session key instead, so that
        :meth:`forget_subject` also ends every session of theirs.
        """
        if not isinstance(data, dict):
            raise TypeError(f"session data must be a dict, not {type(data).__name__}")
        if subject is not None:
            return await self._encrypt_subject_value(
                data, KeyType.SESSION, context, Purpose.SESSION, subject
            )
        return await self._encrypt_value(data, KeyType.SESSION, context, Purpose.SESSION)

    async def decrypt_session_data(
        self, token: str, *, context: str | bytes | None = None
    ) -> dict[str, Any]:
        """Decrypt :meth:`encrypt_session_data` output (never a field token)."""
        value = await self._decrypt_value(token, KeyType.SESSION, context, Purpose.SESSION)
        if not isinstance(value, dict):
            raise decryption_failed(
                DecryptionFailure.MALFORMED, None, "the decrypted session is not a dict"
            )
        return value

    # -- cache entries ------------------------------------------------------

    async def encrypt_cache_data(
        self, cache_key: str, value: Any, ttl: float | None = 3600, *, subject: str | None = None
    ) -> tuple[str, str]:
        """Encrypt a cache entry: (deterministic encrypted key, encrypted value with expiry).

        Equal ``cache_key`` strings give equal encrypted keys (AES-SIV under the
        cache key type), so the encrypted key can be used as the Redis key. The
        value carries its expiry time inside the ciphertext; decrypting after it
        raises ``CacheEntryExpiredError``. ``ttl=None`` means no expiry.
        ``subject``: the value is sealed under that data subject's cache key, so
        :meth:`forget_subject` makes it unreadable; the encrypted key stays under the
        cache key type's own key (lookups do not know the subject): keep personal data
        out of cache keys.
        """
        if not isinstance(cache_key, str):
            raise TypeError("cache_key must be str")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0
        ):
            raise ValueError("ttl must be a positive number of seconds (or None)")
        keyring = await self._keyring(KeyType.CACHE)
        expires = _NO_EXPIRY if ttl is None else int((self._clock().timestamp() + ttl) * 1000)
        encrypted_key = keyring.encrypt_deterministic(
            cache_key, KeyType.CACHE, _CACHE_KEY_CONTEXT, purpose=Purpose.CACHE
        )
        plaintext = encode_value([expires, value])
        context = _cache_value_context(cache_key)
        if subject is not None:
            encrypted_value = await self._encrypt_subject_value(
                [expires, value], KeyType.CACHE, context, Purpose.CACHE, subject
            )
        elif len(plaintext) > self._threshold:
            encrypted_value = await self._run(
                self._encrypt_bytes, keyring, plaintext, KeyType.CACHE, context, Purpose.CACHE
            )
        else:
            encrypted_value = self._encrypt_bytes(
                keyring, plaintext, KeyType.CACHE, context, Purpose.CACHE
            )
        self.counters["cache_encryptions"] += 1
        return encrypted_key, encrypted_value

    async def encrypt_cache_key(self, cache_key: str) -> str:
        """The encrypted form of ``cache_key`` alone (to look an entry up)."""
        keyring = await self._keyring(KeyType.CACHE)
        return keyring.encrypt_deterministic(
            cache_key, KeyType.CACHE, _CACHE_KEY_CONTEXT, purpose=Purpose.CACHE
        )

    async def decrypt_cache_data(self, encrypted_key: str, encrypted_value: str) -> tuple[str, Any]:
        """(cache key, value); ``CacheEntryExpiredError`` once the entry's TTL has passed."""
        cache_key = decode_value(
            await self._decrypt_bytes(
                encrypted_key, KeyType.CACHE, _CACHE_KEY_CONTEXT, Purpose.CACHE
            )
        )
        if not isinstance(cache_key, str):
            raise undecodable(encrypted_key)
        envelope = await self._decrypt_bytes(
            encrypted_value, KeyType.CACHE, _cache_value_context(cache_key), Purpose.CACHE
        )
        try:
            expires, value = decode_value(envelope)
        except (ValueError, TypeError):
            raise undecodable(encrypted_value) from None
        if expires != _NO_EXPIRY and self._clock().timestamp() * 1000 >= expires:
            self.counters["cache_expired"] += 1
            raise CacheEntryExpiredError()
        return cache_key, value

    # -- data subjects ------------------------------------------------------

    async def forget_subject(
        self,
        subject: str,
        *,
        key_type: KeyTypeLike | None = None,
        tombstone: bool = False,
        actor: str | None = None,
    ) -> ForgetReport:
        """Erase a data subject: destroy their subject keys (of ``key_type``, else of every
        key type), so every token, blob, stream, session and cache entry sealed with
        ``subject=`` becomes unreadable wherever a copy lives (docs/subjects.md).

        Reads afterwards raise ``DecryptionError`` with reason ``subject_forgotten``, in
        this process at once and in others once they see the new keyset revision. The
        forgotten key ids are kept in the sealed keyset, so a row restored from a backup
        is refused too. The same subject id used again later gets a new key, unless
        ``tombstone=True`` (then ``KeyStateError`` on any new encryption for it). One
        ``subject_forgotten`` audit event records ``actor``, the key types, the key ids
        and lookup hashes, never the subject id.
        """
        if not self._started:
            await self.start()
        return await self.key_manager.subjects.forget(
            subject, key_type=key_type, tombstone=tombstone, actor=actor
        )

    async def subject_key_exists(self, subject: str, key_type: KeyTypeLike) -> bool:
        """Whether ``subject`` has a live key of ``key_type`` (none is created)."""
        kt = KeyType(key_type)
        await self._keyring(kt)
        return await self.key_manager.subjects.exists(kt, subject)

    async def subject_reference(self, subject: str, key_type: KeyTypeLike) -> str:
        """The lookup hash ``subject``'s ``key_type`` key is filed under: what the audit
        trail records of a forget (find "what happened to this person's key" by it)."""
        kt = KeyType(key_type)
        await self._keyring(kt)
        return self.key_manager.subjects.reference(subject, kt)

    async def rewrap_subjects(
        self, key_type: KeyTypeLike, *, batch_size: int = 1000
    ) -> SubjectRewrapReport:
        """:meth:`KeyManager.rewrap_subjects` (after a rotation of ``key_type``)."""
        if not self._started:
            await self.start()
        return await self.key_manager.rewrap_subjects(key_type, batch_size=batch_size)

    # -- reporting ----------------------------------------------------------

    async def get_encryption_stats(self) -> dict[str, Any]:
        """Counters, active keys and health of the service."""
        status = "running" if self._started else ("closed" if self._closed else "not_started")
        stats: dict[str, Any] = {
            "encryption_service": status,
            "performance_mode": self.config.performance_mode.value,
            "inline_threshold": self._threshold,
            "segment_size": self._segment_size,
            "compression_enabled": self.config.compression_enabled,
            "compressed_key_types": sorted(self.config.compressed_key_types),
            "counters": {
                **self.counters,
                "encryptions": self._encryptions,
                "decryptions": self._decryptions,
            },
            "usage_by_key": {dk.key_id: dk.encryptions for dk in self.keyring if dk.encryptions},
            "active_keys": {str(kt): dk.key_id for kt, dk in self.keyring.active_keys.items()},
            "loaded_keys": len(self.keyring),
            "aes_ni": _aes_ni_available(),
            "kek_provider": self.key_manager.kek.backend,
            "key_store": self.key_manager.store.name,
        }
        stats["dek_cache"] = {
            "hits": self.key_manager.dek_cache_hits,
            "misses": self.key_manager.dek_cache_misses,
        }
        if self._started:
            health = await self.key_manager.health()
            stats.update(health)
            if not (health["key_store_reachable"] and health["kek_provider_reachable"]):
                stats["encryption_service"] = "degraded"
        return stats


def _required_key_type(key_type: KeyTypeLike | None) -> KeyType:
    if key_type is None:
        raise TypeError(
            "key_type is required: bulk data and streams open only under the key "
            "type they were encrypted with"
        )
    return KeyType(key_type)


def _decompress(plaintext: bytes | memoryview) -> bytes:
    try:
        return _compression.decompress_payload(plaintext)
    except ValueError:
        raise decryption_failed(
            DecryptionFailure.MALFORMED,
            None,
            "the decrypted data does not decompress within the limits",
        ) from None


def _v1_refused() -> DecryptionError:
    return decryption_failed(
        DecryptionFailure.MALFORMED,
        None,
        "format version 1 tokens are no longer read (accept_format_v1=False)",
    )


def _cache_value_context(cache_key: str) -> bytes:
    return _CACHE_VALUE_CONTEXT + hashlib.sha256(cache_key.encode("utf-8")).digest()
