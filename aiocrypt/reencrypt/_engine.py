"""The re-encryption engine: keyset pagination, compare-and-swap batches, checkpoints,
passes and shards (the package docstring says how a run goes).

Just over 500 lines: one class whose pipelined pass, hot transform loop and
checkpointing are read together when a run's correctness is in question (resume,
compare-and-swap); specs, SQL and adapters are already modules of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .. import _compression
from .._codec import encode_value
from .._crypto import NONCE_BYTES, DataKey
from .._errors import DecryptionError, DecryptionFailure, ReencryptionError
from .._format import FLAG_ZSTD, TEXT_PREFIXES, context_bytes, text_prefix
from .._keyring import Keyring, UnknownKeyError
from .._legacy import LegacyReader
from .._subjects import SUBJECT_TOKEN_PREFIX
from .._telemetry import annotate, count, traced
from .._types import KeyType, KeyTypeLike
from ._database import ReencryptionDatabase
from ._specs import (
    Checkpoint,
    ColumnSpec,
    KeyRange,
    ProgressCallback,
    ReencryptionProgress,
    ReencryptionResult,
    TableCensus,
    TableSpec,
    WriteBatch,
    row_context,
)
from ._values import parse_legacy

if TYPE_CHECKING:
    from .._manager import KeyManager

logger = logging.getLogger("aiocrypt.reencrypt")


# -- the engine -----------------------------------------------------------------


@dataclass(slots=True)
class _Column:
    spec: ColumnSpec
    context: str
    prefix: str
    target: DataKey
    compression_level: int | None
    reader: LegacyReader | None = None
    # the spec's fields the hot loop reads, one attribute away
    key_type: KeyType = field(init=False)
    row_bound: bool = field(init=False)
    deterministic: bool = field(init=False)
    context_bytes: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.key_type = self.spec.key_type
        self.row_bound = self.spec.row_bound
        self.deterministic = self.spec.deterministic
        self.context_bytes = self.context.encode("utf-8")


@dataclass(slots=True)
class _RunStats:
    batches: int = 0
    rows_read: int = 0
    rows_updated: int = 0
    rows_conflicted: int = 0
    rows_failed: int = 0
    failed_pks: list[Any] = field(default_factory=list)
    failures: list[ReencryptionError] = field(default_factory=list)
    #: (primary key, column) of every value that failed in this run: a row whose
    #: only pending values failed before is neither counted nor reported again.
    failed_seen: set[tuple[str, str]] = field(default_factory=set)


class ReencryptionEngine:
    """Re-encrypts stored tokens onto the active key of each column's key type.

    ``tables`` registers :class:`TableSpec` by name so a job can name a table
    only (``aiocrypt.integrations.sqlalchemy.table_specs(Base.metadata)`` finds
    them in model metadata). ``rate_limit`` caps rows per second;
    ``progress`` (sync or async) is called after each committed batch, and an
    exception it raises stops the run after that batch (resume later).
    ``on_error="skip"`` leaves a value that does not decrypt in place (counted,
    its primary key reported) instead of stopping the run. Values are
    zstd-compressed as the key manager's config says for each column's key type
    (``compression_enabled`` / ``compressed_key_types``), as the service does;
    ``compression_level`` compresses every column at that level instead.
    ``legacy_readers`` open the other tools' ciphertext of columns whose spec
    names one (``ColumnSpec.legacy_reader``), the migration off sqlalchemy-utils
    or Fernet; a spec naming a reader the engine was not given is refused.
    """

    def __init__(
        self,
        key_manager: KeyManager,
        database: ReencryptionDatabase,
        *,
        tables: Iterable[TableSpec] = (),
        batch_size: int = 2000,
        rate_limit: float | None = None,
        progress: ProgressCallback | None = None,
        max_passes: int = 3,
        on_error: Literal["raise", "skip"] = "raise",
        compression_level: int | None = None,
        legacy_readers: Iterable[LegacyReader] = (),
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if rate_limit is not None and rate_limit <= 0:
            raise ValueError("rate_limit must be a positive number of rows per second")
        if max_passes < 1:
            raise ValueError("max_passes must be at least 1")
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        self.key_manager = key_manager
        self.database = database
        self.tables: dict[str, TableSpec] = {t.name: t for t in tables}
        self.batch_size = batch_size
        self.rate_limit = rate_limit
        self.progress = progress
        self.max_passes = max_passes
        self.on_error = on_error
        self.compression_level = compression_level
        self.legacy_readers: dict[str, LegacyReader] = {r.name: r for r in legacy_readers}
        self._prepared: set[str] = set()

    def __repr__(self) -> str:
        return f"<ReencryptionEngine tables={sorted(self.tables)} batch_size={self.batch_size}>"

    def table(self, table: str | TableSpec) -> TableSpec:
        if isinstance(table, TableSpec):
            return table
        try:
            return self.tables[table]
        except KeyError:
            raise KeyError(f"no table spec registered for {table!r}") from None

    async def _prepare(self, spec: TableSpec) -> None:
        if spec.name not in self._prepared:
            await self.database.prepare(spec)
            self._prepared.add(spec.name)

    # -- reporting ----------------------------------------------------------

    async def census(self, table: str | TableSpec) -> TableCensus:
        """Rows per key id per column, counted in SQL (nothing is decrypted)."""
        spec = self.table(table)
        await self._prepare(spec)
        return await self.database.census(spec)

    async def key_usage(self, tables: Iterable[str | TableSpec] | None = None) -> dict[str, int]:
        """Rows per key id over every column of ``tables`` (default: all registered).

        The shape ``KeyManager.census`` takes (``key_manager.census =
        engine.key_usage``), so cleanup destroys only keys no row uses any more.
        Every key of a key type these tables use is listed, with 0 when no row
        uses it: an explicit 0 is what lets cleanup destroy a key, while a key
        of a type the census does not cover (sessions, caches, blind indexes,
        tables elsewhere) is absent and therefore kept. Blind-index key versions
        are counted by ``aiocrypt.integrations.sqlalchemy.blind_index_usage``.
        """
        specs = [
            self.table(t) if isinstance(t, str) else t
            for t in (self.tables.values() if tables is None else tables)
        ]
        covered = {c.key_type for spec in specs for c in spec.columns}
        usage: dict[str, int] = {
            k.key_id: 0 for k in await self.key_manager.list_keys() if k.key_type in covered
        }
        for spec in specs:
            census = await self.census(spec)
            for by_key in census.counts.values():
                for key_id, rows in by_key.items():
                    if key_id is not None:
                        usage[key_id] = usage.get(key_id, 0) + rows
        return usage

    async def plan_shards(self, table: str | TableSpec, count: int) -> list[KeyRange]:
        """``count`` primary-key ranges of about equal size, for as many workers."""
        spec = self.table(table)
        await self._prepare(spec)
        bounds: list[Any] = []
        for value in await self.database.boundaries(spec, count):
            if not bounds or value != bounds[-1]:
                bounds.append(value)
        edges = [None, *bounds, None]
        return [KeyRange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]

    async def targets(self, table: str | TableSpec) -> dict[str, str]:
        """Column -> the key id a run would move it to (the active key of its key type)."""
        spec = self.table(table)
        keyring = await self.key_manager.ensure_active({c.key_type for c in spec.columns})
        return {c.name: keyring.active(c.key_type).key_id for c in spec.columns}

    # -- running ------------------------------------------------------------

    @staticmethod
    def job_id_for(spec: TableSpec, targets: Mapping[str, str], shard: KeyRange) -> str:
        """Stable id of (table, columns, target keys, shard): a rerun resumes its checkpoint."""
        material = json.dumps(
            [spec.to_dict(), sorted(targets.items()), shard.after, shard.until],
            default=str,
            sort_keys=True,
        )
        digest = hashlib.sha256(material.encode("utf-8")).hexdigest()[:24]
        return f"{spec.name}:{digest}"

    @traced("aiocrypt.reencrypt.run")
    async def reencrypt(
        self,
        table: str | TableSpec,
        *,
        columns: Iterable[str] | None = None,
        key_type: KeyTypeLike | None = None,
        shard: KeyRange | tuple[Any, Any] | None = None,
        job_id: str | None = None,
        max_batches: int | None = None,
    ) -> ReencryptionResult:
        """Move every value of the table (or shard) onto the active keys; resumable.

        All arguments are identifiers, so a job queue can carry them. Rerunning
        with the same arguments resumes from the checkpoint; once a job is
        complete, a rerun is a cheap verification pass. ``max_batches``: stop after
        that many batches committed (``result.stopped``; run again to resume).
        """
        if max_batches is not None and max_batches < 1:
            raise ValueError("max_batches must be at least 1")
        spec = self.table(table)
        if columns is not None or key_type is not None:
            spec = spec.select(columns, key_type)
        key_range = KeyRange.of(shard)
        await self._prepare(spec)
        keyring = await self.key_manager.ensure_active({c.key_type for c in spec.columns})
        cols = []
        for c in spec.columns:
            target = keyring.require_encryptable(c.key_type)
            context = spec.context_for(c)
            context_bytes(context)  # validates it once: the hot loop only encodes it
            level = (
                self.compression_level
                if self.compression_level is not None
                else self.key_manager.config.compression_level_for(c.key_type)
            )
            reader = None
            if c.legacy_reader is not None:
                reader = self.legacy_readers.get(c.legacy_reader)
                if reader is None:
                    raise ValueError(
                        f"{spec.name}.{c.name}: no legacy reader named "
                        f"{c.legacy_reader!r} was given (legacy_readers=)"
                    )
            # the target's version 2 prefix: its version 1 tokens are re-encrypted too
            cols.append(_Column(c, context, text_prefix(target.key_id), target, level, reader))
        targets = {c.spec.name: c.target.key_id for c in cols}
        job = job_id or self.job_id_for(spec, targets, key_range)
        annotate(
            table=spec.name, columns=len(cols), target_key_ids=tuple(sorted(set(targets.values())))
        )

        checkpoint = await self.database.load_checkpoint(job)
        resumed_from = None
        if checkpoint is None:
            checkpoint = Checkpoint(job, spec.name)
        elif checkpoint.done:
            checkpoint.pass_no += 1
            checkpoint.last_pk = None
            checkpoint.done = False
        else:
            resumed_from = checkpoint.last_pk
            logger.info("re-encryption %s resumes after batch %d", job, checkpoint.batches)

        stats = _RunStats()
        started = time.monotonic()
        passes = 0
        target_changed = False
        while True:
            passes += 1
            # A pass resumed mid-table proves nothing about the rows before its start
            # (a concurrent writer may have left some on an old key): only a sweep from
            # the start that finds nothing completes the job, and it is always run.
            full_sweep = checkpoint.last_pk is None
            read, target_changed, stopped = await self._pass(
                spec, cols, key_range, checkpoint, stats, started, max_batches
            )
            if (
                stopped
                or target_changed
                or (full_sweep and (read == 0 or passes >= self.max_passes))
            ):
                break
            checkpoint.pass_no += 1
            checkpoint.last_pk = None
            await self.database.save_checkpoint(checkpoint)
        complete = (
            not stopped
            and not target_changed
            and read == 0
            and full_sweep
            and not stats.rows_failed
        )
        if complete:
            checkpoint.done = True
            await self.database.save_checkpoint(checkpoint)
        elapsed = time.monotonic() - started
        logger.info(
            "re-encryption %s: %d rows updated in %d batches, %.1f s%s",
            job,
            stats.rows_updated,
            stats.batches,
            elapsed,
            "" if complete else " (stopped after max_batches)" if stopped else " (incomplete)",
        )
        annotate(
            outcome="complete"
            if complete
            else "stopped"
            if stopped
            else "target_changed"
            if target_changed
            else "incomplete",
            rows=stats.rows_updated,
            batches=stats.batches,
            passes=passes,
        )
        return ReencryptionResult(
            job_id=job,
            table=spec.name,
            targets=targets,
            run_batches=stats.batches,
            run_rows_read=stats.rows_read,
            run_rows_updated=stats.rows_updated,
            run_rows_conflicted=stats.rows_conflicted,
            run_rows_failed=stats.rows_failed,
            passes=passes,
            resumed_from=resumed_from,
            checkpoint=checkpoint,
            elapsed=elapsed,
            complete=complete,
            target_changed=target_changed,
            failed_primary_keys=tuple(stats.failed_pks),
            failures=tuple(stats.failures),
            stopped=stopped,
        )

    async def _pass(  # noqa: C901 - the pipelined batch loop: reads, crypto, writes and checkpoints overlap in one place
        self,
        spec: TableSpec,
        cols: list[_Column],
        key_range: KeyRange,
        checkpoint: Checkpoint,
        stats: _RunStats,
        started: float,
        max_batches: int | None = None,
    ) -> tuple[int, bool, bool]:
        """One sweep from the checkpoint to the end of the range: (rows read, target
        changed, stopped after ``max_batches`` batches of the run)."""
        db = self.database
        prefixes = [c.prefix for c in cols]
        limit = self.batch_size
        pipelined = db.supports_pipelining

        def fetch(after: Any) -> asyncio.Task[Sequence[Sequence[Any]]]:
            return asyncio.ensure_future(
                db.fetch_batch(spec, prefixes, after, key_range.until, limit)
            )

        read = 0
        target_changed = stopped = False
        next_fetch: asyncio.Task[Sequence[Sequence[Any]]] | None = fetch(
            checkpoint.last_pk if checkpoint.last_pk is not None else key_range.after
        )
        writing: asyncio.Task[None] | None = None
        try:
            while next_fetch is not None:
                rows = await next_fetch
                next_fetch = None
                if not rows:
                    break
                last_pk = rows[-1][0]
                if len(rows) == limit and pipelined:
                    next_fetch = fetch(last_pk)
                # Let the fetch just started and the write started last time send their
                # queries now: an await of something already done does not yield, and
                # the transform below holds the loop, so they would otherwise wait for
                # it and the server would sit idle instead of working alongside.
                await asyncio.sleep(0)
                keyring = await self.key_manager.current_keyring()
                if any(_active_id(keyring, c.spec.key_type) != c.target.key_id for c in cols):
                    logger.warning(
                        "re-encryption %s: a target key rotated during the run; "
                        "stopping (run again for the new key)",
                        checkpoint.job_id,
                    )
                    target_changed = True
                    break
                batch, failures = await self._transform(spec, cols, rows)
                failed, stale = _first_failures(failures, stats)
                read += len(rows) - stale
                if writing is not None:
                    await writing
                    writing = None
                    await self._after_commit(checkpoint, stats, started)
                stats.failed_pks.extend(failed[: max(0, 100 - len(stats.failed_pks))])
                stats.failures.extend(
                    [f for f in failures if f.primary_key in failed][
                        : max(0, 100 - len(stats.failures))
                    ]
                )
                writing = asyncio.ensure_future(
                    self._commit(spec, batch, checkpoint, stats, last_pk, len(rows), len(failed))
                )
                if not pipelined:
                    await writing
                    writing = None
                    await self._after_commit(checkpoint, stats, started)
                if max_batches is not None and stats.batches + (writing is not None) >= max_batches:
                    stopped = True
                    break
                if len(rows) == limit and not pipelined:
                    next_fetch = fetch(last_pk)
            if writing is not None:
                await writing
                writing = None
                await self._after_commit(checkpoint, stats, started)
        finally:
            for task in (next_fetch, writing):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
        return read, target_changed, stopped

    @traced("aiocrypt.reencrypt.batch")
    async def _commit(
        self,
        spec: TableSpec,
        batch: WriteBatch,
        checkpoint: Checkpoint,
        stats: _RunStats,
        last_pk: Any,
        rows_read: int,
        failed: int,
    ) -> None:
        annotate(table=spec.name, columns=len(batch.new), rows=rows_read, rows_failed=failed)
        pending = Checkpoint(
            checkpoint.job_id,
            checkpoint.table,
            checkpoint.pass_no,
            last_pk,
            checkpoint.batches + 1,
            checkpoint.rows_read + rows_read,
            checkpoint.rows_updated,
            checkpoint.rows_conflicted,
            checkpoint.rows_failed + failed,
        )
        updated = await self.database.write_batch(spec, batch, pending)
        conflicted = len(batch) - updated
        annotate(rows_updated=updated, rows_conflicted=conflicted, batch=pending.batches)
        count("aiocrypt.reencrypt.rows", updated, table=spec.name)
        pending.rows_updated += updated
        pending.rows_conflicted += conflicted
        (
            checkpoint.last_pk,
            checkpoint.batches,
            checkpoint.rows_read,
            checkpoint.rows_updated,
            checkpoint.rows_conflicted,
            checkpoint.rows_failed,
        ) = (
            pending.last_pk,
            pending.batches,
            pending.rows_read,
            pending.rows_updated,
            pending.rows_conflicted,
            pending.rows_failed,
        )
        stats.batches += 1
        stats.rows_read += rows_read
        stats.rows_updated += updated
        stats.rows_conflicted += conflicted
        stats.rows_failed += failed

    async def _after_commit(self, checkpoint: Checkpoint, stats: _RunStats, started: float) -> None:
        elapsed = time.monotonic() - started
        if self.progress is not None:
            outcome = self.progress(
                ReencryptionProgress(
                    checkpoint.job_id,
                    checkpoint.table,
                    checkpoint.pass_no,
                    checkpoint.batches,
                    checkpoint.rows_read,
                    checkpoint.rows_updated,
                    checkpoint.rows_conflicted,
                    checkpoint.rows_failed,
                    checkpoint.last_pk,
                    stats.batches,
                    stats.rows_updated,
                    elapsed,
                )
            )
            if inspect.isawaitable(outcome):
                await outcome
        if self.rate_limit is not None:
            delay = stats.rows_read / self.rate_limit - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)

    async def _transform(
        self, spec: TableSpec, cols: list[_Column], rows: Sequence[Sequence[Any]]
    ) -> tuple[WriteBatch, list[ReencryptionError]]:
        keyring = self.key_manager.keyring
        try:
            return self._transform_sync(spec, cols, rows, keyring)
        except UnknownKeyError as exc:
            # A token from a key this process has not loaded yet (rotated elsewhere).
            if await self.key_manager.load_key(exc.key_id) is None:
                return self._transform_sync(
                    spec, cols, rows, self.key_manager.keyring, unknown_fails=True
                )
            return await self._transform(spec, cols, rows)

    def _transform_sync(  # noqa: C901 - the re-encryption hot loop, inlined on purpose (a call per value costs more than the crypto)
        self,
        spec: TableSpec,
        cols: list[_Column],
        rows: Sequence[Sequence[Any]],
        keyring: Keyring,
        *,
        unknown_fails: bool = False,
    ) -> tuple[WriteBatch, list[ReencryptionError]]:
        n = len(cols)
        pks: list[Any] = []
        old: list[list[Any]] = [[] for _ in range(n)]
        new: list[list[str | None]] = [[] for _ in range(n)]
        failed: list[ReencryptionError] = []
        # One getrandom call per batch instead of one per token (the hot loop's
        # largest fixed cost); each nonce is still 96 fresh random bits.
        randomness = os.urandom(NONCE_BYTES * n * len(rows))
        offset = 0
        decrypt = keyring.decrypt_bytes
        for row in rows:
            pk = row[0]
            out: list[str | None] = [None] * n
            row_failed = False
            for i, col in enumerate(cols):
                value = row[i + 1]
                if value is None or (
                    type(value) is str and value.startswith((col.prefix, SUBJECT_TOKEN_PREFIX))
                ):
                    continue  # on target, or a data subject's (rewrapped, not moved)
                if col.row_bound:
                    context = row_context(col.context, pk)
                    ctx = context.encode("utf-8")
                else:
                    context, ctx = col.context, col.context_bytes
                try:
                    # The common case inline: a token of a loaded key. Anything else (a
                    # legacy value, a failure, a key not loaded yet) goes through
                    # _plaintext, which decides again and says why: only failures pay.
                    try:
                        if type(value) is not str or not value.startswith(TEXT_PREFIXES):
                            raise DecryptionError("not a token")
                        plaintext = decrypt(value, col.key_type, context, for_reencryption=True)
                    except DecryptionError:
                        plaintext = self._plaintext(
                            spec, col, keyring, value, context, pk, unknown_fails
                        )
                except ReencryptionError as exc:
                    if self.on_error == "raise":
                        raise
                    # this value stays; the row's other columns still move
                    failed.append(exc)
                    row_failed = True
                    continue
                level = col.compression_level
                flags = 0
                if level is not None:
                    plaintext = _compression.compress(plaintext, level)
                    flags = FLAG_ZSTD
                if col.deterministic:
                    out[i] = col.target.seal_deterministic(plaintext, ctx, flags)
                else:
                    out[i] = col.target.seal_text(
                        plaintext, ctx, flags, randomness[offset : offset + NONCE_BYTES]
                    )
                    offset += NONCE_BYTES
            if row_failed and all(o is None for o in out):
                continue  # nothing of it to write
            pks.append(pk)
            for i in range(n):
                old[i].append(row[i + 1])
                new[i].append(out[i])
        return WriteBatch(pks, old, new), failed

    @staticmethod
    def _plaintext(
        spec: TableSpec,
        col: _Column,
        keyring: Keyring,
        value: Any,
        context: str,
        pk: Any,
        unknown_fails: bool,
    ) -> bytes:
        reason: DecryptionFailure | None = None
        key_id: str | None = None
        if type(value) is str and value.startswith(TEXT_PREFIXES):
            try:
                return keyring.decrypt_bytes(
                    value, col.spec.key_type, context, for_reencryption=True
                )
            except UnknownKeyError as exc:
                if not unknown_fails:
                    raise
                reason, key_id = exc.reason, exc.key_id
            except DecryptionError as exc:
                reason, key_id = exc.reason, exc.key_id
        elif col.spec.legacy_type is not None:
            try:
                raw = value if col.reader is None else col.reader.open(value)
                return encode_value(parse_legacy(col.spec.legacy_type, raw))
            except ValueError:  # LegacyTokenError too: it does not say why
                reason = DecryptionFailure.AUTHENTICATION_FAILED if col.reader is not None else None
        raise ReencryptionError(spec.name, col.spec.name, pk, reason=reason, key_id=key_id)


def _first_failures(
    failures: Sequence[ReencryptionError], stats: _RunStats
) -> tuple[list[Any], int]:
    """(primary keys failing for the first time in this run, rows of known failures only).

    A value that does not decrypt stays where it is, so every later pass reads
    its row again: it is reported (and logged) once, and a pass that reads only
    such rows does not call for another pass.
    """
    new: list[Any] = []
    rows: dict[str, bool] = {}  # row -> whether any of its failures is new
    for exc in failures:
        row = json.dumps(exc.primary_key, default=str)
        seen = (row, exc.column) in stats.failed_seen
        if not seen:
            stats.failed_seen.add((row, exc.column))
            logger.warning(
                "re-encryption left a value that does not decrypt: %s (primary key %r)",
                exc,
                exc.primary_key,
            )
            if row not in rows or not rows[row]:
                # a key is in new only if its row was marked fresh right after; two rows
                # of one table whose equal keys dump differently (1 and 1.0) do not occur
                if exc.primary_key not in new:  # pragma: no branch - always new here
                    new.append(exc.primary_key)
        rows[row] = rows.get(row, False) or not seen
    return new, sum(1 for fresh in rows.values() if not fresh)


def _active_id(keyring: Keyring, key_type: KeyType) -> str | None:
    dk = keyring.active_keys.get(key_type)
    return None if dk is None else dk.key_id
