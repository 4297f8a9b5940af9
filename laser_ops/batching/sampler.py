"""One batched sampler: temperature, top-k and top-p as tensors over rows, one device sync per step.

Sampling uses the Gumbel-max trick: ``argmax(scores / T + g)`` with ``g = -log(-log(u))`` is an exact
draw from ``softmax(scores / T)``. The uniforms ``u`` of a row come from that row's own
``torch.Generator`` (``vocab`` draws per token, whatever else is in the batch), so a seeded request
produces the same tokens alone or inside any batch, while every other step of the computation is a
batched tensor op.

Numerics: scores are shifted by their row maximum before dividing by the temperature, so a tiny
temperature (even 1e-38) drives every non-maximal token to -inf instead of overflowing to inf/NaN;
top-p always keeps the most likely token. Log-probs (OpenAI ``logprobs``) are taken from the raw
distribution, before temperature and filtering, as OpenAI reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    logprobs: int | None = None  # record the chosen token's log-prob and the top-N alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SampledTokens:
    """One step's choice per row; ``logprobs``/``top`` are None for rows that did not ask for them."""

    tokens: list[int]
    logprobs: list[float | None]
    top: list[dict[int, float] | None]


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A per-request generator: seeded when the request gives a seed, else from OS entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> SampledTokens:
    """Choose one token per row of ``logits`` (rows x vocab, any float dtype)."""
    rows, vocab = logits.shape
    logits = logits.float()
    choice = logits.argmax(-1)
    sampled = [r for r, p in enumerate(params) if not p.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        scores = logits.index_select(0, idx)
        scores = scores - scores.max(-1, keepdim=True).values
        temps = torch.tensor([params[r].temperature for r in sampled], device=logits.device)
        scores = scores / temps.clamp_(min=torch.finfo(torch.float32).tiny)[:, None]
        scores = _top_k(scores, [params[r].top_k for r in sampled])
        scores = _top_p(scores, [params[r].top_p for r in sampled])
        uniforms = torch.stack([
            torch.rand(vocab, generator=generators[r], device=logits.device) for r in sampled])
        gumbel = -torch.log(-torch.log(uniforms.clamp_(min=torch.finfo(torch.float32).tiny)))
        choice = choice.index_copy(0, idx, (scores + gumbel).argmax(-1))
    want = [r for r, p in enumerate(params) if p.logprobs is not None]
    logprobs: list[float | None] = [None] * rows
    top: list[dict[int, float] | None] = [None] * rows
    if not want:
        return SampledTokens(choice.tolist(), logprobs, top)
    idx = torch.tensor(want, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, idx), dim=-1)
    chosen = logp.gather(-1, choice.index_select(0, idx)[:, None])[:, 0]
    n_top = max(params[r].logprobs or 0 for r in want)
    top_v = top_i = None
    if n_top > 0:
        top_v, top_i = torch.topk(logp, min(n_top, vocab), dim=-1)
    tokens = choice.tolist()  # the step's one sync; the log-prob transfers below ride on it
    chosen_l = chosen.tolist()
    tv = top_v.tolist() if top_v is not None else None
    ti = top_i.tolist() if top_i is not None else None
    for j, r in enumerate(want):
        logprobs[r] = chosen_l[j]
        n = params[r].logprobs or 0
        top[r] = dict(zip(ti[j][:n], tv[j][:n])) if n > 0 and ti is not None and tv is not None else {}
    return SampledTokens(tokens, logprobs, top)


def _top_k(scores: torch.Tensor, ks: list[int]) -> torch.Tensor:
    vocab = scores.shape[-1]
    if not any(0 < k < vocab for k in ks):
        return scores
    k_max = max(k for k in ks if 0 < k < vocab)
    kth = torch.topk(scores, k_max, dim=-1).values  # descending
    ks_t = torch.tensor([k if 0 < k < vocab else 0 for k in ks], device=scores.device)
    # The k-th largest score of each row; rows with top-k off get -inf (keep everything).
    threshold = kth.gather(-1, (ks_t - 1).clamp_min(0)[:, None])
    threshold = torch.where(ks_t[:, None] > 0, threshold, torch.full_like(threshold, -torch.inf))
    return scores.masked_fill(scores < threshold, -torch.inf)


def _top_p(scores: torch.Tensor, ps: list[float]) -> torch.Tensor:
    if all(p >= 1.0 for p in ps):
        return scores
    p_t = torch.tensor(ps, device=scores.device)[:, None]
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    # Drop a token once the tokens ranked above it already reach top_p: the first always stays.
    drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= p_t
    drop_sorted[:, 0] = False  # even a top_p that rounds to 0 keeps the most likely token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, -torch.inf)
