"""Issue 14's reproducers, one regression test each: every bad input answers a 4xx naming the field, nothing is
stored, and the connection stays usable. Each body is sent as raw JSON text, as curl would send it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import LiveServer, start_server, tiny_loaded, wait_until

SPEC = {"target": "fc_in", "layer": 1, "rank_fraction": 0.1}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    s = start_server(tmp_path_factory.mktemp("validation"), tiny_loaded(), max_prompt_tokens=64)
    yield s
    s.stop()


def post(srv: LiveServer, path: str, body: str, method: str = "POST") -> httpx.Response:
    return srv.client.request(method, path, content=body.encode("utf-8", "surrogatepass"),
                              headers={"Content-Type": "application/json"})


def stored(srv: LiveServer) -> dict[str, list[str]]:
    """What the server holds: profiles, datasets, jobs."""
    c = srv.client
    return {"profiles": [p["name"] for p in c.get("/v1/profiles").json()["data"]],
            "datasets": [d["name"] for d in c.get("/v1/datasets").json()["data"]],
            "jobs": [j["id"] for j in c.get("/v1/jobs").json()["data"]]}


def refused(srv: LiveServer, path: str, body: str, loc: list, status: int = 422, method: str = "POST") -> dict:
    """Send ``body``: the status, an error located at ``loc``, nothing stored, the server still answering."""
    before = stored(srv)
    r = post(srv, path, body, method)
    assert r.status_code == status, r.text
    err = r.json()["detail"][0] if "detail" in r.json() else r.json()["error"]
    where = err["loc"] if "loc" in err else ["body", *str(err["param"]).split(".")]
    assert [str(p) for p in where[:len(loc)]] == [str(p) for p in loc], r.text
    assert r.headers.get("connection") != "close"  # the keep-alive connection survives
    assert stored(srv) == before
    assert srv.client.post("/v1/generate", json={"prompt": "ok", "max_new_tokens": 1}).status_code == 200
    return err


# ---------------------------------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e309"])
@pytest.mark.parametrize(("path", "template", "loc"), [
    ("/v1/generate", '{"prompt": "hi", "max_new_tokens": 2, "temperature": %s}', ["body", "temperature"]),
    ("/v1/generate", '{"prompt": "hi", "max_new_tokens": 2, "top_p": %s}', ["body", "top_p"]),
    ("/v1/score", '{"context": "a", "continuations": [" b", %s]}', ["body", "continuations", 1]),
    ("/v1/profiles", '{"name": "nf", "interventions": [{"target": "fc_in", "layer": 1, "rank_fraction": %s}]}',
     ["body", "interventions", 0, "rank_fraction"]),
    ("/v1/profiles?dry_run=true", '{"name": "nf", "interventions": [{"target": "fc_in", "layer": 1, "energy": %s}]}',
     ["body", "interventions", 0, "energy"]),
    ("/v1/profiles", '{"name": "nf", "interventions": [{"kind": "prune_magnitude", "target": "fc_in", "layer": 1, '
                     '"sparsity": %s}]}', ["body", "interventions", 0, "sparsity"]),
    ("/v1/jobs/sweeps", '{"dataset": "qa_wikidata", "rhos": [0.5, %s]}', ["body", "rhos", 1]),
    ("/v1/jobs/sweeps", '{"dataset": "qa_wikidata", "time_limit_s": %s}', ["body", "time_limit_s"]),
    ("/v1/datasets", '{"name": "nf", "format": "bigbench", "content": {"examples": [{"input": "q", '
                     '"target_scores": {"a": %s, "b": 1}}]}}', ["body", "content"]),
])
def test_non_finite_numbers_are_refused(srv: LiveServer, path: str, template: str, loc: list, number: str) -> None:
    err = refused(srv, path, template % number, loc)
    assert "input" not in err or json.dumps(err["input"], allow_nan=False)  # never echoed as NaN/Infinity


@pytest.mark.parametrize("content", [
    '{"input": "q", "target_scores": {"a": NaN, "b": 1}}',
    '{"input": "q", "target_scores": {"a": 1e999, "b": 1}}',
])
def test_non_finite_numbers_inside_uploaded_files_are_bad_rows(srv: LiveServer, content: str) -> None:
    refused(srv, "/v1/datasets", json.dumps({"name": "nf", "format": "jsonl", "content": content}),
            ["body", "content", 1])
    task = json.dumps({"examples": [json.loads(content.replace("NaN", '"x"').replace("1e999", '"x"'))]})
    task = task.replace('"x"', "NaN")  # the BIG-bench task as text, with a NaN literal inside
    refused(srv, "/v1/datasets", json.dumps({"name": "nf", "format": "bigbench", "content": task}),
            ["body", "content"])


# ---------------------------------------------------------------------------------------------- lone surrogates


@pytest.mark.parametrize(("path", "body", "loc", "status"), [
    ("/v1/generate", '{"prompt": "\\ud800 hi", "max_new_tokens": 2}', ["body", "prompt"], 422),
    ("/v1/generate", '{"prompts": ["ok", "\\udfff"], "max_new_tokens": 2}', ["body", "prompts", 1], 422),
    ("/v1/score", '{"context": "\\ud800", "continuations": [" a"]}', ["body", "context"], 422),
    ("/v1/completions", '{"prompt": "\\ud800 hi", "max_tokens": 2}', ["body", "prompt"], 400),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}',
     ["body", "messages", 0, "content"], 400),
    ("/tokenize", '{"prompt": "\\ud800 hi"}', ["body", "prompt"], 400),
    ("/v1/profiles", '{"name": "sur", "description": "\\ud800", "interventions": []}', ["body", "description"], 422),
    ("/v1/datasets", '{"name": "sur", "format": "jsonl", "content": "\\ud800"}', ["body", "content"], 422),
    ("/v1/datasets", '{"name": "sur", "format": "jsonl", "content": "{\\"input\\": \\"\\\\ud800\\", '
                     '\\"target\\": \\"a\\"}"}', ["body", "content", 1], 422),
    ("/v1/generate", '{"prompt": "hi", "\\ud800": 1}', ["body"], 422),
])
def test_lone_surrogates_are_refused(srv: LiveServer, path: str, body: str, loc: list, status: int) -> None:
    refused(srv, path, body, loc, status)


# ---------------------------------------------------------------------------------------------- stored poison


@pytest.mark.parametrize(("field", "value"), [
    ("seed", 18446744073709551616), ("seed", 2**63), ("seed", -1), ("seed", True), ("seed", 1.5),
    ("layer", True), ("layer", [1, False]), ("layer", "1_0"), ("layer", "٣"), ("rank", True), ("rank", "4"),
])
def test_interventions_are_validated_to_the_range_the_code_can_use(srv: LiveServer, field: str, value: object) -> None:
    spec = {"kind": "random_basis", "target": "fc_in", "layer": -1, "rank": 4, field: value}
    body = json.dumps({"name": "rbseed", "interventions": [spec]})
    for path in ("/v1/profiles", "/v1/profiles?dry_run=true"):
        refused(srv, path, body, ["body", "interventions", 0, field])
    refused(srv, "/v1/profiles/rbseed", json.dumps({"interventions": [spec]}), ["body", "interventions", 0, field],
            method="PUT")
    assert srv.client.get("/v1/profiles/rbseed").status_code == 404


def test_the_largest_seed_is_usable(srv: LiveServer) -> None:
    spec = {"kind": "random_basis", "target": "fc_in", "layer": -1, "rank": 4, "seed": 2**63 - 1}
    assert srv.client.post("/v1/profiles", json={"name": "bigseed", "interventions": [spec]}).status_code == 201
    try:
        assert srv.client.post("/v1/generate", json={"profile": "bigseed", "prompt": "a",
                                                     "max_new_tokens": 2}).status_code == 200
        assert srv.client.post("/v1/profiles?dry_run=true", json={"name": "x", "interventions": [spec]}).status_code == 200
    finally:
        srv.client.delete("/v1/profiles/bigseed")


# ---------------------------------------------------------------------------------------------- tiny temperatures


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 1e-38}),
    ("/v1/generate", {"prompt": "hi", "max_new_tokens": 4, "temperature": 1e-320, "seed": 3}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 1e-320}),
    ("/v1/generate", {"prompt": "hi", "max_new_tokens": 4, "temperature": 1.0, "top_p": 1e-320, "seed": 3}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "temperature": 0.7, "top_p": 5e-324}),
])
def test_tiny_temperatures_and_top_p_sample_the_top_token(srv: LiveServer, path: str, body: dict) -> None:
    """Sampling that close to zero is greedy: the answer equals the greedy one (no NaN probabilities)."""
    r = srv.client.post(path, json=body)
    assert r.status_code == 200, r.text
    greedy = srv.client.post(path, json={**body, "temperature": 0, "top_p": 1}).json()

    def text(answer: dict) -> str:
        choice = answer["choices"][0]
        return choice.get("text", choice.get("message", {}).get("content"))

    assert text(r.json()) == text(greedy)


# ---------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("template", ["{input.zzz}{input}", "{input}{choices:>50000000}", "{input[0]}",
                                      "{input!r}", "{0}{input}", "{input}{", "{}{input}", "no placeholder"])
def test_unsafe_prompt_templates_are_refused(srv: LiveServer, template: str) -> None:
    content = json.dumps({"input": "2+2=", "choices": ["4", "5"], "answer": 0})
    for fmt, payload in (("jsonl", content), ("bigbench", {"examples": [{"input": "q", "target": "a"}]})):
        body = {"name": "tpl", "format": fmt, "content": payload, "prompt_template": template}
        refused(srv, "/v1/datasets", json.dumps(body), ["body", "prompt_template"])


def test_deeply_nested_jsonl_is_a_bad_row(srv: LiveServer) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    ok = json.dumps({"input": "q", "target": "a"})
    err = refused(srv, "/v1/datasets", json.dumps({"name": "deep", "format": "jsonl", "content": ok + "\n" + deep}),
                  ["body", "content", 2])
    assert "nested deeper than" in err["msg"]


def test_deeply_nested_body_is_a_400(srv: LiveServer) -> None:
    refused(srv, "/v1/datasets", '{"name": "deep", "format": "bigbench", "content": ' + "[" * 100_000, ["body"], 400)


# ---------------------------------------------------------------------------------------------- tokenizer limits


def test_tokenize_has_the_prompt_limit(srv: LiveServer) -> None:
    services = srv.app.state.services
    calls = []
    original = services.engine.scorer.encode
    services.engine.scorer.encode = lambda text: calls.append(len(text)) or original(text)  # type: ignore[method-assign]
    try:
        r = srv.client.post("/tokenize", json={"prompt": "ab " * 100_000})
    finally:
        services.engine.scorer.encode = original  # type: ignore[method-assign]
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert calls == []  # refused by its length, never tokenized
    r = srv.client.post("/tokenize", json={"prompt": "Paris " * 80})  # short in characters, long in tokens
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert srv.client.post("/tokenize", json={"prompt": "Paris"}).json()["count"] >= 1


# ---------------------------------------------------------------------------------------------- OpenAI requests


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "body"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": False, "stream_options": {}}, "body"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, "messages.0.content"),
])
def test_openai_chat_requests_are_checked(srv: LiveServer, body: dict, param: str) -> None:
    r = srv.client.post("/v1/chat/completions", json={"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"] or "body").startswith(param) and err["type"] == "invalid_request_error", err


def test_streamed_chat_logprobs_come_with_each_delta(srv: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "Is the sky blue?"}], "max_tokens": 12, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    whole = srv.client.post("/v1/chat/completions", json=body).json()["choices"][0]
    with srv.client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert deltas and all(d["logprobs"] and d["logprobs"]["content"] for d in deltas)
    for d in deltas:  # each delta's log-probs are its own tokens
        assert "".join(t["token"] for t in d["logprobs"]["content"]) == d["delta"]["content"]
    streamed = [t for d in deltas for t in d["logprobs"]["content"]]
    assert [t["token"] for t in streamed] == [t["token"] for t in whole["logprobs"]["content"]]
    assert [t["logprob"] for t in streamed] == pytest.approx([t["logprob"] for t in whole["logprobs"]["content"]],
                                                              abs=1e-5)


# ---------------------------------------------------------------------------------------------- queue and schema


def test_the_queue_bound_counts_requests_and_429_has_the_error_shape(tmp_path: Path) -> None:
    """With max_queue=2, a request of 8 prompts is one request; the third queued request answers 429."""
    s = start_server(tmp_path, tiny_loaded(), max_queue=2)
    entered, gate = threading.Event(), threading.Event()

    def hold(module, args):  # the owner thread waits here until the test lets it go
        entered.set()
        gate.wait(60)

    hook = s.app.state.services.engine.swapper.model.register_forward_pre_hook(hold)
    engine = s.app.state.services.engine
    results: dict[str, httpx.Response] = {}

    def send(key: str, body: dict) -> None:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            results[key] = c.post("/v1/generate", json=body)

    threads = [threading.Thread(target=send, args=("first", {"prompt": "a", "max_new_tokens": 1}))]
    try:
        threads[0].start()
        assert entered.wait(60)  # running on the owner thread: the queue is empty
        for key, body in (("many", {"prompts": ["b"] * 8, "max_new_tokens": 1}),
                          ("second", {"prompt": "c", "max_new_tokens": 1})):
            threads.append(threading.Thread(target=send, args=(key, body)))
            threads[-1].start()
            wait_until(lambda: engine.queue_depth >= len(threads) - 1, what="the request to queue")
        assert engine.queue_depth == 2  # two requests queued (9 prompts)
        r = s.client.post("/v1/generate", json={"prompt": "d", "max_new_tokens": 1})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json() == {"detail": [{"loc": [], "msg": r.json()["detail"][0]["msg"], "type": "overloaded"}]}
        assert "429" in s.client.get("/openapi.json").json()["paths"]["/v1/generate"]["post"]["responses"]
    finally:
        gate.set()
        for t in threads:
            t.join(60)
        hook.remove()
        s.stop()
    assert [results[k].status_code for k in ("first", "many", "second")] == [200, 200, 200]
    assert len(results["many"].json()["choices"]) == 8


def test_options_and_405_list_every_method_of_the_path(srv: LiveServer) -> None:
    r = srv.client.options("/v1/profiles/some-name")
    assert r.status_code == 204 and r.headers["allow"] == "DELETE, GET, OPTIONS, PUT"
    r = srv.client.patch("/v1/profiles/some-name", json={})
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, OPTIONS, PUT"
    assert r.json()["detail"][0]["type"] == "method_not_allowed"
    assert srv.client.options("/v1/generate").headers["allow"] == "OPTIONS, POST"


def test_schema_states_cross_field_rules_and_body_errors(srv: LiveServer) -> None:
    spec = srv.client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "oneOf" in json.dumps(schemas["GenerateParams"])  # prompt xor prompts
    assert "oneOf" in json.dumps(schemas["ScoreRequest"])  # context + continuations xor text
    assert "oneOf" in json.dumps(schemas["CompareRequest"])  # generate xor score
    assert "anyOf" in schemas["InterventionSpec"]  # which knob goes with which kind
    assert schemas["GenerateRequest"]["properties"]["max_new_tokens"]["anyOf"][0]["maximum"] == 1024
    raw_keywords = [k for k in ("\"ge\"", "\"le\"", "\"gt\"", "\"lt\"") if k in json.dumps(schemas)]
    assert not raw_keywords  # every bound is a JSON Schema keyword
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if "requestBody" in op:
                assert {"400", "413", "422"} <= set(op["responses"]), (method, path)


def test_dataset_422_answers_match_the_documented_schema(srv: LiveServer) -> None:
    spec = srv.client.get("/openapi.json").json()
    ref = spec["paths"]["/v1/datasets"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
    required = set(spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]["required"])
    for body in ({"name": "x", "format": "jsonl", "content": "not json"},  # bad rows
                 {"name": "x", "format": "nope", "content": ""}):  # a bad field
        r = srv.client.post("/v1/datasets", json=body)
        assert r.status_code == 422 and required <= set(r.json()), r.text
