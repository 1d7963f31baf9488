"""The ``aiocrypt`` command: keys, configuration and health for operators.

Settings come from the ``ENCRYPTION_*`` environment variables (and the JSON
config file), exactly as the library reads them. Nothing secret is printed,
except by ``new-master-key``, whose whole purpose is to print a new key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from ._config import CryptoConfigManager
from ._errors import AiocryptError
from ._factory import build_key_manager
from ._manager import KeyManager
from ._types import KeyStatus, KeyType

T = TypeVar("T")
console = Console()


def _run(work: Callable[[KeyManager], Awaitable[T]]) -> T:
    async def main() -> T:
        manager = build_key_manager(CryptoConfigManager().get_config())
        async with manager:
            return await work(manager)

    try:
        return asyncio.run(main())
    except AiocryptError as exc:
        raise click.ClickException(str(exc)) from None


def _key_type(_: Any, __: Any, value: str) -> KeyType:
    try:
        return KeyType(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group()
@click.version_option(package_name="aiocrypt")
def main() -> None:
    """aiocrypt: field encryption keys for asyncio web applications."""


@main.group()
def keys() -> None:
    """Inspect and change data-encryption keys."""


@keys.command("list")
@click.option("--type", "key_type", default=None, help="only this key type")
@click.option("--status", type=click.Choice([s.value for s in KeyStatus]), default=None)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def list_keys(key_type: str | None, status: str | None, as_json: bool) -> None:
    """List keys (metadata only; no material is ever shown)."""
    found = _run(lambda m: m.list_keys(key_type, status))
    if as_json:
        click.echo(json.dumps([{k: v for k, v in key.to_dict().items() if k != "wrapped_key"}
                               for key in found], indent=2))
        return
    table = Table("key id", "type", "version", "status", "created", "expires")
    for key in found:
        table.add_row(key.key_id, key.key_type.value, str(key.version), key.status.value,
                      f"{key.created_at:%Y-%m-%d %H:%M}", f"{key.expires_at:%Y-%m-%d}")
    console.print(table)


@keys.command("generate")
@click.argument("key_type", callback=_key_type)
def generate(key_type: KeyType) -> None:
    """Create a new active version of KEY_TYPE."""
    key = _run(lambda m: m.generate_key(key_type))
    click.echo(f"{key.key_id} is now the active {key.key_type.value} key (version {key.version})")


@keys.command("rotate")
@click.argument("key_type", callback=_key_type)
@click.option("--force", is_flag=True, help="rotate even if the policy says it is not due")
def rotate(key_type: KeyType, force: bool) -> None:
    """Rotate KEY_TYPE if due by policy (or --force)."""
    async def work(m: KeyManager) -> tuple[str | None, str]:
        before = m.keyring.active_keys.get(key_type)
        after = await m.rotate_key(key_type, force=force)
        return (before.key_id if before else None), after.key_id

    before, after = _run(work)
    if before == after:
        click.echo(f"{key_type.value}: not due for rotation; {after} stays active "
                   "(use --force to rotate anyway)")
    else:
        click.echo(f"{key_type.value}: rotated {before or '(none)'} -> {after}")


@keys.command("revoke")
@click.argument("key_id")
@click.option("--reason", default="Manual revocation", show_default=True)
def revoke(key_id: str, reason: str) -> None:
    """Revoke KEY_ID: it never encrypts again."""
    key = _run(lambda m: m.revoke_key(key_id, reason))
    click.echo(f"{key.key_id} is {key.status.value}")


@keys.command("compromise")
@click.argument("key_id")
@click.option("--reason", required=True, help="what happened (kept in the audit trail)")
@click.option("--reencrypt", is_flag=True,
              help="enqueue the re-encryption of its data on the ARQ workers now "
                   "(aiocrypt[arq]; ENCRYPTION_ARQ_REDIS_URL or ENCRYPTION_REDIS_URL)")
@click.pass_context
def compromise(ctx: click.Context, key_id: str, reason: str, reencrypt: bool) -> None:
    """Mark KEY_ID compromised: stop using it, rotate, flag its data for re-encryption."""
    key = _run(lambda m: m.mark_compromised(key_id, reason))
    click.echo(f"{key.key_id} is {key.status.value}; its data must be re-encrypted")
    if not reencrypt:
        click.echo(f"next: aiocrypt jobs reencrypt {key.key_type.value} {key.key_id} "
                   "(or pass --reencrypt)")
        return
    try:
        from .integrations._arq_cli import reencrypt as enqueue_reencryption
    except ImportError as exc:
        raise click.ClickException(f"{exc}: pip install 'aiocrypt[arq]'") from None
    ctx.invoke(enqueue_reencryption, key_type=key.key_type, old_key_id=key.key_id,
               batch_size=None, shards=None)


@keys.command("rotate-due")
def rotate_due() -> None:
    """Run the rotation policy now (what the daily job does) and print the report."""
    click.echo(json.dumps(_run(lambda m: m.rotate_keys_due()), indent=2))


@keys.command("cleanup")
@click.option("--confirm", "confirm", multiple=True, metavar="KEY_ID",
              help="a key id you have verified no data references (repeatable)")
@click.option("--force", is_flag=True,
              help="destroy expired keys WITHOUT a reference check (audited; data may be lost)")
def cleanup(confirm: tuple[str, ...], force: bool) -> None:
    """Destroy keys past max age + grace that nothing references; say why others are kept."""
    if force:
        click.confirm("Destroy every key past its grace period without checking references?",
                      abort=True)
    report = _run(lambda m: m.cleanup_report(confirm_unreferenced=confirm, force=force))
    for item in report["destroyed"]:
        click.echo(f"destroyed {item['key_id']}: {item['reason']}")
    for item in report["kept"]:
        click.echo(f"kept      {item['key_id']}: {item['reason']}")
    if not report["destroyed"] and not report["kept"]:
        click.echo("no key is past its grace period")


@keys.command("rotate-master-key")
@click.option("--new-key-env", default="ENCRYPTION_NEW_MASTER_KEY", show_default=True,
              help="environment variable holding the new master key (never a CLI argument)")
def rotate_master_key(new_key_env: str) -> None:
    """Rewrap every DEK under a new local master key; resumable if interrupted."""
    from ._config import decode_master_key
    from .kek.local import LocalKekProvider

    raw = os.environ.get(new_key_env)
    if not raw:
        raise click.ClickException(f"{new_key_env} is not set")
    try:
        new_kek = LocalKekProvider(decode_master_key(raw))
    except ValueError as exc:
        raise click.ClickException(str(exc).replace("ENCRYPTION_MASTER_KEY", new_key_env)) \
            from None
    count = _run(lambda m: m.rotate_master_key(new_kek))
    click.echo(f"rewrapped {count} keys under {new_kek.kek_id}; now set ENCRYPTION_MASTER_KEY "
               f"to the value of {new_key_env}")


@keys.command("stats")
def stats() -> None:
    """Key statistics as JSON."""
    click.echo(json.dumps(_run(lambda m: m.get_key_statistics()), indent=2, default=str))


@main.group()
def audit() -> None:
    """The audit trail."""


@audit.command("verify")
@click.option("--dsn", envvar="ENCRYPTION_AUDIT_DSN", required=True,
              help="PostgreSQL DSN of the audit table (or ENCRYPTION_AUDIT_DSN)")
@click.option("--table", default="aiocrypt_audit", show_default=True)
def audit_verify(dsn: str, table: str) -> None:
    """Recompute the hash chain of the Postgres audit table; exit 1 if it was tampered with."""
    from .audit.postgres import PostgresAuditSink

    async def main() -> Any:
        sink = PostgresAuditSink(dsn, table=table)
        try:
            return await sink.verify()
        finally:
            await sink.close()

    result = asyncio.run(main())
    if result.ok:
        click.echo(f"audit chain OK ({result.rows} rows)")
        return
    for problem in result.problems:
        click.echo(f"- {problem}", err=True)
    sys.exit(1)


@main.group()
def config() -> None:
    """Check the configuration."""


@config.command("validate")
def validate() -> None:
    """Report every configuration problem; exit 1 if there is any."""
    problems = CryptoConfigManager().validate_environment()
    if not problems:
        click.echo("configuration OK")
        return
    for problem in problems:
        click.echo(f"- {problem}", err=True)
    sys.exit(1)


@config.command("show")
def show() -> None:
    """Show the effective settings (secrets shown only as <set>)."""
    click.echo(json.dumps(CryptoConfigManager().get_config().to_public_dict(), indent=2,
                          default=str))


@main.command("new-master-key")
def new_master_key() -> None:
    """Print a new random master key (base64 of 32 bytes) for ENCRYPTION_MASTER_KEY."""
    click.echo(base64.b64encode(os.urandom(32)).decode("ascii"))


@main.command("demo")
def demo() -> None:
    """Run the end-to-end demo in a temporary directory."""
    from .demo import main as demo_main

    demo_main([])


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
            raise click.ClickException(f"{exc}: pip install 'aiocrypt[{self._extra}]'") \
                from None
        return group

    def list_commands(self, ctx: click.Context) -> list[str]:
        return self._group().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._group().get_command(ctx, cmd_name)


main.add_command(_LazyGroup(
    "jobs", "aiocrypt.integrations._arq_cli:jobs", "arq",
    help="Background jobs on ARQ workers: status of re-encryption, enqueue rotation, "
         "re-encryption and cleanup."))


if __name__ == "__main__":
    main()
