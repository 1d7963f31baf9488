"""What every ``aiocrypt`` command shares: exit codes, error reporting, settings, output.

The exit codes are decided here, in :func:`exit_code_for`, and nowhere else (see
the table in ``aiocrypt/cli.py`` and docs/cli.md).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Final, NoReturn, TypeVar

import click
from rich.console import Console

from ._config import CryptoConfigManager, EncryptionConfig
from ._errors import AiocryptError, ConfigurationError, ReencryptionError, UnknownKeyTypeError
from ._factory import build_key_manager
from ._keys import EncryptionKey
from ._manager import KeyManager
from ._types import KeyType
from ._urls import scrub

T = TypeVar("T")
# Piped output is not cut at 80 columns (key ids must stay copyable); COLUMNS still wins.
_WIDTH: Final = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
console = Console(width=_WIDTH)
err_console = Console(stderr=True)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_CONFIG: Final = 3
EXIT_UNREACHABLE: Final = 4
EXIT_INTERRUPTED: Final = 130


# -- errors and exit codes (the one place) -------------------------------------------


class CliError(click.ClickException):
    """A failure reported as one ``error: ...`` line on stderr with a chosen exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


_CONNECTION_ERROR_NAMES: Final = (
    "ConnectionError",
    "ConnectionRefusedError",
    "TimeoutError",
    "CannotConnectNowError",
    "ConnectionDoesNotExistError",
    "ConnectTimeout",
    "ConnectError",
    "gaierror",
    "EndpointConnectionError",
    "ServiceUnavailable",
)


_UNREACHABLE_ERRNOS: Final = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET}
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _unreachable(exc: BaseException) -> bool:
    for item in _chain(exc):
        if isinstance(item, (ConnectionError, TimeoutError)):
            return True
        names = {cls.__name__ for cls in type(item).__mro__}
        if names.intersection(_CONNECTION_ERROR_NAMES):
            return True
        if isinstance(item, OSError) and item.errno in _UNREACHABLE_ERRNOS:
            return True
    return False


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code of an exception that ended a command."""
    if isinstance(exc, click.ClickException):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, (ConfigurationError, ImportError)):
        return EXIT_CONFIG
    if isinstance(exc, UnknownKeyTypeError):  # a key type given where no parameter checked it
        return EXIT_USAGE
    if _unreachable(exc):
        return EXIT_UNREACHABLE
    return EXIT_FAILED


_SECRET_ENV: Final = re.compile(r"(MASTER_KEY|SECRET|TOKEN|PASSWORD)$")


def redact(text: str) -> str:
    """``text`` with the secrets of any URL in it and the values of secret variables
    blanked out (URLs by the project's one rule, :func:`aiocrypt._urls.scrub`)."""
    text = scrub(text)
    for name, value in os.environ.items():
        if name.startswith("ENCRYPTION_") and _SECRET_ENV.search(name) and len(value) >= 8:
            text = text.replace(value, "<redacted>")
    return text


def describe(exc: BaseException) -> str:
    """One line about ``exc``: its message (never a secret), else its type."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    message = " ".join(str(exc).replace("\n- ", "; ").split())
    if isinstance(exc, ReencryptionError):
        message += f" [primary key {exc.primary_key!r}]"
    if not isinstance(exc, (AiocryptError, ImportError, click.ClickException)):
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return redact(message or type(exc).__name__)


class AiocryptGroup(click.Group):
    """The root group: turns any exception of a command into ``error: ...`` + exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if ctx.meta.get("aiocrypt.debug"):
                traceback.print_exc()
            code = exit_code_for(exc)
            message = describe(exc)
            if code == EXIT_INTERRUPTED:
                message = (
                    "interrupted (anything checkpointed is kept: run the command again to resume)"
                )
            raise CliError(message, code) from None


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    raise CliError(message, code)


# -- shared helpers ------------------------------------------------------------------


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--json", "as_json", is_flag=True, help="machine-readable output on stdout"
    )(function)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def load_config() -> EncryptionConfig:
    """The settings, validated: every problem in one line, exit code 3."""
    config = CryptoConfigManager().get_config()
    problems = config.validate()
    if problems:
        hint = (
            ""
            if any("aiocrypt init" in p for p in problems)
            else " (run 'aiocrypt doctor' for details)"
        )
        fail("; ".join(problems) + hint, EXIT_CONFIG)
    return config


def run_with_manager(work: Callable[[KeyManager], Awaitable[T]], **manager_options: Any) -> T:
    config = load_config()

    async def main() -> T:
        manager = build_key_manager(config, watch=False, **manager_options)
        async with manager:
            return await work(manager)

    return asyncio.run(main())


def key_type_param(_: Any, __: Any, value: str) -> KeyType:
    """A declared key type (exit 2 with the nearest names for any other): checked before
    anything opens the store, so a typo creates nothing."""
    try:
        config: EncryptionConfig | None = CryptoConfigManager().get_config()
    except ConfigurationError:
        config = None  # the command reports the settings' problem (exit 3) itself
    try:
        return KeyType(value) if config is None else config.declared_key_type(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def key_metadata(key: EncryptionKey) -> dict[str, Any]:
    """A key's metadata for output: never its material, wrapped or not."""
    data = {k: v for k, v in key.to_dict().items() if k != "wrapped_key"}
    data["has_material"] = key.wrapped_key is not None
    return data
