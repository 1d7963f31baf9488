"""Shared pieces of the security tests: an event loop for Hypothesis, secret scanning."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class LoopRunner:
    """One event loop that sync Hypothesis tests drive coroutines on (fixtures are not
    re-run per Hypothesis example, so the service lives as long as the module)."""

    def __init__(self) -> None:
        self._runner = asyncio.Runner()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def close(self) -> None:
        self._runner.close()


def secret_forms(secret: bytes) -> list[bytes]:
    """Every textual form in which ``secret`` could leak: raw, hex, base64(url), +/- padding."""
    forms = {secret, secret.hex().encode(), secret.hex().upper().encode()}
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        text = enc(secret)
        forms.add(text)
        forms.add(text.rstrip(b"="))
    # a secret split across lines or truncated in a message: its first 20 chars still match
    forms.update({f[:20] for f in list(forms) if len(f) > 20})
    return sorted(forms)


def find_secrets(haystack: bytes | str, secrets: dict[str, bytes]) -> list[str]:
    """Names of the secrets (and the form) that occur in ``haystack``."""
    data = haystack.encode("utf-8", "surrogateescape") if isinstance(haystack, str) else haystack
    found = []
    for name, secret in secrets.items():
        for form in secret_forms(secret):
            if form in data:
                found.append(f"{name} ({form[:4]!r}...)")
                break
    return found


def exception_texts(exc: BaseException) -> Iterable[str]:
    """str and repr of an exception and of every exception chained to it, and its traceback."""
    import traceback

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield from (repr(a) for a in current.args)
        current = current.__cause__ or current.__context__
    yield "".join(traceback.format_exception(exc))
