"""Browser fixtures: one headless Chromium for the UI tests (Debian's package, driven by Playwright's Python API).

``make test`` installs Chromium (apt) when it is missing and sets LASER_REQUIRE_BROWSER=1, so there a missing
browser fails the run; a bare ``pytest`` on a machine without it skips these tests with the reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LASER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 20_000  # generous for a loaded 2-core machine; every wait ends as soon as its DOM condition holds


@pytest.fixture(scope="package")
def browser() -> Iterator[object]:
    """Package-scoped: Playwright's sync API runs an event loop in this thread while it is open, so it is
    closed before tests outside tests/server/ui run (their asyncio.run() needs the thread free)."""
    if not Path(CHROMIUM).exists():
        message = f"Chromium not found at {CHROMIUM} (make test installs Debian's chromium package)"
        if os.environ.get("LASER_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, tmp_path: Path) -> Iterator[object]:
    """A fresh browser context (its own sessionStorage) at desktop size; JS errors fail the test.

    The page's last state is saved as ``final.png`` in the test's tmp folder, also when the test fails.
    """
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
        pg.screenshot(path=tmp_path / "final.png", full_page=True)
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_ui(page, url: str, tab: str = "playground") -> None:
    """Load the UI on ``tab`` and wait until it has read the model and the profiles."""
    from playwright.sync_api import expect

    page.goto(f"{url}/ui/#{tab}")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


def start_sweep_from_page(page, *, types: list[str], layers: str, rhos: str, validation: int, test: int) -> None:
    """Fill the sweep form (on the Sweeps tab, dataset already chosen) and start it."""
    for box in page.locator("#sw-types input").all():
        box.set_checked(box.get_attribute("value") in types)
    page.get_by_label("Layers").fill(layers)
    page.get_by_label("ρ (rank fractions)").fill(rhos)
    page.get_by_text("Search and budget").click()
    page.get_by_label("Validation examples").fill(str(validation))
    page.get_by_label("Test examples").fill(str(test))
    page.get_by_role("button", name="Start sweep").click()
