"""Tests for laser_ops.evaluation: metrics through the scorer, statistics, and the fast evaluator."""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch

from laser_ops.datasets import Dataset, Example, PromptFormat
from laser_ops.evaluation import (
    FastChoiceEvaluator,
    answer_in,
    evaluate_generation,
    evaluate_multiple_choice,
    evaluate_top_k,
    mcnemar_exact,
    perplexity,
    report_from_predictions,
    wilson_interval,
)
from laser_ops.scoring import GenerationRequest, HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.testing import make_tiny_model, tiny_tokenizer

WORDS = ["Paris", "Rome", "France", "Italy", "city", "capital", "fox", "dog", "yes", "no", "blue", "red"]
PROFILES = [
    [],
    [{"target": "fc_in", "layer": 2, "rank_fraction": 0.1}],
    [{"target": "fc_out", "layer": 1, "rank_fraction": 0.05}],
    [{"target": "mlp", "layer": 0, "rank_fraction": 0.2}, {"target": "q_proj", "layer": 2, "rank": 1}],
    [{"kind": "zero", "target": "out_proj", "layer": 1}],
]


def toy_mc(n: int = 24, seed: int = 0, prefix: str = "Question: ") -> Dataset:
    """Prompts with a shared instruction and 2-4 candidates of different token lengths."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
        choices = rng.sample(["Paris", "Rome is a city", "no", "the lazy dog", "blue", "France or Italy"],
                             rng.randint(2, 4))
        examples.append(Example(id=i, input=words, choices=choices, correct=[rng.randrange(len(choices))]))
    fmt = PromptFormat(task_prefix="The capital of France is Paris. " + prefix, example_output_prefix="\nA: ")
    return Dataset(name="toy", kind="multiple_choice", examples=examples, format=fmt)


@functools.cache
def _llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def scorer() -> HFScorer:
    return HFScorer(_llama(), tiny_tokenizer(), batch_size=5)


@pytest.fixture(scope="module")
def swapper() -> WeightSwapper:
    return WeightSwapper(_llama(), svd_cache=SvdCache("tiny-llama"))


# ---- statistics


def test_wilson_matches_hand_computation() -> None:
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_mcnemar_exact_matches_hand_computation() -> None:
    # 1 example only A gets right, 9 only B: p = 2 * (C(10,0) + C(10,1)) / 2^10.
    a = [True] + [False] * 9 + [True] * 5
    b = [False] + [True] * 9 + [True] * 5
    r = mcnemar_exact(a, b)
    assert (r.only_a, r.only_b) == (1, 9)
    assert r.p_value == pytest.approx(22 / 1024)
    assert r.significant and r.verdict.startswith("significant at 0.05: edited is better")
    r = mcnemar_exact([True] * 3 + [False] * 5, [False] * 3 + [True] * 5)
    assert r.p_value == pytest.approx(186 / 256)
    assert r.verdict.startswith("not significant at 0.05")
    r = mcnemar_exact([True, False], [True, False])
    assert r.p_value == 1.0 and "no discordant" in r.verdict
    with pytest.raises(ValueError, match="length"):
        mcnemar_exact([True], [True, False])


# ---- metrics through the scorer


def test_classification_accuracy_and_log_loss(scorer: HFScorer) -> None:
    ds = toy_mc(12)
    report = evaluate_multiple_choice(scorer, ds)
    correct = 0
    gold = []
    for ex in ds.examples:
        lps = [r.logprob for r in scorer.loglikelihood([(ds.prompt(ex), c) for c in ex.choices])]
        correct += max(range(len(lps)), key=lambda i: (lps[i], -i)) in ex.correct
        gold.append(lps[ex.gold])
    assert report.n == 12 and report.n_correct == correct
    assert report.log_loss == pytest.approx(-sum(gold) / len(gold), rel=1e-5)
    assert (report.ci_low, report.ci_high) == wilson_interval(correct, 12)
    assert [o.id for o in report.outcomes] == list(range(12))


def test_generation_accuracy_only_searches_the_continuation(scorer: HFScorer) -> None:
    prompts = ["The capital of France is", "A quick brown fox"]
    outs = scorer.generate([GenerationRequest(prompt=p, max_new_tokens=6) for p in prompts])
    hit = outs[0].text.strip().split()[0] if outs[0].text.strip() else outs[0].text
    examples = [
        Example(id=0, input=prompts[0], targets=[f"  {hit.upper()} "]),  # case and whitespace ignored
        Example(id=1, input=prompts[1], targets=["quick brown"]),  # only in the prompt
    ]
    ds = Dataset(name="g", kind="generation", examples=examples, format=PromptFormat(example_output_prefix=""))
    report = evaluate_generation(scorer, ds, max_new_tokens=6)
    assert [o.correct for o in report.outcomes] == [bool(hit.strip()), "quick brown" in outs[1].text.lower()]
    assert report.outcomes[0].prediction == outs[0].text
    assert report.log_loss is not None and report.log_loss > 0
    assert answer_in(" The answer is Paris.", ["paris "]) and not answer_in("Rome", ["Paris"])


def test_top_k_for_single_token_answers(scorer: HFScorer) -> None:
    prompt = "The capital of France is"
    ctx = scorer.encode(prompt)
    greedy_id = scorer.generate([GenerationRequest(prompt=prompt, max_new_tokens=1)])[0].token_ids[0]
    greedy = scorer.decode([greedy_id])
    examples = [Example(id=0, input=prompt, targets=[greedy]),
                Example(id=1, input=prompt, targets=["Rome is a city in Italy and a capital"])]
    ds = Dataset(name="t", kind="generation", examples=examples, format=PromptFormat(example_output_prefix=""))
    _, cont = scorer.encode_pair(prompt, greedy)
    assert len(cont) == 1 and ctx  # the greedy token re-encodes to itself
    report = evaluate_top_k(scorer, ds, k=1)
    assert report.n == 1 and report.skipped == 1 and report.n_correct == 1


def test_perplexity_guard_value(scorer: HFScorer) -> None:
    texts = ["The capital of France is Paris.", "A quick brown fox jumps over the lazy dog."]
    res = scorer.loglikelihood_rolling(texts)
    expected = math.exp(-sum(r.logprob for r in res) / sum(r.n_tokens for r in res))
    assert perplexity(scorer, texts) == pytest.approx(expected)


# ---- fast evaluator


def _assert_same(fast, plain) -> None:
    assert [p.index for p in fast] == [p.index for p in plain]
    for f, p in zip(fast, plain):
        assert f.n_tokens == p.n_tokens
        assert f.logprobs == pytest.approx(p.logprobs, abs=1e-4)


def test_fast_evaluator_equals_plain_path_on_tiny_llama(scorer: HFScorer, swapper: WeightSwapper) -> None:
    ds = toy_mc(24)
    fast = FastChoiceEvaluator(scorer, ds.choice_items(), batch_size=4)
    assert fast.fast and fast.prefix_len > 5  # the shared instruction is computed once
    for specs in PROFILES + PROFILES[::-1]:  # reversed: states come from the cache, not a fresh pass
        got = fast.evaluate_profile(swapper, specs)
        with swapper.applied_profile(specs):
            want = scorer.predict_choices(ds.choice_items())
        _assert_same(got, want)
    assert swapper.is_base
    assert len({tuple(p.index for p in fast.evaluate_profile(swapper, s)) for s in PROFILES}) > 1


def test_fast_evaluator_truncation_and_no_shared_prefix(swapper: WeightSwapper) -> None:
    short = HFScorer(_llama(), tiny_tokenizer(), batch_size=3, max_length=12)  # forces left truncation
    ds = toy_mc(10, seed=3, prefix="")
    items = [(f"{i} " + c, ch) for i, (c, ch) in enumerate(ds.choice_items())]
    fast = FastChoiceEvaluator(short, items, batch_size=3)
    assert fast.fast
    for specs in PROFILES[:3]:
        got = fast.evaluate_profile(swapper, specs)
        with swapper.applied_profile(specs):
            _assert_same(got, short.predict_choices(items))


def test_fast_evaluator_falls_back_for_other_archs() -> None:
    model = make_tiny_model("gpt2")
    sc = HFScorer(model, tiny_tokenizer())
    ds = toy_mc(6)
    fast = FastChoiceEvaluator(sc, ds.choice_items())
    assert not fast.fast
    sw = WeightSwapper(model, svd_cache=SvdCache("tiny-gpt2"))
    spec = [{"target": "fc_in", "layer": 1, "rank_fraction": 0.1}]
    got = fast.evaluate_profile(sw, spec)
    with sw.applied_profile(spec):
        _assert_same(got, sc.predict_choices(ds.choice_items()))


def test_report_from_predictions_checks_length(scorer: HFScorer) -> None:
    ds = toy_mc(3)
    with pytest.raises(ValueError, match="predictions"):
        report_from_predictions(ds, scorer.predict_choices(ds.choice_items()[:2]))


@pytest.mark.integration
def test_fast_evaluator_equals_plain_path_on_smollm2() -> None:
    from laser_ops.datasets import builtin_dataset, stratified_split
    from laser_ops.loading import load_model

    lm = load_model("smollm2-135m")
    sc = HFScorer(lm.model, lm.tokenizer, batch_size=8)
    sw = WeightSwapper(lm.model, svd_cache=SvdCache(lm.fingerprint))
    val = stratified_split(builtin_dataset("epistemic_reasoning"), seed=0).validation.subset(range(6))
    fast = FastChoiceEvaluator(sc, val.choice_items(), batch_size=8)
    assert fast.fast
    for specs in ([], [{"target": "fc_in", "layer": 27, "rank_fraction": 0.01}],
                  [{"target": "fc_out", "layer": 20, "rank_fraction": 0.05}]):
        got = fast.evaluate_profile(sw, specs)
        with sw.applied_profile(specs), torch.inference_mode():
            _assert_same(got, sc.predict_choices(val.choice_items()))
