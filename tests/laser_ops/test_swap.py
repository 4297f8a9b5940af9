"""The reversible weight swapper, as a contract over every tiny architecture."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from torch import nn

from laser_ops.interventions import EditResult, InterventionError, edit_kind
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.targets import read_matrix
from laser_ops.testing import TINY_CONFIGS, make_tiny_model, tiny_tokenizer

ARCHS = list(TINY_CONFIGS)


def state_hashes(model: nn.Module) -> dict[str, str]:
    """sha256 of the raw bytes of every state_dict tensor (bit-exact, any dtype)."""
    out = {}
    for name, t in model.state_dict().items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        out[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {n for n in before if before[n] != after[n]}


def logits(model: nn.Module) -> torch.Tensor:
    ids = tiny_tokenizer()("The capital of France is Paris.", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def swapper_for(model: nn.Module, **kw) -> WeightSwapper:
    return WeightSwapper(model, svd_cache=SvdCache("test"), **kw)


# Every architecture has fc_in, fc_out and the attention types; edit each kind of place once.
EDIT = [
    {"target": "mlp", "layer": -1, "rank_fraction": 0.1},
    {"target": "attn", "layer": 0, "rank": 2},
]
A = [{"target": "fc_in", "layer": 0, "rank": 2}, {"target": "fc_out", "layer": 1, "rank": 3}]
B = [{"target": "fc_in", "layer": 0, "rank": 2}, {"target": "out_proj", "layer": 2, "rank": 3}]


@pytest.mark.parametrize("arch", ARCHS)
def test_edit_changes_logits_and_revert_restores_every_bit(arch):
    model = make_tiny_model(arch)
    base_hash, base_logits = state_hashes(model), logits(model)
    swapper = swapper_for(model)
    assert swapper.is_base

    stats = swapper.apply(EDIT)
    n_params = len(swapper.plan(EDIT)) if arch not in ("gpt2", "gpt_neox") else None
    assert not swapper.is_base
    assert stats.written == len(swapper.applied) and stats.materialized == len(swapper.applied)
    if n_params is not None:
        assert len(swapper.applied) == n_params  # one parameter per matrix (no fused slices)
    assert stats.svds >= 1
    edited = logits(model)
    assert (edited - base_logits).abs().max() > 1e-3
    assert changed(base_hash, state_hashes(model)) == set(swapper.applied)

    revert = swapper.revert()
    assert swapper.is_base and swapper.applied == {} and swapper.current == []
    assert revert.written == stats.written and revert.svds == 0 and revert.materialized == 0
    assert state_hashes(model) == base_hash
    assert torch.equal(logits(model), base_logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_switching_writes_only_differing_params_and_cached_reapply_is_free(arch):
    model = make_tiny_model(arch)
    swapper = swapper_for(model)
    base_hash = state_hashes(model)
    swapper.apply(A)
    a_hash = state_hashes(model)
    names_a = dict(swapper.applied)

    to_b = swapper.apply(B)
    # fc_in L0 is identical in A and B: only fc_out L1 (restored) and out_proj L2 (written) move
    assert to_b.written == 2 and to_b.materialized == 1
    b_hash = state_hashes(model)
    moved = changed(a_hash, b_hash)
    assert len(moved) == 2
    fc_in_name = swapper.targets.ref("fc_in", 0).param_name
    assert fc_in_name not in moved and a_hash[fc_in_name] == b_hash[fc_in_name]
    assert set(swapper.applied) - set(names_a) == {swapper.targets.ref("out_proj", 2).param_name}

    # B reached by switching == B applied on a fresh copy
    fresh = make_tiny_model(arch)
    swapper_for(fresh).apply(B)
    assert state_hashes(fresh) == b_hash

    back = swapper.apply(A)
    assert back.svds == 0 and back.materialized == 0 and back.written == 2
    assert state_hashes(model) == a_hash
    swapper.revert()
    again = swapper.apply(B)
    assert again.svds == 0 and again.materialized == 0 and again.written == 2
    assert state_hashes(model) == b_hash
    same = swapper.apply(list(reversed(B)))  # same profile, other order: nothing to do
    assert same.written == 0 and same.materialized == 0 and same.svds == 0
    swapper.revert()
    assert state_hashes(model) == base_hash


def test_new_rank_of_a_cached_matrix_reuses_its_decomposition():
    model = make_tiny_model("llama")
    swapper = swapper_for(model)
    first = swapper.apply([{"target": "fc_in", "layer": 1, "rank_fraction": 0.5}])
    assert first.svds == 1
    for rho in (0.25, 0.1, 0.05):
        stats = swapper.apply([{"target": "fc_in", "layer": 1, "rank_fraction": rho}])
        assert stats.svds == 0 and stats.materialized == 1
    assert swapper.svd_cache.computed == 1


def _bad_specs() -> list[list[dict]]:
    return [
        [{"target": "fc_in", "layer": 99, "rank": 1}],
        [{"target": "fc_out", "layer": 2, "rank": 1}, {"target": "mlp", "layer": "-1:", "rank": 1}],  # duplicate
        [{"target": "fc_in", "layer": 2, "rank": 10_000}],
        [{"target": "fc_in", "layer": 2, "rank_fraction": 2.0}],  # pydantic error
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_failed_apply_on_a_spec_error_leaves_model_and_state_unchanged(arch):
    model = make_tiny_model(arch)
    swapper = swapper_for(model)
    swapper.apply(A)
    a_hash, applied, current = state_hashes(model), dict(swapper.applied), list(swapper.current)
    for specs in _bad_specs():
        with pytest.raises(ValueError):  # InterventionError and pydantic's ValidationError are ValueErrors
            swapper.apply(specs)
        assert state_hashes(model) == a_hash
        assert swapper.applied == applied and swapper.current == current


@pytest.mark.parametrize("arch", ARCHS)
def test_non_finite_edit_is_refused_before_any_write(arch, monkeypatch):
    model = make_tiny_model(arch)
    swapper = swapper_for(model)
    swapper.apply(A)
    a_hash, applied = state_hashes(model), dict(swapper.applied)
    laser = type(edit_kind("laser"))
    original = laser.apply

    def poisoned(self, spec, w, svd, ref):
        result = original(self, spec, w, svd, ref)
        if ref.layer == 2:
            result.matrix[0, 0] = float("nan")
        return EditResult(result.matrix, result.k)

    monkeypatch.setattr(laser, "apply", poisoned)
    # layer 0 and 1 edits are fine and come first; the poisoned layer-2 edit must stop everything
    profile = [{"target": "mlp", "layer": "0:2", "rank": 1}, {"target": "fc_in", "layer": 2, "rank": 1}]
    with pytest.raises(InterventionError, match="non-finite values") as exc:
        swapper.apply(profile)
    assert exc.value.loc == (1,)
    assert state_hashes(model) == a_hash and swapper.applied == applied
    monkeypatch.setattr(laser, "apply", original)
    swapper.apply(profile)  # the same profile works once the fault is gone
    assert not swapper.is_base


def test_failure_during_writes_rolls_back_to_the_previous_profile(monkeypatch):
    model = make_tiny_model("llama")
    swapper = swapper_for(model)
    swapper.apply(B)
    b_hash, applied = state_hashes(model), dict(swapper.applied)
    victim = swapper.targets.ref("fc_up", 1).param_name
    param = model.get_parameter(victim)
    real_copy = param.copy_

    def failing_copy(*args, **kwargs):
        raise RuntimeError("simulated device error")

    monkeypatch.setattr(param, "copy_", failing_copy, raising=False)
    profile = [{"target": "mlp", "layer": 1, "rank": 1}, {"target": "fc_in", "layer": 2, "rank": 1}]
    with pytest.raises(RuntimeError, match="simulated"):
        swapper.apply(profile)
    monkeypatch.setattr(param, "copy_", real_copy)
    assert state_hashes(model) == b_hash and swapper.applied == applied


@pytest.mark.parametrize("arch", ARCHS)
def test_applied_profile_restores_after_an_exception(arch):
    model = make_tiny_model(arch)
    swapper = swapper_for(model)
    base_hash = state_hashes(model)
    with pytest.raises(RuntimeError, match="boom"):
        with swapper.applied_profile(A) as stats:
            assert stats.written == 2 and state_hashes(model) != base_hash
            raise RuntimeError("boom")
    assert swapper.is_base and state_hashes(model) == base_hash

    swapper.apply(B)
    b_hash = state_hashes(model)
    with pytest.raises(KeyboardInterrupt):
        with swapper.applied_profile(A):
            assert swapper.current != [] and state_hashes(model) != b_hash
            raise KeyboardInterrupt
    assert state_hashes(model) == b_hash
    with swapper.applied_profile([]):
        assert state_hashes(model) == base_hash
    assert state_hashes(model) == b_hash and len(swapper.current) == 2


def _param_bytes(model: nn.Module, name: str) -> int:
    p = model.get_parameter(name)
    return p.numel() * p.element_size()


def test_lru_byte_bound_never_evicts_the_live_edit(monkeypatch):
    model = make_tiny_model("llama")
    one = _param_bytes(model, "model.layers.0.mlp.gate_proj.weight")
    swapper = swapper_for(model, max_cache_bytes=one)  # room for a single edited tensor
    base_hash = state_hashes(model)

    swapper.apply(EDIT)  # 10 parameters, all live, far over the bound
    live_hash, live_applied = state_hashes(model), dict(swapper.applied)
    live_bytes = sum(_param_bytes(model, n) for n in swapper.applied)
    assert swapper.cached_bytes == live_bytes > swapper.max_cache_bytes
    assert swapper.apply(EDIT).materialized == 0  # nothing live was evicted

    # a failed switch must be able to roll back to the live tensors
    victim = model.get_parameter(swapper.targets.ref("fc_in", 1).param_name)
    monkeypatch.setattr(victim, "copy_", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("io")), raising=False)
    with pytest.raises(RuntimeError, match="io"):
        swapper.apply([{"target": "fc_out", "layer": 0, "rank": 1}, {"target": "fc_in", "layer": 1, "rank": 1}])
    monkeypatch.undo()
    assert state_hashes(model) == live_hash and swapper.applied == live_applied

    # switching away unpins them: the bound is enforced again, and coming back re-materialises (no SVD)
    swapper.apply(A)
    assert swapper.cached_bytes <= max(swapper.max_cache_bytes, sum(_param_bytes(model, n) for n in swapper.applied))
    back = swapper.apply(EDIT)
    assert back.materialized > 0 and back.svds == 0
    assert state_hashes(model) == live_hash
    swapper.revert()
    assert state_hashes(model) == base_hash


def test_lru_keeps_recent_profiles_within_the_bound():
    model = make_tiny_model("llama")
    one = _param_bytes(model, "model.layers.0.mlp.gate_proj.weight")
    swapper = swapper_for(model, max_cache_bytes=3 * one)
    profiles = [[{"target": "fc_in", "layer": 0, "rank": r}] for r in (1, 2, 3, 4)]
    for p in profiles:
        swapper.apply(p)
        assert swapper.cached_bytes <= swapper.max_cache_bytes
    assert swapper.apply(profiles[1]).materialized == 0  # still cached
    assert swapper.apply(profiles[0]).materialized == 1  # evicted (oldest)
    assert swapper.warm(profiles[3]) == 0 and swapper.warm([{"target": "fc_in", "layer": 0, "rank": 9}]) == 1
    assert swapper.apply([{"target": "fc_in", "layer": 0, "rank": 9}]).materialized == 0
    assert swapper.cached_bytes <= swapper.max_cache_bytes


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dry_run_reports_and_does_not_touch_the_model(arch):
    model = make_tiny_model(arch)
    swapper = swapper_for(model)
    swapper.apply(A)
    before, applied = state_hashes(model), dict(swapper.applied)
    specs = [{"target": "fc_in", "layer": 2, "rank_fraction": 0.3},
             {"kind": "prune_magnitude", "target": "q_proj", "layer": 1, "sparsity": 0.5},
             {"target": "fc_out", "layer": 1, "rank": 4}]  # fc_out L1 is live in A: reported from the base
    reports = swapper.dry_run(specs)
    assert state_hashes(model) == before and swapper.applied == applied
    assert [r.index for r in reports] == [0, 1, 2]

    fc_in = reports[0]
    ref = swapper.targets.ref("fc_in", 2)
    w = read_matrix(model.get_parameter(ref.param_name), ref).double()
    S = torch.linalg.svdvals(w)
    k = math.floor(0.3 * min(ref.shape))
    assert (fc_in.type, fc_in.layer, fc_in.kind, fc_in.shape, fc_in.k) == ("fc_in", 2, "laser", ref.shape, k)
    assert fc_in.retained_energy == pytest.approx(((S[:k] ** 2).sum() / (S**2).sum()).item(), rel=1e-5)
    assert fc_in.frobenius_error == pytest.approx(math.sqrt((S[k:] ** 2).sum().item()), rel=1e-4)
    assert fc_in.relative_frobenius_error == pytest.approx(fc_in.frobenius_error / torch.linalg.matrix_norm(w).item())

    prune = reports[1]
    assert prune.k is None and prune.retained_energy is None and 0 < prune.relative_frobenius_error < 1

    fc_out = reports[2]
    ref_out = swapper.targets.ref("fc_out", 1)
    fresh = make_tiny_model(arch)
    w_base = read_matrix(fresh.get_parameter(ref_out.param_name), ref_out).double()
    S_base = torch.linalg.svdvals(w_base)
    assert fc_out.k == 4
    assert fc_out.frobenius_error == pytest.approx(math.sqrt((S_base[4:] ** 2).sum().item()), rel=1e-4)

    assert swapper.dry_run([]) == []
    with pytest.raises(InterventionError):
        swapper.dry_run([{"target": "fc_in", "layer": 9, "rank": 1}])
    assert state_hashes(model) == before


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_model_revert_is_bit_exact(arch):
    model = make_tiny_model(arch, dtype=torch.bfloat16)
    base_hash = state_hashes(model)
    swapper = swapper_for(model)
    stats = swapper.apply(EDIT + [{"kind": "keep_bottom", "target": "fc_in", "layer": 1, "rank": 3}])
    edited_hash = state_hashes(model)
    assert changed(base_hash, edited_hash) == set(swapper.applied) and stats.written > 0
    assert all(model.get_parameter(n).dtype == torch.bfloat16 for n in swapper.applied)
    swapper.revert()
    assert state_hashes(model) == base_hash
    swapper.apply(EDIT + [{"kind": "keep_bottom", "target": "fc_in", "layer": 1, "rank": 3}])
    assert state_hashes(model) == edited_hash  # the cached edit is the same bits
    swapper.revert()
    assert state_hashes(model) == base_hash


def test_fused_bf16_slice_leaves_other_rows_bit_identical():
    model = make_tiny_model("gpt_neox", dtype=torch.bfloat16)
    swapper = swapper_for(model)
    ref = swapper.targets.ref("k_proj", 1)
    param = model.get_parameter(ref.param_name)
    before = param.detach().clone()
    swapper.apply([{"target": "k_proj", "layer": 1, "rank": 1}])
    others = sorted(set(range(param.shape[0])) - set(ref.rows))
    assert torch.equal(param.detach()[others], before[others])
    assert not torch.equal(param.detach()[list(ref.rows)], before[list(ref.rows)])


def test_spectrum_of_a_base_matrix_while_it_is_edited():
    model = make_tiny_model("llama")
    swapper = swapper_for(model)
    ref = swapper.targets.ref("fc_in", 1)
    base = read_matrix(model.get_parameter(ref.param_name), ref).double().clone()
    swapper.apply([{"target": "fc_in", "layer": 1, "rank": 2}])
    report = swapper.spectrum("fc_in", 1, k=2)  # reads the original, not the live rank-2 matrix
    S = torch.linalg.svdvals(base)
    assert report.sigma_max == pytest.approx(S[0].item(), rel=1e-5)
    assert report.retained_energy == pytest.approx(((S[:2] ** 2).sum() / (S**2).sum()).item(), rel=1e-5)


def test_edit_that_overflows_a_half_precision_model_is_refused(monkeypatch):
    """Finite in float32 but inf in fp16 (> 65504): the check must see the tensor that would be written."""
    model = make_tiny_model("llama", dtype=torch.float16)
    swapper = swapper_for(model)
    swapper.apply(A)
    a_hash, applied = state_hashes(model), dict(swapper.applied)
    laser = type(edit_kind("laser"))
    original = laser.apply

    def huge(self, spec, w, svd, ref):
        result = original(self, spec, w, svd, ref)
        result.matrix[0, 0] = 1e6
        return EditResult(result.matrix, result.k)

    monkeypatch.setattr(laser, "apply", huge)
    with pytest.raises(InterventionError, match="overflow torch.float16") as exc:
        swapper.apply([{"target": "fc_out", "layer": 0, "rank": 1}, {"target": "fc_in", "layer": 2, "rank": 1}])
    assert exc.value.loc == (0,)
    assert state_hashes(model) == a_hash and swapper.applied == applied


@pytest.mark.parametrize(("poison", "refused"), [
    ({(0, 0): float("nan")}, True),
    ({(0, 0): float("inf")}, True),
    ({(0, 0): float("inf"), (1, 1): -float("inf")}, True),  # the two infinities cancel to NaN in a sum
    ({(i, j): 3e38 for i in range(4) for j in range(4)}, False),  # finite, though the sum overflows
])
def test_finiteness_check_is_exact(poison, refused, monkeypatch):
    model = make_tiny_model("llama")
    swapper = swapper_for(model)
    base_hash = state_hashes(model)
    laser = type(edit_kind("laser"))
    original = laser.apply

    def poisoned(self, spec, w, svd, ref):
        result = original(self, spec, w, svd, ref)
        for (i, j), value in poison.items():
            result.matrix[i, j] = value
        return EditResult(result.matrix, result.k)

    monkeypatch.setattr(laser, "apply", poisoned)
    profile = [{"target": "fc_in", "layer": 1, "rank": 2}]
    if refused:
        with pytest.raises(InterventionError, match="non-finite"):
            swapper.apply(profile)
        assert state_hashes(model) == base_hash and swapper.is_base
    else:
        swapper.apply(profile)
        assert model.get_parameter("model.layers.1.mlp.gate_proj.weight")[0, 0].item() == pytest.approx(3e38)
