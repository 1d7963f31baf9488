"""A real headless browser (Debian's chromium + chromium-driver, selenium) against both examples.

Each example app runs in a subprocess on loopback (``python -m examples.flask_app`` under
werkzeug, ``python -m examples.quart_app`` under hypercorn), started and stopped here. The
browser logs in through a form post, reloads, logs out, presses Back, replays the old cookie,
and reads the cookie flags it holds. Skipped only where chromium or chromedriver is missing
(.ci/run installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _private_services import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SECRETS = ("85000", "12000", "6789")  # alice's income, savings, SSN digits

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver are not installed (apt-get install chromium "
    "chromium-driver; .ci/run does)",
)


@pytest.fixture(params=["flask", "quart"])
def example_url(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, master_key_b64: str
) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "AIOCRYPT_REDIS_URL": redis_url,
        "EXAMPLE_DATA_DIR": str(tmp_path),
        "ENCRYPTION_MASTER_KEY": master_key_b64,
        "PYTHONPATH": str(ROOT),
    }
    with (tmp_path / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", f"examples.{request.param}_app", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)  # both examples close cleanly on Ctrl-C
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def body(driver: Any) -> str:
    text: str = driver.find_element("tag name", "body").text
    return text


def post_form(driver: Any, action: str, fields: dict[str, str]) -> None:
    """Submit a real form from the current page (a navigation, as a user's click would be)."""
    driver.execute_script(
        "const f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];"
        "for (const [k, v] of Object.entries(arguments[1])) {"
        "  const i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i);}"
        "document.body.appendChild(f); f.submit();",
        action,
        fields,
    )


def test_login_reload_logout_back_and_replay(browser: Any, example_url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    def wait_for_path(path: str) -> None:
        WebDriverWait(browser, 15).until(lambda d: d.current_url == example_url + path)

    browser.get(example_url + "/login")
    token = json.loads(body(browser))["csrf_token"]
    post_form(
        browser,
        "/login",
        {"username": "alice", "password": "correct horse battery staple", "csrf_token": token},
    )
    wait_for_path("/me")
    assert all(secret in body(browser) for secret in SECRETS[:2])
    assert "alice" in body(browser)

    # The cookie the browser holds has the flags the example configures.
    cookie = browser.get_cookie("session")
    assert cookie is not None
    assert cookie["httpOnly"] is True and cookie["secure"] is False
    assert cookie["sameSite"] == "Lax" and "expiry" not in cookie  # not permanent
    assert cookie["path"] == "/"
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: invisible to JS
    old_cookie = cookie["value"]

    browser.refresh()
    assert "alice" in body(browser) and SECRETS[0] in body(browser)

    post_form(browser, "/logout", {})
    wait_for_path("/")
    assert '"logged_in":false' in body(browser).replace(" ", "")
    assert browser.get_cookie("session") is None

    browser.back()  # /me again: Cache-Control: no-store, so it is fetched, not shown from cache
    WebDriverWait(browser, 15).until(lambda d: d.current_url == example_url + "/me")
    shown = body(browser)
    assert "alice" not in shown and not any(secret in shown for secret in SECRETS)

    browser.add_cookie({"name": "session", "value": old_cookie, "path": "/"})
    browser.get(example_url + "/me")  # the pre-logout cookie, replayed
    shown = body(browser)
    assert "alice" not in shown and not any(secret in shown for secret in SECRETS)
    browser.get(example_url + "/")
    assert '"logged_in":false' in body(browser).replace(" ", "")
