"""The README's screenshots, taken from the real UI on the real model (SmolLM2): an A/B in the playground and a
small sweep on a built-in dataset. ``LASER_UPDATE_DOCS=1`` rewrites docs/*.png; otherwise the fresh screenshots
stay in the test's tmp folder and the committed ones must match their size (regenerate when the layout changes)."""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from laser_ops.loading import LoadedModel
from tests.server.conftest import LiveServer, start_server
from tests.server.ui.conftest import open_ui, start_sweep_from_page

DOCS = Path(__file__).resolve().parents[3] / "docs"
UPDATE = os.environ.get("LASER_UPDATE_DOCS") == "1"
PROFILE = {"name": "late-fc-in", "description": "LASER on a late MLP input matrix",
           "interventions": [{"kind": "laser", "target": "fc_in", "layer": -3, "rank_fraction": 0.01}]}
HEIGHT_TOLERANCE = 0.15  # content may shift a little (timings, ETA); a new layout needs new screenshots

pytestmark = pytest.mark.integration


@pytest.fixture
def smol_server(tmp_path: Path, smollm2: LoadedModel) -> Iterator[LiveServer]:
    srv = start_server(tmp_path, smollm2)
    assert srv.client.post("/v1/profiles", json=PROFILE).status_code == 201
    yield srv
    srv.stop()


def png_size(path: Path) -> tuple[int, int]:
    with path.open("rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def publish(shot: Path) -> None:
    """Copy to docs/ (LASER_UPDATE_DOCS=1) or check the committed screenshot still fits the page."""
    target = DOCS / shot.name
    if UPDATE:
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(shot, target)
        return
    hint = "regenerate with: LASER_UPDATE_DOCS=1 make test PYTEST_ARGS=tests/server/ui/test_docs.py"
    assert target.is_file(), f"{target} is missing; {hint}"
    (w, h), (w0, h0) = png_size(shot), png_size(target)
    assert w == w0 and abs(h - h0) <= HEIGHT_TOLERANCE * h0, f"{target.name}: {w0}x{h0} committed, {w}x{h} now; {hint}"


def test_readme_screenshot_of_the_playground(page: Page, smol_server: LiveServer, tmp_path: Path) -> None:
    open_ui(page, smol_server.url)
    for value in ("base", "late-fc-in"):
        page.locator(f'#pg-profiles input[value="{value}"]').check()
    page.get_by_label("Prompt", exact=True).fill("The three primary colors are")
    page.get_by_label("Max new tokens").fill("20")
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#pg-output")).to_have_attribute("data-token-view", "ready")
    texts = [page.locator(f'#pg-output .column[data-profile="{p}"] .answer .tok').all_text_contents()
             for p in ("base", "late-fc-in")]
    assert "".join(texts[0]) != "".join(texts[1])
    expect(page.locator(".tok.first-diff")).to_have_count(2)
    shot = tmp_path / "playground.png"
    page.screenshot(path=shot, full_page=True)
    publish(shot)


def test_readme_screenshot_of_a_sweep(page: Page, smol_server: LiveServer, tmp_path: Path) -> None:
    open_ui(page, smol_server.url, "sweeps")
    page.locator("#sw-dataset").select_option("epistemic_reasoning")
    start_sweep_from_page(page, types=["fc_in", "fc_out"], layers="-2:", rhos="0.1, 0.01", validation=20, test=40)
    expect(page.locator('#job-heatmap td.cell[data-state="pending"]')).to_have_count(0, timeout=240_000)
    expect(page.locator("#job-heatmap td.cell")).to_have_count(8)
    expect(page.locator("#job-verdict")).to_be_visible(timeout=120_000)
    shot = tmp_path / "sweep.png"
    page.locator("#job-view").screenshot(path=shot)
    publish(shot)
