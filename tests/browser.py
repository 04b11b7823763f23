"""Headless Chromium from Debian's packages, driven by Playwright for Python.

Used by the dashboard tests and by `python -m bench.dashboard`. Playwright
never downloads a browser here: it launches the system's `/usr/bin/chromium`
(Debian's `chromium`, installed by `./dev`) with a fresh profile in a temp
dir, removed afterwards. `PPLEX_CHROMIUM` names another executable.
"""
import contextlib
import os
import shutil
import tempfile

CHROMIUM = os.environ.get("PPLEX_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 1000}
TIMEOUT_MS = 10_000  # any single wait on the page


@contextlib.contextmanager
def chromium(viewport=VIEWPORT):
    """A browser context in a fresh profile; open pages with `.new_page()`."""
    from playwright.sync_api import sync_playwright  # only the browser tests and bench need it
    profile = tempfile.mkdtemp(prefix="pplex-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport=viewport)
            context.set_default_timeout(TIMEOUT_MS)
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
