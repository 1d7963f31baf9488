"""Optional OpenTelemetry spans and metrics around key operations.

Skeleton: the API callers use. With ``opentelemetry-api`` not installed every
call is a no-op. Attributes are key ids, key types, counts and outcomes only:
never a value, a token or key material.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Operation", "count", "span"]

AttributeValue = str | int | float | bool


class Operation:
    """The handle of one span: attributes set while it runs (e.g. the outcome)."""

    __slots__ = ("attributes",)

    def __init__(self, attributes: dict[str, AttributeValue]) -> None:
        self.attributes = attributes

    def set(self, **attributes: AttributeValue) -> None:
        self.attributes.update(attributes)


@contextmanager
def span(name: str, **attributes: AttributeValue) -> Iterator[Operation]:
    """Trace one operation named ``aiocrypt.<area>.<operation>``."""
    yield Operation(dict(attributes))


def count(name: str, value: int = 1, **attributes: AttributeValue) -> None:
    """Add ``value`` to the counter ``name``."""
