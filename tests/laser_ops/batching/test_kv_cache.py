"""The per-row KV cache: rows at different offsets, prompts in chunks and rows moved between slots give
the logits of a plain forward pass, on every architecture."""

from __future__ import annotations

import pytest
import torch

from laser_ops.batching.kv_cache import SlotKVCache, attention_mask
from laser_ops.testing import CAUSAL_ARCHS, make_tiny_model, tiny_tokenizer


def _forward(model, cache: SlotKVCache, slots: list[int], rows: list[list[int]], offsets: list[int]) -> torch.Tensor:
    q = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (q - len(r)) for r in rows])
    offs = torch.tensor(offsets)
    positions = offs[:, None] + torch.arange(q)[None]
    with cache.step(slots, offsets, q, ids.device):
        mask = attention_mask(offs, q, cache.current.kv_len, model.dtype)
        return model(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=cache,
                     use_cache=True).logits


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_rows_at_their_own_offsets_equal_a_plain_forward(arch: str) -> None:
    model = make_tiny_model(arch)
    tok = tiny_tokenizer()
    prompts = [tok(p).input_ids for p in ("The capital of France is", "A quick brown fox jumps over the lazy", "Hi")]
    with torch.inference_mode():
        plain = [model(input_ids=torch.tensor([p])).logits[0] for p in prompts]
        cache = SlotKVCache(model.config.num_hidden_layers, slots=2)
        got0 = _forward(model, cache, [0], [prompts[0]], [0])[0]
        torch.testing.assert_close(got0, plain[0], atol=1e-5, rtol=1e-5)
        # rows 1 and 2 in chunks of 3, in slots 4 and 2 (not contiguous: gathered), right-padded
        p1, p2 = prompts[1], prompts[2]
        pieces1, pieces2 = [], []
        for c in range(0, max(len(p1), len(p2)), 3):
            lg = _forward(model, cache, [4, 2], [p1[c:c + 3] or [0], p2[c:c + 3] or [0]], [c, c])
            pieces1.append(lg[0, :len(p1[c:c + 3])])
            pieces2.append(lg[1, :len(p2[c:c + 3])])
        torch.testing.assert_close(torch.cat(pieces1), plain[1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.cat(pieces2), plain[2], atol=1e-5, rtol=1e-4)
        # one decode step for all three rows, each at its own length (contiguous slots after moves)
        cache.copy_row(4, 1, len(p1))
        cache.copy_row(2, 2, len(p2))
        nxt = [int(p[-1].argmax()) for p in plain]
        step = _forward(model, cache, [0, 1, 2], [[t] for t in nxt], [len(p) for p in prompts])
        for i, p in enumerate(prompts):
            full = model(input_ids=torch.tensor([p + [nxt[i]]])).logits[0, -1]
            torch.testing.assert_close(step[i, 0], full, atol=1e-5, rtol=1e-4)


def test_mask_hides_each_rows_future_and_other_rows_padding() -> None:
    mask = attention_mask(torch.tensor([0, 2]), q_len=2, kv_len=4, dtype=torch.float32)
    allowed = (mask == 0).squeeze(1)
    assert allowed[0].tolist() == [[True, False, False, False], [True, True, False, False]]
    assert allowed[1].tolist() == [[True, True, True, False], [True, True, True, True]]
    window = (attention_mask(torch.tensor([3]), 1, 4, torch.float32, sliding_window=2) == 0).squeeze()
    assert window.tolist() == [False, False, True, True]


def test_buffers_grow_and_release() -> None:
    cache = SlotKVCache(2, slots=1, length=4)
    cache.reserve(5, 100)
    assert cache.slot_capacity >= 5 and cache.length_capacity >= 100
    cache.release()
    assert cache.nbytes == 0
