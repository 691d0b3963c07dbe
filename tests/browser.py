"""Headless-browser fixture: Debian's Chromium (/usr/bin/chromium) driven by Playwright.

Use it from a test with pytest-django's `live_server`:

    def test_page(browser_page, live_server):
        browser_page.goto(live_server.url + "/")
        assert browser_page.title() == "..."

The fixture is a plain module-level fixture: load it with `-p tests.browser` (addopts) or
`pytest_plugins = ["tests.browser"]` in tests/conftest.py.

The test is skipped when the `playwright` package or /usr/bin/chromium is missing
(.ci/install-chromium.sh installs the latter). Playwright's own browser download
(`playwright install`) is never used: this machine can't reach it.

Playwright's sync API leaves an asyncio event loop marked running in the test's thread
while it is started. Two consequences for Django, both handled here for the test's duration:
- the ORM refuses calls (SynchronousOnlyOperation): DJANGO_ALLOW_ASYNC_UNSAFE is set, and
  restored afterwards;
- `django.db.connections` (an asgiref Local) switches to a separate per-context storage, so
  ORM calls would open a second connection, outside the test's transaction (rows leak past
  the rollback on PostgreSQL, "database is locked" on SQLite, and the left-open connection
  stops the test database from being dropped): the thread's own connections are put into
  that storage, and any other connection opened there is closed at the end.
Everything is function-scoped (a launch takes ~0.2 s here) so that no loop outlives the test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    # (ignored only where playwright is not installed: the browser tests then skip)
    from playwright.sync_api import Page  # type: ignore[import-not-found,unused-ignore]

CHROMIUM = Path("/usr/bin/chromium")
DEFAULT_TIMEOUT_MS = 15_000

# Playwright already adds --no-sandbox (no chromium_sandbox), --disable-background-networking
# and friends; they are repeated here so the launch does not depend on its defaults.
# The network ones matter: this machine's closed network refuses Chromium's background calls.
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where the sandbox can't start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


@pytest.fixture
def browser_page() -> Iterator[Page]:
    """A fresh Playwright `Page` in headless Chromium, closed with its browser after the test."""
    try:
        from playwright.sync_api import sync_playwright  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pytest.skip(
            "browser test: playwright is not installed (it is in requirements-dev.txt: bin/test installs "
            "it; Playwright's own `playwright install` is not needed)"
        )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(
            f"browser test: no Chromium at {CHROMIUM}; install Debian's chromium to run it "
            "(`sudo apt-get install chromium`, or `sudo bash .ci/install-chromium.sh`)"
        )

    from django.db import connections

    # This thread's connection wrappers, taken while no event loop runs.
    outer = {alias: connections[alias] for alias in connections}
    saved = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            # From here on `connections` sees the loop's storage: give it the same connections.
            for alias, connection in outer.items():
                connections[alias] = connection
            try:
                browser = playwright.chromium.launch(
                    executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
                )
                try:
                    context = browser.new_context()
                    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
                    context.set_default_navigation_timeout(DEFAULT_TIMEOUT_MS)
                    yield context.new_page()
                    context.close()
                finally:
                    browser.close()
            finally:
                for connection in connections.all(initialized_only=True):
                    if connection is not outer.get(connection.alias):
                        connection.close()
                for alias in outer:
                    del connections[alias]
    finally:
        if saved is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = saved
