"""Connection URLs as they may appear in reprs, logs and messages: without secrets.

The one redaction rule of the project (every repr, message and command output
goes through :func:`redact_url` or :func:`scrub`):

* a password in the userinfo becomes ``***`` (``redis://user:***@host:6379/0``);
* query parameters that carry secrets are removed: ``password``, ``pass``,
  ``pwd``, ``passwd``, ``secret``, ``token``, ``access_key``, ``api_key``,
  ``sslpassword``, ``sig`` ..., and any name containing ``pass``, ``secret``,
  ``token``, ``pwd`` or ``credential`` (case-insensitive, percent-decoded);
  the other parameters stay, because they say where the connection goes
  (``?host=/var/run/postgresql``, ``?sslmode=require``, ``?db=2``);
* the fragment is dropped.

It works on the text of the URL, not on a parser's idea of a host, so any
scheme and form is covered: ``redis``, ``rediss``, ``unix``, ``postgres``,
``postgresql``, several hosts, a socket path in the host or in the query. A
password must be percent-encoded in a URL; when an ``@`` follows the authority
(a raw ``/``, ``?`` or ``@`` in a password, or an ``@`` in a path or query
value), what belongs to the userinfo cannot be told, and all of it is hidden
(after a ``?``, everything after the scheme is).
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote_plus

__all__ = ["redact_url", "scrub"]

_SCHEME: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):(//)?")
_SECRET_NAMES: Final = frozenset(
    {
        "password",
        "pass",
        "pwd",
        "passwd",
        "secret",
        "token",
        "access_key",
        "api_key",
        "apikey",
        "sslpassword",
        "key",
        "auth",
        "sig",
        "signature",
        "credentials",
        "client_secret",
    }
)
_SECRET_PARTS: Final = ("pass", "secret", "token", "pwd", "credential")
#: One host, optionally with a port: a name, an IPv4 address, a bracketed IPv6
#: address or a percent-encoded socket path.
_HOST: Final = r"(?:\[[0-9A-Za-z:.%]*\]|[A-Za-z0-9._~%\-]*)(?::\d*)?"
_HOSTS: Final = re.compile(rf"{_HOST}(?:,{_HOST})*")
#: A URL inside free text: up to the first blank or quote.
_URL_IN_TEXT: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]*")


def _is_secret(name: str) -> bool:
    name = unquote_plus(name).strip().lower()
    return name in _SECRET_NAMES or any(part in name for part in _SECRET_PARTS)


def _split(url: str) -> tuple[str, str | None, str, str] | None:
    """``(scheme prefix, userinfo, hosts, rest)`` of ``url``, or None if it has no scheme.

    ``rest`` is the path and query (the fragment removed); ``userinfo`` is None
    without an ``@``, and ``"\\0"`` when the authority is ambiguous (hide it all).
    """
    match = _SCHEME.match(url)
    if match is None:
        return None
    prefix, body = match.group(0), url[match.end() :]
    if not match.group(2):  # "unix:/path?query": no authority
        if "@" in body:  # "user:password@host" without "//": not a URL to take apart
            return "", "\0", "***", ""
        return prefix, None, "", body.partition("#")[0]
    end = min((i for i in map(body.find, "/?#") if i != -1), default=len(body))
    authority, rest = body[:end], body[end:]
    if "@" in rest:
        # a raw "/", "?" or "#" inside a password puts part of it after the
        # authority: everything up to the last "@" may be userinfo. After a "?",
        # that "@" may as well sit in a query value, and what follows be secret.
        before, _, after = body.rpartition("@")
        if "?" in before:
            return prefix, "\0", "***", ""
        after = after.partition("#")[0]
        end = min((i for i in map(after.find, "/?") if i != -1), default=len(after))
        return prefix, "\0", after[:end], after[end:]
    rest = rest.partition("#")[0]
    if "@" in authority:
        userinfo, _, hosts = authority.rpartition("@")
        return prefix, userinfo, hosts, rest
    return prefix, None, authority, rest


def _redact_query(rest: str) -> str:
    path, sep, query = rest.partition("?")
    if not sep:
        return path
    kept = [
        item for item in re.split(r"[&;]", query) if item and not _is_secret(item.partition("=")[0])
    ]
    return f"{path}?{'&'.join(kept)}" if kept else path


def redact_url(url: str) -> str:
    """``url`` without its secrets: the userinfo password as ``***``, secret query
    parameters and the fragment removed (the rule is in the module docstring).

    A string without a scheme (a bare host, a libpq ``key=value`` string) keeps
    only its non-secret ``key=value`` words.
    """
    parts = _split(url)
    if parts is None:
        kept = [
            word
            for word in url.split()
            if "=" not in word or not _is_secret(word.partition("=")[0])
        ]
        return " ".join(kept)
    prefix, userinfo, hosts, rest = parts
    if not _HOSTS.fullmatch(hosts):
        hosts = "***"  # not a host list: possibly the tail of an unencoded password
    if userinfo is None:
        netloc = hosts
    elif userinfo == "\0":
        netloc = "***" if hosts == "***" else f"***@{hosts}"
    else:
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hosts}" if has_password else f"{user}@{hosts}"
    return prefix + netloc + _redact_query(rest)


def _secrets_of(url: str) -> set[str]:
    """The secret values in ``url``, as written and percent-decoded."""
    values = [
        word.partition("=")[2]
        for word in re.split(r"[\s&;?]", url)
        if "=" in word and _is_secret(word.partition("=")[0])
    ]
    parts = _split(url)
    if parts is not None and parts[1] == "\0":
        match = _SCHEME.match(url)
        chunk = url[match.end() if match else 0 :].rpartition("@")[0]
        values += [chunk, chunk.partition(":")[2]]
    elif parts is not None and parts[1] is not None:
        values.append(parts[1].partition(":")[2])
    found: set[str] = set()
    for value in values:
        value = value.partition("#")[0]
        found.update(v for v in (value, unquote_plus(value)) if v)
    return found


def scrub(text: str, *urls: str | None) -> str:
    """``text`` (a message, a driver's error) with every URL in it redacted, and the
    secrets of each of ``urls`` (the URLs the caller connected with) masked wherever
    they appear."""
    text = _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
    for url in urls:
        if url:
            for secret in sorted(_secrets_of(url), key=len, reverse=True):
                text = text.replace(secret, "***")
    return text
