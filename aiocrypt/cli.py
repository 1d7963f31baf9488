"""The ``aiocrypt`` command: keys, configuration, data and health for operators.

Settings come from the ``ENCRYPTION_*`` environment variables (and the JSON
config file), exactly as the library reads them. Nothing secret is printed,
except by ``new-master-key`` and ``init --show-key / --print-export``, which are
asked to. Every command takes ``--json``; human output is rich text.

Errors are one line on stderr (``error: ...``; ``aiocrypt --debug`` adds the
traceback) and the exit code says what kind of failure it was, decided in one
place (:func:`exit_code_for`):

====  =====================================================================
0     success
1     the operation failed or found problems (tampered audit chain, a key
      that does not exist, rows that did not re-encrypt, ...)
2     usage error: bad option or argument (click's own)
3     configuration error: a setting is missing or invalid, an extra is not
      installed
4     a service is unreachable: key store, KEK provider, Redis, Postgres
130   interrupted (Ctrl-C); re-encryption resumes from its checkpoint
====  =====================================================================

Over 500 lines: the ``keys`` (15 commands), ``audit`` and ``config`` groups, each
command a thin layer of click options and output over one library call. The
rest is split off: ``init`` and ``doctor`` in ``_cli_setup``, ``reencrypt`` and
``census`` in ``_cli_ops``, what every command shares in ``_cli_base``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from ._cli_base import (
    EXIT_CONFIG,
    EXIT_FAILED,
    AiocryptGroup,
    console,
    echo_json,
    fail,
    json_option,
    key_metadata,
    key_type_param,
    load_config,
    run_with_manager,
)
from ._cli_ops import census_from_options, table_options
from ._config import CryptoConfigManager, EncryptionConfig, decode_master_key
from ._factory import build_kek_provider, build_key_store
from ._keys import EncryptionKey
from ._manager import KeyManager, KeyRetirement
from ._types import KeyStatus, KeyType

if TYPE_CHECKING:
    from .audit.postgres import AuditVerification

#: ``main`` is the command; ``key_type_param`` is for commands plugged in by integrations
#: (``aiocrypt jobs``): a declared key type, checked before anything opens the store.
__all__ = ["key_type_param", "main"]


@click.group(cls=AiocryptGroup)
@click.version_option(package_name="aiocrypt")
@click.option(
    "--debug", is_flag=True, envvar="AIOCRYPT_DEBUG", help="show the traceback of an error"
)
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """aiocrypt: field encryption keys for asyncio web applications."""
    ctx.meta["aiocrypt.debug"] = debug


@main.group()
def keys() -> None:
    """Inspect and change data-encryption keys (metadata only: material is never shown)."""


@keys.command("list")
@click.option("--type", "key_type", default=None, help="only this key type")
@click.option("--status", type=click.Choice([s.value for s in KeyStatus]), default=None)
@json_option
def list_keys(key_type: str | None, status: str | None, as_json: bool) -> None:
    """List keys (metadata only; no material is ever shown)."""
    found = run_with_manager(lambda m: m.list_keys(key_type, status))
    if as_json:
        echo_json([key_metadata(key) for key in found])
        return
    table = Table()
    table.add_column("key id", no_wrap=True)
    for heading in ("type", "version", "status", "created", "expires"):
        table.add_column(heading)
    for key in found:
        table.add_row(
            key.key_id,
            key.key_type.value,
            str(key.version),
            key.status.value,
            f"{key.created_at:%Y-%m-%d %H:%M}",
            f"{key.expires_at:%Y-%m-%d}",
        )
    console.print(table)


@keys.command("show")
@click.argument("key_id")
@json_option
def show_key(key_id: str, as_json: bool) -> None:
    """Show the metadata of KEY_ID (never its material)."""
    data = key_metadata(run_with_manager(lambda m: m.get_key(key_id)))
    if as_json:
        echo_json(data)
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for name, value in data.items():
        table.add_row(name.replace("_", " "), "-" if value in (None, "") else str(value))
    console.print(table)


@keys.command("generate")
@click.argument("key_type", callback=key_type_param)
@json_option
def generate(key_type: KeyType, as_json: bool) -> None:
    """Create a new active version of KEY_TYPE."""
    key = run_with_manager(lambda m: m.generate_key(key_type))
    if as_json:
        echo_json(key_metadata(key))
        return
    click.echo(f"{key.key_id} is now the active {key.key_type.value} key (version {key.version})")


@keys.command("rotate")
@click.argument("key_type", callback=key_type_param)
@click.option("--force", is_flag=True, help="rotate even if the policy says it is not due")
@json_option
def rotate(key_type: KeyType, force: bool, as_json: bool) -> None:
    """Rotate KEY_TYPE if due by policy (or --force)."""

    async def work(m: KeyManager) -> tuple[str | None, EncryptionKey]:
        await m.refresh(force=True)
        before = m.keyring.active_keys.get(key_type)
        after = await m.rotate_key(key_type, force=force)
        return (before.key_id if before else None), after

    before, after = run_with_manager(work)
    rotated = before != after.key_id
    if as_json:
        echo_json(
            {
                "key_type": key_type.value,
                "rotated": rotated,
                "old_key_id": before,
                "active_key": key_metadata(after),
            }
        )
    elif not rotated:
        click.echo(
            f"{key_type.value}: not due for rotation; {after.key_id} stays active "
            "(use --force to rotate anyway)"
        )
    else:
        click.echo(f"{key_type.value}: rotated {before or '(none)'} -> {after.key_id}")


@keys.command("revoke")
@click.argument("key_id")
@click.option("--reason", default="Manual revocation", show_default=True)
@json_option
def revoke(key_id: str, reason: str, as_json: bool) -> None:
    """Revoke KEY_ID: it never encrypts again."""
    key = run_with_manager(lambda m: m.revoke_key(key_id, reason))
    if as_json:
        echo_json(key_metadata(key))
        return
    click.echo(f"{key.key_id} is {key.status.value}")


@keys.command("compromise")
@click.argument("key_id")
@click.option("--reason", required=True, help="what happened (kept in the audit trail)")
@click.option(
    "--reencrypt",
    is_flag=True,
    help="enqueue the re-encryption of its data on the ARQ workers now "
    "(aiocrypt[arq]; ENCRYPTION_ARQ_REDIS_URL or ENCRYPTION_REDIS_URL)",
)
@json_option
@click.pass_context
def compromise(
    ctx: click.Context, key_id: str, reason: str, reencrypt: bool, as_json: bool
) -> None:
    """Mark KEY_ID compromised: stop using it, rotate, flag its data for re-encryption."""
    key = run_with_manager(lambda m: m.mark_compromised(key_id, reason))
    if as_json and not reencrypt:
        echo_json(key_metadata(key))
        return
    if not as_json:
        click.echo(f"{key.key_id} is {key.status.value}; its data must be re-encrypted")
    if not reencrypt:
        click.echo(
            f"next: aiocrypt reencrypt ... (or aiocrypt jobs reencrypt "
            f"{key.key_type.value} {key.key_id}, or pass --reencrypt)"
        )
        return
    from .integrations.arq.cli import reencrypt as enqueue_reencryption

    ctx.invoke(
        enqueue_reencryption,
        key_type=key.key_type,
        old_key_id=key.key_id,
        batch_size=None,
        shards=None,
        as_json=as_json,
    )


@keys.command("rotate-due")
@json_option
def rotate_due(as_json: bool) -> None:
    """Run the rotation policy now (what the daily job does) and print the report (JSON)."""
    echo_json(run_with_manager(lambda m: m.rotate_keys_due()))


@keys.command("cleanup")
@click.option(
    "--confirm",
    "confirm",
    multiple=True,
    metavar="KEY_ID",
    help="a key id you have verified no data references (repeatable)",
)
@click.option(
    "--force",
    is_flag=True,
    help="destroy expired keys WITHOUT a reference check (audited; data may be lost)",
)
@click.option("--yes", is_flag=True, help="do not ask before --force")
@json_option
def cleanup(confirm: tuple[str, ...], force: bool, yes: bool, as_json: bool) -> None:
    """Destroy keys past max age + grace that nothing references; say why others are kept."""
    if force and not yes:
        click.confirm(
            "Destroy every key past its grace period without checking references?",
            abort=True,
            err=True,
        )
    report = run_with_manager(lambda m: m.cleanup_report(confirm_unreferenced=confirm, force=force))
    if as_json:
        echo_json(report)
        return
    for item in report["destroyed"]:
        click.echo(f"destroyed {item['key_id']}: {item['reason']}")
    for item in report["kept"]:
        click.echo(f"kept      {item['key_id']}: {item['reason']}")
    if not report["destroyed"] and not report["kept"]:
        click.echo("no key is past its grace period")


_CensusSource = Callable[[KeyManager], Awaitable[dict[str, int]]] | None


def _retirement_dict(result: KeyRetirement) -> dict[str, Any]:
    return {
        "key_type": result.key_type.value,
        "dry_run": result.dry_run,
        "type_retired": result.type_retired,
        "keys": [
            {
                "key_id": k.key_id,
                "version": k.version,
                "status_before": k.status_before.value,
                "reason": k.reason.value,
            }
            for k in result.keys
        ],
        "min_decryption_version_before": result.min_decryption_version_before,
        "min_decryption_version": result.min_decryption_version,
    }


def _echo_retirement(result: KeyRetirement) -> None:
    verb = "would destroy" if result.dry_run else "destroyed"
    for key in result.keys:
        click.echo(
            f"{verb} {key.key_id} (version {key.version}, {key.status_before.value}): "
            f"{key.reason.value}"
        )
    kt = result.key_type.value
    before, after = result.min_decryption_version_before, result.min_decryption_version
    if after != before:
        click.echo(
            f"{kt}: minimum decryption version {before} -> {after}"
            + (" (dry run: nothing changed)" if result.dry_run else "")
        )
    elif result.dry_run:
        click.echo(f"{kt}: minimum decryption version stays {after} (dry run: nothing changed)")
    if result.type_retired and not result.dry_run:
        click.echo(
            f"{kt} has no key left and none active; it is created again only if "
            "something encrypts with it"
        )


def _run_retirement(
    retire: Callable[
        [KeyManager, Mapping[str, int] | None, list[str], bool], Awaitable[KeyRetirement]
    ],
    rows_census: _CensusSource,
    confirm_ids: Callable[[KeyManager], Awaitable[list[str]]],
    question: str,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Check (a dry run), show it, ask, then retire: the census runs again for the real
    run, and only the key ids shown are confirmed (a key made meanwhile is refused)."""

    async def work(
        m: KeyManager, dry: bool, confirmed: list[str] | None
    ) -> tuple[KeyRetirement, list[str]]:
        ids = await confirm_ids(m) if confirmed is None else confirmed
        counts = await rows_census(m) if rows_census is not None else None
        return await retire(m, counts, ids, dry), ids

    plan, ids = run_with_manager(lambda m: work(m, True, None))
    if dry_run:
        echo_json(_retirement_dict(plan)) if as_json else _echo_retirement(plan)
        return
    if not yes:
        if not as_json:
            _echo_retirement(plan)
        click.confirm(question, abort=True, err=True)
    done, _ = run_with_manager(lambda m: work(m, False, ids))
    echo_json(_retirement_dict(done)) if as_json else _echo_retirement(done)


def _census_or_confirmation(rows_census: _CensusSource, confirm_unreferenced: bool) -> None:
    if rows_census is None and not confirm_unreferenced:
        raise click.UsageError(
            "no census: name the data (--table T --column NAME:KEY_TYPE, or --models) so the "
            "census can show that no row uses it, or pass --confirm-unreferenced once you have "
            "checked that nothing references it"
        )


def _retire_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        (
            click.option(
                "--confirm-unreferenced",
                is_flag=True,
                help="you have checked that no data references the key(s) the census "
                "does not cover (needed without a census)",
            ),
            click.option("--dry-run", is_flag=True, help="only say what would be done"),
            click.option("--yes", is_flag=True, help="do not ask for confirmation"),
        )
    ):
        function = option(function)
    return table_options(json_option(function))


@keys.command("retire")
@click.argument("key_id")
@_retire_options
def retire(
    key_id: str,
    dsn: str | None,
    tables: tuple[str, ...],
    pk: str,
    columns: tuple[str, ...],
    models: str | None,
    confirm_unreferenced: bool,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Destroy KEY_ID now, whatever its age, once the census shows no row on it.

    For a key no longer active, after its data was re-encrypted: the census of
    the tables named (as for 'aiocrypt census') must count 0 rows on it, or
    --confirm-unreferenced says you checked. Refused while rows use it. Raises the
    type's minimum decryption version past it when it was the oldest.
    """
    rows_census = census_from_options(dsn, tables, pk, columns, models)
    _census_or_confirmation(rows_census, confirm_unreferenced)

    async def confirm_ids(_: KeyManager) -> list[str]:
        return [key_id] if confirm_unreferenced else []

    _run_retirement(
        lambda m, counts, ids, dry: m.retire_key(
            key_id, census=counts, confirm_unreferenced=ids, dry_run=dry
        ),
        rows_census,
        confirm_ids,
        f"Destroy {key_id} now? Data under it can never be read again.",
        dry_run,
        yes,
        as_json,
    )


@keys.command("retire-type")
@click.argument("key_type")
@_retire_options
def retire_type(
    key_type: str,
    dsn: str | None,
    tables: tuple[str, ...],
    pk: str,
    columns: tuple[str, ...],
    models: str | None,
    confirm_unreferenced: bool,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Retire KEY_TYPE, created by mistake: destroy every key of it, the active one too.

    No new version is made active. Each key must be unreferenced as for 'keys
    retire' (census, or --confirm-unreferenced), or nothing changes.
    """
    try:  # any well-formed name: a mistaken type is, by definition, not a declared one
        kt = KeyType(key_type)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="KEY_TYPE") from None
    rows_census = census_from_options(dsn, tables, pk, columns, models)
    _census_or_confirmation(rows_census, confirm_unreferenced)

    async def confirm_ids(m: KeyManager) -> list[str]:
        if not confirm_unreferenced:
            return []
        return [k.key_id for k in await m.list_keys() if k.key_type == kt]

    _run_retirement(
        lambda m, counts, ids, dry: m.retire_key_type(
            kt, census=counts, confirm_unreferenced=ids, dry_run=dry
        ),
        rows_census,
        confirm_ids,
        f"Destroy every {kt.value} key now, the active one too? Data under them can never be "
        "read again.",
        dry_run,
        yes,
        as_json,
    )


@keys.command("min-version")
@click.argument("key_type", callback=key_type_param)
@click.argument("version", type=click.IntRange(min=1), required=False)
@table_options
@click.option(
    "--confirm-unreferenced",
    is_flag=True,
    help="you have checked that no data references the older versions the census "
    "does not cover (needed without a census)",
)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@json_option
def min_version(
    key_type: KeyType,
    version: int | None,
    dsn: str | None,
    tables: tuple[str, ...],
    pk: str,
    columns: tuple[str, ...],
    models: str | None,
    confirm_unreferenced: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Show KEY_TYPE's minimum decryption version, or set it to VERSION.

    Versions below it refuse every decryption, re-encryption included. Raising it
    is refused while the census counts rows on an older version (or, without a
    census, unless --confirm-unreferenced); lowering it re-enables them.
    """
    current = run_with_manager(lambda m: m.get_min_decryption_version(key_type))
    if version is None or version == current:
        if as_json:
            echo_json(
                {"key_type": key_type.value, "min_decryption_version": current, "changed": False}
            )
        else:
            click.echo(f"{key_type.value}: minimum decryption version {current}")
        return
    rows_census = census_from_options(dsn, tables, pk, columns, models)
    if version > current:
        _census_or_confirmation(rows_census, confirm_unreferenced)
    if not yes:
        what = (
            "every version below it will refuse to decrypt"
            if version > current
            else "versions from it up decrypt again"
        )
        click.confirm(
            f"Set the minimum decryption version of {key_type.value} from {current} "
            f"to {version} ({what})?",
            abort=True,
            err=True,
        )

    async def work(m: KeyManager) -> int:
        counts = await rows_census(m) if rows_census is not None else None
        older = [k.key_id for k in await m.list_keys(key_type) if k.version < version]
        # confirmation covers what the census does not count; rows it counts still refuse
        confirmed = (
            [i for i in older if counts is None or i not in counts] if confirm_unreferenced else []
        )
        return await m.set_min_decryption_version(
            key_type, version, census=counts, confirm_unreferenced=confirmed
        )

    now = run_with_manager(work)
    if as_json:
        echo_json(
            {
                "key_type": key_type.value,
                "min_decryption_version": now,
                "previous": current,
                "changed": True,
            }
        )
    else:
        click.echo(f"{key_type.value}: minimum decryption version {current} -> {now}")


def _local_kek_from_env(name: str) -> Any:
    from .kek.local import LocalKekProvider

    raw = os.environ.get(name)
    if not raw:
        fail(f"{name} is not set", EXIT_CONFIG)
    try:
        return LocalKekProvider(decode_master_key(raw))
    except ValueError as exc:
        fail(str(exc).replace("ENCRYPTION_MASTER_KEY", name), EXIT_CONFIG)


@keys.command("rotate-master-key")
@click.option(
    "--new-key-env",
    default="ENCRYPTION_NEW_MASTER_KEY",
    show_default=True,
    help="environment variable holding the new master key (never a CLI argument)",
)
@json_option
def rotate_master_key(new_key_env: str, as_json: bool) -> None:
    """Rewrap every DEK under a new local master key; resumable if interrupted."""
    new_kek = _local_kek_from_env(new_key_env)
    count = run_with_manager(lambda m: m.rotate_master_key(new_kek))
    if as_json:
        echo_json({"rewrapped": count, "kek_id": new_kek.kek_id})
        return
    click.echo(
        f"rewrapped {count} keys under {new_kek.kek_id}; now set ENCRYPTION_MASTER_KEY "
        f"to the value of {new_key_env}"
    )


@keys.command("rewrap")
@click.option(
    "--previous-key-env",
    "previous",
    multiple=True,
    metavar="VAR",
    help="environment variable holding an older master key some DEKs may still be "
    "wrapped by (repeatable)",
)
@click.option(
    "--only-foreign", is_flag=True, help="only DEKs not already wrapped by the current KEK"
)
@json_option
def rewrap(previous: tuple[str, ...], only_foreign: bool, as_json: bool) -> None:
    """Re-wrap every DEK under the current KEK / master key (no data is touched).

    Use it after the KMS key was rotated (fresh wraps use its newest version), or
    to finish moving DEKs off an older master key (--previous-key-env).
    """
    from .keystore.file import FileKeyStore

    config = load_config()
    older = [_local_kek_from_env(name) for name in previous]

    async def main() -> tuple[int, str]:
        kek = build_kek_provider(config)
        store = build_key_store(config, kek)
        if older and isinstance(store, FileKeyStore):
            store = FileKeyStore(store.path, kek, previous_keks=older)
        async with KeyManager(store, kek, config, previous_keks=older, watch=False) as manager:
            return await manager.rewrap_keys(only_foreign=only_foreign), kek.kek_id

    count, kek_id = asyncio.run(main())
    if as_json:
        echo_json({"rewrapped": count, "kek_id": kek_id})
        return
    click.echo(f"rewrapped {count} keys under {kek_id}")


@keys.command("adopt")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@json_option
def adopt(yes: bool, as_json: bool) -> None:
    """Check and seal a key store written before keysets were sealed (once, with the KEK).

    Every record must unwrap under the configured KEK; the keyset is then sealed
    as it stands and the list of keys and statuses is audited: compare it with
    your audit trail (docs/runbook.md, "Upgrading to sealed keysets").
    """
    config = load_config()
    if not yes and not as_json:
        click.confirm(
            "Seal the key store as it is now (statuses are trusted as found)?", abort=True
        )

    async def run() -> tuple[Any, list[EncryptionKey]]:
        kek = build_kek_provider(config)
        manager = KeyManager(build_key_store(config, kek), kek, config, watch=False)
        try:
            report = await manager.adopt_store()
            return report, await manager.list_keys()
        finally:
            await manager.close()

    report, keys_now = asyncio.run(run())
    if as_json:
        echo_json(
            {
                "already_sealed": report.already_sealed,
                "revision": report.revision,
                "keys": [key_metadata(k) for k in keys_now],
            }
        )
        return
    if report.already_sealed:
        click.echo(f"the key store is already sealed (revision {report.revision}); verified")
        return
    click.echo(f"sealed the key store at revision {report.revision}; keys as adopted:")
    for key in keys_now:
        click.echo(f"  {key.key_id}  {key.status.value}")


@keys.command("stats")
@json_option
def stats(as_json: bool) -> None:
    """Key statistics (JSON)."""
    echo_json(run_with_manager(lambda m: m.get_key_statistics()))


@main.group()
def audit() -> None:
    """The audit trail."""


def _audit_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        (
            click.option(
                "--dsn",
                envvar="ENCRYPTION_AUDIT_DSN",
                required=True,
                help="PostgreSQL DSN of the audit table (or ENCRYPTION_AUDIT_DSN)",
            ),
            click.option("--table", default="aiocrypt_audit", show_default=True),
            click.option(
                "--hmac-key-env",
                metavar="NAME",
                help="the environment variable holding the chain's HMAC key "
                "(base64); the key is never taken from the command line",
            ),
        )
    ):
        function = option(function)
    return json_option(function)


def _audit_hmac_key(name: str | None) -> bytes | None:
    """The HMAC key from the variable ``name``: its value never appears in a message."""
    if name is None:
        return None
    value = os.environ.get(name, "")
    if not value.strip():
        fail(f"--hmac-key-env: the environment variable {name} is not set", EXIT_CONFIG)
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        fail(f"--hmac-key-env: {name} is not valid base64", EXIT_CONFIG)
    if len(key) < 16:
        fail(
            f"--hmac-key-env: {name} holds {len(key)} bytes; an HMAC key has at least 16",
            EXIT_CONFIG,
        )
    return key


def _report_audit(result: AuditVerification, as_json: bool) -> None:
    if as_json:
        echo_json(
            {
                "ok": result.ok,
                "rows": result.rows,
                "mode": result.mode,
                "head": str(result.head) if result.head else None,
                "problems": list(result.problems),
                "warnings": list(result.warnings),
            }
        )
    else:
        if result.ok:
            click.echo(
                f"audit chain OK ({result.rows} rows, {result.mode} mode, head {result.head})"
            )
        for warning in result.warnings:
            click.echo(f"warning: {warning}", err=True)
        for problem in result.problems:
            click.echo(f"- {problem}", err=True)
    if not result.ok:
        sys.exit(EXIT_FAILED)


@audit.command("verify")
@_audit_options
@click.option(
    "--anchor",
    metavar="SEQ:HEX",
    help="a head printed by an earlier verify: fail if the table was rolled back past it",
)
def audit_verify(
    dsn: str, table: str, hmac_key_env: str | None, anchor: str | None, as_json: bool
) -> None:
    """Recompute the hash chain of the Postgres audit table; exit 1 if it was tampered with.

    Give the key of an HMAC chain with --hmac-key-env NAME. Record the printed head
    somewhere else and pass it as --anchor later to detect a rollback.
    """
    from .audit.postgres import AuditAnchor, PostgresAuditSink

    key = _audit_hmac_key(hmac_key_env)
    try:
        expected = AuditAnchor.parse(anchor) if anchor is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--anchor") from None

    async def main() -> AuditVerification:
        sink = PostgresAuditSink(dsn, table=table, hmac_key=key)
        try:
            return await sink.verify(anchor=expected)
        finally:
            await sink.close()

    _report_audit(asyncio.run(main()), as_json)


@audit.command("upgrade")
@_audit_options
def audit_upgrade(dsn: str, table: str, hmac_key_env: str | None, as_json: bool) -> None:
    """Authenticate the head of an audit table written by an older aiocrypt (once).

    Verifies the whole chain first and changes nothing if it fails; the upgrade
    trusts the table as it is now, and is itself recorded in the chain.
    """
    from .audit.postgres import PostgresAuditSink

    key = _audit_hmac_key(hmac_key_env)

    async def main() -> AuditVerification:
        sink = PostgresAuditSink(dsn, table=table, hmac_key=key)
        try:
            return await sink.upgrade()
        finally:
            await sink.close()

    _report_audit(asyncio.run(main()), as_json)


@main.group()
def config() -> None:
    """Check the configuration."""


@config.command("validate")
@json_option
def validate(as_json: bool) -> None:
    """Report every configuration problem; exit 3 if there is any.

    Nothing is created or changed. The file key store's directory and file are
    checked as the store will use them; with the local master key an existing key
    store is also opened read-only to check that the master key opens it. A KMS or
    a networked store is not contacted: 'aiocrypt doctor' reaches those.
    """
    config = CryptoConfigManager().get_config()
    problems = config.validate()
    if not problems:
        problems = asyncio.run(_open_local_file_store(config))
    warnings = config.storage_warnings()
    if as_json:
        echo_json({"ok": not problems, "problems": problems, "warnings": warnings})
    else:
        for warning in warnings:
            click.echo(f"warning: {warning}", err=True)
        for problem in problems:
            click.echo(f"- {problem}", err=True)
        if not problems:
            click.echo("configuration OK")
    if problems:
        sys.exit(EXIT_CONFIG)


async def _open_local_file_store(config: EncryptionConfig) -> list[str]:
    """A read-only open of an existing file store under the local master key (pure
    computation: no KMS call, nothing written); a problem if it does not open."""
    from ._errors import KeyStoreError
    from .kek.local import LocalKekProvider
    from .keystore.file import FileKeyStore

    path = config.key_store_file()
    if config.storage_backend != "file" or not path.is_file():
        return []
    store_log = logging.getLogger("aiocrypt.keystore.file")
    level = store_log.level
    store_log.setLevel(logging.ERROR)  # its mode warning is validate's own warning
    try:
        await FileKeyStore(path, LocalKekProvider(config.master_key_bytes())).read()
    except KeyStoreError as exc:
        return [f"ENCRYPTION_KEY_STORAGE_PATH: {exc}"]
    finally:
        store_log.setLevel(level)
    return []


@config.command("show")
@json_option
def show(as_json: bool) -> None:
    """Show the effective settings as JSON (secrets shown only as <set>)."""
    echo_json(CryptoConfigManager().get_config().to_public_dict())


@main.command("new-master-key")
@json_option
def new_master_key(as_json: bool) -> None:
    """Print a new random master key (base64 of 32 bytes) for ENCRYPTION_MASTER_KEY."""
    key = base64.b64encode(os.urandom(32)).decode("ascii")
    if sys.stdout.isatty():
        click.echo(
            "warning: this prints a secret; prefer 'aiocrypt init' (writes a 0600 file)", err=True
        )
    echo_json({"master_key": key}) if as_json else click.echo(key)


@main.command("demo")
def demo() -> None:
    """Run the end-to-end demo in a temporary directory."""
    from .demo import main as demo_main

    demo_main([])


from ._cli_ops import census, reencrypt  # noqa: E402  (they use the helpers above)
from ._cli_setup import doctor, init  # noqa: E402

main.add_command(init)
main.add_command(doctor)
main.add_command(reencrypt)
main.add_command(census)

from ._cli_subjects import subjects  # noqa: E402

main.add_command(subjects)


class _LazyGroup(click.Group):
    """A command group defined in an integration, imported only when it is used (the
    core CLI never imports arq or redis)."""

    def __init__(self, name: str, target: str, extra: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self._target, self._extra = target, extra

    def _group(self) -> click.Group:
        import importlib

        module, _, attr = self._target.partition(":")
        try:
            group: click.Group = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            fail(f"{exc}: pip install 'aiocrypt[{self._extra}]'", EXIT_CONFIG)
        return group

    def list_commands(self, ctx: click.Context) -> list[str]:
        return self._group().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._group().get_command(ctx, cmd_name)


main.add_command(
    _LazyGroup(
        "jobs",
        "aiocrypt.integrations.arq.cli:jobs",
        "arq",
        help="Background jobs on ARQ workers: status of re-encryption, enqueue rotation, "
        "re-encryption and cleanup.",
    )
)


if __name__ == "__main__":
    main(prog_name="aiocrypt")
