"""Requests per second of the Quart example: encrypted Redis sessions vs plain JSON ones.

    python bench/bench_sessions.py            # from the repository root, Redis on :6379

Two server processes run the Quart example (examples/quart_app.py) under
hypercorn on loopback, side by side: one with aiocrypt's encrypted sessions,
one with a baseline that stores the same session envelope as plain JSON under
the raw session id (the same store code with its three key-related steps
replaced: no HMAC, no AES-GCM). This process is the load generator: it logs
``--connections`` users in on each server, then runs ``--bursts`` bursts per
endpoint and variant, alternating E P / P E so that background load on the
machine hits both alike. In a burst every user's keep-alive connection sends
its share of ``--requests`` requests (stopping early at ``--seconds``):

* ``read``:  ``GET /whoami``  loads the session (GETEX + decrypt), never writes it;
* ``write``: ``POST /visits`` loads, changes and saves it (+ encrypt + SET).

The report gives medians, bests and the median of the ratios of adjacent
bursts. Keys live under a random prefix in Redis database 15 and are deleted
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import cpu_model  # noqa: E402

SCENARIOS = {"read": ("GET", "/whoami"), "write": ("POST", "/visits")}


# -- server side -------------------------------------------------------------------


def serve(variant: str, port: int, redis_url: str, prefix: str) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config
    from quart import Quart
    from quart.json.tag import TaggedJSONSerializer
    from quart.sessions import SessionMixin
    from quart.wrappers import BaseRequestWebsocket, Response

    from aiocrypt import DecryptionError
    from aiocrypt.integrations.quart import AioCrypt, EncryptedSessionInterface, QuartSession
    from aiocrypt.integrations.sessions import EncryptedSession, RedisSessionStore, apply_cookie
    from examples.quart_app import create_app

    class PlainJSONSessionStore(RedisSessionStore):  # type: ignore[misc]  # aiocrypt.integrations.* is Any to mypy
        """Baseline: the session id itself is the Redis key and the envelope is plain JSON."""

        async def _redis_keys(self) -> Callable[[str], list[str]]:
            prefix = self.settings.prefix
            return lambda sid: [prefix + sid]

        async def _seal(self, envelope: dict[str, Any], sid: str) -> str:
            return json.dumps(envelope, separators=(",", ":"))

        async def _open(self, token: str, sid: str) -> Any:
            try:
                return json.loads(token)
            except ValueError:
                raise DecryptionError() from None

    class PlainSessionInterface(EncryptedSessionInterface):  # type: ignore[misc]  # aiocrypt.integrations.* is Any to mypy
        store: PlainJSONSessionStore

        async def open_session(self, app: Quart, request: BaseRequestWebsocket) -> QuartSession:
            settings = AioCrypt.state(app).settings
            return await self.store.load(
                request.cookies.get(settings.cookie_name), self.session_class
            )

        async def save_session(
            self, app: Quart, session: SessionMixin, response: Response | Any
        ) -> None:
            assert isinstance(session, EncryptedSession)
            if not session.accessed:
                return
            result = await self.store.save(session)
            apply_cookie(AioCrypt.state(app).settings, session, result, response)

    app = create_app(
        {
            "AIOCRYPT_REDIS_URL": redis_url,
            "AIOCRYPT_SESSION_PREFIX": f"{prefix}{variant}:session:",
            "AIOCRYPT_CACHE_PREFIX": f"{prefix}{variant}:cache:",
            "AIOCRYPT_COOKIE_SECURE": False,
            "EXAMPLE_DATA_DIR": None,
        }
    )
    if variant == "plain":
        interface = PlainSessionInterface()
        app.session_interface = interface

        @app.before_serving
        async def plain_store() -> None:
            state = AioCrypt.state(app)
            assert state.redis_client is not None
            interface.store = PlainJSONSessionStore(  # the same tagged JSON as the extension
                state.service,
                state.redis_client,
                state.settings.session,
                serializer=TaggedJSONSerializer(),
            )

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    stop = asyncio.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)

    asyncio.run(main())


# -- client side -------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until_up(url: str, timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(url + "/")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server at {url} did not come up")
            await asyncio.sleep(0.05)


async def log_in(url: str, username: str) -> str:
    import httpx

    async with httpx.AsyncClient(base_url=url) as client:
        token = (await client.get("/login")).json()["csrf_token"]
        response = await client.post(
            "/login",
            data={
                "username": username,
                "password": "correct horse battery staple",
                "csrf_token": token,
            },
        )
        assert response.status_code == 302, response.status_code
        return client.cookies["session"]


async def hammer(
    port: int, cookie: str, method: str, path: str, count: int, deadline: float
) -> int:
    """Send up to ``count`` requests on one keep-alive connection; return how many completed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Cookie: session={cookie}\r\nContent-Length: 0\r\n\r\n"
    ).encode("ascii")
    done = 0
    try:
        while done < count and time.monotonic() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if head[9:12] != b"200":
                raise RuntimeError(f"{method} {path}: HTTP {head[9:12].decode()}")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done += 1
    finally:
        writer.close()
        await writer.wait_closed()
    return done


async def measure(
    port: int, cookies: list[str], scenario: str, requests: int, seconds: float
) -> float:
    """Requests per second of one burst: every connection sends its share, in parallel."""
    method, path = SCENARIOS[scenario]
    per_connection = max(1, requests // len(cookies))
    start = time.monotonic()
    deadline = start + seconds
    done = await asyncio.gather(
        *(hammer(port, c, method, path, per_connection, deadline) for c in cookies)
    )
    return sum(done) / (time.monotonic() - start)


async def check_storage(redis_url: str, prefix: str, variant: str) -> None:
    """Make sure each variant stored what it claims to (JSON in clear, or tokens)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}{variant}:session:*")]
        values = await client.mget(keys)
        assert values, "no sessions stored"
        plain = [v.startswith(b"{") for v in values]
        assert all(plain) if variant == "plain" else not any(plain), variant
    finally:
        await client.aclose()


class ServerProcess:
    """One variant of the app, served by hypercorn in a child process."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None
        self.cookies: list[str] = []

    async def start(self, args: argparse.Namespace, prefix: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("ENCRYPTION_MASTER_KEY", None)  # a fresh key for the temp data dir
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            self.variant,
            "--port",
            str(self.port),
            "--redis-url",
            args.redis_url,
            "--prefix",
            prefix,
            cwd=ROOT,
            env=env,
        )
        url = f"http://127.0.0.1:{self.port}"
        await wait_until_up(url)
        users = ["alice", "bob"] * (args.connections // 2) + ["alice"] * (args.connections % 2)
        self.cookies = list(await asyncio.gather(*(log_in(url, u) for u in users)))
        for scenario in SCENARIOS:  # warm-up
            await measure(self.port, self.cookies, scenario, 20 * len(self.cookies), args.seconds)

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def cleanup(redis_url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def bench(args: argparse.Namespace) -> dict[tuple[str, str], list[float]]:
    prefix = f"bench:sessions:{secrets.token_hex(4)}:"
    servers = {"encrypted": ServerProcess("encrypted"), "plain": ServerProcess("plain")}
    rps: dict[tuple[str, str], list[float]] = {}
    try:
        for server in servers.values():
            await server.start(args, prefix)
        for burst in range(args.bursts):
            # Alternate the order so neither variant always runs first.
            order = ["encrypted", "plain"] if burst % 2 == 0 else ["plain", "encrypted"]
            for scenario in SCENARIOS:
                for variant in order:
                    server = servers[variant]
                    rps.setdefault((scenario, variant), []).append(
                        await measure(
                            server.port, server.cookies, scenario, args.requests, args.seconds
                        )
                    )
            print(
                f"burst {burst + 1:2}: "
                + "  ".join(
                    f"{scenario} E {rps[scenario, 'encrypted'][-1]:6.0f} "
                    f"P {rps[scenario, 'plain'][-1]:6.0f}"
                    for scenario in SCENARIOS
                ),
                flush=True,
            )
        for variant in servers:
            await check_storage(args.redis_url, prefix, variant)
    finally:
        for server in servers.values():
            await server.stop()
        await cleanup(args.redis_url, prefix)
    return rps


def report(args: argparse.Namespace, rps: dict[tuple[str, str], list[float]]) -> None:
    print(
        f"\n{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs ({cpu_model()}), {args.connections} keep-alive connections, "
        f"{args.bursts} bursts of {args.requests} requests per endpoint and variant"
    )
    print(
        "\n| endpoint | encrypted req/s (median / best) | plain JSON req/s (median / best) "
        "| ratio of medians | median of paired ratios | ratio of bests |"
    )
    print("|---|---|---|---|---|---|")
    for scenario, (method, path) in SCENARIOS.items():
        enc, plain = rps[scenario, "encrypted"], rps[scenario, "plain"]
        paired = statistics.median(e / p for e, p in zip(enc, plain, strict=True))
        print(
            f"| {scenario}: `{method} {path}` "
            f"| {statistics.median(enc):.0f} / {max(enc):.0f} "
            f"| {statistics.median(plain):.0f} / {max(plain):.0f} "
            f"| {statistics.median(enc) / statistics.median(plain):.2f}x "
            f"| {paired:.2f}x | {max(enc) / max(plain):.2f}x |"
        )


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=1600, help="requests per burst (default 1600)"
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="time limit per burst (default 10)"
    )
    parser.add_argument(
        "--bursts", type=int, default=20, help="bursts per endpoint and variant (default 20)"
    )
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--serve", choices=("encrypted", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = arguments()
    if args.serve:
        serve(args.serve, args.port, args.redis_url, args.prefix)
    else:
        report(args, asyncio.run(bench(args)))


if __name__ == "__main__":
    main()
