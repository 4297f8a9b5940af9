"""OpenAI-compatible routes, over real HTTP with the official `openai` client."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from laser_ops.interventions import parse_profile
from tests.server.conftest import LiveServer, start_server, tiny_loaded

PROMPT = "The capital of France is Paris. The capital of Italy is"
STRONG_EDIT = [{"target": "all", "layer": "all", "rank": 1}]


def client_of(srv: LiveServer, key: str = "none") -> OpenAI:
    return OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def lm_eval_loglikelihood(choice: object, ctxlen: int) -> tuple[float, bool]:
    """What lm-evaluation-harness's local-completions does with one echoed choice."""
    lp = choice.logprobs  # type: ignore[attr-defined]
    tokens = lp.token_logprobs[ctxlen:-1]
    tops = lp.top_logprobs[ctxlen:-1]
    return sum(tokens), all(tok == max(top.values()) for tok, top in zip(tokens, tops))


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One tiny-llama server for the module (tests that need weights in base state ask base first)."""
    server = start_server(tmp_path_factory.mktemp("openai"), tiny_loaded(), max_new_tokens=64,
                          max_prompt_tokens=100)
    server.app.state.services.profiles.put("edit", parse_profile(STRONG_EDIT), "rank-1 everything")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(srv: LiveServer) -> OpenAI:
    return client_of(srv)


# --------------------------------------------------------------------------------------------- models


def test_models_lists_base_and_profiles_with_parent(client: OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert {"base", "edit"} <= set(models)
    assert models["base"].model_extra.get("parent") is None
    assert models["edit"].model_extra["parent"] == "base"
    assert models["edit"].model_extra["root"] == models["base"].model_extra["root"] == "tiny-llama"
    assert client.models.retrieve("edit").id == "edit"


def test_unknown_model_is_404_naming_known_models(client: OpenAI, srv: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="a", max_tokens=1)
    body = err.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert "base" in body["message"] and "edit" in body["message"]
    raw = srv.client.post("/v1/chat/completions",
                          json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert raw.status_code == 404 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_profile_changes_the_completion(client: OpenAI) -> None:
    kw = dict(prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1, echo=True)
    base = client.completions.create(model="base", **kw).choices[0]
    edit = client.completions.create(model="edit", **kw).choices[0]
    assert base.logprobs.token_logprobs[1:] != pytest.approx(edit.logprobs.token_logprobs[1:], abs=1e-3)
    assert base.text != edit.text
    again = client.completions.create(model="base", **kw).choices[0]
    assert again.text == base.text  # swapping back restores base exactly


# --------------------------------------------------------------------------------------------- echo + logprobs


def test_echo_logprobs_align_with_prompt(client: OpenAI, srv: LiveServer) -> None:
    scorer = srv.app.state.services.engine.scorer
    ids = scorer.encode(PROMPT)
    out = client.completions.create(model="base", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=2, echo=True)
    choice = out.choices[0]
    lp = choice.logprobs
    n = len(ids) + 1  # prompt + the generated token (an EOS is listed too)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens[: len(ids)]) == PROMPT
    assert choice.text.startswith(PROMPT)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for tok, off in zip(lp.tokens[: len(ids)], lp.text_offset):
        assert choice.text[off: off + len(tok)] == tok
    for tok_lp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 1 <= len(top) <= 3 and max(top.values()) >= tok_lp
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens <= 1


def test_lm_eval_loglikelihood_matches_scorer(client: OpenAI, srv: LiveServer) -> None:
    scorer = srv.app.state.services.engine.scorer
    pairs = [("The capital of France is", " Paris."), ("Question: Is the sky blue? Answer:", " yes"),
             ("A quick brown", " fox jumps over the lazy dog")]
    encoded = [scorer.encode_pair(c, x) for c, x in pairs]
    out = client.completions.create(model="base", prompt=[c + x for c, x in encoded], max_tokens=1,
                                    temperature=0, logprobs=1, echo=True, seed=1234)
    assert [c.index for c in out.choices] == [0, 1, 2]
    # The request ran on base, so the shared model holds base weights now.
    expected = scorer.loglikelihood_tokens(encoded)
    for choice, (ctx, _), ref in zip(sorted(out.choices, key=lambda c: c.index), encoded, expected):
        ll, greedy = lm_eval_loglikelihood(choice, len(ctx))
        assert ll == pytest.approx(ref.logprob, abs=1e-4)
        assert greedy == ref.is_greedy


def _echo_stream_last(srv: LiveServer, body: dict) -> dict:
    """The streamed choice reassembled: its text and its log-probs (sent chunk by chunk) joined."""
    with srv.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    last = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]["choices"][0]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    logprobs = {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                              "text_offset")} if parts else None
    return {**last, "logprobs": logprobs, "text": "".join(c["choices"][0]["text"] for c in chunks if c["choices"])}


def test_one_pass_scoring_agrees_with_generate_path(srv: LiveServer) -> None:
    """lm-eval's greedy max_tokens=1 call is answered by one scoring pass; the stream runs generate."""
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 2, "echo": True}
    fast = srv.client.post("/v1/completions", json=body).json()["choices"][0]
    slow = _echo_stream_last(srv, body)
    assert fast["text"].startswith(PROMPT) and fast["finish_reason"] == slow["finish_reason"]
    assert fast["logprobs"]["tokens"] == slow["logprobs"]["tokens"]
    assert fast["logprobs"]["token_logprobs"][1:] == pytest.approx(slow["logprobs"]["token_logprobs"][1:], abs=1e-5)


def test_an_ending_eos_is_listed_in_logprobs(srv: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generation that ends on EOS still lists that token, so lm-eval's [ctxlen:-1] stays aligned."""
    scorer = srv.app.state.services.engine.scorer
    ids = scorer.encode(PROMPT)
    first = scorer.prompt_logprobs([ids + [0]], top_n=1)[0].top_logprobs[-1]
    token = max(first, key=first.__getitem__)
    monkeypatch.setattr(scorer, "eos_token_ids", {*scorer.eos_token_ids, token})
    batch = srv.app.state.services.engine.batch  # the engine's decode loop stops on the same ids
    monkeypatch.setattr(batch, "eos_token_ids", scorer.eos_token_ids)
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    for choice in (srv.client.post("/v1/completions", json=body).json()["choices"][0], _echo_stream_last(srv, body)):
        assert choice["text"] == PROMPT and choice["finish_reason"] == "stop"
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1
        assert lp["token_logprobs"][-1] == pytest.approx(first[token], abs=1e-5)
        assert lp["text_offset"][-1] == len(PROMPT)
    plain = srv.client.post("/v1/completions", json={**body, "echo": False, "max_tokens": 4}).json()
    assert plain["choices"][0]["text"] == "" and len(plain["choices"][0]["logprobs"]["tokens"]) == 1
    assert plain["usage"]["completion_tokens"] == 0


def test_string_list_and_token_prompts_agree(client: OpenAI, srv: LiveServer) -> None:
    ids = srv.app.state.services.engine.scorer.encode(PROMPT)
    kw = dict(model="base", max_tokens=4, temperature=0, logprobs=1, echo=True)
    by_text = client.completions.create(prompt=[PROMPT, "Rome is"], **kw)
    by_ids = client.completions.create(prompt=ids, **kw)
    assert len(by_text.choices) == 2
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.choices[0].logprobs.token_logprobs == pytest.approx(by_text.choices[0].logprobs.token_logprobs)


def test_max_tokens_zero_scores_the_prompt_only(client: OpenAI, srv: LiveServer) -> None:
    ids = srv.app.state.services.engine.scorer.encode(PROMPT)
    out = client.completions.create(model="base", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    choice = out.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids) and choice.logprobs.token_logprobs[0] is None
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    plain = client.completions.create(model="base", prompt=PROMPT, max_tokens=0)
    assert plain.choices[0].text == ""


def test_logprobs_of_generated_tokens(client: OpenAI) -> None:
    out = client.completions.create(model="base", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    choice = out.choices[0]
    lp = choice.logprobs
    n = out.usage.completion_tokens + (1 if choice.finish_reason == "stop" else 0)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    for tok_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 4 and max(top.values()) == pytest.approx(tok_lp)  # greedy: chosen is the top
    echoed = client.completions.create(model="base", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, echo=True)
    n_prompt = echoed.usage.prompt_tokens
    tail = echoed.choices[0].logprobs.token_logprobs[n_prompt:]
    assert echoed.choices[0].text == PROMPT + choice.text
    assert tail == pytest.approx(lp.token_logprobs, abs=1e-4)


# --------------------------------------------------------------------------------------------- sampling options


def test_seed_n_and_stop(client: OpenAI) -> None:
    kw = dict(model="base", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=3)
    first = client.completions.create(**kw)
    second = client.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    greedy = client.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    if len(greedy) >= 3:
        stop = greedy[1:3]
        cut = client.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
        assert cut.choices[0].text == greedy[: greedy.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_limits_and_unsupported_fields_are_400s_naming_the_field(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="base", prompt="a", max_tokens=65)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="base", prompt=[5] * 101, max_tokens=1)
    assert err.value.status_code == 400 and err.value.body["param"] == "prompt"
    assert err.value.body["code"] == "context_length_exceeded"  # OpenAI's and vLLM's answer
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="base", prompt="a", frequency_penalty=0.5)
    assert err.value.body["param"] == "frequency_penalty"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="base", prompt=[100000], max_tokens=1)
    assert err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], max_tokens=1000)
    assert err.value.body["param"] == "max_tokens"
    ok = client.completions.create(model="base", prompt="a", max_tokens=1, frequency_penalty=0, user="u",
                                   extra_body={"some_new_field": 1})
    assert len(ok.choices) == 1


# --------------------------------------------------------------------------------------------- streaming


def test_streamed_completion_equals_non_streamed(client: OpenAI) -> None:
    kw = dict(model="edit", prompt=[PROMPT, "Rome is a city"], max_tokens=10, temperature=0)
    full = client.completions.create(**kw)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        assert chunk.object == "text_completion"
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_stream_ends_with_done_in_openai_format(srv: LiveServer) -> None:
    with srv.client.stream("POST", "/v1/completions", json={
            "model": "base", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True,
            "echo": True, "logprobs": 1}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["text"] == PROMPT
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None  # the echoed prompt's, first null
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    for chunk in chunks[1:]:  # every generated delta carries the log-probs of its own tokens
        choice = chunk["choices"][0]
        if choice["text"]:
            assert choice["logprobs"]["tokens"] and "".join(choice["logprobs"]["tokens"]) == choice["text"]


# --------------------------------------------------------------------------------------------- chat


def test_chat_uses_the_chat_template_and_streams_the_same_text(client: OpenAI, srv: LiveServer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is the sky blue?"}]
    tokenizer = srv.app.state.services.engine.info.tokenizer
    expected_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    out = client.chat.completions.create(model="edit", messages=messages, max_tokens=12, temperature=0,
                                         logprobs=True, top_logprobs=2)
    assert out.object == "chat.completion" and out.usage.prompt_tokens == len(expected_ids)
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert len(choice.logprobs.content) == out.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    tokenized = srv.client.post("/tokenize", json={"messages": messages}).json()
    assert tokenized["tokens"] == expected_ids
    streamed, roles = "", []
    for chunk in client.chat.completions.create(model="edit", messages=messages, max_tokens=12, temperature=0,
                                                stream=True):
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            streamed += c.delta.content or ""
            roles += [c.delta.role] if c.delta.role else []
    assert streamed == choice.message.content and roles == ["assistant"]


def test_chat_without_template_is_400(tmp_path: Path) -> None:
    loaded = tiny_loaded()
    loaded.tokenizer = copy.deepcopy(loaded.tokenizer)  # the tiny tokenizer is shared (cached)
    loaded.tokenizer.chat_template = None
    server = start_server(tmp_path, loaded)
    try:
        with pytest.raises(openai.BadRequestError) as err:
            client_of(server).chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}])
        assert "chat template" in err.value.body["message"]
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------- tokenizer routes


def test_tokenizer_routes(srv: LiveServer) -> None:
    scorer = srv.app.state.services.engine.scorer
    info = srv.client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|eos|>" and info["chat_template"] and info["model_max_length"] == 256
    tok = srv.client.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False,
                                             "return_token_strs": True}).json()
    assert tok["tokens"] == scorer.encode(PROMPT) and "".join(tok["token_strs"]) == PROMPT
    assert srv.client.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == PROMPT
    bad = srv.client.post("/tokenize", json={"prompt": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


# --------------------------------------------------------------------------------------------- auth


def test_api_keys_guard_the_openai_routes(tmp_path: Path) -> None:
    server = start_server(tmp_path, tiny_loaded(), api_key="infer", admin_api_key="admin")
    try:
        with pytest.raises(openai.AuthenticationError) as err:
            client_of(server, "wrong").models.list()
        assert err.value.status_code == 401 and set(err.value.body) == {"message", "type", "param", "code"}
        missing = httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": "a"})
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        assert missing.headers["www-authenticate"] == "Bearer"
        assert httpx.get(server.url + "/tokenizer_info").status_code == 401
        for key in ("infer", "admin"):
            out = client_of(server, key).completions.create(model="base", prompt="a", max_tokens=1)
            assert len(out.choices) == 1
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.integration
def test_smollm2_lm_eval_loglikelihood_and_chat(tmp_path: Path, smollm2: object) -> None:
    server = start_server(tmp_path, smollm2)
    try:
        scorer = server.app.state.services.engine.scorer
        client = client_of(server)
        pairs = [("The capital of France is", " Paris"), ("The capital of France is", " Berlin"),
                 ("Water boils at 100 degrees", " Celsius.")]
        encoded = [scorer.encode_pair(c, x) for c, x in pairs]
        out = client.completions.create(model="base", prompt=[c + x for c, x in encoded], max_tokens=1,
                                        temperature=0, logprobs=1, echo=True, seed=0)
        expected = scorer.loglikelihood_tokens(encoded)
        got = [lm_eval_loglikelihood(c, len(ctx)) for c, (ctx, _) in
               zip(sorted(out.choices, key=lambda c: c.index), encoded)]
        for (ll, greedy), ref in zip(got, expected):
            assert ll == pytest.approx(ref.logprob, abs=1e-4)
            assert greedy == ref.is_greedy
        assert got[0][0] > got[1][0]  # Paris beats Berlin
        chat = client.chat.completions.create(model="base", max_tokens=24, temperature=0,
                                              messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert chat.choices[0].message.content.strip()
    finally:
        server.stop()


def test_out_of_range_seed_is_a_400_naming_seed(srv: LiveServer) -> None:
    """A seed torch cannot take (> 64 bits) is refused up front, not a 500 from the engine."""
    for path, body in (("/v1/completions", {"model": "base", "prompt": "a", "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}],
                                                 "max_tokens": 2})):
        r = srv.client.post(path, json={**body, "temperature": 1.0, "seed": 2**64})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "seed"


def test_oversize_text_prompt_is_refused_before_tokenizing(srv: LiveServer) -> None:
    """A prompt far over max_prompt_tokens in characters is refused without tokenizing (400
    context_length_exceeded, as OpenAI answers; the native routes answer 413)."""
    services = srv.app.state.services
    calls = []
    original = services.engine.scorer.encode
    services.engine.scorer.encode = lambda text: calls.append(len(text)) or original(text)  # type: ignore[method-assign]
    try:
        r = srv.client.post("/v1/completions", json={"model": "base", "prompt": "ab " * 2000, "max_tokens": 1})
    finally:
        services.engine.scorer.encode = original  # type: ignore[method-assign]
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt" and r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []


def test_oversize_chat_is_refused_before_rendering(srv: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.serving.openai import chat as openai_serving

    calls = []
    original = openai_serving.render_chat
    monkeypatch.setattr(openai_serving, "render_chat", lambda *a, **k: calls.append(1) or original(*a, **k))
    r = srv.client.post("/v1/chat/completions", json={"model": "base", "max_tokens": 1,
                                                      "messages": [{"role": "user", "content": "ab " * 2000}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages" and r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []
