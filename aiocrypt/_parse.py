"""Settings given as text: the one boolean parser of the project.

Environment variables, ``app.config`` keys and adapters' own settings all read a
boolean here, so every place accepts the same words: ``1``, ``true``, ``yes``,
``on`` and ``0``, ``false``, ``no``, ``off`` (case and surrounding spaces
ignored), or a real ``bool``. Anything else is refused with a
``ConfigurationError`` naming the setting; it is never guessed at.
"""

from __future__ import annotations

from typing import Any, Final

from ._errors import ConfigurationError

__all__ = ["FALSE_WORDS", "TRUE_WORDS", "parse_bool"]

TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS: Final = frozenset({"0", "false", "no", "off"})


def parse_bool(name: str, value: Any) -> bool:
    """The boolean setting ``name`` from ``value``: a ``bool``, or one of
    :data:`TRUE_WORDS` / :data:`FALSE_WORDS` as text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ConfigurationError(
        f"{name} must be true or false (one of 1, true, yes, on, 0, false, no, off), got {value!r}"
    )
