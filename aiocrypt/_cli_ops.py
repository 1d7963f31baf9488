"""``aiocrypt reencrypt`` and ``census``: the data.

They drive the core :class:`ReencryptionEngine` over :class:`AsyncpgDatabase`; the
tables come from ``--table/--pk/--column`` options or from SQLAlchemy model
metadata (``--models package.module``). ``init`` and ``doctor`` are in
``_cli_setup.py``.

Over 500 lines since ruff format spread the click options one per line: the
commands share the table options, the reporter and the database opening, and
are read as one operator surface (docs/cli.md).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import click
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ._cli_base import (
    EXIT_CONFIG,
    EXIT_FAILED,
    console,
    echo_json,
    err_console,
    fail,
    json_option,
    load_config,
)
from ._cli_reencrypt import ShardTask, reencrypt_sharded, reencrypt_table
from ._errors import AiocryptError, ConfigurationError
from ._factory import build_key_manager
from ._format import text_prefix
from ._legacy import LegacyReader
from ._manager import KeyManager
from ._types import KeyType
from ._urls import redact_url
from .reencrypt import (
    DEFAULT_CHECKPOINT_TABLE,
    ColumnSpec,
    ReencryptionEngine,
    ReencryptionProgress,
    TableSpec,
)

if TYPE_CHECKING:
    from .reencrypt import AsyncpgDatabase

# -- which tables ----------------------------------------------------------------------


def _parse_column(text: str) -> ColumnSpec:
    name, sep, rest = text.partition(":")
    if not sep or not rest:
        raise click.BadParameter(f"{text!r}: use NAME:KEY_TYPE[:CONTEXT]", param_hint="--column")
    key_type, _, context = rest.partition(":")
    try:
        return ColumnSpec(name, KeyType(key_type), context=context or None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--column") from None


def _models_metadata(target: str) -> list[Any]:
    """The SQLAlchemy ``MetaData`` objects ``--models MODULE[:OBJECT]`` names."""
    try:
        import sqlalchemy as sa
    except ImportError as exc:  # pragma: no cover - the dev extra installs sqlalchemy
        raise ImportError(f"{exc}: --models needs pip install 'aiocrypt[sqlalchemy]'") from None
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"--models {target}: cannot import {module_name} ({exc})"
        ) from None
    candidates = [getattr(module, attr)] if attr else list(vars(module).values())
    found: dict[int, sa.MetaData] = {}
    for obj in candidates:
        metadata = (
            obj
            if isinstance(obj, sa.MetaData)
            else (getattr(obj, "metadata", None) if isinstance(obj, type) else None)
        )
        if isinstance(metadata, sa.MetaData):
            found[id(metadata)] = metadata
    return list(found.values())


def _specs_from_models(target: str, only: Sequence[str]) -> list[TableSpec]:
    from .integrations.sqlalchemy import table_specs

    specs = [
        spec
        for md in _models_metadata(target)
        for spec in table_specs(md, list(only) if only else None)
    ]
    if not specs:
        raise ConfigurationError(f"--models {target}: no table with encrypted columns found")
    return specs


def legacy_readers_from_models(target: str | None) -> list[LegacyReader]:
    """The legacy readers the models' columns declare (``legacy=``): their keys come from
    the application's own module, never from the command line or a job argument."""
    if target is None:
        return []
    from .integrations.sqlalchemy import legacy_readers

    readers: dict[str, LegacyReader] = {}
    for metadata in _models_metadata(target):
        for reader in legacy_readers(metadata):
            readers.setdefault(reader.name, reader)
    return list(readers.values())


def table_specs_from_options(
    tables: Sequence[str], pk: str, columns: Sequence[str], models: str | None
) -> list[TableSpec]:
    """The tables a ``reencrypt`` / ``census`` run covers, from its options."""
    if models:
        if columns:
            raise click.UsageError("give --models or --column, not both")
        return _specs_from_models(models, tables)
    if not columns:
        if tables:
            raise click.UsageError(
                "--table needs at least one --column NAME:KEY_TYPE (or use --models)"
            )
        return []
    if len(tables) != 1:
        raise click.UsageError("--column needs exactly one --table")
    try:
        return [TableSpec(tables[0], pk, tuple(_parse_column(c) for c in columns))]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def table_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--dsn",
            envvar="ENCRYPTION_POSTGRES_DSN",
            default=None,
            help="PostgreSQL DSN of the data (default: ENCRYPTION_POSTGRES_DSN)",
        ),
        click.option(
            "--table",
            "tables",
            multiple=True,
            help="table name (schema.table allowed); with --models, a filter",
        ),
        click.option("--pk", default="id", show_default=True, help="its single-column primary key"),
        click.option(
            "--column",
            "columns",
            multiple=True,
            metavar="NAME:KEY_TYPE[:CONTEXT]",
            help="an encrypted column, its key type and context (default context "
            "TABLE.NAME); repeatable",
        ),
        click.option(
            "--models",
            default=None,
            metavar="MODULE[:OBJECT]",
            help="take tables and columns from SQLAlchemy model metadata",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _require_dsn(dsn: str | None) -> str:
    if not dsn:
        fail("no database: pass --dsn or set ENCRYPTION_POSTGRES_DSN", EXIT_CONFIG)
    return dsn


def _asyncpg_database(dsn: str, checkpoint_table: str) -> AsyncpgDatabase:
    try:
        from .reencrypt import AsyncpgDatabase
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"{exc}: pip install 'aiocrypt[postgres]'") from None
    return AsyncpgDatabase(dsn, checkpoint_table=checkpoint_table)


def _dsn_origin() -> str:
    """Where the running command's --dsn came from: the option or the variable."""
    ctx = click.get_current_context(silent=True)
    source = None if ctx is None else ctx.get_parameter_source("dsn")
    if source is click.core.ParameterSource.COMMANDLINE:
        return "check the --dsn option"
    return "check ENCRYPTION_POSTGRES_DSN, or pass --dsn"


async def _open_database(dsn: str, checkpoint_table: str) -> AsyncpgDatabase:
    """The data's database, connected now: one that cannot be reached is one error naming
    the DSN (redacted) and the setting to check (exit 4, or 3 for a refused login)."""
    database = _asyncpg_database(dsn, checkpoint_table)  # says which extra if asyncpg is missing
    import asyncpg

    try:
        await database.__aenter__()
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError) as exc:
        await database.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AiocryptError(
            f"cannot reach the PostgreSQL database at {redact_url(dsn)} "
            f"({_dsn_origin()}): {reason or type(exc).__name__}"
        ) from exc
    except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError) as exc:
        await database.close()
        raise ConfigurationError(
            f"the PostgreSQL database at {redact_url(dsn)} refused the "
            f"connection ({_dsn_origin()}): {exc}"
        ) from None
    return database


def _prefixes(manager: KeyManager, spec: TableSpec) -> list[str]:
    """Each column's target prefix (a never-matching one when its type has no key yet)."""
    active = manager.keyring.active_keys
    return [
        text_prefix(active[c.key_type].key_id) if c.key_type in active else "\x7f"
        for c in spec.columns
    ]


# -- reencrypt -------------------------------------------------------------------------


class _Reporter:
    """A rich progress bar on a terminal, plain lines (at most one a second) otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.live = err_console.is_terminal and not quiet
        self.progress: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._last_line = 0.0
        self._totals: dict[str, int] = {}

    def __enter__(self) -> _Reporter:
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=err_console,
                transient=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def start(self, table: str, total: int) -> None:
        self._totals[table] = total
        if self.progress is not None:
            self._tasks[table] = self.progress.add_task(table, total=max(total, 1), rate="0")
        else:
            click.echo(f"{table}: {total:,} rows to re-encrypt", err=True)

    def update(self, event: ReencryptionProgress, base: int) -> None:
        """After a batch of a run in this process."""
        self.advance(
            event.table,
            event.rows_read - base,
            event.rows_per_second,
            f"batch {event.batches}, ",
            f", {event.run_rows_updated:,} updated",
            first=event.run_batches == 1,
        )

    def advance(
        self,
        table: str,
        done: int,
        rate: float,
        before: str = "",
        after: str = "",
        *,
        first: bool = False,
    ) -> None:
        """``done`` rows of ``table`` read by this run so far (``--jobs``: all shards')."""
        if self.progress is not None:
            self.progress.update(self._tasks[table], completed=done, rate=f"{rate:,.0f}")
            return
        now = time.monotonic()
        if now - self._last_line >= 1.0 or first:
            self._last_line = now
            click.echo(
                f"{table}: {before}{done:,}/{self._totals.get(table, 0):,} rows"
                f"{after} ({rate:,.0f} rows/s)",
                err=True,
            )


@click.command("reencrypt")
@table_options
@click.option("--key-type", default=None, help="only columns of this key type")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="at most this many rows per second",
)
@click.option(
    "--max-batches",
    type=click.IntRange(min=1),
    default=None,
    help="stop each table after N batches (run again to resume)",
)
@click.option(
    "--skip-errors",
    is_flag=True,
    help="leave values that do not decrypt in place and list their primary keys "
    "(default: stop at the first)",
)
@click.option("--checkpoint-table", default=DEFAULT_CHECKPOINT_TABLE, show_default=True)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="processes (one per core): each table is cut into 4 primary-key ranges "
    "per process, each process taking the next free range when done with one",
)
@click.option("--dry-run", is_flag=True, help="only count the rows that would be re-encrypted")
@json_option
def reencrypt(  # noqa: C901 - a click command: its option combinations checked in place, one guard each
    dsn: str | None,
    tables: tuple[str, ...],
    pk: str,
    columns: tuple[str, ...],
    models: str | None,
    key_type: str | None,
    batch_size: int,
    rate: float | None,
    max_batches: int | None,
    skip_errors: bool,
    checkpoint_table: str,
    jobs: int,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Move every encrypted value of Postgres tables onto the active keys.

    Resumable: each batch commits with its checkpoint, so after Ctrl-C or a crash
    the same command continues where it stopped. Rows an application changes
    meanwhile are never overwritten (compare-and-swap). With --jobs N, N processes
    share each table (--rate and --max-batches then apply to each process); a
    rerun with any --jobs skips the rows already moved.
    """
    specs = table_specs_from_options(tables, pk, columns, models)
    if not specs:
        raise click.UsageError("name the data: --table T --column NAME:KEY_TYPE, or --models")
    if key_type is not None:
        specs = [
            s.select(key_type=key_type)
            for s in specs
            if any(c.key_type == KeyType(key_type) for c in s.columns)
        ]
        if not specs:
            raise click.UsageError(f"no column named has key type {key_type!r} (--key-type)")
    database_dsn = _require_dsn(dsn)
    config = load_config()

    async def main() -> list[dict[str, Any]]:
        manager = build_key_manager(config, watch=False)
        database = await _open_database(database_dsn, checkpoint_table)
        engine = ReencryptionEngine(
            manager,
            database,
            tables=specs,
            batch_size=batch_size,
            rate_limit=rate,
            on_error="skip" if skip_errors else "raise",
            legacy_readers=legacy_readers_from_models(models),
        )
        async with manager:
            try:
                if dry_run:
                    return [await _dry_run(manager, database, spec) for spec in specs]
                with _Reporter(quiet=False) as reporter:
                    results = []
                    for spec in specs:
                        reporter.start(
                            spec.name, await database.count_rows(spec, _prefixes(manager, spec))
                        )
                        if jobs == 1:
                            results.append(
                                await reencrypt_table(
                                    engine,
                                    spec,
                                    on_progress=reporter.update,
                                    max_batches=max_batches,
                                )
                            )
                            continue
                        task = ShardTask(
                            spec,
                            database_dsn,
                            checkpoint_table,
                            batch_size,
                            None if rate is None else rate / jobs,
                            skip_errors,
                            max_batches,
                            models,
                        )
                        results.append(
                            await reencrypt_sharded(
                                engine, task, jobs, functools.partial(reporter.advance, spec.name)
                            )
                        )
                    return results
            finally:
                await database.close()

    results = asyncio.run(main())
    if as_json:
        echo_json(results)
    else:
        for r in results:
            if dry_run:
                click.echo(
                    f"{r['table']}: {r['pending_rows']:,} of {r['rows']:,} rows would "
                    "be re-encrypted (dry run: nothing changed)"
                )
                continue
            run = r["run"]
            state = (
                "complete"
                if r["complete"]
                else "stopped after --max-batches: run again to resume"
                if r["stopped"]
                else "INCOMPLETE"
            )
            resumed = (
                ""
                if r["resumed_from"] is None
                else f" (resumed after primary key {r['resumed_from']})"
            )
            click.echo(
                f"{r['table']}: {run['rows_updated']:,} rows re-encrypted in "
                f"{run['batches']} batches{resumed}; {state}"
            )
            if run["rows_failed"]:
                click.echo(
                    f"  {run['rows_failed']} rows did not decrypt and were left: "
                    f"primary keys {r['failed_primary_keys']}",
                    err=True,
                )
                for f in r["failures"]:
                    click.echo(
                        f"    {r['table']}.{f['column']} primary key {f['primary_key']}: "
                        f"{f['reason'] or 'not a token'}"
                        + (f" (key {f['key_id']})" if f["key_id"] else ""),
                        err=True,
                    )
    if not dry_run and any(not r["complete"] and not r["stopped"] for r in results):
        sys.exit(EXIT_FAILED)


async def _dry_run(
    manager: KeyManager, database: AsyncpgDatabase, spec: TableSpec
) -> dict[str, Any]:
    census = await database.census(spec)
    active = manager.keyring.active_keys
    targets = {
        c.name: active[c.key_type].key_id if c.key_type in active else None for c in spec.columns
    }
    pending = await database.count_rows(spec, _prefixes(manager, spec))
    total = await database.count_rows(spec)
    return {
        "table": spec.name,
        "rows": total,
        "pending_rows": pending,
        "targets": targets,
        "values_off_target": census.off_target({k: v for k, v in targets.items() if v}),
    }


# -- census ----------------------------------------------------------------------------


@click.command("census")
@table_options
@json_option
def census(  # noqa: C901 - a click command: its option combinations checked in place, one guard each
    dsn: str | None,
    tables: tuple[str, ...],
    pk: str,
    columns: tuple[str, ...],
    models: str | None,
    as_json: bool,
) -> None:
    """Rows per key version per table and column (counted in SQL), and keys per status."""
    specs = table_specs_from_options(tables, pk, columns, models)
    config = load_config()
    database_dsn = _require_dsn(dsn) if specs else ""

    async def main() -> dict[str, Any]:
        async with build_key_manager(config, watch=False) as manager:
            keys = {k.key_id: k for k in await manager.list_keys()}
            by_status: dict[str, dict[str, int]] = {}
            for key in keys.values():
                per_type = by_status.setdefault(key.key_type.value, {})
                per_type[key.status.value] = per_type.get(key.status.value, 0) + 1
            out_tables = []
            if specs:
                database = await _open_database(database_dsn, DEFAULT_CHECKPOINT_TABLE)
                try:
                    for spec in specs:
                        counted = await database.census(spec)
                        cols = {}
                        for column, by_key in counted.counts.items():
                            cols[column] = [
                                {
                                    "key_id": kid,
                                    "version": keys[kid].version if kid in keys else None,
                                    "status": keys[kid].status.value
                                    if kid in keys
                                    else ("not a token" if kid is None else "unknown key"),
                                    "rows": rows,
                                }
                                for kid, rows in sorted(
                                    by_key.items(), key=lambda kv: (kv[0] is None, kv[0] or "")
                                )
                            ]
                        out_tables.append({"table": spec.name, "columns": cols})
                finally:
                    await database.close()
            return {"keys": by_status, "tables": out_tables}

    result = asyncio.run(main())
    if as_json:
        echo_json(result)
        return
    keys_table = Table("key type", "status", "keys", title="keys per status", title_justify="left")
    for kt, per_status in sorted(result["keys"].items()):
        for st, n in sorted(per_status.items()):
            keys_table.add_row(kt, st, str(n))
    console.print(keys_table)
    if result["tables"]:
        rows_table = Table(
            "table",
            "column",
            "version",
            "status",
            "rows",
            title="rows per key version",
            title_justify="left",
        )
        rows_table.add_column("key id", no_wrap=True)
        for t in result["tables"]:
            for column, entries in t["columns"].items():
                for e in entries:
                    rows_table.add_row(
                        t["table"],
                        column,
                        str(e["version"] or "-"),
                        e["status"],
                        f"{e['rows']:,}",
                        e["key_id"] or "-",
                    )
        console.print(rows_table)


def census_from_options(
    dsn: str | None, tables: Sequence[str], pk: str, columns: Sequence[str], models: str | None
) -> Callable[[KeyManager], Awaitable[dict[str, int]]] | None:
    """The census a key command (``keys retire``, ``min-version``) consults: rows per key
    id over the tables named as for ``census`` and ``reencrypt``, in the shape
    ``KeyManager`` takes (``ReencryptionEngine.key_usage``: every key of a key type these
    columns use is listed, 0 when no row holds it). None when no table is named."""
    specs = table_specs_from_options(tables, pk, columns, models)
    if not specs:
        return None
    database_dsn = _require_dsn(dsn)

    async def count(manager: KeyManager) -> dict[str, int]:
        database = await _open_database(database_dsn, DEFAULT_CHECKPOINT_TABLE)
        try:
            return await ReencryptionEngine(manager, database, tables=specs).key_usage()
        finally:
            await database.close()

    return count
