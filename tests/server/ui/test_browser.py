"""The web UI in a real headless Chromium against a real server on a tiny model: the playground's A/B, the
profile form's live dry run and the spectrum, a sweep started from the page filling its heatmap cell by cell,
API keys, keyboard use and the 390 px layout. Every wait is on a DOM condition, never a sleep."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.server.conftest import LiveServer, start_server, tiny_loaded, wait_until
from tests.server.ui.conftest import PHONE, open_ui, start_sweep_from_page

EDITED = {"name": "edited", "description": "rank 1 on every MLP matrix",
          "interventions": [{"kind": "laser", "target": "mlp", "layer": "all", "rank": 1}]}
WORDS = ["Paris", "Rome", "France", "Italy", "city", "capital", "fox", "dog", "yes", "no", "blue", "red"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One tiny-Llama server for the module, with an edited profile whose answers differ from base."""
    srv = start_server(tmp_path_factory.mktemp("ui"), tiny_loaded())
    assert srv.client.post("/v1/profiles", json=EDITED).status_code == 201
    yield srv
    srv.stop()


def pick_profiles(page: Page, names: list[str]) -> None:
    """Select exactly ``names``, in order (the first is the reference)."""
    expect(page.locator("#pg-profiles input").first).to_be_visible()
    for value in [box.get_attribute("value") for box in page.locator("#pg-profiles input:checked").all()]:
        page.locator(f'#pg-profiles input[value="{value}"]').uncheck()
    for name in names:
        page.locator(f'#pg-profiles input[value="{name}"]').check()
    expect(page.locator("#pg-profiles .chip.on")).to_have_count(len(names))


def answer_of(page: Page, profile: str) -> str:
    return "".join(page.locator(f'#pg-output .column[data-profile="{profile}"] .answer .tok').all_text_contents())


# ---------------------------------------------------------------------------------------------- playground


def test_playground_streams_base_and_edited_side_by_side_and_marks_the_first_difference(
        page: Page, server: LiveServer, tmp_path: Path) -> None:
    prompt = "The capital of France is"
    expected = {p: server.client.post("/v1/generate", json={"profile": p, "prompt": prompt, "max_new_tokens": 12})
                .json()["choices"][0]["text"] for p in ("base", "edited")}
    assert expected["base"] != expected["edited"]

    open_ui(page, server.url)
    pick_profiles(page, ["base", "edited"])
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Max new tokens").fill("12")
    page.get_by_role("button", name="Run").click()

    expect(page.locator("#pg-summary")).to_have_attribute("data-state", "done")
    expect(page.locator('#pg-output .answer[data-done="true"]')).to_have_count(2)
    assert answer_of(page, "base") == expected["base"]  # what streamed is what the route answers
    assert answer_of(page, "edited") == expected["edited"]
    expect(page.locator("#pg-summary")).to_contain_text("edited differs from base from token")

    # The marked token is the first one whose text leaves the common prefix.
    edited = page.locator('#pg-output .column[data-profile="edited"]')
    marked = edited.locator(".tok.first-diff")
    expect(marked).to_have_count(1)
    index = int(marked.get_attribute("data-i"))
    tokens = edited.locator(".answer .tok").all_text_contents()
    before = "".join(tokens[:index])
    assert expected["base"].startswith(before)
    assert not expected["base"].startswith(before + tokens[index])

    # Token view: each generated token coloured by the other profile's log-prob; the tokens still spell the answer.
    expect(page.locator("#pg-output")).to_have_attribute("data-token-view", "ready")
    scored = edited.locator(".answer .tok.scored")
    expect(scored.first).to_be_visible()
    assert "".join(edited.locator(".answer .tok").all_text_contents()) == expected["edited"]
    assert re.search(r"under base \(Δ [+−±]\d", scored.first.get_attribute("title"))
    page.screenshot(path=tmp_path / "playground.png", full_page=True)


def test_score_mode_shows_each_profiles_logprobs_and_pick(page: Page, server: LiveServer, tmp_path: Path) -> None:
    context, candidates = "Paris is a city in", [" France", " Italy", " the lazy dog"]
    api = server.client.post("/v1/compare", json={"profiles": ["base", "edited"], "score": {
        "context": context, "continuations": candidates}}).json()

    open_ui(page, server.url)
    pick_profiles(page, ["base", "edited"])
    page.get_by_label("Score answers").check()
    page.get_by_label("Context").fill(context)
    page.get_by_label("Candidate answers").fill("\n".join(candidates))
    page.get_by_role("button", name="Run").click()

    table = page.locator(".score-table")
    expect(table).to_be_visible()
    for i, profile in enumerate(["base", "edited"]):
        picked = api["score"][i]["argmax"]
        expect(table.locator(f'tfoot td[data-profile="{profile}"]')).to_have_text(candidates[picked])
        cells = table.locator(f'tbody td[data-profile="{profile}"] .lp')
        shown = [float(t.replace("−", "-")) for t in cells.all_text_contents()]
        assert shown == pytest.approx([c["logprob"] for c in api["score"][i]["continuations"]], abs=1e-3)
    page.screenshot(path=tmp_path / "score.png", full_page=True)


# ---------------------------------------------------------------------------------------------- profiles


def test_profile_form_runs_the_dry_run_as_you_type_and_shows_the_spectrum(
        page: Page, server: LiveServer, tmp_path: Path) -> None:
    open_ui(page, server.url, "profiles")
    page.get_by_label("Profile name").fill("late-fc-in")
    edit = page.get_by_role("group", name="Intervention 1")
    edit.get_by_label("Target").select_option("fc_in")
    edit.get_by_label("Layer").fill("-1")
    value = edit.get_by_label("Value")
    value.fill("0.01")
    dry = page.locator("#pf-dry")
    expect(dry.locator("td.k")).to_have_text("1")  # fc_in is 64x32: k = max(1, floor(0.01 * 32))

    value.fill("0.5")
    expect(dry.locator("td.k")).to_have_text("16")
    value.fill("2")
    expect(dry).to_have_attribute("data-state", "invalid")
    expect(dry).to_contain_text("rank_fraction")
    value.fill("0.5")
    expect(dry.locator("td.k")).to_have_text("16")

    page.get_by_role("button", name="Spectrum of fc_in layer 2").click()
    out = page.locator("#sp-out")
    expect(out).to_have_attribute("data-state", "ready")
    expect(out.locator("svg .k-label")).to_have_text("k = 16")
    spectrum = server.client.get("/v1/spectrum/fc_in/2").json()
    expect(out.locator("svg .mp-label")).to_contain_text(f"{spectrum['mp_rank']} above")
    page.screenshot(path=tmp_path / "profiles.png", full_page=True)

    page.get_by_role("button", name="Create profile").click()
    expect(page.locator('#pf-table tr[data-profile="late-fc-in"]')).to_be_visible()
    stored = server.client.get("/v1/profiles/late-fc-in").json()
    assert stored["interventions"] == [{"kind": "laser", "target": "fc_in", "layer": -1, "rank_fraction": 0.5,
                                        "rank": None, "energy": None, "sparsity": None, "seed": 0}]

    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete profile late-fc-in").click()
    expect(page.locator('#pf-table tr[data-profile="late-fc-in"]')).to_have_count(0)
    assert server.client.get("/v1/profiles/late-fc-in").status_code == 404


# ---------------------------------------------------------------------------------------------- sweeps


def _toy_jsonl(n: int) -> str:
    rows = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(2 + i % 5)]
        choices = [["Paris", "Rome is a city"], ["no", "the lazy dog", "blue"], ["yes", "red"]][i % 3]
        rows.append({"input": " ".join(words), "choices": choices, "answer": i % len(choices)})
    return "".join(json.dumps(r) + "\n" for r in rows)


def _hold_after(srv: LiveServer, steps: int, gate: threading.Event) -> None:
    """The job worker waits after its ``steps``-th step until ``gate`` is set."""
    manager = srv.app.state.services.jobs
    seen = [0]

    async def after_step(job_id: str, row: object) -> None:
        seen[0] += 1
        if seen[0] == steps:
            await asyncio.to_thread(gate.wait, 60)

    manager._after_step = after_step


def test_sweep_started_from_the_page_fills_the_heatmap_cell_by_cell_and_shows_a_verdict(
        page: Page, server: LiveServer, tmp_path: Path) -> None:
    data = tmp_path / "toy.jsonl"
    data.write_text(_toy_jsonl(40))
    gate = threading.Event()
    _hold_after(server, 2, gate)  # base, then both rho of fc_in@0 (one step scores all rho of a matrix), then wait
    try:
        open_ui(page, server.url, "sweeps")
        page.get_by_label("File", exact=True).set_input_files(data)
        expect(page.locator("#ds-name")).to_have_value("toy")
        page.get_by_role("button", name="Upload").click()
        expect(page.locator("#ds-status")).to_contain_text("Stored toy: 40 multiple choice examples")
        expect(page.locator("#sw-dataset")).to_have_value("toy")

        start_sweep_from_page(page, types=["fc_in"], layers="0:2", rhos="0.5, 0.1", validation=8, test=16)

        cells = page.locator("#job-heatmap td.cell")
        expect(cells).to_have_count(4)  # fc_in x layers {0, 1} x rho {0.5, 0.1}
        expect(page.locator('#job-heatmap td.cell[data-state="done"]')).to_have_count(2)  # filled live, mid-job
        expect(page.locator('#job-heatmap td.cell[data-state="pending"]')).to_have_count(2)
        expect(page.locator("#job-progress-text")).to_contain_text("3/6 steps")
        page.screenshot(path=tmp_path / "sweep-running.png", full_page=True)
    finally:
        gate.set()

    expect(page.locator('#job-heatmap td.cell[data-state="done"]')).to_have_count(4)
    verdict = page.locator("#job-verdict")
    expect(verdict).to_be_visible()
    job_id = page.locator("#job-title").inner_text().split()[1]
    # The verdict can show from the test step's event a moment before the job's final state is stored.
    job = wait_until(lambda: (j := server.client.get(f"/v1/jobs/{job_id}").json())["state"] == "succeeded" and j,
                     what="the job to succeed")
    expect(verdict).to_contain_text(job["verdict"])
    for row in (r for r in job["rows"] if r["role"] == "config"):
        cell = page.locator(f'#job-heatmap td[data-key="fc_in|{row["layer"]}|{row["rho"]}"]')
        expect(cell).to_have_text(f"{100 * row['validation']['accuracy']:.1f}"
                                  if row["validation"]["accuracy"] < 1 else "100")

    # The per-config table sorts by validation accuracy (descending on the first click).
    page.get_by_role("button", name="Val. accuracy").click()
    expect(page.locator("#job-table th[aria-sort=descending]")).to_contain_text("Val. accuracy")
    shown = [float(t.rstrip("%")) for t in page.locator("#job-table tbody tr td:nth-child(6)").all_text_contents()]
    assert shown == sorted(shown, reverse=True) and len(shown) == 5  # base + 4 configs

    promotable = job["best"] is not None and job["best"]["key"] != "base"
    expect(page.locator("#job-promote")).to_be_visible(visible=promotable)
    if promotable:
        page.get_by_label("Promote the winner as profile").fill("toy-winner")
        page.get_by_role("button", name="Promote winner").click()
        expect(page.locator("#job-promote-status")).to_contain_text("Profile toy-winner created")
        stored = server.client.get("/v1/profiles/toy-winner").json()
        assert len(stored["interventions"]) == len(job["best"]["interventions"])
        for kept, best in zip(stored["interventions"], job["best"]["interventions"]):
            assert best.items() <= kept.items()  # the stored spec adds the defaults
    page.screenshot(path=tmp_path / "sweep.png", full_page=True)


# ---------------------------------------------------------------------------------------------- keys, a11y, layout


def test_with_api_keys_the_page_shows_401_until_a_key_is_entered(page: Page, tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded(), api_key="infer-key", admin_api_key="admin-key")
    try:
        page.goto(f"{srv.url}/ui/")  # no key yet: the model line loads (/info is open), the profiles answer 401
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("401")
        expect(alert).to_contain_text("API key")
        expect(page.locator("#pg-profiles .chip")).to_have_count(0)
        page.screenshot(path=tmp_path / "needs-key.png", full_page=True)

        page.get_by_label("API key").fill("wrong")
        page.get_by_role("button", name="Use key").click()
        expect(alert).to_contain_text("invalid API key")

        page.get_by_label("API key").fill("infer-key")
        page.get_by_role("button", name="Use key").click()
        expect(alert).to_be_hidden()
        expect(page.locator('#pg-profiles input[value="base"]')).to_be_checked()
        page.get_by_role("button", name="Run").click()
        expect(page.locator('#pg-output .answer[data-done="true"]')).to_have_count(1)

        # The inference key may not change state: creating a profile explains the 403.
        page.get_by_role("tab", name="Profiles").click()
        page.get_by_label("Profile name").fill("nope")
        page.get_by_role("button", name="Create profile").click()
        expect(alert).to_contain_text("403")

        assert page.evaluate("sessionStorage.getItem('laser-serve.api-key')") == "infer-key"
        assert "infer-key" not in page.url
    finally:
        srv.stop()


def test_keyboard_alone_switches_tabs_and_runs_the_playground(page: Page, server: LiveServer) -> None:
    open_ui(page, server.url)
    page.get_by_role("tab", name="Playground").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Profiles")).to_be_focused()
    expect(page.get_by_role("tab", name="Profiles")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#panel-profiles")).to_be_visible()
    page.keyboard.press("End")
    expect(page.locator("#panel-sweeps")).to_be_visible()
    page.keyboard.press("Home")
    expect(page.locator("#panel-playground")).to_be_visible()

    page.get_by_label("Prompt", exact=True).focus()
    page.keyboard.press("Control+Enter")
    expect(page.locator("#pg-summary")).to_have_attribute("data-state", "done")

    # Every visible control on every tab has an accessible name.
    for tab in ("Playground", "Profiles", "Sweeps"):
        page.get_by_role("tab", name=tab).click()
        unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(el => el.offsetParent !== null)
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                          && !el.getAttribute('aria-labelledby') && !(el.tagName === 'BUTTON' && el.innerText.trim()))
            .map(el => el.outerHTML.slice(0, 80))""")
        assert unlabelled == [], f"{tab}: controls without a label: {unlabelled}"


def test_every_tab_fits_a_390px_phone(page: Page, server: LiveServer, tmp_path: Path) -> None:
    page.set_viewport_size(PHONE)
    open_ui(page, server.url)
    pick_profiles(page, ["base", "edited"])
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#pg-summary")).to_have_attribute("data-state", "done")
    for tab in ("playground", "profiles", "sweeps"):
        page.get_by_role("tab", name=tab.title()).click()
        expect(page.locator(f"#panel-{tab}")).to_be_visible()
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= PHONE["width"], f"{tab}: the page is {width}px wide at a {PHONE['width']}px viewport"
        page.screenshot(path=tmp_path / f"{tab}-390.png", full_page=True)
    run = page.get_by_role("tab", name="Playground")
    box = run.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
