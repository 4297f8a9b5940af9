"""The batched sampler: filters per row, reproducible per seed whatever the batch, never NaN."""

from __future__ import annotations

import math

import pytest
import torch

from laser_ops.batching.sampler import SamplingParams, new_generator, sample

VOCAB = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax() -> None:
    logits = _logits(4)
    out = sample(logits, [SamplingParams()] * 4, [None] * 4)
    assert out.tokens == logits.argmax(-1).tolist() and out.logprobs == [None] * 4


def test_a_seeded_row_draws_the_same_tokens_alone_or_in_any_batch() -> None:
    row = _logits(1, seed=1)
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)

    def draws(batch_logits: torch.Tensor, at: int, others: list[SamplingParams]) -> list[int]:
        gen = new_generator(42, torch.device("cpu"))
        got = []
        for _ in range(10):
            ps = list(others)
            ps.insert(at, params)
            gens = [new_generator(i, torch.device("cpu")) if not p.greedy else None for i, p in enumerate(ps)]
            gens[at] = gen
            got.append(sample(batch_logits, ps, gens).tokens[at])
        return got

    alone = draws(row, 0, [])
    crowd = torch.cat([_logits(2, seed=5), row, _logits(1, seed=6)])
    assert draws(crowd, 2, [SamplingParams(), SamplingParams(temperature=1.5), SamplingParams(top_k=3)]) == alone
    assert len(set(alone)) > 1  # it does sample


def test_filters_restrict_every_draw() -> None:
    logits = _logits(3, seed=2)
    ps = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.5),
          SamplingParams(temperature=1.0, top_k=1)]
    probs = torch.softmax(logits, -1)
    order = probs.argsort(-1, descending=True)
    nucleus = set(order[1, :int((probs[1, order[1]].cumsum(0) < 0.5).sum()) + 1].tolist())
    for seed in range(30):
        gens = [new_generator(seed * 3 + i, torch.device("cpu")) for i in range(3)]
        t = sample(logits, ps, gens).tokens
        assert t[0] in order[0, :2].tolist() and t[1] in nucleus and t[2] == order[2, 0].item()


@pytest.mark.parametrize("params", [SamplingParams(temperature=1e-38), SamplingParams(temperature=1.0, top_p=1e-300),
                                    SamplingParams(temperature=5e-324, top_k=3)])
def test_extreme_settings_stay_finite_and_pick_the_top_token(params: SamplingParams) -> None:
    logits = _logits(2, seed=3) - 100  # all negative: a naive logits/T would be -inf everywhere
    gens = [new_generator(1, torch.device("cpu")) for _ in range(2)]
    assert sample(logits, [params] * 2, gens).tokens == logits.argmax(-1).tolist()


def test_logprobs_are_those_of_the_raw_distribution() -> None:
    logits = _logits(2, seed=4)
    out = sample(logits, [SamplingParams(logprobs=3), SamplingParams(temperature=2.0, logprobs=0)],
                 [None, new_generator(0, torch.device("cpu"))])
    logp = torch.log_softmax(logits, -1)
    assert out.logprobs[0] == pytest.approx(logp[0].max().item())
    assert list(out.top[0].values()) == pytest.approx(logp[0].topk(3).values.tolist())
    assert out.logprobs[1] == pytest.approx(logp[1, out.tokens[1]].item()) and out.top[1] == {}
    assert all(math.isfinite(v) for v in out.top[0].values())


@pytest.mark.parametrize(("temperature", "top_p"), [(1e-38, 1.0), (1e-320, 1.0), (5e-324, 1.0), (1.0, 1e-320),
                                                    (0.7, 5e-324), (1e-320, 1e-320)])
def test_tiny_temperature_or_top_p_samples_the_top_token(temperature: float, top_p: float) -> None:
    """Sampling so close to greedy is greedy, not 'probability tensor contains either inf, nan or element < 0'."""
    logits = torch.tensor([[1.0, 12.5, -3.0, 12.49, float("-inf")]])
    for seed in range(5):
        params = SamplingParams(temperature=temperature, top_p=top_p)
        assert sample(logits, [params], [new_generator(seed, torch.device("cpu"))]).tokens == [1]


def test_sampling_still_spreads_at_ordinary_temperatures() -> None:
    logits = torch.tensor([[2.0, 2.0, 2.0, -50.0]])
    seen = {sample(logits, [SamplingParams(temperature=1.0)], [new_generator(s, torch.device("cpu"))]).tokens[0]
            for s in range(40)}
    assert seen == {0, 1, 2}
