"""Connection URLs as they may appear in reprs, logs and messages: without passwords."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_url", "scrub"]


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (and query parameters dropped).

    Query strings are dropped because drivers accept secrets there too
    (``?password=...``, ``?sslpassword=...``).
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    if parts.username is not None or parts.password is not None:
        user = parts.username or ""
        secret = ":***" if parts.password is not None else ""
        netloc = f"{user}{secret}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def scrub(text: str, url: str | None) -> str:
    """``text`` (a driver's error message) with the password of ``url`` masked, if present."""
    if not url:
        return text
    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    return text.replace(password, "***") if password else text
