"""Profiles served per row: every row gets its own profile's output, and no weight byte is written."""

from __future__ import annotations

import hashlib

import pytest
import torch

from laser_ops.batching.row_edits import RowRouter, compile_profile
from laser_ops.loading import model_fingerprint
from laser_ops.scoring import GenerationRequest, HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper, profile_signature
from laser_ops.testing import CAUSAL_ARCHS, make_tiny_model, tiny_tokenizer

PROFILES = {
    "base": [],
    "laser": [{"target": "fc_in", "layer": -1, "rank_fraction": 0.1}],
    "attn_zero": [{"target": "attn", "layer": 0, "rank": 2}, {"kind": "zero", "target": "fc_out", "layer": 1}],
    "controls": [{"kind": "keep_bottom", "target": "fc_out", "layer": -1, "rank": 2},
                 {"kind": "random_basis", "target": "q_proj", "layer": 1, "rank": 3, "seed": 4}],
    "dense": [{"kind": "prune_magnitude", "target": "fc_in", "layer": 0, "sparsity": 0.5},
              {"kind": "laser", "target": "v_proj", "layer": 2, "rank_fraction": 0.9}],
}
PROMPTS = ["The capital of France is", "Rome is a city in", "A quick brown fox"]


def _hashes(model: torch.nn.Module) -> dict[str, str]:
    return {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for n, p in model.state_dict().items()}


def _request(prompt: str) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_new_tokens=8, logprobs=0)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_rows_of_each_profile_match_that_profile_swapped_in(arch: str) -> None:
    model = make_tiny_model(arch)
    scorer = HFScorer(model, tiny_tokenizer())
    swapper = WeightSwapper(model, svd_cache=SvdCache(model_fingerprint(model)))
    solo = {}
    for name, specs in PROFILES.items():
        with swapper.applied_profile(specs):
            solo[name] = scorer.generate([_request(p) for p in PROMPTS])
    assert len({tuple(tuple(r.token_ids) for r in v) for v in solo.values()}) == len(PROFILES), \
        "profiles must visibly differ"

    base_hash, written = _hashes(model), swapper.bytes_written
    router = RowRouter(model)
    for name, specs in PROFILES.items():
        router.add(name, compile_profile(swapper, specs, profile_signature(specs)))
    engine = scorer.batch_engine(router=router)
    gens = {(name, p): engine.add_generation(_request(p), scorer.encode(p), tag=name)
            for p in PROMPTS for name in PROFILES}  # profiles interleaved row by row
    engine.run()
    for (name, p), gen in gens.items():
        want = solo[name][PROMPTS.index(p)]
        assert gen.result.token_ids == want.token_ids, (name, p)
        assert gen.result.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-5)
    assert swapper.bytes_written == written and _hashes(model) == base_hash  # served without a weight write
    router.close()
    assert not any(m._forward_hooks for m in model.modules())


def test_factored_edits_are_low_rank_and_dense_ones_are_not() -> None:
    model = make_tiny_model("llama")
    swapper = WeightSwapper(model, svd_cache=SvdCache(model_fingerprint(model)))
    laser = compile_profile(swapper, PROFILES["laser"], "laser")
    [(module, [edit])] = laser.edits.items()
    assert module.endswith("mlp.gate_proj") and edit.dense is None and edit.right.shape[0] == 3
    dense = compile_profile(swapper, PROFILES["dense"], "dense")
    assert all(e.dense is not None for edits in dense.edits.values() for e in edits)  # no low-rank form / no gain


def test_routing_is_off_outside_route_and_after_remove() -> None:
    model = make_tiny_model("gpt2")
    swapper = WeightSwapper(model, svd_cache=SvdCache(model_fingerprint(model)))
    ids = torch.tensor([tiny_tokenizer()("The capital of France is").input_ids])
    with torch.inference_mode():
        before = model(ids).logits
    router = RowRouter(model)
    router.add("z", compile_profile(swapper, [{"kind": "zero", "target": "all", "layer": "all"}], "z"))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)  # hooks installed but no rows routed
        with router.route(["z"]):
            assert not torch.allclose(model(ids).logits, before)
    router.remove("z")
    assert not any(m._forward_hooks for m in model.modules())


def test_route_ends_after_an_exception() -> None:
    model = make_tiny_model("llama")
    swapper = WeightSwapper(model, svd_cache=SvdCache(model_fingerprint(model)))
    router = RowRouter(model)
    router.add("a", compile_profile(swapper, PROFILES["laser"], "a"))
    with pytest.raises(RuntimeError), router.route(["a"]):
        raise RuntimeError("boom")
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode():
        plain = model(ids).logits
    router.close()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, plain)


def test_invalid_profile_fails_to_compile_with_the_field() -> None:
    model = make_tiny_model("llama")
    swapper = WeightSwapper(model, svd_cache=SvdCache(model_fingerprint(model)))
    with pytest.raises(ValueError) as err:
        compile_profile(swapper, [{"target": "fc_in", "layer": 99, "rank": 1}], "x")
    assert getattr(err.value, "loc", None) == (0, "layer")
