"""Quart example: encrypted user fields, encrypted Redis sessions, an encrypted report cache.

Run (Redis on 127.0.0.1:6379)::

    python -m examples.quart_app                 # http://127.0.0.1:8000
    hypercorn "examples.quart_app:create_app()"  # the same app under hypercorn's CLI

Endpoints (JSON): ``GET /``, ``GET /login`` (gives a CSRF token, opens a
session), ``POST /login`` (username, password, csrf_token; rotates the
session id), ``GET /me``, ``GET /report`` (cached encrypted in Redis),
``GET /whoami`` and ``POST /visits`` (session only), ``POST /logout``.

Session cookie flags come from the framework's own keys (``SESSION_COOKIE_*`` in
``_common.default_config``). Responses that read a logged-in session carry
``Cache-Control: private, no-store`` (``AIOCRYPT_SESSION_CACHE_CONTROL``), so the
Back button after logout shows nothing; with Redis down they answer 503.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
from collections.abc import Mapping
from typing import Any

from quart import Quart, abort, redirect, request, session
from quart.typing import ResponseReturnValue

from aiocrypt.integrations.quart import AioCrypt

from ._common import (
    ReportMaker,
    UserRepository,
    build_service,
    database_engine,
    default_config,
    jsonable,
    new_csrf_token,
    prepare_data_dir,
    tokens_match,
)


def create_app(config: Mapping[str, Any] | None = None) -> Quart:  # noqa: C901 - the example's views as nested functions, written out for readers
    app = Quart(__name__)
    app.config.update(default_config())
    app.config.update(config or {})
    data_dir, temporary = prepare_data_dir(app.config["EXAMPLE_DATA_DIR"])
    service = build_service(data_dir)
    crypt = AioCrypt(app, service=service)  # starts/closes the service with the app
    crypt.add_health_routes(app, metrics_path=None)  # /healthz: keys, KEK and Redis
    engine = database_engine(data_dir)
    repo = UserRepository(engine, service)
    reports = ReportMaker()
    app.extensions["example"] = {"reports": reports, "users": repo}

    @app.before_serving
    async def setup() -> None:
        await repo.seed_demo_users()

    @app.after_serving
    async def teardown() -> None:
        await engine.dispose()
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)

    async def current_user_id() -> int:
        user_id = session.get("user_id")
        if not isinstance(user_id, int):
            abort(401)
        return user_id

    @app.get("/")
    async def index() -> ResponseReturnValue:
        return {"app": "quart", "logged_in": "user_id" in session}

    @app.get("/login")
    async def login_form() -> ResponseReturnValue:
        session["csrf_token"] = token = new_csrf_token()
        return {"csrf_token": token}

    @app.post("/login")
    async def login() -> ResponseReturnValue:
        form = await request.form
        if not tokens_match(session.get("csrf_token"), form.get("csrf_token")):
            return {"error": "bad csrf token"}, 400
        user = await repo.authenticate(form.get("username", ""), form.get("password", ""))
        if user is None:
            return {"error": "wrong username or password"}, 401
        session.regenerate()  # type: ignore[attr-defined]  # new id at login: no fixation
        session.update(user_id=user.id, username=user.username, csrf_token=new_csrf_token())
        return redirect("/me")

    @app.post("/logout")
    async def logout() -> ResponseReturnValue:
        session.clear()  # deletes the stored session and the cookie
        return redirect("/")

    @app.get("/me")
    async def me() -> ResponseReturnValue:
        user = await repo.get(await current_user_id())
        if user is None:
            abort(401)
        return user.public()

    @app.get("/report")
    async def report() -> ResponseReturnValue:
        user_id = await current_user_id()

        async def compute() -> dict[str, Any]:
            user = await repo.get(user_id)
            if user is None:
                abort(401)
            return await reports.compute(user)

        data = await crypt.cache.get_or_set(
            f"report:{user_id}", compute, ttl=app.config["REPORT_CACHE_TTL"]
        )
        return {"report": jsonable(data), "computations": reports.computations}

    @app.get("/whoami")
    async def whoami() -> ResponseReturnValue:
        return {"username": session.get("username")}

    @app.post("/visits")
    async def visits() -> ResponseReturnValue:
        session["visits"] = count = session.get("visits", 0) + 1
        return {"visits": count}

    return app


def main(argv: list[str] | None = None) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    config = Config()
    config.bind = [f"{args.host}:{args.port}"]
    config.accesslog = "-"
    asyncio.run(serve(create_app(), config))


if __name__ == "__main__":
    main()
