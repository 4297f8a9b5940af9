"""The exact fingerprint: every byte, dtype and shape counts; the cache beside converted weights."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from laser_ops.fingerprint import FINGERPRINT_VERSION, FingerprintCache, model_fingerprint
from laser_ops.testing import make_tiny_model, save_tiny_model


def _old_sampled_indexes(numel: int, samples: int = 4096) -> set[int]:
    """The indexes the previous (sampled) fingerprint read: 4096 evenly strided values per tensor."""
    return set((torch.arange(samples) * (numel - 1) // (samples - 1)).tolist())


def _flip_lowest_bit(t: torch.Tensor, index: int) -> None:
    flat = t.view(-1).view(torch.int32)  # float32: flip the last mantissa bit of one element
    flat[index] ^= 1


def test_flipping_one_unsampled_element_changes_the_fingerprint():
    model = make_tiny_model("llama")
    name, weight = max(model.named_parameters(), key=lambda kv: kv[1].numel())
    assert weight.numel() > 2 * 4096 and weight.dtype == torch.float32
    index = 1
    assert index not in _old_sampled_indexes(weight.numel())  # the old fingerprint never read this element
    before = model_fingerprint(model)
    with torch.no_grad():
        _flip_lowest_bit(weight, index)
    after = model_fingerprint(model)
    assert after != before, name
    with torch.no_grad():
        _flip_lowest_bit(weight, index)
    assert model_fingerprint(model) == before  # deterministic: same bytes, same fingerprint


def test_dtype_and_shape_are_part_of_the_identity():
    base = nn.Module()
    base.register_buffer("w", torch.arange(12, dtype=torch.float32))
    same_bytes_other_dtype = nn.Module()
    same_bytes_other_dtype.register_buffer("w", torch.arange(12, dtype=torch.float32).view(torch.int32))
    same_bytes_other_shape = nn.Module()
    same_bytes_other_shape.register_buffer("w", torch.arange(12, dtype=torch.float32).reshape(3, 4))
    fps = {model_fingerprint(m) for m in (base, same_bytes_other_dtype, same_bytes_other_shape)}
    assert len(fps) == 3


def test_fingerprint_is_independent_of_layout_and_thread_count():
    """Bytes are hashed in row-major order: a transposed-then-contiguous copy of equal values is equal."""
    a, b = nn.Module(), nn.Module()
    values = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    a.register_buffer("w", values.clone())
    b.register_buffer("w", values.t().contiguous().t())  # same values, column-major storage
    assert not b.w.is_contiguous()
    assert model_fingerprint(a) == model_fingerprint(b, workers=1) == model_fingerprint(a, workers=3)
    assert model_fingerprint(a, chunk_bytes=100) == model_fingerprint(a)  # chunking does not change the hash


def test_tied_weights_are_hashed_once_but_differ_from_untied():
    tied = make_tiny_model("llama")
    untied = make_tiny_model("llama")
    with torch.no_grad():
        untied.lm_head.weight = nn.Parameter(untied.get_input_embeddings().weight.clone())
        tied.lm_head.weight = tied.get_input_embeddings().weight
    assert torch.equal(tied.lm_head.weight, untied.lm_head.weight)
    assert model_fingerprint(tied) != model_fingerprint(untied)


def test_cache_beside_the_weights_is_reused_and_invalidated_by_a_changed_file(tmp_path):
    folder = tmp_path / "converted"
    save_tiny_model("llama", str(folder))
    model = make_tiny_model("llama")
    cache = FingerprintCache(folder / "laser-fingerprint.json", folder)
    first, cached = cache.fingerprint(model, torch.float32)
    assert not cached and first == model_fingerprint(model)
    stored = json.loads(cache.path.read_text())
    assert stored["version"] == FINGERPRINT_VERSION and list(stored["entries"].values()) == [first]

    again, cached = FingerprintCache(cache.path, folder).fingerprint(make_tiny_model("llama", seed=1),
                                                                    torch.float32)
    assert cached and again == first  # read back: no hashing of the (here deliberately different) model
    assert FingerprintCache(cache.path, folder).get(torch.bfloat16) is None  # the dtype is in the key

    # Rewrite the weights file with one element flipped: the key changes, so the fingerprint is recomputed.
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(str(weights))
    name = max(tensors, key=lambda n: tensors[n].numel())
    _flip_lowest_bit(tensors[name], 1)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert FingerprintCache(cache.path, folder).get(torch.float32) is None


def test_unreadable_or_foreign_cache_file_is_a_miss(tmp_path):
    folder = tmp_path / "m"
    save_tiny_model("llama", str(folder))
    path = folder / "laser-fingerprint.json"
    for content in ("not json", json.dumps({"version": FINGERPRINT_VERSION - 1, "entries": {}}), "[]"):
        path.write_text(content)
        assert FingerprintCache(path, folder).get(torch.float32) is None
