"""The one URL-redaction rule (``aiocrypt._urls``), over random passwords and parameters.

Every secret the strategies make is written in upper-case letters (plus, for the
unencoded forms, the characters that split a URL), and nothing else in the URL
is: an upper-case letter in the output is a leaked piece of a secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiocrypt._urls import redact_url, scrub

SCHEMES = ["redis", "rediss", "unix", "postgres", "postgresql", "http", "https", "redis+unix"]
SECRET_NAMES = [
    "password",
    "pass",
    "pwd",
    "secret",
    "token",
    "access_key",
    "sslpassword",
    "db_password",
    "client_secret",
    "auth_token",
    "passwd",
    "x-amz-security-token",
]
PLAIN_NAMES = ["sslmode", "db", "host", "application_name", "connect_timeout", "user"]

lower = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
#: a secret: at least one upper-case letter, then anything at all (percent-encoded in URLs)
secret = st.builds(
    lambda head, tail: head + tail,
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=4),
    st.text(st.characters(blacklist_categories=("Ll", "Nd", "Cs")), max_size=12),
)
#: an unencoded secret, as someone might paste it into a URL
raw_secret = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ/?#@:!$", min_size=1, max_size=16).filter(
    lambda s: any(c.isupper() for c in s)
)
hosts = st.sampled_from(
    [
        "127.0.0.1:6379",
        "localhost",
        "[::1]:5432",
        "h1:5432,h2:5433",
        "%2fvar%2frun%2fpostgresql",
        "",
        "db.example.com",
    ]
)
paths = st.sampled_from(["", "/", "/0", "/15", "/test", "/tmp/redis.sock"])


def secret_name(name: str, flips: list[bool]) -> str:
    """``name`` with some letters upper-cased (names are matched case-insensitively)."""
    return "".join(
        c.upper() if flip else c for c, flip in zip(name, flips + [False] * 40, strict=False)
    )


@dataclass
class Url:
    text: str
    plain: list[str]  # what must survive: the non-secret parameters


@st.composite
def urls(draw: st.DrawFn, encoded: bool = True) -> Url:
    scheme = draw(st.sampled_from(SCHEMES))
    userinfo = ""
    password = draw(secret) if encoded else draw(raw_secret)
    form = draw(st.sampled_from(["user:pw", ":pw", "user", "none"]))
    pw = quote(password, safe="") if encoded else password
    if form == "user:pw":
        userinfo = f"{draw(lower)}:{pw}@"
    elif form == ":pw":
        userinfo = f":{pw}@"
    elif form == "user":
        userinfo = f"{draw(lower)}@"
    params: list[str] = []
    plain: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            name = secret_name(
                draw(st.sampled_from(SECRET_NAMES)), draw(st.lists(st.booleans(), max_size=20))
            )
            value = quote(draw(secret), safe="") if encoded else draw(raw_secret)
            params.append(f"{name}={value}")
        else:
            item = f"{draw(st.sampled_from(PLAIN_NAMES))}={draw(lower)}"
            params.append(item)
            plain.append(item)
    query = f"?{'&'.join(params)}" if params else ""
    fragment = f"#{quote(draw(secret), safe='')}" if draw(st.booleans()) else ""
    return Url(f"{scheme}://{userinfo}{draw(hosts)}{draw(paths)}{query}{fragment}", plain)


def leaked(text: str) -> list[str]:
    return [c for c in text if c.isupper()]


@given(urls())
def test_no_secret_survives_and_the_plain_parameters_do(url: Url) -> None:
    out = redact_url(url.text)
    assert not leaked(out), (url.text, out)
    for item in url.plain:
        assert item in out, (url.text, out)
    assert redact_url(out) == out  # a redacted URL is a fixed point


@given(urls(encoded=False))
def test_an_unencoded_password_is_hidden_too(url: Url) -> None:
    out = redact_url(url.text)
    assert not leaked(out), (url.text, out)


@given(
    urls(),
    st.sampled_from(["could not connect to {}: refused", "{}", "at <{}>", "'{}' is unreachable"]),
)
def test_scrub_redacts_urls_inside_messages(url: Url, template: str) -> None:
    out = scrub(template.format(url.text))
    assert not leaked(out), out


@given(secret, lower)
def test_scrub_masks_the_secrets_of_the_url_used_wherever_they_appear(
    password: str, user: str
) -> None:
    encoded = quote(password, safe="")
    url = f"postgresql://{user}:{encoded}@127.0.0.1/db?sslpassword={encoded}"
    message = f"auth failed for {user} with {password} ({encoded})"
    assert not leaked(scrub(message, url))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db?password=secret", "postgresql://u@h/db"),
        (
            "postgresql://u:pw@h:5432/db?sslmode=require&SSLPassword=x",
            "postgresql://u:***@h:5432/db?sslmode=require",
        ),
        ("redis://:p@ss@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://app:pw@[::1]:6380/2?token=t&db=1", "rediss://app:***@[::1]:6380/2?db=1"),
        ("unix:///tmp/redis.sock?password=x&db=2", "unix:///tmp/redis.sock?db=2"),
        ("unix://:pw@/tmp/redis.sock", "unix://:***@/tmp/redis.sock"),
        (
            "postgresql:///db?host=/var/run/postgresql&password=x",
            "postgresql:///db?host=/var/run/postgresql",
        ),
        ("postgresql://u:p@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
        ("redis://:a/b@host/0", "redis://***@host/0"),
        ("host=h password=secret dbname=x", "host=h dbname=x"),
        ("http://127.0.0.1:8200", "http://127.0.0.1:8200"),
    ],
)
def test_known_forms(url: str, expected: str) -> None:
    assert redact_url(url) == expected
