"""``aiocrypt subjects``: forget a data subject, rewrap subject keys, count them.

Registered by ``cli.py``; the shared helpers are in ``_cli_base``. Nothing here
prints a subject id back, a key or a value: a forget prints the key ids and
lookup hashes it destroyed, as its audit event records them (docs/subjects.md).
"""

from __future__ import annotations

import getpass

import click
from rich.table import Table

from ._cli_base import console, echo_json, fail, json_option, key_type_param, run_with_manager
from ._manager import KeyManager
from ._subjects_keys import ForgetReport, SubjectRewrapReport
from ._types import KeyStatus, KeyType

__all__ = ["subjects"]


@click.group()
def subjects() -> None:
    """Per-subject keys: erase one person's data, rewrap after a rotation, count."""


def _declared_key_type(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> KeyType | None:
    return None if value is None else key_type_param(ctx, param, value)


key_type_option = click.option(
    "--key-type",
    "key_type",
    default=None,
    callback=_declared_key_type,
    help="the key type (default: every type)",
)


@subjects.command("forget")
@click.argument("subject")
@key_type_option
@click.option("--tombstone", is_flag=True, help="refuse new keys for this subject from now on")
@click.option(
    "--actor", default=None, help="who asked (recorded in the audit event; default: cli:<user>)"
)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@json_option
def forget(
    subject: str,
    key_type: KeyType | None,
    tombstone: bool,
    actor: str | None,
    yes: bool,
    as_json: bool,
) -> None:
    """Destroy SUBJECT's keys: every copy of their data becomes unreadable, for good."""
    what = f"the {key_type.value} key" if key_type is not None else "every key"
    if not yes and not click.confirm(
        f"Destroy {what} of this subject? Their data can never be read again.", err=True
    ):
        fail("not confirmed: nothing was changed")
    who = actor or f"cli:{getpass.getuser()}"

    async def work(manager: KeyManager) -> ForgetReport:
        return await manager.subjects.forget(
            subject, key_type=key_type, tombstone=tombstone, actor=who
        )

    report = run_with_manager(work)
    data = {
        "forgotten": report.forgotten,
        "key_types": [k.value for k in report.key_types],
        "subject_key_ids": list(report.subject_key_ids),
        "lookups": list(report.lookups),
        "tombstone": report.tombstone,
        "revision": report.revision,
    }
    if as_json:
        echo_json(data)
    elif report.forgotten:
        console.print(
            f"forgotten: {', '.join(report.subject_key_ids)} (keyset revision "
            f"{report.revision}){' with a tombstone' if tombstone else ''}"
        )
    else:
        console.print("this subject has no key" + (" (tombstone kept)" if tombstone else ""))


@subjects.command("rewrap")
@key_type_option
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1))
@json_option
def rewrap(key_type: KeyType | None, batch_size: int, as_json: bool) -> None:
    """Wrap subject keys still under an older version again under the active one."""

    async def work(manager: KeyManager) -> list[SubjectRewrapReport]:
        await manager.refresh(force=True)
        types = (
            [key_type]
            if key_type is not None
            else sorted(
                {k.key_type for k in await manager.list_keys() if k.status is KeyStatus.ACTIVE}
            )
        )
        return [await manager.rewrap_subjects(kt, batch_size=batch_size) for kt in types]

    reports = run_with_manager(work)
    data = [
        {
            "key_type": r.key_type.value,
            "wrapping_key_id": r.wrapping_key_id,
            "rewrapped": r.rewrapped,
            "batches": r.batches,
            "remaining": dict(r.remaining),
        }
        for r in reports
    ]
    if as_json:
        echo_json(data)
        return
    for r in reports:
        left = sum(r.remaining.values())
        console.print(
            f"{r.key_type.value}: {r.rewrapped} subject keys rewrapped under "
            f"{r.wrapping_key_id} in {r.batches} batches; {left} left on older keys"
        )
    if any(sum(r.remaining.values()) for r in reports):
        fail("some subject keys were not rewrapped (see the log): run it again")


@subjects.command("stats")
@key_type_option
@json_option
def stats(key_type: KeyType | None, as_json: bool) -> None:
    """Subject keys per wrapping key (a version that wraps any is never destroyed)."""

    async def work(manager: KeyManager) -> list[tuple[str, str, int, str, int]]:
        census = await manager.subject_census(key_type)
        keys = {k.key_id: k for k in await manager.list_keys(key_type)}
        return [
            (
                key_id,
                keys[key_id].key_type.value,
                keys[key_id].version,
                keys[key_id].status.value,
                n,
            )
            for key_id, n in census.items()
        ]

    rows = run_with_manager(work)
    if as_json:
        echo_json(
            [
                {
                    "wrapping_key_id": key_id,
                    "key_type": kt,
                    "version": version,
                    "status": status,
                    "subject_keys": n,
                }
                for key_id, kt, version, status, n in rows
            ]
        )
        return
    table = Table()
    for heading in ("wrapping key", "type", "version", "status", "subject keys"):
        table.add_column(heading)
    for key_id, kt, version, status, n in rows:
        table.add_row(key_id, kt, str(version), status, str(n))
    console.print(table)
