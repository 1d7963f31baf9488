"""The public surface for adapters: what aiocrypt's integrations and third-party
adapters (an ORM, a framework, a job queue) may import from the core.

Everything else under ``aiocrypt._*`` is private and may change in any release;
the names here follow the version's compatibility promise like the rest of the
public API (docs/architecture.md, "Plugin points").
"""

from __future__ import annotations

from ._parse import FALSE_WORDS, TRUE_WORDS, parse_bool
from ._urls import redact_url, scrub

__all__ = [
    "FALSE_WORDS",
    "TRUE_WORDS",
    "parse_bool",
    "redact_url",
    "scrub",
]
