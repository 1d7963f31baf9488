"""Flask example: the Quart example's app in Flask, with async views.

Run (Redis on 127.0.0.1:6379)::

    python -m examples.flask_app                            # http://127.0.0.1:5000
    flask --app "examples.flask_app:create_app()" run

Views that touch the database or the cache are ``async def``: the extension
runs them on its own event loop, where the service, the cache's Redis client
and the async SQLAlchemy engine live. Sessions are handled synchronously.

Session cookie flags come from the framework's own keys (``SESSION_COOKIE_*`` in
``_common.default_config``). Responses that read a logged-in session carry
``Cache-Control: private, no-store`` (``AIOCRYPT_SESSION_CACHE_CONTROL``), so the
Back button after logout shows nothing; with Redis down they answer 503.
"""

from __future__ import annotations

import argparse
import shutil
import threading
from collections.abc import Mapping
from typing import Any

from flask import Flask, abort, redirect, request, session
from flask.typing import ResponseReturnValue

from aiocrypt.integrations.flask import AioCrypt

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


def create_app(config: Mapping[str, Any] | None = None) -> Flask:  # noqa: C901 - the example's views as nested functions, written out for readers
    app = Flask(__name__)
    app.config.update(default_config())
    app.config.update(config or {})
    data_dir, temporary = prepare_data_dir(app.config["EXAMPLE_DATA_DIR"])
    service = build_service(data_dir)
    crypt = AioCrypt(app, service=service)
    crypt.add_health_routes(app, metrics_path=None)  # /healthz: keys, KEK and Redis
    engine = database_engine(data_dir)
    repo = UserRepository(engine, service)
    reports = ReportMaker()
    app.extensions["example"] = {"reports": reports, "users": repo}

    seeded = threading.Lock()
    seeded_done: list[bool] = []

    @app.before_request
    def seed_once() -> None:
        if not seeded_done:
            with seeded:
                if not seeded_done:
                    crypt.run(repo.seed_demo_users())
                    seeded_done.append(True)

    def close() -> None:
        """Dispose of the database engine, stop the extension, remove a temp data dir."""
        state = crypt.state(app)
        if state.started:
            state.run(engine.dispose())
        crypt.close(app)
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)

    app.extensions["example"]["close"] = close

    def current_user_id() -> int:
        user_id = session.get("user_id")
        if not isinstance(user_id, int):
            abort(401)
        return user_id

    @app.get("/")
    def index() -> ResponseReturnValue:
        return {"app": "flask", "logged_in": "user_id" in session}

    @app.get("/login")
    def login_form() -> ResponseReturnValue:
        session["csrf_token"] = token = new_csrf_token()
        return {"csrf_token": token}

    @app.post("/login")
    async def login() -> ResponseReturnValue:
        form = request.form
        if not tokens_match(session.get("csrf_token"), form.get("csrf_token")):
            return {"error": "bad csrf token"}, 400
        user = await repo.authenticate(form.get("username", ""), form.get("password", ""))
        if user is None:
            return {"error": "wrong username or password"}, 401
        session.regenerate()  # type: ignore[attr-defined]  # new id at login: no fixation
        session.update(user_id=user.id, username=user.username, csrf_token=new_csrf_token())
        return redirect("/me")

    @app.post("/logout")
    def logout() -> ResponseReturnValue:
        session.clear()  # deletes the stored session and the cookie
        return redirect("/")

    @app.get("/me")
    async def me() -> ResponseReturnValue:
        user = await repo.get(current_user_id())
        if user is None:
            abort(401)
        return user.public()

    @app.get("/report")
    async def report() -> ResponseReturnValue:
        user_id = current_user_id()

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
    def whoami() -> ResponseReturnValue:
        return {"username": session.get("username")}

    @app.post("/visits")
    def visits() -> ResponseReturnValue:
        session["visits"] = count = session.get("visits", 0) + 1
        return {"visits": count}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    app = create_app()
    try:
        app.run(host=args.host, port=args.port, threaded=True)
    finally:
        app.extensions["example"]["close"]()


if __name__ == "__main__":
    main()
