"""Tests for laser_ops.fast_choice: the layer-cached evaluator equals the plain scorer on every causal
architecture, for single profiles and for replicated all-rho passes, chunk by chunk, block by block."""

from __future__ import annotations

import functools

import pytest
import torch

from laser_ops.fast_choice import FastChoiceEvaluator
from laser_ops.scoring import HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.testing import CAUSAL_ARCHS, make_tiny_model, tiny_tokenizer
from tests.laser_ops.test_evaluation import PROFILES, toy_mc


@functools.cache
def _model(arch: str) -> torch.nn.Module:
    return make_tiny_model(arch)


def _setup(arch: str, batch_size: int = 4) -> tuple[HFScorer, WeightSwapper]:
    model = _model(arch)
    return HFScorer(model, tiny_tokenizer(), batch_size=batch_size), WeightSwapper(model, svd_cache=SvdCache(arch))


def _assert_same(fast, plain) -> None:
    assert [p.index for p in fast] == [p.index for p in plain]
    for f, p in zip(fast, plain):
        assert f.n_tokens == p.n_tokens
        assert f.logprobs == pytest.approx(p.logprobs, abs=1e-4)


def _plain(sw: WeightSwapper, sc: HFScorer, specs, items):
    with sw.applied_profile(specs):
        return sc.predict_choices(items)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_every_causal_architecture_takes_the_layer_path_and_equals_plain(arch: str) -> None:
    sc, sw = _setup(arch)
    ds = toy_mc(8, seed=1)
    fast = FastChoiceEvaluator(sc, ds.choice_items(), batch_size=4)
    assert fast.fast, f"{arch}: the layer path must drive this architecture's own modules"
    assert fast.prefix_len > 0, f"{arch}: the shared task prefix goes through the model's own KV cache"
    for specs in ([], [{"target": "fc_in", "layer": 2, "rank_fraction": 0.1}]):
        _assert_same(fast.evaluate_profile(sw, specs), _plain(sw, sc, specs, ds.choice_items()))
    # all rho of one matrix in one replicated pass, per-row ranks through the factors (fused q on gpt2/neox)
    for t, rhos in (("fc_out", (0.5, 0.1, 0.03)), ("q_proj", (0.5, 0.1))):
        group = [[{"target": t, "layer": 1, "rank_fraction": r}] for r in rhos]
        for specs, got in zip(group, fast.evaluate_group(sw, group)):
            _assert_same(got, _plain(sw, sc, specs, ds.choice_items()))
    assert sw.is_base


def test_cached_states_and_profiles_in_any_order() -> None:
    sc, sw = _setup("llama", batch_size=5)
    ds = toy_mc(14)
    fast = FastChoiceEvaluator(sc, ds.choice_items(), batch_size=4)
    for specs in PROFILES + PROFILES[::-1]:  # reversed: states come from the cache, not a fresh pass
        _assert_same(fast.evaluate_profile(sw, specs), _plain(sw, sc, specs, ds.choice_items()))
    assert sw.is_base
    assert len({tuple(p.index for p in fast.evaluate_profile(sw, s)) for s in PROFILES}) > 1
    fast.clear_cache()
    tiny = FastChoiceEvaluator(sc, ds.choice_items(), batch_size=4, max_cache_bytes=0)  # nothing cached
    _assert_same(tiny.evaluate_profile(sw, PROFILES[1]), _plain(sw, sc, PROFILES[1], ds.choice_items()))


def test_replicated_group_matches_one_profile_at_a_time_and_keep_bottom() -> None:
    sc, sw = _setup("llama")
    ds = toy_mc(12, seed=4)
    fast = FastChoiceEvaluator(sc, ds.choice_items(), batch_size=3)
    for kind in ("laser", "keep_bottom"):
        group = [[{"kind": kind, "target": "fc_in", "layer": 1, "rank_fraction": r}] for r in (0.9, 0.2, 0.05)]
        grouped = fast.evaluate_group(sw, group)
        for specs, got in zip(group, grouped):
            _assert_same(got, fast.evaluate_profile(sw, specs))
            _assert_same(got, _plain(sw, sc, specs, ds.choice_items()))


def test_truncation_and_fallback_for_other_kinds(scorer_window: int = 12) -> None:
    sc, sw = _setup("llama")
    short = HFScorer(sc.model, tiny_tokenizer(), batch_size=3, max_length=scorer_window)  # forces left truncation
    ds = toy_mc(10, seed=3, prefix="")
    items = [(f"{i} " + c, ch) for i, (c, ch) in enumerate(ds.choice_items())]
    fast = FastChoiceEvaluator(short, items, batch_size=3)
    assert fast.fast
    for specs in PROFILES[:3]:
        _assert_same(fast.evaluate_profile(sw, specs), _plain(sw, short, specs, items))
    group = [[{"kind": "prune_magnitude", "target": "fc_in", "layer": 1, "sparsity": s}] for s in (0.5, 0.9)]
    for specs, got in zip(group, fast.evaluate_group(sw, group)):  # not factorable: one profile at a time
        _assert_same(got, _plain(sw, short, specs, items))


def test_chunks_restore_the_weights_between_batches() -> None:
    """Each chunk holds its edits only while it computes: other work may run between chunks."""
    sc, sw = _setup("llama")
    ds = toy_mc(12, seed=2)
    fast = FastChoiceEvaluator(sc, ds.choice_items(), batch_size=4)
    group = [[{"target": "fc_out", "layer": 2, "rank_fraction": r}] for r in (0.5, 0.1)]
    other = [{"target": "fc_in", "layer": 0, "rank_fraction": 0.1}]
    for profiles in (group, [PROFILES[3]]):
        gen = fast.iter_group(sw, profiles)
        chunks = 0
        while True:
            try:
                next(gen)
            except StopIteration as done:
                result = done.value
                break
            chunks += 1
            assert sw.is_base
            sw.apply(other)  # what an engine might serve between two chunks
            sc.predict_choices(ds.choice_items()[:2])
            sw.revert()
        assert chunks == 3  # 12 items, 4 rows per batch
        for specs, got in zip(profiles, result):
            _assert_same(got, _plain(sw, sc, specs, ds.choice_items()))


def test_blocks_score_only_their_items() -> None:
    sc, sw = _setup("llama")
    ds = toy_mc(12, seed=6)
    blocks = [[0, 5, 7], [1, 2, 3, 4], [6, 8, 9, 10, 11]]
    fast = FastChoiceEvaluator(sc, ds.choice_items(), batch_size=2, blocks=blocks)
    spec = [{"target": "fc_in", "layer": 1, "rank_fraction": 0.1}]
    want = _plain(sw, sc, spec, ds.choice_items())
    for b, block in enumerate(blocks):
        _assert_same(fast.evaluate_profile(sw, spec, block=b), [want[i] for i in block])
    with pytest.raises(ValueError, match="partition"):
        FastChoiceEvaluator(sc, ds.choice_items(), blocks=[[0, 1]])


@pytest.mark.integration
def test_fast_evaluator_equals_plain_path_on_smollm2() -> None:
    from laser_ops.datasets import builtin_dataset, stratified_split
    from laser_ops.loading import load_model

    lm = load_model("smollm2-135m")
    sc = HFScorer(lm.model, lm.tokenizer, batch_size=8)
    sw = WeightSwapper(lm.model, svd_cache=SvdCache(lm.fingerprint))
    val = stratified_split(builtin_dataset("epistemic_reasoning"), seed=0).validation.subset(range(8))
    fast = FastChoiceEvaluator(sc, val.choice_items(), batch_size=8)
    assert fast.fast
    group = [[{"target": "fc_in", "layer": 27, "rank_fraction": r}] for r in (0.2, 0.01)]
    for specs, got in zip(group + [[]], fast.evaluate_group(sw, group) + [fast.evaluate_profile(sw, [])]):
        with sw.applied_profile(specs), torch.inference_mode():
            _assert_same(got, sc.predict_choices(val.choice_items()))
