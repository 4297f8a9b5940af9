"""Mixed-profile batches: each row computed with its own profile's weights, in one forward pass."""

from __future__ import annotations

import hashlib

import pytest
import torch

from laser_ops.loading import model_fingerprint
from laser_ops.mixed import RowOverrides
from laser_ops.scoring import GenerationRequest, HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.testing import CAUSAL_ARCHS, make_tiny_model, tiny_tokenizer

A = [{"target": "fc_in", "layer": -1, "rank_fraction": 0.1}]
B = [{"target": "attn", "layer": 0, "rank": 2}, {"kind": "zero", "target": "fc_out", "layer": 1}]
PROMPTS = ["The capital of France is", "Rome is a city in", "A quick brown fox"]


def _hashes(model: torch.nn.Module) -> dict[str, str]:
    return {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for n, p in model.state_dict().items()}


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
@pytest.mark.parametrize("live", [[], A])
def test_rows_of_each_profile_match_that_profile_run_alone(arch: str, live: list) -> None:
    model = make_tiny_model(arch)
    scorer = HFScorer(model, tiny_tokenizer())
    swapper = WeightSwapper(model, svd_cache=SvdCache(model_fingerprint(model)))
    profiles = {"base": [], "a": A, "b": B}
    solo = {}
    for name, specs in profiles.items():
        swapper.apply(specs)
        solo[name] = [r.token_ids for r in scorer.generate([GenerationRequest(prompt=p, max_new_tokens=8)
                                                             for p in PROMPTS])]
    assert len({tuple(map(tuple, v)) for v in solo.values()}) == 3, "profiles must visibly differ"

    swapper.apply(live)  # whatever is live, every row must get its own profile's weights
    live_hash = _hashes(model)
    overrides = {name: swapper.overrides_for(specs) for name, specs in profiles.items()}
    rows = RowOverrides(model, {k: v for k, v in overrides.items() if v})
    requests = [GenerationRequest(prompt=p, max_new_tokens=8, tag=name) for name in profiles for p in PROMPTS]
    with rows.installed():
        mixed = scorer.generate(requests, before_forward=lambda reqs: rows.set_rows([r.tag for r in reqs]))
    got = {name: [r.token_ids for r in mixed[i * len(PROMPTS):(i + 1) * len(PROMPTS)]]
           for i, name in enumerate(profiles)}
    assert got == solo
    assert _hashes(model) == live_hash  # the live weights were never touched
    assert not any(m._forward_hooks for m in model.modules())


def test_hooks_are_removed_after_an_exception() -> None:
    model = make_tiny_model("llama")
    swapper = WeightSwapper(model, svd_cache=SvdCache(model_fingerprint(model)))
    rows = RowOverrides(model, {"a": swapper.overrides_for(A)})
    with pytest.raises(RuntimeError), rows.installed():
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())


def test_overrides_hold_only_what_differs_from_the_live_state() -> None:
    model = make_tiny_model("llama")
    swapper = WeightSwapper(model, svd_cache=SvdCache(model_fingerprint(model)))
    swapper.apply(A)
    assert swapper.overrides_for(A) == {}
    back = swapper.overrides_for([])  # base rows need the original of the edited matrix
    (name,) = back
    assert torch.equal(back[name], swapper._originals[name])
