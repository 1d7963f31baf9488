"""``aiocrypt init`` and ``doctor``: setting a project up, and checking that its
settings, key file, key store, KEK and services work."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import os
import shlex
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ._cli_base import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    console,
    describe,
    echo_json,
    exit_code_for,
    fail,
    json_option,
)
from ._config import (
    DEFAULT_CONFIG_FILE,
    DEFAULT_ROTATION_POLICIES,
    DEFAULT_STORAGE_PATH,
    MASTER_KEY_FILE_VAR,
    EncryptionConfig,
)
from ._errors import ConfigurationError
from ._factory import build_kek_provider, build_key_store
from ._manager import KeyManager
from ._urls import redact_url

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
        prefix = "" if not lines or gitignore.read_text(encoding="utf-8").endswith("\n") else "\n"
        with open(gitignore, "a", encoding="utf-8") as fh:
            fh.write(f"{prefix}# the aiocrypt master key: never commit it\n{entry}\n")
    return gitignore


@click.command("init")
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="where to write the new master key (mode 0600); default: outside the "
    "project, $XDG_CONFIG_HOME/aiocrypt/<project>-<hash>/master.key "
    "(~/.config when unset)",
)
@click.option(
    "--key-in-project",
    is_flag=True,
    help=f"write the key to {IN_PROJECT_KEY_FILE} in the project instead, with a "
    ".gitignore that covers it",
)
@click.option(
    "--no-key-file",
    is_flag=True,
    help="write no key file (then --show-key or --print-export is required)",
)
@click.option(
    "--config-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path(DEFAULT_CONFIG_FILE),
    show_default=True,
    help="the JSON config file to write (defaults, rotation policies)",
)
@click.option(
    "--performance-mode",
    type=click.Choice(["security", "balanced", "performance"]),
    default="balanced",
    show_default=True,
)
@click.option("--show-key", is_flag=True, help="also print the key on stdout (warns on stderr)")
@click.option(
    "--print-export",
    is_flag=True,
    help="print an 'export ENCRYPTION_MASTER_KEY=...' line on stdout (warns on stderr)",
)
@click.option("--force", is_flag=True, help="overwrite existing files")
@json_option
def init(  # noqa: C901 - the setup wizard: one question per backend, read top to bottom
    key_file: Path | None,
    key_in_project: bool,
    no_key_file: bool,
    config_file: Path,
    performance_mode: str,
    show_key: bool,
    print_export: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Generate a master key and a config file.

    The key goes to a 0600 file outside the project tree (see --key-file) and is
    never printed unless --show-key or --print-export asks for it. A key file
    inside the project or a git work tree gets a .gitignore beside it. Existing
    files are kept unless --force.
    """
    if no_key_file and not (show_key or print_export):
        raise click.UsageError(
            "--no-key-file needs --show-key or --print-export (the key would be lost)"
        )
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
        click.echo(
            "warning: the master key is printed on stdout; whoever sees it can open "
            "every data key: keep it out of logs and shell history",
            err=True,
        )
    next_steps = []
    if not no_key_file:
        next_steps.append(f"export {MASTER_KEY_FILE_VAR}={shlex.quote(str(key_file))}")
    if config_file != Path(DEFAULT_CONFIG_FILE):
        next_steps.append(f"export ENCRYPTION_CONFIG_FILE={shlex.quote(str(config_file))}")
    next_steps.append("aiocrypt doctor")
    if as_json:
        out: dict[str, Any] = {
            "key_file": None if no_key_file else str(key_file),
            "gitignore": None if gitignore is None else str(gitignore),
            "config_file": str(config_file),
            "next": next_steps,
        }
        if show_key or print_export:
            out["master_key"] = key
        echo_json(out)
        return
    if not no_key_file:
        click.echo(f"created {key_file} (the master key, mode 0600: keep it secret, back it up)")
    if gitignore is not None:
        click.echo(
            f"wrote {gitignore}: git ignores {key_file.name} (the key is inside the "
            "project: keep it out of images and backups of the project too)"
        )
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
    except ImportError as exc:  # pragma: no cover - the dev extra installs redis
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
    except ImportError as exc:  # pragma: no cover - the dev extra installs asyncpg
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
    candidates = dict.fromkeys(
        p.resolve()
        for p in (
            default_key_file(),
            IN_PROJECT_KEY_FILE,
            *extra,
            *([Path(named).expanduser()] if named else []),
        )
    )
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
            problems.append(
                f"inside the git work tree {tree}: move it out of the project "
                f"(aiocrypt init puts it in {default_key_file().parent})"
            )
        detail = "; ".join(problems) or f"mode {mode:04o}, outside any git work tree"
        checks.append(Check(f"master key file {path}", True, detail, warning=bool(problems)))
    return checks


async def _doctor_checks(timeout: float, key_files: Sequence[Path] = ()) -> list[Check]:  # noqa: C901 - one independent check per line of the doctor's report
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
        checks.append(
            Check(
                "configuration", True, f"backend {config.storage_backend}, settings from {source}"
            )
        )
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
                return (
                    f"{store.name}{where}: {len(keys)} keys readable and authentic "
                    f"(revision {await store.revision()})"
                )

            try:
                checks.append(await _check("key store", check_store, timeout))
                loose = config.storage_warnings()  # opens, as validate says, but fix it
                if checks[-1].ok and loose:
                    checks[-1] = Check(
                        "key store", True, "; ".join([checks[-1].detail, *loose]), warning=True
                    )
            finally:
                await manager.close()
        else:
            checks.append(Check("key store", None, "skipped: the KEK provider failed"))
            await kek.close()
    # each URL with the variable it came from, named when the service does not answer
    redis_urls: dict[str, str] = {}
    for var, url in (
        ("ENCRYPTION_REDIS_URL", config.redis_url),
        ("ENCRYPTION_ARQ_REDIS_URL", os.environ.get("ENCRYPTION_ARQ_REDIS_URL")),
    ):
        if url:
            redis_urls.setdefault(url, var)
    for url, var in redis_urls.items():
        checks.append(
            await _check(f"Redis {redact_url(url)}", functools.partial(_check_redis, url), timeout)
        )
        if checks[-1].ok is False:
            checks[-1].detail += f" (check {var})"
    dsns: dict[str, str] = {}
    for var, dsn in (
        ("ENCRYPTION_POSTGRES_DSN", config.postgres_dsn),
        ("ENCRYPTION_AUDIT_DSN", os.environ.get("ENCRYPTION_AUDIT_DSN")),
    ):
        if dsn:
            dsns.setdefault(dsn, var)
    for dsn, var in dsns.items():
        checks.append(
            await _check(
                f"PostgreSQL {redact_url(dsn)}", functools.partial(_check_postgres, dsn), timeout
            )
        )
        if checks[-1].ok is False:
            checks[-1].detail += f" (check {var})"
    for check in checks:
        # dead: every failed Check above is built with a non-zero code (EXIT_CONFIG,
        # EXIT_UNREACHABLE, or exit_code_for's, which is never 0)
        if check.ok is False and check.exit_code == EXIT_OK:
            check.exit_code = EXIT_FAILED  # pragma: no cover - dead, see the comment above
    return checks


def doctor_exit_code(checks: Sequence[Check]) -> int:
    """3 if the configuration is wrong, else 4 if a service is unreachable, else 1 or 0."""
    codes = {c.exit_code for c in checks if c.ok is False}
    for code in (EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_FAILED):
        if code in codes:
            return code
    return EXIT_OK


@click.command("doctor")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="seconds each reachability check may take",
)
@click.option(
    "--key-file",
    "key_files",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="a master key file to check too (init's default places are always checked); repeatable",
)
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
        echo_json(
            {
                "ok": code == EXIT_OK,
                "exit_code": code,
                "checks": [
                    {"name": c.name, "ok": c.ok, "warning": c.warning, "detail": c.detail}
                    for c in checks
                ],
            }
        )
    else:
        for c in checks:
            word = (
                "[yellow]WARN[/]"
                if c.ok and c.warning
                else "[green]ok  [/]"
                if c.ok
                else ("[red]FAIL[/]" if c.ok is False else "[dim]skip[/]")
            )
            console.print(
                f"{word}  {c.name}: {c.detail}", markup=True, highlight=False, soft_wrap=True
            )
    sys.exit(code)
