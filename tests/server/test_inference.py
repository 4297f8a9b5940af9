"""Native inference routes over real HTTP: generate (plain, batched, streamed), score, compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ForwardGate, LiveServer, start_server, tiny_loaded, wait_until

P1 = [{"kind": "laser", "target": "fc_in", "layer": 1, "rank_fraction": 0.1}]
PROMPT = "The capital of France is"


@pytest.fixture
def srv(live: LiveServer) -> LiveServer:
    assert live.client.post("/v1/profiles", json={"name": "p1", "interventions": P1}).status_code == 201
    return live


def gen(c: httpx.Client, **body) -> dict:
    r = c.post("/v1/generate", json={"max_new_tokens": 10, **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(c: httpx.Client, body: dict) -> list:
    events = []
    with c.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_generate_single_and_default_profile(srv: LiveServer) -> None:
    out = gen(srv.client, prompt=PROMPT)
    assert out["profile"] == "base"
    [choice] = out["choices"]
    assert choice["finish_reason"] in ("length", "stop") and choice["completion_tokens"] <= 10
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    assert gen(srv.client, prompt=PROMPT, profile="base") == out
    assert gen(srv.client, prompt=PROMPT, profile="p1")["choices"][0]["text"] != choice["text"]


def test_prompts_list_equals_each_prompt_alone(srv: LiveServer) -> None:
    prompts = [PROMPT, "Rome is a city in", "A quick brown fox", "Question: Is the sky blue? Answer:"]
    batch = gen(srv.client, prompts=prompts, profile="p1")
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    alone = [gen(srv.client, prompt=p, profile="p1")["choices"][0] for p in prompts]
    assert [c["text"] for c in batch["choices"]] == [c["text"] for c in alone]


def test_sampling_seed_reproduces(srv: LiveServer) -> None:
    body = {"prompt": PROMPT, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7, "max_new_tokens": 16}
    a, b = gen(srv.client, **body), gen(srv.client, **body)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_stop_and_zero_tokens(srv: LiveServer) -> None:
    full = gen(srv.client, prompt=PROMPT, max_new_tokens=20)["choices"][0]["text"]
    stop = full[3:5]
    assert stop
    cut = gen(srv.client, prompt=PROMPT, max_new_tokens=20, stop=stop)["choices"][0]
    assert cut["finish_reason"] == "stop" and full.startswith(cut["text"]) and stop not in cut["text"]
    zero = gen(srv.client, prompt=PROMPT, max_new_tokens=0)["choices"][0]
    assert zero["text"] == "" and zero["completion_tokens"] == 0


def test_stream_matches_plain_generate(srv: LiveServer) -> None:
    body = {"prompt": PROMPT, "profile": "p1", "max_new_tokens": 12}
    plain = gen(srv.client, **body)["choices"][0]
    events = sse_events(srv.client, body)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["finish_reason"] == plain["finish_reason"] and final["profile"] == "p1"
    assert final["usage"]["completion_tokens"] == plain["completion_tokens"]
    assert "".join(e.get("text", "") for e in events[:-1]) == plain["text"]
    assert all(e.get("finish_reason") is None for e in events[:-2])


def test_stream_errors_before_start_keep_their_status(srv: LiveServer) -> None:
    r = srv.client.post("/v1/generate", json={"prompt": "x", "profile": "nope", "stream": True})
    assert r.status_code == 404
    r = srv.client.post("/v1/generate", json={"prompts": ["a", "b"], "stream": True})
    assert r.status_code == 422


def test_score_continuations_and_argmax(srv: LiveServer) -> None:
    conts = [" Paris", " Rome", " a very long and unlikely continuation"]
    r = srv.client.post("/v1/score", json={"profile": "p1", "context": PROMPT, "continuations": conts})
    assert r.status_code == 200, r.text
    out = r.json()
    scores = out["continuations"]
    assert [s["continuation"] for s in scores] == conts
    lps = [s["logprob"] for s in scores]
    assert out["argmax"] == max(range(3), key=lambda i: lps[i])
    assert all(s["n_tokens"] >= 1 and s["logprob"] < 0 for s in scores)
    assert all(s["mean_logprob"] == pytest.approx(s["logprob"] / s["n_tokens"]) for s in scores)
    norm = srv.client.post("/v1/score", json={"profile": "p1", "context": PROMPT, "continuations": conts,
                                              "normalize": True}).json()
    means = [s["mean_logprob"] for s in scores]
    assert norm["argmax"] == max(range(3), key=lambda i: means[i])
    # is_greedy agrees with generation: the greedy continuation scores as greedy.
    greedy = gen(srv.client, prompt=PROMPT, profile="p1", max_new_tokens=1)["choices"][0]["text"]
    if greedy:
        g = srv.client.post("/v1/score", json={"profile": "p1", "context": PROMPT, "continuations": [greedy]}).json()
        assert g["continuations"][0]["is_greedy"]


def test_score_text_perplexity(srv: LiveServer) -> None:
    r = srv.client.post("/v1/score", json={"text": "Paris is a city in France."})
    assert r.status_code == 200, r.text
    ppl = r.json()["perplexity"]
    assert ppl["n_tokens"] > 0 and ppl["perplexity"] == pytest.approx(math.exp(-ppl["logprob"] / ppl["n_tokens"]))
    assert r.json()["continuations"] is None


@pytest.mark.parametrize("body", [
    {"context": "a"},
    {"continuations": [" a"]},
    {"context": "a", "continuations": []},
    {"context": "a", "continuations": [" b"], "text": "c"},
    {"text": ""},
])
def test_score_shape_errors(srv: LiveServer, body: dict) -> None:
    assert srv.client.post("/v1/score", json=body).status_code == 422


def test_compare_generate_and_score(srv: LiveServer) -> None:
    c = srv.client
    r = c.post("/v1/compare", json={"profiles": ["base", "p1"],
                                    "generate": {"prompts": [PROMPT, "Rome is"], "max_new_tokens": 10}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["profiles"] == ["base", "p1"] and [g["profile"] for g in out["generate"]] == ["base", "p1"]
    for i, prompt in enumerate([PROMPT, "Rome is"]):
        for j, p in enumerate(["base", "p1"]):
            assert out["generate"][j]["choices"][i]["text"] == gen(c, prompt=prompt, profile=p)["choices"][0]["text"]
    diff = out["diff"]
    assert diff["reference"] == "base" and diff["any_changed"]
    changed = diff["generate"][0]["changed"]
    texts = [(g["choices"][i]["text"]) for g in out["generate"] for i in range(2)]
    assert {d["index"] for d in changed} == {i for i in range(2) if texts[i] != texts[2 + i]}
    for d in changed:
        assert d["reference"][:d["first_difference"]] == d["text"][:d["first_difference"]]

    r = c.post("/v1/compare", json={"profiles": ["base", "p1"],
                                    "score": {"context": PROMPT, "continuations": [" Paris", " Rome"]}})
    assert r.status_code == 200, r.text
    out = r.json()
    base, p1 = out["score"]
    sd = out["diff"]["score"][0]
    assert sd["profile"] == "p1"
    assert sd["logprob_deltas"] == pytest.approx([b["logprob"] - a["logprob"] for a, b in
                                                  zip(base["continuations"], p1["continuations"])])
    assert sd["argmax_changed"] == (base["argmax"] != p1["argmax"])

    r = c.post("/v1/compare", json={"profiles": ["base", "p1"], "score": {"text": "Paris is in France."}})
    assert r.status_code == 200
    base, p1 = r.json()["score"]
    assert r.json()["diff"]["score"][0]["perplexity_delta"] == pytest.approx(
        p1["perplexity"]["perplexity"] - base["perplexity"]["perplexity"])


@pytest.mark.parametrize(("body", "status", "loc"), [
    ({"profiles": ["base", "nope"], "generate": {"prompt": "x"}}, 404, ["body", "profiles", 1]),
    ({"profiles": ["base", "base"], "generate": {"prompt": "x"}}, 422, None),
    ({"profiles": ["base"], "generate": {"prompt": "x"}}, 422, None),
    ({"profiles": ["base", "p1"]}, 422, None),
    ({"profiles": ["base", "p1"], "generate": {"prompt": "x", "stream": True}}, 422, None),
    ({"profiles": ["base", "p1"], "generate": {"prompt": "x", "max_new_tokens": 10**6}}, 422,
     ["body", "generate", "max_new_tokens"]),
])
def test_compare_errors(srv: LiveServer, body: dict, status: int, loc) -> None:
    r = srv.client.post("/v1/compare", json=body)
    assert r.status_code == status, r.text
    if loc is not None:
        assert r.json()["detail"][0]["loc"] == loc


def test_limits(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded(), max_prompt_tokens=16, max_new_tokens=20)
    try:
        c = srv.client
        r = c.post("/v1/generate", json={"prompt": "Paris is a city in France. " * 10})
        assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
        r = c.post("/v1/generate", json={"prompts": ["ok", "Paris is a city in France. " * 10]})
        assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body", "prompts", 1]
        r = c.post("/v1/generate", json={"prompt": "x" * 10**6})
        assert r.status_code == 413
        r = c.post("/v1/generate", json={"prompt": "ok", "max_new_tokens": 21})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_new_tokens"]
        r = c.post("/v1/score", json={"text": "Paris is a city in France. " * 10})
        assert r.status_code == 413
        r = c.post("/v1/score", json={"context": "Paris is a city in France. " * 10, "continuations": [" x"]})
        assert r.status_code == 413
        assert c.get("/health").status_code == 200
        assert c.post("/v1/generate", json={"prompt": "ok", "max_new_tokens": 20}).status_code == 200
    finally:
        srv.stop()


def test_prompt_plus_new_tokens_over_model_positions(tmp_path: Path) -> None:
    srv = start_server(tmp_path, tiny_loaded(), max_new_tokens=1000)
    try:
        r = srv.client.post("/v1/generate", json={"prompt": "ok", "max_new_tokens": 300})  # tiny model: 256
        assert r.status_code == 422 and "positions" in r.text
    finally:
        srv.stop()


def _generated(srv: LiveServer) -> float:
    m = srv.client.get("/metrics").text
    return sum(float(line.split()[-1]) for line in m.splitlines()
               if line.startswith("laser_generated_tokens_total"))


def _requests_done(srv: LiveServer, route: str) -> float:
    """Requests to ``route`` whose handling has finished (the metrics middleware counts them on the way out)."""
    m = srv.client.get("/metrics").text
    return sum(float(line.split()[-1]) for line in m.splitlines()
               if line.startswith("laser_requests_total") and f'route="{route}"' in line)


def _wait_idle(srv: LiveServer) -> None:
    """A score request queues behind whatever runs; when it answers, the engine has finished that work."""
    r = srv.client.post("/v1/score", json={"context": "a", "continuations": [" b"]})
    assert r.status_code == 200


def test_stream_disconnect_cancels(srv: LiveServer) -> None:
    # The prompt's pass and the first decode step go through; the next step waits until the client is gone.
    gate = ForwardGate(srv.app.state.services.engine.swapper.model, free_passes=2)
    try:
        with srv.client.stream("POST", "/v1/generate",
                               json={"prompt": "ok", "max_new_tokens": 200, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # leave after the first event: the connection closes
        wait_until(lambda: _requests_done(srv, "/v1/generate") == 1, what="the server to notice the disconnect")
        gate.open()
        _wait_idle(srv)
        assert _generated(srv) < 10
    finally:
        gate.remove()
    assert gen(srv.client, prompt="ok")["choices"]


def test_plain_disconnect_cancels(srv: LiveServer) -> None:
    gate = ForwardGate(srv.app.state.services.engine.swapper.model, free_passes=1)
    try:
        with pytest.raises(httpx.ReadTimeout):  # the gate holds the answer back, so the client gives up
            httpx.post(f"{srv.url}/v1/generate", json={"prompt": "ok", "max_new_tokens": 200}, timeout=0.3)
        wait_until(lambda: _requests_done(srv, "/v1/generate") == 1, what="the server to notice the disconnect")
        gate.open()
        _wait_idle(srv)
        assert _generated(srv) < 10
    finally:
        gate.remove()
    assert srv.client.get("/health").status_code == 200


@pytest.mark.integration
def test_smollm2_end_to_end(tmp_path: Path, smollm2) -> None:
    """Real model: base knows Paris; a late fc_in rank reduction is served, compared, scored and survives a restart."""
    srv = start_server(tmp_path, smollm2)
    try:
        c = srv.client
        n = c.get("/info").json()["num_layers"]
        spec = [{"target": "fc_in", "layer": n - 2, "rank_fraction": 0.01}]
        dry = c.post("/v1/profiles?dry_run=true", json={"name": "late", "interventions": spec}).json()
        assert dry["matrices"][0]["k"] == 5 and 0 < dry["matrices"][0]["retained_energy"] < 1
        assert c.post("/v1/profiles", json={"name": "late", "interventions": spec}).status_code == 201
        base = gen(c, prompt=PROMPT, profile="base", max_new_tokens=8)["choices"][0]["text"]
        assert "Paris" in base
        edited = gen(c, prompt=PROMPT, profile="late", max_new_tokens=8)["choices"][0]["text"]
        cmp = c.post("/v1/compare", json={"profiles": ["base", "late"],
                                          "generate": {"prompt": PROMPT, "max_new_tokens": 8}}).json()
        assert [g["choices"][0]["text"] for g in cmp["generate"]] == [base, edited]
        sc = c.post("/v1/compare", json={"profiles": ["base", "late"],
                                         "score": {"context": PROMPT, "continuations": [" Paris", " London"]}}).json()
        assert sc["score"][0]["argmax"] == 0 and all(d != 0 for d in sc["diff"]["score"][0]["logprob_deltas"])
        events = sse_events(c, {"prompt": PROMPT, "profile": "base", "max_new_tokens": 8})
        assert "".join(e.get("text", "") for e in events[:-1]) == base
        ppl = c.post("/v1/score", json={"profile": "late", "text": "Paris is the capital of France."}).json()
        assert 1 < ppl["perplexity"]["perplexity"] < 1e4
    finally:
        srv.stop()
    srv = start_server(tmp_path, smollm2)
    try:
        assert srv.client.get("/v1/profiles/late").status_code == 200
        assert gen(srv.client, prompt=PROMPT, profile="late", max_new_tokens=8)["choices"][0]["text"] == edited
    finally:
        srv.stop()
