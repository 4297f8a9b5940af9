"""Sweep job routes over real HTTP: equality with library scoring, cancel, resume after restart, promote,
plot, SSE events, grid validation, and inference being served while a sweep runs."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from laser_ops.datasets import parse_jsonl, stratified_split
from laser_ops.evaluation import evaluate_generation, evaluate_multiple_choice, wilson_interval
from laser_ops.scoring import HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.testing import make_tiny_model, tiny_tokenizer
from tests.server.conftest import LiveServer, start_server, tiny_loaded, wait_until

WORDS = ["Paris", "Rome", "France", "Italy", "city", "capital", "fox", "dog", "yes", "no", "blue", "red"]
TERMINAL = ("succeeded", "failed", "cancelled")


def toy_rows(n: int = 24, seed: int = 0, kind: str = "multiple_choice") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
        if kind == "multiple_choice":
            choices = rng.sample(["Paris", "Rome is a city", "no", "the lazy dog", "blue"], rng.randint(2, 3))
            rows.append({"input": text, "choices": choices, "answer": rng.randrange(len(choices))})
        else:
            rows.append({"input": text, "targets": [rng.choice(WORDS)]})
    return rows


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def upload(c, name: str, rows: list[dict]) -> None:
    r = c.post("/v1/datasets", json={"name": name, "format": "jsonl", "content": jsonl(rows)})
    assert r.status_code == 201, r.text


def start(c, **body) -> dict:
    r = c.post("/v1/jobs/sweeps", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def wait(c, job_id: str, until=lambda j: j["state"] in TERMINAL, timeout: float = 120.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = c.get(f"/v1/jobs/{job_id}").json()
        if until(j):
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not get there in {timeout}s: {j['state']} {j['done']}/{j['total']}")


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str | None, dict]]:
    """(event name, data) pairs of a server-sent event stream."""
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name, json.loads(line[6:])


def manager(srv: LiveServer):
    return srv.app.state.services.jobs


def hold_after(srv: LiveServer, n_steps: int, gate: threading.Event) -> None:
    """Make the job worker pause after its n-th step until ``gate`` is set (or the server stops)."""
    m = manager(srv)
    seen = [0]

    async def after_step(job_id, row) -> None:
        seen[0] += 1
        while seen[0] >= n_steps and not gate.is_set():
            await asyncio.sleep(0.01)

    m._after_step = after_step


SMALL = dict(types=["fc_in", "fc_out"], layers=[1, 2], rhos=[0.5, 0.1], validation_fraction=0.5)
DOCS_HEATMAP = Path(__file__).resolve().parents[2] / "docs" / "sweep-heatmap.png"


# ---------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("kind", ["multiple_choice", "generation"])
def test_job_accuracy_equals_library_scoring(live: LiveServer, kind: str) -> None:
    c = live.client
    rows = toy_rows(24 if kind == "multiple_choice" else 12, kind=kind)
    upload(c, "toy", rows)
    job = start(c, dataset="toy", max_new_tokens=4, **SMALL)
    assert job["state"] in ("queued", "running") and job["total"] == 2 * 2 * 2 + 2
    job = wait(c, job["id"])
    assert job["state"] == "succeeded", job["error"]
    assert job["done"] == job["total"] == 10 and job["stopped"] == "completed"
    info = c.get("/info").json()
    assert job["model_fingerprint"] == info["fingerprint"] and job["model_id"] == info["model_id"]
    assert job["owner"] == manager(live).owner and job["heartbeat_at"] is not None

    # Independent scoring through the library: same data, same split, a fresh copy of the same model.
    dataset = parse_jsonl(jsonl(rows), "toy")
    val = stratified_split(dataset, 0.5, 0).validation
    model = make_tiny_model("llama")
    scorer = HFScorer(model, tiny_tokenizer(), batch_size=8)
    swapper = WeightSwapper(model, svd_cache=SvdCache("tiny-ref"))
    table = [r for r in job["rows"] if r["role"] in ("base", "config")]
    assert len(table) == 9
    for r in table:
        with swapper.applied_profile(r["interventions"]):
            report = (evaluate_multiple_choice(scorer, val) if kind == "multiple_choice"
                      else evaluate_generation(scorer, val, max_new_tokens=4))
        v = r["validation"]
        assert (v["n"], v["n_correct"]) == (report.n, report.n_correct), r["key"]
        assert v["accuracy"] == pytest.approx(report.accuracy)
        assert (v["ci_low"], v["ci_high"]) == pytest.approx(wilson_interval(report.n_correct, report.n))
        if kind == "multiple_choice":
            assert v["log_loss"] == pytest.approx(report.log_loss, rel=1e-4, abs=1e-4)
        if r["role"] == "config":
            assert r["delta_accuracy"] == pytest.approx(v["accuracy"] - job["base"]["validation"]["accuracy"])

    eligible = [r for r in table if r["role"] == "config" and not r["collapsed"]]
    best = job["best"]
    if eligible:
        assert not best["collapsed"]
        assert best["validation"]["accuracy"] == max(r["validation"]["accuracy"] for r in eligible)
    test = job["test"]
    assert test["winner_key"] == (best["key"] if best else "base")
    assert test["base"]["n"] == job["n_test"] == len(rows) // 2
    assert test["base"]["ci_low"] <= test["base"]["accuracy"] <= test["base"]["ci_high"]
    assert 0 <= test["mcnemar"]["p_value"] <= 1
    if not test["significant"]:
        assert any(w in test["verdict"] for w in ("not significant", "does not beat", "worse", "base model itself"))
    majority = test["majority"]  # the constant predictor is part of every verdict
    assert majority["label"] and f"always-{majority['label']!r}" in test["verdict"]
    assert job["verdict"] == test["verdict"]
    for r in table:  # label metrics on every row
        assert 0 <= r["labels"]["top_answer_share"] <= 1 and r["labels"]["majority_accuracy"] > 0


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("patch", "status", "loc", "needle"), [
    ({"layers": [7]}, 422, ["body", "layers"], "allowed: 0..2"),
    ({"layers": []}, 422, ["body", "layers"], "at least 1 item"),
    ({"layers": [True]}, 422, ["body", "layers"], "not a boolean"),
    ({"seed": 2**64}, 422, ["body", "seed"], "less than or equal to 9223372036854775807"),
    ({"types": ["fc_xx"]}, 422, ["body", "types"], "allowed"),
    ({"rhos": [0.5, 1.5]}, 422, ["body", "rhos", 1], "less than or equal to 1"),
    ({"rhos": []}, 422, ["body", "rhos"], "at least 1 item"),
    ({"dataset": "nope"}, 404, ["body", "dataset"], "unknown dataset"),
    ({"dataset": "../etc"}, 422, ["body", "dataset"], "pattern"),
    ({"validation_fraction": 1.5}, 422, ["body", "validation_fraction"], "less than 1"),
    ({"bogus": 1}, 422, ["body", "bogus"], "Extra"),
])
def test_invalid_sweeps_are_clear_4xx(live: LiveServer, patch: dict, status: int, loc: list, needle: str) -> None:
    body = {"dataset": "epistemic_reasoning", **SMALL, **patch}
    r = live.client.post("/v1/jobs/sweeps", json=body)
    assert r.status_code == status, r.text
    err = r.json()["detail"][0]
    assert err["loc"][:len(loc)] == loc and needle in err["msg"], err
    assert live.client.get("/v1/jobs").json()["data"] == []


def test_unknown_job_is_404(live: LiveServer) -> None:
    c = live.client
    for r in (c.get("/v1/jobs/nope"), c.delete("/v1/jobs/nope"), c.get("/v1/jobs/nope/plot.png"),
              c.get("/v1/jobs/nope/events"), c.post("/v1/jobs/nope/promote", json={"name": "x"})):
        assert r.status_code == 404, r.text


# ---------------------------------------------------------------------------------------------- lifecycle


def test_cancel_running_and_queued_jobs(live: LiveServer) -> None:
    c = live.client
    upload(c, "toy", toy_rows())
    gate = threading.Event()
    hold_after(live, 2, gate)
    first = start(c, dataset="toy", **SMALL)
    second = start(c, dataset="toy", **SMALL)
    wait(c, first["id"], lambda j: j["done"] >= 3)  # base, then both rho of fc_in@1 in one step
    assert c.get(f"/v1/jobs/{second['id']}").json()["state"] == "queued"  # one job at a time, FIFO
    metrics = c.get("/metrics").text
    assert f'laser_job_progress_ratio{{job="{first["id"]}"}} 0.3' in metrics
    assert 'laser_jobs{state="running"} 1.0' in metrics and 'laser_jobs{state="queued"} 1.0' in metrics

    assert c.delete(f"/v1/jobs/{first['id']}").status_code == 409  # running: cancel first, then delete
    r = c.post(f"/v1/jobs/{second['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = c.post(f"/v1/jobs/{first['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = c.delete(f"/v1/jobs/{first['id']}")
    assert r.status_code == 409 and "still ending" in r.text  # its step is held on the engine
    gate.set()
    wait_until(lambda: manager(live).running_job is None, what="the worker to wind the cancelled job up")
    job = c.get(f"/v1/jobs/{first['id']}").json()
    assert job["state"] == "cancelled" and job["done"] == 3 and job["test"] is None  # rows kept, no more steps
    assert [r["key"] for r in job["rows"]] == ["base", "laser:fc_in:1:0.5", "laser:fc_in:1:0.1"]
    assert c.get(f"/v1/jobs/{second['id']}").json()["rows"] == []
    assert c.post(f"/v1/jobs/{first['id']}/cancel").status_code == 409
    assert c.delete("/v1/datasets/toy").status_code == 200  # no unfinished job uses it any more
    states = {j["id"]: j["state"] for j in c.get("/v1/jobs").json()["data"]}
    assert states == {first["id"]: "cancelled", second["id"]: "cancelled"}
    metrics = c.get("/metrics").text
    assert 'laser_jobs{state="cancelled"} 2.0' in metrics and "laser_job_progress_ratio{" not in metrics
    # Finished jobs can be deleted (they would pile up forever otherwise); their rows go with them.
    r = c.delete(f"/v1/jobs/{first['id']}")
    assert r.status_code == 200 and r.json() == {"id": first["id"], "deleted": True}
    assert c.get(f"/v1/jobs/{first['id']}").status_code == 404
    assert c.delete(f"/v1/jobs/{first['id']}").status_code == 404
    assert [j["id"] for j in c.get("/v1/jobs").json()["data"]] == [second["id"]]
    assert 'laser_jobs{state="cancelled"} 1.0' in c.get("/metrics").text


def test_dataset_in_use_cannot_be_deleted(live: LiveServer) -> None:
    c = live.client
    upload(c, "toy", toy_rows())
    gate = threading.Event()
    hold_after(live, 1, gate)
    job = start(c, dataset="toy", **SMALL)
    r = c.delete("/v1/datasets/toy")
    assert r.status_code == 409 and job["id"] in r.text
    gate.set()
    assert wait(c, job["id"])["state"] == "succeeded"


def test_failed_job_reports_its_error(live: LiveServer) -> None:
    c = live.client
    upload(c, "toy", toy_rows())

    async def broken(job_id, row) -> None:
        raise RuntimeError("disk on fire")

    manager(live)._after_step = broken
    job = wait(c, start(c, dataset="toy", **SMALL)["id"])
    assert job["state"] == "failed" and job["error"] == "RuntimeError: disk on fire" and job["finished_at"]
    assert [r["key"] for r in job["rows"]] == ["base"]  # the finished step is kept
    assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    assert c.delete(f"/v1/jobs/{job['id']}").status_code == 200


def test_resume_after_restart_skips_finished_steps(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded())
    try:
        upload(srv.client, "toy", toy_rows())
        hold_after(srv, 2, threading.Event())  # never released: the server stops mid-job (base + fc_in@1 done)
        job = start(srv.client, dataset="toy", **SMALL)
        before = wait(srv.client, job["id"], lambda j: j["done"] >= 3)
        assert before["state"] == "running" and before["done"] == 3 and before["owner"] == manager(srv).owner
    finally:
        srv.stop()
    srv = start_server(tmp_path, tiny_loaded())
    try:
        # The stopped server gave the job back: the new one resumes it at once (no lease to wait out).
        after = wait(srv.client, job["id"])
        assert after["state"] == "succeeded" and after["done"] == after["total"] == 10
        assert after["owner"] == manager(srv).owner != before["owner"]
        assert manager(srv).rows_run == 10 - 3  # finished configs were not rerun
        assert after["rows"][:3] == before["rows"][:3]  # same rows, same timings: loaded, not recomputed
        assert len({r["key"] for r in after["rows"]}) == 10
    finally:
        srv.stop()


def test_promote_winner_and_serve_it(live: LiveServer) -> None:
    c = live.client
    upload(c, "toy", toy_rows())
    gate = threading.Event()
    hold_after(live, 1, gate)
    job = start(c, dataset="toy", **SMALL)
    wait(c, job["id"], lambda j: j["done"] >= 1)
    r = c.post(f"/v1/jobs/{job['id']}/promote", json={"name": "early"})
    assert r.status_code == 409 and "running" in r.text
    gate.set()
    job = wait(c, job["id"])
    r = c.post(f"/v1/jobs/{job['id']}/promote", json={"name": "winner"})
    assert r.status_code == 201, r.text
    stored, best = r.json()["interventions"], job["best"]["interventions"]
    assert len(stored) == len(best) == 1 and best[0].items() <= stored[0].items()
    assert c.get("/v1/profiles/winner").status_code == 200
    g = c.post("/v1/generate", json={"prompt": "Paris is", "profile": "winner", "max_new_tokens": 3})
    assert g.status_code == 200 and g.json()["profile"] == "winner"

    r = c.post(f"/v1/jobs/{job['id']}/promote", json={"name": "winner"})
    assert r.status_code == 409 and r.json()["detail"][0]["loc"] == ["body", "name"]
    assert c.post(f"/v1/jobs/{job['id']}/promote", json={"name": "winner", "replace": True}).status_code == 201
    assert c.post(f"/v1/jobs/{job['id']}/promote", json={"name": "base"}).status_code == 409
    assert c.post(f"/v1/jobs/{job['id']}/promote", json={"name": "../x"}).status_code == 422


def test_no_winner_cannot_be_promoted_or_plotted(live: LiveServer) -> None:
    c = live.client
    upload(c, "toy", toy_rows())
    gate = threading.Event()
    hold_after(live, 1, gate)
    job = start(c, dataset="toy", **SMALL)
    wait(c, job["id"], lambda j: j["done"] >= 1)
    c.post(f"/v1/jobs/{job['id']}/cancel")
    gate.set()
    r = c.post(f"/v1/jobs/{job['id']}/promote", json={"name": "w"})
    assert r.status_code == 409 and "no winning config" in r.text
    assert c.get(f"/v1/jobs/{job['id']}/plot.png").status_code == 409


def test_plot_events_and_metrics(live: LiveServer) -> None:
    c = live.client
    upload(c, "toy", toy_rows())
    gate = threading.Event()
    hold_after(live, 1, gate)
    job = start(c, dataset="toy", **SMALL)
    events: list[tuple[str, dict]] = []
    with c.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for event in sse_events(s.iter_lines()):
            events.append(event)
            gate.set()
    progress = [e for n, e in events if n == "progress"]
    assert events[-1][0] == "state" and events[-1][1]["state"] == "succeeded"
    dones = [e["done"] for e in progress]
    assert dones == sorted(dones) and dones[-1] == 10 and {e["total"] for e in progress} <= {None, 10}
    assert any(e["eta_s"] is not None for e in progress) and any(e["best"] for e in progress)
    assert events[-1][1]["best"]["validation"]["ci_high"] >= events[-1][1]["best"]["validation"]["accuracy"]

    png = c.get(f"/v1/jobs/{job['id']}/plot.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    metrics = c.get("/metrics").text
    assert 'laser_jobs{state="succeeded"} 1.0' in metrics and 'laser_jobs{state="running"} 0.0' in metrics
    # A finished job's stream is one final state event.
    with c.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert len(lines) == 1 and json.loads(lines[0][6:])["state"] == "succeeded"


def test_inference_is_served_while_a_sweep_runs(live: LiveServer) -> None:
    c = live.client
    upload(c, "toy", toy_rows(200))
    job = start(c, dataset="toy", types=["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_up", "fc_out"],
                layers="all", rhos=[0.9, 0.8, 0.6, 0.2, 0.1, 0.05, 0.01])
    assert job["total"] == 7 * 3 * 7 + 2
    wait(c, job["id"], lambda j: j["done"] >= 2)
    for _ in range(3):
        g = c.post("/v1/generate", json={"prompt": "Paris is", "max_new_tokens": 4})
        assert g.status_code == 200
    j = c.get(f"/v1/jobs/{job['id']}").json()
    assert j["state"] == "running" and j["done"] < j["total"]  # answered while the sweep was still running
    assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"


def test_admin_key_guards_jobs(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded(), admin_api_key="adm", api_key="inf")
    try:
        c = srv.client
        body = {"dataset": "epistemic_reasoning", **SMALL, "max_validation_examples": 4, "max_test_examples": 4}
        assert c.post("/v1/jobs/sweeps", json=body).status_code == 401
        assert c.post("/v1/jobs/sweeps", json=body, headers={"Authorization": "Bearer inf"}).status_code == 403
        r = c.post("/v1/jobs/sweeps", json=body, headers={"Authorization": "Bearer adm"})
        assert r.status_code == 202
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer inf"}).status_code == 200
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.integration
def test_readme_flow_on_smollm2(tmp_path: Path, smollm2) -> None:
    """The README walk-through on the real model, over REST and the CLI: sweep, watch, verdict (with the
    majority baseline), the winner's flips, the heatmap (regenerates docs/sweep-heatmap.png), promote, generate."""
    from typer.testing import CliRunner

    from clients.cli import app

    srv = start_server(tmp_path, smollm2)
    try:
        c = srv.client
        info = c.get("/v1/datasets/epistemic_reasoning").json()
        assert info["builtin"] and info["kind"] == "multiple_choice"
        job = start(c, dataset="epistemic_reasoning", types=["fc_in", "fc_out"], layers=[-4, -3, -2, -1],
                    rhos=[0.1, 0.01], max_validation_examples=40, max_test_examples=80)
        assert job["total"] == 18
        with c.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=900) as s:
            last = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")][-1]
        assert last["type"] == "state" and last["state"] == "succeeded", last
        job = c.get(f"/v1/jobs/{job['id']}").json()
        assert job["n_validation"] == 40 and {r["layer"] for r in job["rows"] if r["role"] == "config"} == \
            {26, 27, 28, 29}
        test = job["test"]
        assert test is not None and f"always-{test['majority']['label']!r}" in job["verdict"]
        cli = CliRunner().invoke(app, ["--url", srv.url, "jobs", "examples", job["id"], "--config",
                                       test["winner_key"], "--split", "test"], env={"COLUMNS": "160"})
        assert cli.exit_code == 0, cli.output
        assert f"{test['winner_key']} vs base on test: fixed {test['mcnemar']['only_winner']}, broken " \
               f"{test['mcnemar']['only_base']}" in " ".join(cli.output.split())
        png = c.get(f"/v1/jobs/{job['id']}/plot.png")
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        if os.environ.get("LASER_UPDATE_DOCS"):  # the README's figure, regenerated by this test on request
            DOCS_HEATMAP.write_bytes(png.content)
        assert DOCS_HEATMAP.read_bytes().startswith(b"\x89PNG"), "docs/sweep-heatmap.png is missing"
        if test["winner_key"] != "base":
            r = c.post(f"/v1/jobs/{job['id']}/promote", json={"name": "epistemic-best"})
            assert r.status_code == 201, r.text
            g = c.post("/v1/generate", json={"prompt": "The capital of France is", "profile": "epistemic-best",
                                             "max_new_tokens": 8})
            assert g.status_code == 200 and g.json()["profile"] == "epistemic-best" and g.json()["choices"][0]["text"]
        print(json.dumps({"verdict": job["verdict"], "cli": cli.output, "rows": [
            (r["key"], r["validation"], r["labels"]) for r in job["rows"] if r["role"] == "config"]}))
    finally:
        srv.stop()


def test_examples_list_what_each_config_fixed_and_broke(live: LiveServer) -> None:
    c = live.client
    rows = toy_rows(24, seed=3)
    upload(c, "toy", rows)
    job = wait(c, start(c, dataset="toy", **SMALL)["id"])
    assert job["state"] == "succeeded", job["error"]
    dataset = parse_jsonl(jsonl(rows), "toy")
    val = stratified_split(dataset, 0.5, 0).validation
    base = job["base"]
    for r in [x for x in job["rows"] if x["role"] == "config"]:
        url = f"/v1/jobs/{job['id']}/examples"
        every = c.get(url, params={"config": r["key"], "filter": "all", "limit": 500}).json()
        assert every["total"] == len(val) == len(every["data"])
        fixed = [e for e in every["data"] if e["config_correct"] and not e["base_correct"]]
        broken = [e for e in every["data"] if e["base_correct"] and not e["config_correct"]]
        assert every["counts"]["fixed"] == len(fixed) and every["counts"]["broken"] == len(broken)
        right = sum(e["config_correct"] for e in every["data"])
        assert right == r["validation"]["n_correct"] and sum(e["base_correct"] for e in every["data"]) == \
            base["validation"]["n_correct"]
        for e in every["data"]:
            ex = val.examples[e["index"]]
            assert (e["id"], e["prompt"], e["gold"]) == (ex.id, val.prompt(ex), ex.gold_text)
            assert e["config_answer"] in ex.choices and e["base_answer"] in ex.choices
            assert e["config_correct"] == (ex.choices.index(e["config_answer"]) in ex.correct)
        flips = c.get(url, params={"config": r["key"]}).json()  # default filter: flips
        assert [e["index"] for e in flips["data"]] == sorted(e["index"] for e in fixed + broken)
        pages = [c.get(url, params={"config": r["key"], "offset": i, "limit": 1}).json()["data"]
                 for i in range(flips["total"])]
        assert [p[0]["index"] for p in pages] == [e["index"] for e in flips["data"]]
    test = job["test"]
    page = c.get(f"/v1/jobs/{job['id']}/examples",
                 params={"config": test["winner_key"], "split": "test", "filter": "flips"}).json()
    assert page["counts"]["fixed"] == test["mcnemar"]["only_winner"]
    assert page["counts"]["broken"] == test["mcnemar"]["only_base"]
    bad = c.get(f"/v1/jobs/{job['id']}/examples", params={"config": "laser:fc_in:9:0.5"})
    assert bad.status_code == 404 and bad.json()["detail"][0]["loc"] == ["query", "config"]
    assert c.get(f"/v1/jobs/{job['id']}/examples", params={"config": "base", "filter": "bogus"}).status_code == 422
    assert c.get(f"/v1/jobs/{job['id']}/examples", params={"config": "base", "limit": 0}).status_code == 422
    wrong_test = c.get(f"/v1/jobs/{job['id']}/examples", params={"config": "laser:nope", "split": "test"})
    assert wrong_test.status_code == 404


def test_sweep_on_ray_equals_the_in_process_job(tmp_path: Path) -> None:
    """ray_address on a job: 2 Ray actors load the server's model (fingerprint checked) and give the same rows."""
    pytest.importorskip("ray")
    from laser_ops.loading import load_model
    from laser_ops.testing import save_tiny_model

    folder = save_tiny_model("llama", str(tmp_path / "model"))
    srv = start_server(tmp_path, load_model(folder), ray_actors=2)
    try:
        c = srv.client
        upload(c, "toy", toy_rows())
        local = wait(c, start(c, dataset="toy", **SMALL)["id"])
        remote = wait(c, start(c, dataset="toy", ray_address="local", **SMALL)["id"], timeout=300)
        assert local["state"] == remote["state"] == "succeeded", remote["error"]
        assert remote["config"]["ray_address"] == "local"

        def table(job: dict) -> list:
            return [(r["key"], r["step"], r["validation"], r["delta_accuracy"], r["labels"]) for r in job["rows"]]

        assert table(remote) == table(local)
        assert remote["test"] == local["test"] and remote["verdict"] == local["verdict"]
        assert manager(srv).running_job is None
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------- properties

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from laser_ops.targets import TYPES  # noqa: E402

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=5), st.just("\ud800"), st.just([]))


def _or_junk(good: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(good, good, good, JUNK)


CONFIGS = st.fixed_dictionaries({}, optional={
    "strategy": _or_junk(st.sampled_from(["grid", "greedy_compose", "spectral_prior"])),
    "kind": _or_junk(st.sampled_from(["laser", "laser_mp", "keep_bottom", "random_basis", "prune_magnitude", "zero"])),
    "types": _or_junk(st.lists(st.sampled_from(TYPES), min_size=1, max_size=3)),
    "layers": _or_junk(st.one_of(st.just("all"), st.lists(st.integers(-4, 3), min_size=1, max_size=3))),
    "rhos": _or_junk(st.lists(st.floats(1e-9, 1), min_size=1, max_size=3)),
    "seed": _or_junk(st.integers(0, 2**64)),
    "validation_fraction": _or_junk(st.floats(0, 1)),
    "max_validation_examples": _or_junk(st.integers(0, 30)),
    "max_test_examples": _or_junk(st.integers(0, 30)),
    "time_limit_s": _or_junk(st.floats(0, 1e6)),
    "max_perplexity_ratio": _or_junk(st.floats(0, 10)),
    "normalize": _or_junk(st.booleans()),
    "batch_size": _or_junk(st.integers(0, 2000)),
})


@pytest.fixture(scope="module")
def sweeper(tmp_path_factory: pytest.TempPathFactory):
    s = start_server(tmp_path_factory.mktemp("sweep-properties"), tiny_loaded())
    upload(s.client, "toy", toy_rows(16))
    yield s
    s.stop()


#: Well-formed configs, so that accepted sweeps are explored as much as refused ones.
VALID_CONFIGS = st.fixed_dictionaries({}, optional={
    "strategy": st.sampled_from(["grid", "greedy_compose", "spectral_prior"]),
    "kind": st.sampled_from(["laser", "laser_mp", "keep_bottom", "random_basis", "prune_magnitude", "zero"]),
    "types": st.lists(st.sampled_from(TYPES), min_size=1, max_size=3),
    "layers": st.one_of(st.just("all"), st.lists(st.integers(-3, 2), min_size=1, max_size=3)),
    "rhos": st.lists(st.floats(1e-9, 1), min_size=1, max_size=3),
    "seed": st.integers(0, 2**63 - 1),
    "validation_fraction": st.floats(0.1, 0.9),
    "max_validation_examples": st.integers(2, 30),
    "time_limit_s": st.floats(1e-300, 1e6),
    "normalize": st.booleans(),
    "batch_size": st.integers(1, 1024),
})


@settings(max_examples=25, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(config=st.one_of(VALID_CONFIGS, CONFIGS))
def test_any_sweep_is_accepted_and_runs_or_refused_with_4xx(sweeper: LiveServer, config: dict) -> None:
    """Never accepted-then-broken: an accepted sweep runs to success (a budget of one config keeps it short)."""
    c = sweeper.client
    before = [j["id"] for j in c.get("/v1/jobs").json()["data"]]
    body = json.dumps({**config, "dataset": "toy", "max_configs": 1})
    r = c.post("/v1/jobs/sweeps", content=body.encode("utf-8", "surrogatepass"),
               headers={"Content-Type": "application/json"})
    if r.status_code != 202:
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"][0] == "body"
        assert [j["id"] for j in c.get("/v1/jobs").json()["data"]] == before  # nothing stored
        return
    job = wait(c, r.json()["id"])
    assert job["state"] == "succeeded", job
    assert c.delete(f"/v1/jobs/{job['id']}").status_code == 200
