"""Decompositions (Eckart-Young, randomized) and the SVD cache (memory LRU, disk persistence)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from laser_ops.svd import Decomposition, SvdCache, decompose


def _gaussian(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


def _decaying(m: int, n: int, seed: int = 0, rate: float = 0.7) -> torch.Tensor:
    """A matrix with singular values rate**i (well separated), as trained weights roughly have."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    S = 10.0 * rate ** torch.arange(r, dtype=torch.float64)
    return ((U * S) @ V.T).float()


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
@pytest.mark.parametrize("k", [1, 4, 16, 31])
def test_eckart_young_error_is_the_discarded_energy(shape, k):
    w = _gaussian(*shape, seed=k)
    dec = decompose(w, precision=torch.float64)
    assert dec.complete and dec.rank_available == 32 and dec.shape == shape
    assert torch.all(dec.S[:-1] >= dec.S[1:])  # descending
    err2 = torch.linalg.matrix_norm(w.double() - dec.top(k)).item() ** 2
    discarded = (dec.S[k:] ** 2).sum().item()
    assert abs(err2 - discarded) / discarded < 1e-5
    # ... and W - W_k is exactly what bottom(k) holds
    torch.testing.assert_close(dec.bottom(k), w.double() - dec.top(k), rtol=1e-9, atol=1e-9)


def test_eckart_young_in_float32_default_precision():
    w = _gaussian(64, 40, seed=3)
    dec = decompose(w)
    assert dec.S.dtype == torch.float32
    for k in (2, 10, 20):
        err2 = torch.linalg.matrix_norm(w.double() - dec.top(k).double()).item() ** 2
        discarded = (dec.S[k:].double() ** 2).sum().item()
        assert abs(err2 - discarded) / discarded < 1e-5


@pytest.mark.parametrize("k", [1, 2, 7, 20])
def test_truncation_has_rank_k(k):
    w = _gaussian(40, 24, seed=k)
    assert torch.linalg.matrix_rank(decompose(w).top(k)).item() == k


def test_truncation_is_no_worse_than_another_rank_k_matrix():
    w = _gaussian(30, 20, seed=5)
    best = torch.linalg.matrix_norm(w - decompose(w).top(3))
    other = w[:, :3] @ torch.linalg.lstsq(w[:, :3], w).solution  # rank-3 projection on 3 columns
    assert best < torch.linalg.matrix_norm(w - other)


def test_full_rank_reproduces_the_matrix():
    w = _gaussian(36, 20, seed=1)
    dec = decompose(w)
    torch.testing.assert_close(dec.top(20), w, rtol=1e-5, atol=1e-5)  # rho = 1: k = min(m, n)
    assert torch.count_nonzero(dec.bottom(20)) == 0
    torch.testing.assert_close(dec.bottom(0), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [0, 21, -1])
def test_rank_out_of_range_is_an_error(k):
    dec = decompose(_gaussian(36, 20))
    with pytest.raises(ValueError, match=r"out of range 1\.\.20"):
        dec.top(k)


def test_randomized_top_k_is_close_to_exact():
    w = _decaying(256, 128, seed=2)
    exact = decompose(w)
    approx = decompose(w, method="randomized", rank=8, seed=0)
    assert not approx.complete and approx.rank_available == 8
    assert approx.U.shape == (256, 8) and approx.Vh.shape == (8, 128)
    torch.testing.assert_close(approx.S, exact.S[:8], rtol=1e-4, atol=1e-5)
    rel = torch.linalg.matrix_norm(approx.top(8) - exact.top(8)) / torch.linalg.matrix_norm(exact.top(8))
    assert rel < 1e-4
    assert torch.equal(approx.top(8), decompose(w, method="randomized", rank=8, seed=0).top(8))  # seeded
    with pytest.raises(ValueError, match="complete"):
        approx.bottom(2)
    with pytest.raises(ValueError, match=r"out of range 1\.\.8"):
        approx.top(9)


def test_randomized_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    decompose(_decaying(64, 64), method="randomized", rank=4)
    assert torch.equal(torch.rand(3), expected)


def test_randomized_for_a_large_rank_falls_back_to_exact():
    dec = decompose(_gaussian(40, 20), method="randomized", rank=10)  # rank >= min/2
    assert dec.complete and dec.rank_available == 20


# --- cache -------------------------------------------------------------------------------------


def test_cache_computes_once_and_reuses():
    cache = SvdCache("fp")
    w = _gaussian(24, 16)
    first = cache.get("a", w)
    again = cache.get("a", w)
    assert again is first
    assert cache.computed == 1 and "a" in cache
    cache.get("b", _gaussian(24, 16, seed=1))
    assert cache.computed == 2
    assert cache.nbytes == 2 * first.nbytes


def test_cache_serves_smaller_randomized_requests_from_a_complete_decomposition():
    cache = SvdCache("fp")
    w = _decaying(128, 96)
    cache.get("a", w)
    dec = cache.get("a", w, min_rank=4, complete=False)
    assert dec.complete and cache.computed == 1


def test_cache_upgrades_a_randomized_decomposition_when_more_is_needed():
    cache = SvdCache("fp")
    w = _decaying(128, 96)
    small = cache.get("a", w, min_rank=4, complete=False)
    assert not small.complete and cache.computed == 1
    assert cache.get("a", w, min_rank=3, complete=False) is small  # fits: no new SVD
    assert cache.computed == 1
    full = cache.get("a", w)
    assert full.complete and cache.computed == 2
    assert cache.nbytes == full.nbytes  # the old entry's bytes are released


def test_cache_lru_byte_bound_evicts_the_least_recent():
    w = {name: _gaussian(24, 16, seed=i) for i, name in enumerate("abc")}
    one = decompose(w["a"]).nbytes
    cache = SvdCache("fp", max_bytes=int(2.5 * one))
    cache.get("a", w["a"])
    cache.get("b", w["b"])
    cache.get("a", w["a"])  # a is now the most recent
    cache.get("c", w["c"])  # over the bound: b goes
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.nbytes <= cache.max_bytes
    assert cache.computed == 3
    cache.get("b", w["b"])
    assert cache.computed == 4  # evicted means recomputed
    assert "a" not in cache


def test_cache_keeps_a_single_entry_larger_than_the_bound():
    cache = SvdCache("fp", max_bytes=1)
    dec = cache.get("a", _gaussian(8, 8))
    assert cache.get("a", _gaussian(8, 8)) is dec and cache.computed == 1


def test_disk_round_trip_and_reuse_by_fingerprint(tmp_path):
    w = _gaussian(40, 24, seed=9)
    first = SvdCache("model-A", disk_dir=tmp_path)
    dec = first.get("layers.3.mlp.gate_proj.weight", w)
    assert first.disk_dir == tmp_path / "model-A-float32"
    files = list(first.disk_dir.glob("*.safetensors"))
    assert len(files) == 1
    stored = load_file(str(files[0]))
    assert torch.equal(stored["U"], dec.U) and torch.equal(stored["S"], dec.S) and torch.equal(stored["Vh"], dec.Vh)
    assert stored["shape"].tolist() == [40, 24] and bool(stored["complete"].item())

    # a fresh cache with the same fingerprint (e.g. after a restart) loads instead of decomposing;
    # the matrix argument is not even looked at
    second = SvdCache("model-A", disk_dir=tmp_path)
    loaded = second.get("layers.3.mlp.gate_proj.weight", torch.zeros(40, 24))
    assert second.computed == 0 and second.disk_hits == 1
    assert isinstance(loaded, Decomposition) and loaded.complete and loaded.shape == (40, 24)
    assert torch.equal(loaded.top(5), dec.top(5))
    second.get("layers.3.mlp.gate_proj.weight", w)
    assert second.disk_hits == 1  # now served from memory

    other = SvdCache("model-B", disk_dir=tmp_path)
    recomputed = other.get("layers.3.mlp.gate_proj.weight", 2 * w)
    assert other.computed == 1 and other.disk_hits == 0
    torch.testing.assert_close(recomputed.S, 2 * dec.S)


def test_a_corrupt_disk_file_is_a_miss_not_an_error(tmp_path):
    w = _gaussian(16, 12)
    first = SvdCache("fp", disk_dir=tmp_path)
    first.get("a", w)
    (path,) = first.disk_dir.glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    cache = SvdCache("fp", disk_dir=tmp_path)
    dec = cache.get("a", w)
    assert cache.computed == 1 and cache.disk_hits == 0
    torch.testing.assert_close(dec.top(12), w, rtol=1e-5, atol=1e-5)


def test_disk_byte_bound_prunes_old_files(tmp_path):
    cache = SvdCache("fp", disk_dir=tmp_path)
    cache.get("probe", _gaussian(32, 32))
    (probe,) = cache.disk_dir.glob("*.safetensors")
    size = probe.stat().st_size
    probe.unlink()

    bounded = SvdCache("fp", disk_dir=tmp_path, max_disk_bytes=int(2.5 * size))
    for i in range(5):
        bounded.get(f"m{i}", _gaussian(32, 32, seed=i))
        files = list(bounded.disk_dir.glob("*.safetensors"))
        assert sum(f.stat().st_size for f in files) <= bounded.max_disk_bytes
        assert len(files) == min(i + 1, 2)
    # the most recent one survived and is reused by a new instance
    fresh = SvdCache("fp", disk_dir=tmp_path)
    fresh.get("m4", torch.zeros(32, 32))
    assert fresh.disk_hits == 1 and fresh.computed == 0
    fresh.get("m0", _gaussian(32, 32, seed=0))
    assert fresh.computed == 1


def test_precision_is_part_of_the_disk_key(tmp_path):
    """float64 factors of a matrix are never served to a float32 cache of the same model, nor the reverse."""
    w = _gaussian(24, 16, seed=3)
    SvdCache("fp", disk_dir=tmp_path).get("a", w)
    f64 = SvdCache("fp", disk_dir=tmp_path, precision=torch.float64)
    dec = f64.get("a", w)
    assert f64.computed == 1 and f64.disk_hits == 0 and dec.S.dtype == torch.float64
    again = SvdCache("fp", disk_dir=tmp_path, precision=torch.float64)
    assert again.get("a", w).S.dtype == torch.float64 and again.disk_hits == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp-float32", "fp-float64"]


def test_disk_bound_covers_every_model_under_the_root(tmp_path):
    """Factors of a model no longer served (another fingerprint) are pruned first, not kept forever."""
    old = SvdCache("old-model", disk_dir=tmp_path)
    for i in range(3):
        old.get(f"m{i}", _gaussian(32, 32, seed=i))
    size = next(old.disk_dir.glob("*.safetensors")).stat().st_size
    new = SvdCache("new-model", disk_dir=tmp_path, max_disk_bytes=int(2.5 * size))
    new.get("m0", _gaussian(32, 32, seed=7))
    remaining = list(tmp_path.glob("*/*.safetensors"))
    assert sum(f.stat().st_size for f in remaining) <= new.max_disk_bytes
    assert len(list(new.disk_dir.glob("*.safetensors"))) == 1  # the newest file survives


def test_clear_forgets_memory_but_not_disk(tmp_path):
    cache = SvdCache("fp", disk_dir=tmp_path)
    w = _gaussian(16, 12)
    cache.get("a", w)
    cache.clear()
    assert "a" not in cache and cache.nbytes == 0
    cache.get("a", w)
    assert cache.computed == 1 and cache.disk_hits == 1


def test_decomposition_nbytes_counts_the_factors():
    dec = decompose(_gaussian(30, 20))
    assert dec.nbytes == (30 * 20 + 20 + 20 * 20) * 4
    assert math.isclose(dec.S.double().pow(2).sum().item(),
                        _gaussian(30, 20).double().pow(2).sum().item(), rel_tol=1e-5)
