"""``aiocrypt init``, ``doctor``, ``reencrypt`` and ``census``: setting up, checking, and the data.

``reencrypt`` and ``census`` drive the core :class:`ReencryptionEngine` over
:class:`AsyncpgDatabase`; the tables come from ``--table/--pk/--column``
options or from SQLAlchemy model metadata (``--models package.module``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import importlib
import json
import os
import shlex
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
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
    EXIT_OK,
    EXIT_UNREACHABLE,
    console,
    describe,
    echo_json,
    err_console,
    exit_code_for,
    fail,
    json_option,
    load_config,
)
from ._cli_reencrypt import ShardTask, reencrypt_sharded, reencrypt_table
from ._config import (
    DEFAULT_CONFIG_FILE,
    DEFAULT_ROTATION_POLICIES,
    DEFAULT_STORAGE_PATH,
    MASTER_KEY_FILE_VAR,
    EncryptionConfig,
)
from ._errors import AiocryptError, ConfigurationError
from ._factory import build_kek_provider, build_key_manager, build_key_store
from ._format import text_prefix
from ._legacy import LegacyReader
from ._manager import KeyManager
from ._types import KeyType
from ._urls import redact_url
from .reencrypt import (
    DEFAULT_CHECKPOINT_TABLE,
    ColumnSpec,
    KeyRange,
    ReencryptionEngine,
    ReencryptionProgress,
    TableSpec,
)

if TYPE_CHECKING:
    from .reencrypt import AsyncpgDatabase

# -- init ------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Atomically write ``data`` to ``path`` with ``mode`` (the temp file has it from birth)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def default_key_file(project: Path | None = None) -> Path:
    """Where ``init`` puts the master key by default: outside the project tree, in the
    user's configuration directory, ``$XDG_CONFIG_HOME/aiocrypt/<project>-<hash>/master.key``
    (``~/.config`` when XDG_CONFIG_HOME is unset). The hash of the project's absolute
    path keeps two projects of the same name apart."""
    project = (project or Path.cwd()).resolve()
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    digest = hashlib.sha256(os.fsencode(project)).hexdigest()[:8]
    return base / "aiocrypt" / f"{project.name or 'root'}-{digest}" / "master.key"


IN_PROJECT_KEY_FILE = Path(".aiocrypt/master.key")


def git_work_tree(path: Path) -> Path | None:
    """The git work tree ``path`` lies in (a parent holding ``.git``), or None."""
    for parent in path.resolve().parents:
        if (parent / ".git").exists():
            return parent
    return None


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def _ignore_in_git(key_file: Path) -> Path:
    """A ``.gitignore`` beside ``key_file`` that covers it (added to one already there)."""
    gitignore = key_file.parent / ".gitignore"
    entry = f"/{key_file.name}"
    lines = gitignore.read_text(encoding="utf-8").splitlines() if gitignore.exists() else []
    if entry not in lines and key_file.name not in lines:
        prefix = "" if not lines or gitignore.read_text(encoding="utf-8").endswith("\n") \
            else "\n"
        with open(gitignore, "a", encoding="utf-8") as fh:
            fh.write(f"{prefix}# the aiocrypt master key: never commit it\n{entry}\n")
    return gitignore


@click.command("init")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="where to write the new master key (mode 0600); default: outside the "
                   "project, $XDG_CONFIG_HOME/aiocrypt/<project>-<hash>/master.key "
                   "(~/.config when unset)")
@click.option("--key-in-project", is_flag=True,
              help=f"write the key to {IN_PROJECT_KEY_FILE} in the project instead, with a "
                   ".gitignore that covers it")
@click.option("--no-key-file", is_flag=True,
              help="write no key file (then --show-key or --print-export is required)")
@click.option("--config-file", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(DEFAULT_CONFIG_FILE), show_default=True,
              help="the JSON config file to write (defaults, rotation policies)")
@click.option("--performance-mode", type=click.Choice(["security", "balanced", "performance"]),
              default="balanced", show_default=True)
@click.option("--show-key", is_flag=True, help="also print the key on stdout (warns on stderr)")
@click.option("--print-export", is_flag=True,
              help="print an 'export ENCRYPTION_MASTER_KEY=...' line on stdout (warns on stderr)")
@click.option("--force", is_flag=True, help="overwrite existing files")
@json_option
def init(key_file: Path | None, key_in_project: bool, no_key_file: bool, config_file: Path,
         performance_mode: str, show_key: bool, print_export: bool, force: bool,
         as_json: bool) -> None:
    """Generate a master key and a config file.

    The key goes to a 0600 file outside the project tree (see --key-file) and is
    never printed unless --show-key or --print-export asks for it. A key file
    inside the project or a git work tree gets a .gitignore beside it. Existing
    files are kept unless --force.
    """
    if no_key_file and not (show_key or print_export):
        raise click.UsageError("--no-key-file needs --show-key or --print-export "
                               "(the key would be lost)")
    if key_in_project and key_file is not None:
        raise click.UsageError("--key-in-project and --key-file are exclusive")
    outside = key_file is None and not key_in_project
    if key_file is None:
        key_file = IN_PROJECT_KEY_FILE if key_in_project else default_key_file()
    targets = [config_file] + ([] if no_key_file else [key_file])
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        fail(f"{', '.join(existing)} already exist(s); use --force to overwrite")
    key = base64.b64encode(os.urandom(32)).decode("ascii")
    settings = {
        "algorithm": "AES_256_GCM",
        "key_size_bits": 256,
        "performance_mode": performance_mode,
        "compression_enabled": False,
        "rotation_policies": [p.to_dict() for p in DEFAULT_ROTATION_POLICIES.values()],
    }
    gitignore: Path | None = None
    if not no_key_file:
        _write_private(key_file, (key + "\n").encode("ascii"), 0o600)
        if outside:
            os.chmod(key_file.parent, 0o700)  # our own directory, even if it existed
        elif _inside(key_file, Path.cwd()) or git_work_tree(key_file) is not None:
            gitignore = _ignore_in_git(key_file)
    store_dir = None
    if not os.environ.get("ENCRYPTION_KEY_STORAGE_PATH", "").strip():
        # the default file store's directory: the store creates keys.json, not the folder
        store_dir = Path(DEFAULT_STORAGE_PATH).parent
        store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_file.parent.mkdir(parents=True, exist_ok=True)
    _write_private(config_file, (json.dumps(settings, indent=2) + "\n").encode("utf-8"), 0o644)
    if show_key or print_export:
        click.echo("warning: the master key is printed on stdout; whoever sees it can open "
                   "every data key: keep it out of logs and shell history", err=True)
    next_steps = []
    if not no_key_file:
        next_steps.append(f"export {MASTER_KEY_FILE_VAR}={shlex.quote(str(key_file))}")
    if config_file != Path(DEFAULT_CONFIG_FILE):
        next_steps.append(f"export ENCRYPTION_CONFIG_FILE={shlex.quote(str(config_file))}")
    next_steps.append("aiocrypt doctor")
    if as_json:
        out: dict[str, Any] = {"key_file": None if no_key_file else str(key_file),
                               "gitignore": None if gitignore is None else str(gitignore),
                               "config_file": str(config_file), "next": next_steps}
        if show_key or print_export:
            out["master_key"] = key
        echo_json(out)
        return
    if not no_key_file:
        click.echo(f"created {key_file} (the master key, mode 0600: keep it secret, back it up)")
    if gitignore is not None:
        click.echo(f"wrote {gitignore}: git ignores {key_file.name} (the key is inside the "
                   "project: keep it out of images and backups of the project too)")
    click.echo(f"created {config_file}")
    if store_dir is not None:
        click.echo(f"the key store will be {DEFAULT_STORAGE_PATH} (ENCRYPTION_KEY_STORAGE_PATH)")
    if show_key:
        click.echo(key)
    if print_export:
        click.echo(f"export ENCRYPTION_MASTER_KEY={key}")
    if not (show_key or print_export):
        click.echo("next:")
        for step in next_steps:
            click.echo(f"  {step}")


# -- doctor ----------------------------------------------------------------------------


@dataclass(slots=True)
class Check:
    name: str
    ok: bool | None  # None: skipped
    detail: str = ""
    exit_code: int = EXIT_OK
    warning: bool = False  # passed, but something should be fixed


async def _check(name: str, work: Callable[[], Awaitable[str]], timeout: float) -> Check:
    try:
        detail = await asyncio.wait_for(work(), timeout)
        return Check(name, True, detail)
    except TimeoutError:
        return Check(name, False, f"no answer within {timeout:g} s", EXIT_UNREACHABLE)
    except Exception as exc:
        return Check(name, False, describe(exc), exit_code_for(exc))


async def _check_redis(url: str) -> str:
    try:
        from redis.asyncio import Redis
    except ImportError as exc:
        raise ImportError(f"{exc}: pip install 'aiocrypt[redis]'") from None
    client = Redis.from_url(url, socket_connect_timeout=3)
    try:
        await client.ping()
        info = await client.info("server")
        return f"PING ok (Redis {info.get('redis_version', '?')})"
    finally:
        await client.aclose()


async def _check_postgres(dsn: str) -> str:
    try:
        import asyncpg
    except ImportError as exc:
        raise ImportError(f"{exc}: pip install 'aiocrypt[postgres]'") from None
    conn = await asyncpg.connect(dsn, timeout=3)
    try:
        version = await conn.fetchval("SHOW server_version")
        return f"connected (PostgreSQL {version})"
    finally:
        await conn.close()


def master_key_file_checks(extra: Sequence[Path] = ()) -> list[Check]:
    """The master key files ``init`` writes (and ``extra``) that exist: a warning for one
    group or others can read, or one inside a git work tree (one commit publishes it;
    a .gitignore does not keep it out of images and backups of the project)."""
    checks: list[Check] = []
    named = os.environ.get(MASTER_KEY_FILE_VAR, "").strip()  # the file the process reads
    candidates = dict.fromkeys(p.resolve() for p in (
        default_key_file(), IN_PROJECT_KEY_FILE, *extra,
        *([Path(named).expanduser()] if named else [])))
    for path in candidates:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue
        problems = []
        if mode & 0o077:
            problems.append(f"readable by group/others (mode {mode:04o}): run chmod 600 on it")
        tree = git_work_tree(path)
        if tree is not None:
            problems.append(f"inside the git work tree {tree}: move it out of the project "
                            f"(aiocrypt init puts it in {default_key_file().parent})")
        detail = "; ".join(problems) or f"mode {mode:04o}, outside any git work tree"
        checks.append(Check(f"master key file {path}", True, detail, warning=bool(problems)))
    return checks


async def _doctor_checks(timeout: float, key_files: Sequence[Path] = ()) -> list[Check]:
    checks: list[Check] = master_key_file_checks(key_files)
    try:
        config = EncryptionConfig.from_env()
    except ConfigurationError as exc:
        return [Check("configuration", False, describe(exc), EXIT_CONFIG), *checks]
    problems = config.validate()
    source = config.config_file or "defaults (no config file)"
    key_file_checks, checks = checks, []
    if problems:
        checks += [Check("configuration", False, p, EXIT_CONFIG) for p in problems]
    else:
        checks.append(Check("configuration", True,
                            f"backend {config.storage_backend}, settings from {source}"))
    checks += key_file_checks
    if problems:
        checks.append(Check("KEK provider", None, "skipped: the configuration is invalid"))
        checks.append(Check("key store", None, "skipped: the configuration is invalid"))
    else:
        kek = build_kek_provider(config)

        async def check_kek() -> str:
            await kek.check()
            return f"{kek.backend} KEK {kek.kek_id} answers"

        checks.append(await _check("KEK provider", check_kek, timeout))
        if checks[-1].ok:
            store = build_key_store(config, kek)
            manager = KeyManager(store, kek, config, watch=False)

            async def check_store() -> str:
                await manager.open()
                keys = await manager.list_keys()
                where = f" {config.key_store_file()}" if store.name == "file" else ""
                return (f"{store.name}{where}: {len(keys)} keys readable and authentic "
                        f"(revision {await store.revision()})")

            try:
                checks.append(await _check("key store", check_store, timeout))
                loose = config.storage_warnings()  # opens, as validate says, but fix it
                if checks[-1].ok and loose:
                    checks[-1] = Check("key store", True, "; ".join([checks[-1].detail, *loose]),
                                       warning=True)
            finally:
                await manager.close()
        else:
            checks.append(Check("key store", None, "skipped: the KEK provider failed"))
            await kek.close()
    # each URL with the variable it came from, named when the service does not answer
    redis_urls: dict[str, str] = {}
    for var, url in (("ENCRYPTION_REDIS_URL", config.redis_url),
                     ("ENCRYPTION_ARQ_REDIS_URL", os.environ.get("ENCRYPTION_ARQ_REDIS_URL"))):
        if url:
            redis_urls.setdefault(url, var)
    for url, var in redis_urls.items():
        checks.append(await _check(f"Redis {redact_url(url)}",
                                   lambda url=url: _check_redis(url), timeout))  # type: ignore[misc]
        if checks[-1].ok is False:
            checks[-1].detail += f" (check {var})"
    dsns: dict[str, str] = {}
    for var, dsn in (("ENCRYPTION_POSTGRES_DSN", config.postgres_dsn),
                     ("ENCRYPTION_AUDIT_DSN", os.environ.get("ENCRYPTION_AUDIT_DSN"))):
        if dsn:
            dsns.setdefault(dsn, var)
    for dsn, var in dsns.items():
        checks.append(await _check(f"PostgreSQL {redact_url(dsn)}",
                                   lambda dsn=dsn: _check_postgres(dsn), timeout))  # type: ignore[misc]
        if checks[-1].ok is False:
            checks[-1].detail += f" (check {var})"
    for check in checks:
        if check.ok is False and check.exit_code == EXIT_OK:
            check.exit_code = EXIT_FAILED
    return checks


def doctor_exit_code(checks: Sequence[Check]) -> int:
    """3 if the configuration is wrong, else 4 if a service is unreachable, else 1 or 0."""
    codes = {c.exit_code for c in checks if c.ok is False}
    for code in (EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_FAILED):
        if code in codes:
            return code
    return EXIT_OK


@click.command("doctor")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="seconds each reachability check may take")
@click.option("--key-file", "key_files", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="a master key file to check too (init's default places are always "
                   "checked); repeatable")
@json_option
def doctor(timeout: float, key_files: tuple[Path, ...], as_json: bool) -> None:
    """Check the configuration and reach the key store, KEK provider, Redis and Postgres.

    One line per check; exit 0 when all pass, 3 on a configuration problem, 4 when a
    service is unreachable, 1 on any other failure. A master key file that group or
    others can read, or that sits inside a git work tree, is a warning (WARN).
    """
    checks = asyncio.run(_doctor_checks(timeout, key_files))
    code = doctor_exit_code(checks)
    if as_json:
        echo_json({"ok": code == EXIT_OK, "exit_code": code,
                   "checks": [{"name": c.name, "ok": c.ok, "warning": c.warning,
                               "detail": c.detail} for c in checks]})
    else:
        for c in checks:
            word = "[yellow]WARN[/]" if c.ok and c.warning else \
                "[green]ok  [/]" if c.ok else ("[red]FAIL[/]" if c.ok is False
                                                else "[dim]skip[/]")
            console.print(f"{word}  {c.name}: {c.detail}", markup=True, highlight=False,
                          soft_wrap=True)
    sys.exit(code)


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
    except ImportError as exc:
        raise ImportError(f"{exc}: --models needs pip install 'aiocrypt[sqlalchemy]'") from None
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"--models {target}: cannot import {module_name} ({exc})") \
            from None
    candidates = [getattr(module, attr)] if attr else list(vars(module).values())
    found: dict[int, sa.MetaData] = {}
    for obj in candidates:
        metadata = obj if isinstance(obj, sa.MetaData) else (
            getattr(obj, "metadata", None) if isinstance(obj, type) else None)
        if isinstance(metadata, sa.MetaData):
            found[id(metadata)] = metadata
    return list(found.values())


def _specs_from_models(target: str, only: Sequence[str]) -> list[TableSpec]:
    from .integrations.sqlalchemy import table_specs

    specs = [spec for md in _models_metadata(target)
             for spec in table_specs(md, list(only) if only else None)]
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


def table_specs_from_options(tables: Sequence[str], pk: str, columns: Sequence[str],
                             models: str | None) -> list[TableSpec]:
    """The tables a ``reencrypt`` / ``census`` run covers, from its options."""
    if models:
        if columns:
            raise click.UsageError("give --models or --column, not both")
        return _specs_from_models(models, tables)
    if not columns:
        if tables:
            raise click.UsageError("--table needs at least one --column NAME:KEY_TYPE "
                                   "(or use --models)")
        return []
    if len(tables) != 1:
        raise click.UsageError("--column needs exactly one --table")
    try:
        return [TableSpec(tables[0], pk, tuple(_parse_column(c) for c in columns))]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def table_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--dsn", envvar="ENCRYPTION_POSTGRES_DSN", default=None,
                     help="PostgreSQL DSN of the data (default: ENCRYPTION_POSTGRES_DSN)"),
        click.option("--table", "tables", multiple=True,
                     help="table name (schema.table allowed); with --models, a filter"),
        click.option("--pk", default="id", show_default=True,
                     help="its single-column primary key"),
        click.option("--column", "columns", multiple=True, metavar="NAME:KEY_TYPE[:CONTEXT]",
                     help="an encrypted column, its key type and context (default context "
                          "TABLE.NAME); repeatable"),
        click.option("--models", default=None, metavar="MODULE[:OBJECT]",
                     help="take tables and columns from SQLAlchemy model metadata"),
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
        raise AiocryptError(f"cannot reach the PostgreSQL database at {redact_url(dsn)} "
                            f"({_dsn_origin()}): {reason or type(exc).__name__}") from exc
    except (asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidCatalogNameError) as exc:
        await database.close()
        raise ConfigurationError(f"the PostgreSQL database at {redact_url(dsn)} refused the "
                                 f"connection ({_dsn_origin()}): {exc}") from None
    return database


def _prefixes(manager: KeyManager, spec: TableSpec) -> list[str]:
    """Each column's target prefix (a never-matching one when its type has no key yet)."""
    active = manager.keyring.active_keys
    return [text_prefix(active[c.key_type].key_id) if c.key_type in active else "\x7f"
            for c in spec.columns]


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
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s"), TimeElapsedColumn(),
                TimeRemainingColumn(), console=err_console, transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def start(self, table: str, total: int) -> None:
        self._totals[table] = total
        if self.progress is not None:
            self._tasks[table] = self.progress.add_task(table, total=max(total, 1),
                                                        rate="0")
        else:
            click.echo(f"{table}: {total:,} rows to re-encrypt", err=True)

    def update(self, event: ReencryptionProgress, base: int) -> None:
        """After a batch of a run in this process."""
        self.advance(event.table, event.rows_read - base, event.rows_per_second,
                     f"batch {event.batches}, ", f", {event.run_rows_updated:,} updated",
                     first=event.run_batches == 1)

    def advance(self, table: str, done: int, rate: float, before: str = "", after: str = "",
                *, first: bool = False) -> None:
        """``done`` rows of ``table`` read by this run so far (``--jobs``: all shards')."""
        if self.progress is not None:
            self.progress.update(self._tasks[table], completed=done, rate=f"{rate:,.0f}")
            return
        now = time.monotonic()
        if now - self._last_line >= 1.0 or first:
            self._last_line = now
            click.echo(f"{table}: {before}{done:,}/{self._totals.get(table, 0):,} rows"
                       f"{after} ({rate:,.0f} rows/s)", err=True)


@click.command("reencrypt")
@table_options
@click.option("--key-type", default=None, help="only columns of this key type")
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="at most this many rows per second")
@click.option("--max-batches", type=click.IntRange(min=1), default=None,
              help="stop each table after N batches (run again to resume)")
@click.option("--skip-errors", is_flag=True,
              help="leave values that do not decrypt in place and list their primary keys "
                   "(default: stop at the first)")
@click.option("--checkpoint-table", default=DEFAULT_CHECKPOINT_TABLE, show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="processes: each table is cut into this many primary-key ranges, each "
                   "re-encrypted by a process of its own (one per core)")
@click.option("--dry-run", is_flag=True, help="only count the rows that would be re-encrypted")
@json_option
def reencrypt(dsn: str | None, tables: tuple[str, ...], pk: str, columns: tuple[str, ...],
              models: str | None, key_type: str | None, batch_size: int, rate: float | None,
              max_batches: int | None, skip_errors: bool, checkpoint_table: str,
              jobs: int, dry_run: bool, as_json: bool) -> None:
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
        specs = [s.select(key_type=key_type) for s in specs
                 if any(c.key_type == KeyType(key_type) for c in s.columns)]
    database_dsn = _require_dsn(dsn)
    config = load_config()

    async def main() -> list[dict[str, Any]]:
        manager = build_key_manager(config, watch=False)
        database = await _open_database(database_dsn, checkpoint_table)
        engine = ReencryptionEngine(manager, database, tables=specs, batch_size=batch_size,
                                    rate_limit=rate, on_error="skip" if skip_errors else "raise",
                                    legacy_readers=legacy_readers_from_models(models))
        async with manager:
            try:
                if dry_run:
                    return [await _dry_run(manager, database, spec) for spec in specs]
                with _Reporter(quiet=False) as reporter:
                    results = []
                    for spec in specs:
                        reporter.start(spec.name, await database.count_rows(
                            spec, _prefixes(manager, spec)))
                        if jobs == 1:
                            results.append(await reencrypt_table(
                                engine, spec, on_progress=reporter.update,
                                max_batches=max_batches))
                            continue
                        task = ShardTask(spec, KeyRange(), database_dsn, checkpoint_table,
                                         batch_size, None if rate is None else rate / jobs,
                                         skip_errors, max_batches, models)
                        results.append(await reencrypt_sharded(
                            engine, task, jobs, functools.partial(reporter.advance, spec.name)))
                    return results
            finally:
                await database.close()

    results = asyncio.run(main())
    if as_json:
        echo_json(results)
    else:
        for r in results:
            if dry_run:
                click.echo(f"{r['table']}: {r['pending_rows']:,} of {r['rows']:,} rows would "
                           "be re-encrypted (dry run: nothing changed)")
                continue
            run = r["run"]
            state = ("complete" if r["complete"] else
                     "stopped after --max-batches: run again to resume" if r["stopped"] else
                     "INCOMPLETE")
            resumed = "" if r["resumed_from"] is None else \
                f" (resumed after primary key {r['resumed_from']})"
            click.echo(f"{r['table']}: {run['rows_updated']:,} rows re-encrypted in "
                       f"{run['batches']} batches{resumed}; {state}")
            if run["rows_failed"]:
                click.echo(f"  {run['rows_failed']} rows did not decrypt and were left: "
                           f"primary keys {r['failed_primary_keys']}", err=True)
                for f in r["failures"]:
                    click.echo(f"    {r['table']}.{f['column']} primary key {f['primary_key']}: "
                               f"{f['reason'] or 'not a token'}"
                               + (f" (key {f['key_id']})" if f["key_id"] else ""), err=True)
    if not dry_run and any(not r["complete"] and not r["stopped"] for r in results):
        sys.exit(EXIT_FAILED)


async def _dry_run(manager: KeyManager, database: AsyncpgDatabase,
                   spec: TableSpec) -> dict[str, Any]:
    census = await database.census(spec)
    active = manager.keyring.active_keys
    targets = {c.name: active[c.key_type].key_id if c.key_type in active else None
               for c in spec.columns}
    pending = await database.count_rows(spec, _prefixes(manager, spec))
    total = await database.count_rows(spec)
    return {"table": spec.name, "rows": total, "pending_rows": pending, "targets": targets,
            "values_off_target": census.off_target({k: v for k, v in targets.items() if v})}


# -- census ----------------------------------------------------------------------------


@click.command("census")
@table_options
@json_option
def census(dsn: str | None, tables: tuple[str, ...], pk: str, columns: tuple[str, ...],
           models: str | None, as_json: bool) -> None:
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
                            cols[column] = [{
                                "key_id": kid,
                                "version": keys[kid].version if kid in keys else None,
                                "status": keys[kid].status.value if kid in keys
                                else ("not a token" if kid is None else "unknown key"),
                                "rows": rows,
                            } for kid, rows in sorted(by_key.items(),
                                                      key=lambda kv: (kv[0] is None,
                                                                      kv[0] or ""))]
                        out_tables.append({"table": spec.name, "columns": cols})
                finally:
                    await database.close()
            return {"keys": by_status, "tables": out_tables}

    result = asyncio.run(main())
    if as_json:
        echo_json(result)
        return
    keys_table = Table("key type", "status", "keys", title="keys per status",
                       title_justify="left")
    for kt, per_status in sorted(result["keys"].items()):
        for st, n in sorted(per_status.items()):
            keys_table.add_row(kt, st, str(n))
    console.print(keys_table)
    if result["tables"]:
        rows_table = Table("table", "column", "version", "status", "rows",
                           title="rows per key version", title_justify="left")
        rows_table.add_column("key id", no_wrap=True)
        for t in result["tables"]:
            for column, entries in t["columns"].items():
                for e in entries:
                    rows_table.add_row(t["table"], column, str(e["version"] or "-"),
                                       e["status"], f"{e['rows']:,}", e["key_id"] or "-")
        console.print(rows_table)


def census_from_options(dsn: str | None, tables: Sequence[str], pk: str,
                        columns: Sequence[str], models: str | None) \
        -> Callable[[KeyManager], Awaitable[dict[str, int]]] | None:
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
