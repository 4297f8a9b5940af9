"""CUDA path: swaps, scoring and generation on the GPU in bf16 (skipped where CUDA is absent)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from laser_ops.loading import model_fingerprint
from laser_ops.scoring import GenerationRequest, HFScorer
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.testing import CAUSAL_ARCHS, make_tiny_model, tiny_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _hashes(model: torch.nn.Module) -> dict[str, str]:
    return {n: hashlib.sha256(p.detach().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, p in model.state_dict().items()}


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_swap_on_cuda_changes_output_and_reverts_bit_for_bit(arch: str, dtype: torch.dtype) -> None:
    model = make_tiny_model(arch, dtype=dtype).to("cuda")
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("The capital of France is Paris").input_ids], device="cuda")
    base_hash = _hashes(model)
    with torch.inference_mode():
        before = model(ids).logits.float()
    swapper = WeightSwapper(model, svd_cache=SvdCache(model_fingerprint(model)))
    stats = swapper.apply([{"target": "mlp", "layer": "all", "rank_fraction": 0.1}])
    assert stats.svds > 0 and all(p.device.type == "cuda" for p in model.parameters())
    with torch.inference_mode():
        after = model(ids).logits.float()
    assert (before - after).abs().max().item() > 1e-3
    swapper.revert()
    assert _hashes(model) == base_hash
    again = swapper.apply([{"target": "mlp", "layer": "all", "rank_fraction": 0.1}])
    assert again.svds == 0 and again.materialized == 0
    swapper.revert()
    assert _hashes(model) == base_hash


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_on_cuda_batched_equals_solo(arch: str) -> None:
    """fp32: batched greedy decoding picks exactly the solo tokens (random weights leave near-ties that
    bf16 rounding of differently shaped matmuls could flip, so exact equality is asserted in fp32 only)."""
    model = make_tiny_model(arch, dtype=torch.float32).to("cuda")
    scorer = HFScorer(model, tiny_tokenizer())
    prompts = ["The capital of France is", "Paris is a city", "A quick brown fox"]
    batched = scorer.generate([GenerationRequest(prompt=p, max_new_tokens=8) for p in prompts])
    solo = [scorer.generate([GenerationRequest(prompt=p, max_new_tokens=8)])[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in solo]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scoring_on_cuda_bf16_batched_matches_solo_within_bf16_precision(arch: str) -> None:
    """bf16: batched and solo log-probs of the same tokens agree to bf16's precision (8 mantissa bits)."""
    model = make_tiny_model(arch, dtype=torch.bfloat16).to("cuda")
    scorer = HFScorer(model, tiny_tokenizer())
    seqs = [scorer.encode(p) for p in ["The capital of France is Paris", "A quick brown fox jumps", "Hi"]]
    batched = scorer.prompt_logprobs(seqs)
    solo = [scorer.prompt_logprobs([s])[0] for s in seqs]
    for b, s in zip(batched, solo, strict=True):
        got = torch.tensor(b.token_logprobs[1:])
        want = torch.tensor(s.token_logprobs[1:])
        torch.testing.assert_close(got, want, rtol=2**-6, atol=0.05)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_profile_rows_on_cuda_match_solo_runs(arch: str) -> None:
    from laser_ops.mixed import RowOverrides

    model = make_tiny_model(arch).to("cuda")
    scorer = HFScorer(model, tiny_tokenizer())
    swapper = WeightSwapper(model, svd_cache=SvdCache(model_fingerprint(model), device="cuda"), cache_device="cuda")
    profiles = {"base": [], "a": [{"target": "mlp", "layer": -1, "rank_fraction": 0.1}]}
    prompts = ["The capital of France is", "A quick brown fox"]
    solo = {}
    for name, specs in profiles.items():
        swapper.apply(specs)
        solo[name] = [r.token_ids for r in scorer.generate([GenerationRequest(prompt=p, max_new_tokens=8)
                                                             for p in prompts])]
    assert solo["base"] != solo["a"]
    # profile "a" is live: base rows need the originals, which come from device copies
    overrides = {name: swapper.overrides_for(specs) for name, specs in profiles.items()}
    assert all(t.device.type == "cuda" for o in overrides.values() for t in o.values())
    rows = RowOverrides(model, {k: v for k, v in overrides.items() if v})
    reqs = [GenerationRequest(prompt=p, max_new_tokens=8, tag=name) for name in profiles for p in prompts]
    with rows.installed():
        mixed = scorer.generate(reqs, before_forward=lambda rs: rows.set_rows([r.tag for r in rs]))
    assert [r.token_ids for r in mixed] == solo["base"] + solo["a"]
