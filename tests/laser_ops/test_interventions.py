"""Intervention specs: validation errors, expansion against a model, and each edit kind's math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from laser_ops import interventions as interventions_mod
from laser_ops.interventions import (
    EditKind,
    EditResult,
    InterventionError,
    InterventionSpec,
    edit_kind,
    expand,
    parse_profile,
    rank_for,
    register_edit_kind,
)
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper, profile_signature
from laser_ops.targets import ModelTargets, read_matrix
from laser_ops.testing import make_tiny_model

# --- validation ----------------------------------------------------------------------------------


def _error(**kwargs) -> tuple[tuple, str]:
    kwargs.setdefault("target", "fc_in")
    kwargs.setdefault("layer", 0)
    with pytest.raises(ValidationError) as exc:
        InterventionSpec(**kwargs)
    (err,) = exc.value.errors()
    return tuple(err["loc"]), err["msg"]


@pytest.mark.parametrize(("kwargs", "loc", "fragment"), [
    ({"rank_fraction": 0}, ("rank_fraction",), "greater than 0"),
    ({"rank_fraction": -0.5}, ("rank_fraction",), "greater than 0"),
    ({"rank_fraction": 1.5}, ("rank_fraction",), "less than or equal to 1"),
    ({"rank": 0}, ("rank",), "greater than or equal to 1"),
    ({"energy": 0}, ("energy",), "greater than 0"),
    ({"energy": 1.01}, ("energy",), "less than or equal to 1"),
    ({"kind": "prune_magnitude", "sparsity": 1.0}, ("sparsity",), "less than 1"),
    ({"kind": "prune_magnitude", "sparsity": -0.1}, ("sparsity",), "greater than or equal to 0"),
    ({"kind": "random_basis", "rank": 2, "seed": -1}, ("seed",), "greater than or equal to 0"),
    ({"kind": "svd", "rank": 2}, ("kind",), "'laser', 'laser_mp', 'keep_bottom', 'random_basis'"),
    ({"rank": 2, "alpha": 1}, ("alpha",), "Extra inputs are not permitted"),
])
def test_field_errors_name_the_field_and_the_allowed_range(kwargs, loc, fragment):
    got_loc, msg = _error(**kwargs)
    assert got_loc == loc
    assert fragment in msg


@pytest.mark.parametrize(("kwargs", "fragments"), [
    ({}, ["needs exactly one of rank_fraction (0, 1], rank (>= 1) or energy (0, 1]", "got none"]),
    ({"rank": 2, "rank_fraction": 0.5}, ["exactly one of", "['rank_fraction', 'rank']"]),
    ({"rank": 2, "energy": 0.9}, ["exactly one of", "['rank', 'energy']"]),
    ({"kind": "keep_bottom"}, ["'keep_bottom' needs exactly one of"]),
    ({"kind": "random_basis"}, ["'random_basis' needs exactly one of"]),
    ({"kind": "laser_mp", "rank": 3}, ["kind 'laser_mp' takes no rank"]),
    ({"kind": "zero", "rank_fraction": 0.5}, ["kind 'zero' takes no rank_fraction"]),
    ({"kind": "prune_magnitude"}, ["needs sparsity in [0, 1)"]),
    ({"kind": "laser", "rank": 1, "sparsity": 0.5}, ["sparsity only applies to kind 'prune_magnitude'"]),
    ({"target": "ffn", "rank": 1}, ["target must be one of", "'fc_in'", "'mlp'", "'ffn'"]),
    ({"layer": "x", "rank": 1}, ["layer string 'x'", "'start:stop[:step]' or 'all'"]),
    ({"layer": "1:2:3:4", "rank": 1}, ["layer string '1:2:3:4'"]),
    ({"layer": "a:b", "rank": 1}, ["layer string 'a:b'"]),
    ({"layer": "::0", "rank": 1}, ["layer string '::0'"]),
])
def test_cross_field_errors_say_what_is_allowed(kwargs, fragments):
    _, msg = _error(**kwargs)
    for fragment in fragments:
        assert fragment in msg


def test_bad_layer_types_are_rejected_at_the_layer_field():
    with pytest.raises(ValidationError) as exc:
        InterventionSpec(target="fc_in", layer=1.5, rank=1)
    assert {err["loc"][0] for err in exc.value.errors()} == {"layer"}


def test_defaults_and_json_form():
    spec = InterventionSpec.model_validate({"target": "fc_in", "layer": 27, "rank_fraction": 0.01})
    assert spec.kind == "laser" and spec.seed == 0
    assert parse_profile([spec, {"target": "mlp", "layer": "-5:", "rank": 3}])[1].layer == "-5:"
    with pytest.raises(ValidationError, match="frozen"):
        spec.rank = 3  # specs are values: hashable, never mutated after validation
    assert hash(spec) == hash(InterventionSpec(target="fc_in", layer=27, rank_fraction=0.01))


@pytest.fixture(scope="module")
def llama_targets() -> ModelTargets:
    return ModelTargets.of(make_tiny_model("llama"))


@pytest.mark.parametrize("layer", [3, -4, [0, 7]])
def test_layer_out_of_range_on_the_model_names_the_range(llama_targets, layer):
    spec = InterventionSpec(target="fc_in", layer=layer, rank=1)
    with pytest.raises(InterventionError, match=r"out of range: allowed -3\.\.2 \(3 layers\)") as exc:
        expand([InterventionSpec(target="fc_out", layer=0, rank=1), spec], llama_targets)
    assert exc.value.loc == (1, "layer")


def test_empty_layer_list_is_refused_at_the_layer_field():
    with pytest.raises(ValidationError, match="at least 1 item") as exc:
        InterventionSpec(target="fc_in", layer=[], rank=1)
    assert {err["loc"][0] for err in exc.value.errors()} == {"layer"}


def test_rank_above_min_dimension_names_the_range(llama_targets):
    with pytest.raises(InterventionError, match=r"rank 33 out of range 1\.\.32 for fc_in \(64x32\) at layer 1") as exc:
        expand([InterventionSpec(target="fc_in", layer=1, rank=33)], llama_targets)
    assert exc.value.loc == (0, "rank")
    # k_proj is 16x32 under GQA: the bound is per matrix
    with pytest.raises(InterventionError, match=r"1\.\.16 for k_proj"):
        expand([InterventionSpec(target="attn", layer=0, rank=20)], llama_targets)
    assert len(expand([InterventionSpec(target="fc_in", layer=1, rank=32)], llama_targets)) == 1


def test_duplicate_matrix_across_specs_names_both(llama_targets):
    specs = [InterventionSpec(target="fc_out", layer=0, rank=1),
             InterventionSpec(target="fc_in", layer=-1, rank_fraction=0.5),
             InterventionSpec(kind="zero", target="mlp", layer="1:")]
    with pytest.raises(InterventionError) as exc:
        expand(specs, llama_targets)
    msg = str(exc.value)
    assert "interventions[1]" in msg and "interventions[2]" in msg
    assert "fc_in at layer 2" in msg and "model.layers.2.mlp.gate_proj.weight" in msg
    assert exc.value.loc == (2, "target")


def test_fused_slices_of_one_parameter_are_distinct_matrices():
    mt = ModelTargets.of(make_tiny_model("gpt2"))
    edits = expand([InterventionSpec(target="q_proj", layer=0, rank=1),
                    InterventionSpec(target="k_proj", layer=0, rank=2)], mt)
    assert len({e.ref.param_name for e in edits}) == 1 and len({e.ref.key for e in edits}) == 2
    with pytest.raises(InterventionError, match=r"interventions\[0\] and interventions\[1\]"):
        expand([InterventionSpec(target="v_proj", layer=0, rank=1),
                InterventionSpec(kind="zero", target="attn", layer=0)], mt)


@pytest.mark.parametrize(("rho", "r", "k"), [
    (0.01, 32, 1), (0.3, 32, 9), (1.0, 32, 32), (0.7, 30, 21), (0.29, 100, 29), (0.57, 100, 57), (0.01, 576, 5),
])
def test_rank_fraction_gives_floor_rho_min_at_least_one(rho, r, k):
    spec = InterventionSpec(target="fc_in", layer=0, rank_fraction=rho)
    assert rank_for(spec, (r + 7, r), lambda: torch.empty(0)) == k
    assert rank_for(spec, (r, r + 7), lambda: torch.empty(0)) == k
    assert k == max(1, math.floor(round(rho * r, 9)))


def test_register_edit_kind_refuses_collisions(monkeypatch):
    monkeypatch.setattr(interventions_mod, "_KINDS", dict(interventions_mod._KINDS))

    class Again(EditKind):
        name = "laser"

        def apply(self, spec, w, svd, ref):
            return EditResult(w, None)

    with pytest.raises(ValueError, match="'laser' is already registered"):
        register_edit_kind(Again)
    assert type(edit_kind("laser")).__name__ == "LaserTopK"


# --- each kind's math, through the swapper, on a plain and on a fused + transposed matrix ---------

CASES = {"llama": ("fc_in", 1), "gpt2": ("q_proj", 1)}  # 64x32 plain; 32x32 slice of a Conv1D c_attn


def _edit(arch: str, **spec) -> tuple[torch.Tensor, torch.Tensor, WeightSwapper]:
    """(base logical matrix, edited logical matrix, swapper) for one spec on the case's matrix."""
    target, layer = CASES[arch]
    model = make_tiny_model(arch)
    swapper = WeightSwapper(model, svd_cache=SvdCache(arch))
    ref = swapper.targets.ref(target, layer)
    param = model.get_parameter(ref.param_name)
    base = read_matrix(param, ref).clone()
    swapper.apply([{"target": target, "layer": layer, **spec}])
    return base, read_matrix(param, ref).clone(), swapper


def _svd64(w: torch.Tensor):
    return torch.linalg.svd(w.double(), full_matrices=False)


def _top(w: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = _svd64(w)
    return ((U[:, :k] * S[:k]) @ Vh[:k]).float()


def _rank(w: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(w).item())


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("rho", [0.01, 0.3, 0.5, 1.0])
def test_laser_rank_fraction_keeps_top_k(arch, rho):
    base, new, _ = _edit(arch, rank_fraction=rho)
    k = max(1, math.floor(rho * min(base.shape)))
    assert _rank(new) == k
    torch.testing.assert_close(new, _top(base, k), rtol=1e-4, atol=1e-5)
    if rho == 1.0:
        torch.testing.assert_close(new, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(CASES))
def test_laser_absolute_rank(arch):
    base, new, _ = _edit(arch, rank=5)
    assert _rank(new) == 5
    torch.testing.assert_close(new, _top(base, 5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_laser_energy_is_the_smallest_k_reaching_the_fraction(arch, energy):
    base, new, swapper = _edit(arch, energy=energy)
    s2 = _svd64(base).S ** 2
    cum = (torch.cumsum(s2, 0) / s2.sum()).tolist()
    k = next(i + 1 for i, c in enumerate(cum) if c >= energy - 1e-12)
    assert k == 1 or cum[k - 2] < energy  # k - 1 components are not enough
    assert _rank(new) == k
    torch.testing.assert_close(new, _top(base, k), rtol=1e-4, atol=1e-5)
    target, layer = CASES[arch]
    (report,) = swapper.dry_run([{"target": target, "layer": layer, "energy": energy}])
    assert report.k == k and report.retained_energy >= energy - 1e-9


@pytest.mark.parametrize("arch", list(CASES))
def test_laser_mp_rank_is_the_marchenko_pastur_count(arch):
    base, new, swapper = _edit(arch, kind="laser_mp")
    m, n = base.shape
    S = _svd64(base).S.numpy()
    q75, q25 = np.percentile(S, [75, 25])
    tau = (q75 - q25) / 1.349 * (1 + math.sqrt(min(m, n) / max(m, n)))
    k = max(1, int((S > tau).sum()))
    assert 1 <= k < min(m, n)  # the test matrix really is truncated
    assert _rank(new) == k
    torch.testing.assert_close(new, _top(base, k), rtol=1e-4, atol=1e-5)
    target, layer = CASES[arch]
    assert swapper.dry_run([{"kind": "laser_mp", "target": target, "layer": layer}])[0].k == k


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("spec", [{"rank": 5}, {"rank_fraction": 0.25}])
def test_keep_bottom_is_w_minus_w_k(arch, spec):
    base, new, swapper = _edit(arch, kind="keep_bottom", **spec)
    r = min(base.shape)
    k = spec.get("rank") or math.floor(spec["rank_fraction"] * r)
    torch.testing.assert_close(new, base - _top(base, k), rtol=1e-4, atol=1e-5)
    assert _rank(new) == r - k
    # orthogonal to what laser keeps: W_k + bottom == W
    torch.testing.assert_close(_top(base, k) + new, base, rtol=1e-4, atol=1e-5)
    target, layer = CASES[arch]
    (report,) = swapper.dry_run([{"kind": "keep_bottom", "target": target, "layer": layer, **spec}])
    assert report.k == r - k


@pytest.mark.parametrize("arch", list(CASES))
def test_random_basis_has_rank_k_and_is_seed_deterministic(arch):
    base, a, _ = _edit(arch, kind="random_basis", rank=4, seed=7)
    _, a_again, _ = _edit(arch, kind="random_basis", rank=4, seed=7)
    _, b, _ = _edit(arch, kind="random_basis", rank=4, seed=8)
    assert _rank(a) == 4 and _rank(b) == 4
    assert torch.equal(a, a_again)
    assert not torch.allclose(a, b, atol=1e-3)
    # a random subspace keeps less than the top-k one (Eckart-Young), so it is a real control
    assert torch.linalg.matrix_norm(base - a) > torch.linalg.matrix_norm(base - _top(base, 4))


def test_random_basis_differs_per_matrix():
    model = make_tiny_model("llama")
    mt = ModelTargets.of(model)
    WeightSwapper(model, svd_cache=SvdCache("x")).apply(
        [{"kind": "random_basis", "target": "fc_in", "layer": "0:2", "rank": 3}])
    a, b = (read_matrix(model.get_parameter(mt.ref("fc_in", i).param_name), mt.ref("fc_in", i)) for i in (0, 1))
    # the projection is onto the row space of the edited matrix: compare the two subspaces
    pa = torch.linalg.svd(a.double(), full_matrices=False).Vh[:3]
    pb = torch.linalg.svd(b.double(), full_matrices=False).Vh[:3]
    assert not torch.allclose(pa.T @ pa, pb.T @ pb, atol=1e-3)


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.9])
def test_prune_magnitude_zeros_the_smallest_fraction(arch, sparsity):
    base, new, _ = _edit(arch, kind="prune_magnitude", sparsity=sparsity)
    n = base.numel()
    zeroed = new == 0
    assert int(zeroed.sum()) == math.floor(sparsity * n)
    assert torch.equal(new[~zeroed], base[~zeroed])  # survivors untouched
    if sparsity > 0:
        assert base[zeroed].abs().max() <= base[~zeroed].abs().min()


@pytest.mark.parametrize("arch", list(CASES))
def test_zero_drops_the_matrix_only(arch):
    target, layer = CASES[arch]
    model = make_tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swapper = WeightSwapper(model, svd_cache=SvdCache(arch))
    ref = swapper.targets.ref(target, layer)
    swapper.apply([{"kind": "zero", "target": target, "layer": layer}])
    param = model.get_parameter(ref.param_name)
    assert torch.count_nonzero(read_matrix(param, ref)) == 0
    for name, value in model.state_dict().items():
        if name != ref.param_name:
            assert torch.equal(value, before[name]), name
    assert swapper.dry_run([{"kind": "zero", "target": target, "layer": layer}])[0].relative_frobenius_error == 1.0


# --- composition --------------------------------------------------------------------------------

PROFILES = {
    "llama": [
        {"target": "fc_in", "layer": 0, "rank": 3},
        {"kind": "keep_bottom", "target": "fc_out", "layer": 0, "rank_fraction": 0.5},
        {"kind": "random_basis", "target": "attn", "layer": 1, "rank": 2, "seed": 3},
        {"kind": "prune_magnitude", "target": "fc_up", "layer": -1, "sparsity": 0.5},
        {"kind": "laser_mp", "target": "fc_in", "layer": 2},
    ],
    "gpt2": [  # q, k, v all live in one c_attn parameter
        {"target": "q_proj", "layer": 0, "rank": 3},
        {"kind": "zero", "target": "v_proj", "layer": 0},
        {"kind": "keep_bottom", "target": "k_proj", "layer": 0, "energy": 0.8},
        {"target": "fc_in", "layer": 1, "rank_fraction": 0.1},
    ],
}


@pytest.mark.parametrize("arch", list(PROFILES))
def test_composition_is_order_independent(arch):
    profile = PROFILES[arch]
    states = []
    for order in (profile, profile[::-1], profile[1:] + profile[:1]):
        model = make_tiny_model(arch)
        WeightSwapper(model, svd_cache=SvdCache(arch)).apply(order)
        states.append(model.state_dict())
    base = make_tiny_model(arch).state_dict()
    for name in base:
        assert torch.equal(states[0][name], states[1][name]), name
        assert torch.equal(states[0][name], states[2][name]), name
    assert any(not torch.equal(states[0][n], base[n]) for n in base)
    assert profile_signature(profile) == profile_signature(profile[::-1])


def test_edits_of_one_fused_parameter_do_not_interact():
    """q edited alone == q edited together with v and k (each slice reads the base matrix)."""
    profile = PROFILES["gpt2"][:3]
    together, alone = make_tiny_model("gpt2"), make_tiny_model("gpt2")
    WeightSwapper(together, svd_cache=SvdCache("a")).apply(profile)
    WeightSwapper(alone, svd_cache=SvdCache("b")).apply(profile[:1])
    ref = ModelTargets.of(alone).ref("q_proj", 0)
    q_together = read_matrix(together.get_parameter(ref.param_name), ref)
    q_alone = read_matrix(alone.get_parameter(ref.param_name), ref)
    assert torch.equal(q_together, q_alone)
