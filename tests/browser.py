"""Headless Chromium on a dashboard: the app served in-process, and a page signed in as a test user."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest

from .test_dashboard import PASSWORDS, chromium


@contextmanager
def served(app):
    """The Flask app on a free loopback port (werkzeug, threaded); yields its base URL."""
    from werkzeug.serving import make_server
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)


@contextmanager
def signed_in_page(base: str, path: str, user: str):
    """A Chromium page that asked for `path`, signed in as `user` on the login page it was sent to,
    and is back at `path`."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(base + path)
            page.fill("input[name=username]", user)
            page.fill("input[name=password]", PASSWORDS[user])
            page.click("button[type=submit]")
            page.wait_for_url(base + path)
            yield page
        finally:
            browser.close()
