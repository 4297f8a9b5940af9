"""Target resolution over every tiny architecture: names, logical shapes, layers, fused slices."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from laser_ops import targets as targets_mod
from laser_ops.interventions import InterventionError, InterventionSpec, expand
from laser_ops.svd import SvdCache
from laser_ops.swap import WeightSwapper
from laser_ops.targets import (
    GROUPS,
    TYPES,
    ArchSpec,
    ModelTargets,
    TargetError,
    TypeSlot,
    arch_spec_for,
    describe,
    read_matrix,
    register_architecture,
    supported_model_types,
)
from laser_ops.testing import TINY_CONFIGS, make_tiny_model

H, FF, KV = 32, 64, 16  # tiny hidden size, MLP size (4h = 128 for gpt2/gptj), GQA k/v rows
_LLAMA = {
    "fc_in": ("mlp.gate_proj", (FF, H)), "fc_up": ("mlp.up_proj", (FF, H)), "fc_out": ("mlp.down_proj", (H, FF)),
    "q_proj": ("self_attn.q_proj", (H, H)), "k_proj": ("self_attn.k_proj", (KV, H)),
    "v_proj": ("self_attn.v_proj", (KV, H)), "out_proj": ("self_attn.o_proj", (H, H)),
}
_BERT = {
    "fc_in": ("intermediate.dense", (FF, H)), "fc_out": ("output.dense", (H, FF)),
    "q_proj": ("attention.self.query", (H, H)), "k_proj": ("attention.self.key", (H, H)),
    "v_proj": ("attention.self.value", (H, H)), "out_proj": ("attention.output.dense", (H, H)),
}
# arch -> (architecture name, layer prefix, {type: (module inside the layer, logical (out, in))})
EXPECTED: dict[str, tuple[str, str, dict[str, tuple[str, tuple[int, int]]]]] = {
    "llama": ("llama", "model.layers", _LLAMA),
    "mistral": ("llama", "model.layers", _LLAMA),
    "qwen2": ("llama", "model.layers", _LLAMA),
    "gpt2": ("gpt2", "transformer.h", {
        "fc_in": ("mlp.c_fc", (4 * H, H)), "fc_out": ("mlp.c_proj", (H, 4 * H)),
        "q_proj": ("attn.c_attn", (H, H)), "k_proj": ("attn.c_attn", (H, H)), "v_proj": ("attn.c_attn", (H, H)),
        "out_proj": ("attn.c_proj", (H, H)),
    }),
    "gptj": ("gptj", "transformer.h", {
        "fc_in": ("mlp.fc_in", (4 * H, H)), "fc_out": ("mlp.fc_out", (H, 4 * H)),
        "q_proj": ("attn.q_proj", (H, H)), "k_proj": ("attn.k_proj", (H, H)), "v_proj": ("attn.v_proj", (H, H)),
        "out_proj": ("attn.out_proj", (H, H)),
    }),
    "gpt_neox": ("gpt_neox", "gpt_neox.layers", {
        "fc_in": ("mlp.dense_h_to_4h", (FF, H)), "fc_out": ("mlp.dense_4h_to_h", (H, FF)),
        "q_proj": ("attention.query_key_value", (H, H)), "k_proj": ("attention.query_key_value", (H, H)),
        "v_proj": ("attention.query_key_value", (H, H)), "out_proj": ("attention.dense", (H, H)),
    }),
    "opt": ("opt", "model.decoder.layers", {
        "fc_in": ("fc1", (FF, H)), "fc_out": ("fc2", (H, FF)),
        "q_proj": ("self_attn.q_proj", (H, H)), "k_proj": ("self_attn.k_proj", (H, H)),
        "v_proj": ("self_attn.v_proj", (H, H)), "out_proj": ("self_attn.out_proj", (H, H)),
    }),
    "phi": ("phi", "model.layers", {
        "fc_in": ("mlp.fc1", (FF, H)), "fc_out": ("mlp.fc2", (H, FF)),
        "q_proj": ("self_attn.q_proj", (H, H)), "k_proj": ("self_attn.k_proj", (H, H)),
        "v_proj": ("self_attn.v_proj", (H, H)), "out_proj": ("self_attn.dense", (H, H)),
    }),
    "bert": ("bert", "bert.encoder.layer", _BERT),
    "roberta": ("bert", "roberta.encoder.layer", _BERT),
}
FUSED = {"gpt2", "gpt_neox"}
ARCHS = list(TINY_CONFIGS)


def test_expected_table_covers_every_tiny_architecture():
    assert set(EXPECTED) == set(TINY_CONFIGS)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {arch: make_tiny_model(arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_describe_names_layers_modules_and_logical_shapes(models, arch):
    name, prefix, types_ = EXPECTED[arch]
    d = describe(models[arch])
    assert d.architecture == name
    assert d.model_type == arch
    assert d.num_layers == 3
    assert set(d.types) == set(types_)
    for t, (module, shape) in types_.items():
        desc = d.types[t]
        assert desc.module == f"{prefix}.{{layer}}.{module}", t
        assert desc.shape == shape, t
        assert desc.fused == (arch in FUSED and t in ("q_proj", "k_proj", "v_proj")), t
        assert desc.stored_transposed == (arch == "gpt2"), t
        # the template names a real module in every layer
        for layer in range(3):
            models[arch].get_submodule(desc.module.format(layer=layer))


@pytest.mark.parametrize("arch", ARCHS)
def test_logical_matrix_is_out_by_in_in_the_linear_sense(models, arch):
    """For every type: module(x)[..., rows] == x @ W_logical.T + bias[rows] (catches orientation and slicing)."""
    model = models[arch]
    mt = ModelTargets.of(model)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    for t in mt.types:
        ref = mt.ref(t, 1)
        module = model.get_submodule(ref.module_name)
        w = read_matrix(params[ref.param_name], ref)
        assert tuple(w.shape) == ref.shape
        x = torch.randn(2, 5, ref.shape[1], generator=g)
        with torch.no_grad():
            y = module(x)
        bias = getattr(module, "bias", None)
        if ref.rows is not None:
            y = y[..., list(ref.rows)]
            bias = bias[list(ref.rows)] if bias is not None else None
        expected = x @ w.T + (bias if bias is not None else 0)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5, msg=f"{arch} {t}")


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_expand_to_the_types_the_architecture_has(models, arch):
    mt = ModelTargets.of(models[arch])
    have = set(EXPECTED[arch][2])
    d = mt.describe()
    for group, members in GROUPS.items():
        expected = [t for t in members if t in have]
        assert d.groups[group] == expected
        assert list(mt.expand_types(group)) == expected
    refs = mt.resolve("mlp", 2)
    assert [r.type for r in refs] == [t for t in GROUPS["mlp"] if t in have]
    assert {r.layer for r in refs} == {2}
    assert len(mt.all_refs()) == 3 * len(have)
    # fused slices share one parameter but are distinct matrices
    assert len({r.key for r in mt.all_refs()}) == 3 * len(have)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_negative_layers_count_from_the_end(models, arch):
    mt = ModelTargets.of(models[arch])
    assert mt.ref("fc_in", -1) == mt.ref("fc_in", 2)
    assert mt.ref("fc_out", -3) == mt.ref("fc_out", 0)
    assert mt.ref("fc_in", -1).module_name.split(".")[-3] == "2"
    assert mt.normalize_layers([-1, 2, 0]) == [2, 0]  # duplicates after normalisation collapse


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_refs_are_resolved_once(models, arch):
    """Every apply re-expands its profile; module lookups and fused row tuples are built once per matrix."""
    mt = ModelTargets.of(models[arch])
    first = mt.resolve("all", range(mt.num_layers))
    assert all(a is b for a, b in zip(first, mt.resolve("all", range(mt.num_layers)), strict=True))
    assert mt.ref("fc_in", -1) is mt.ref("fc_in", mt.num_layers - 1)


@pytest.mark.parametrize("layer", [3, -4, 100])
def test_layer_out_of_range_names_the_allowed_range(models, layer):
    mt = ModelTargets.of(models["llama"])
    with pytest.raises(TargetError, match=r"-3\.\.2 \(3 layers\)") as exc:
        mt.ref("fc_in", layer)
    assert exc.value.field == "layer"


@pytest.mark.parametrize(("layer", "expected"), [
    ("-2:", [1, 2]), ("all", [0, 1, 2]), (":2", [0, 1]), ("0:3:2", [0, 2]), ("::-1", [2, 1, 0]),
    ("-1", [2]), (1, [1]), ([0, -1], [0, 2]),
])
def test_layer_ranges_resolve_on_the_model(models, layer, expected):
    mt = ModelTargets.of(models["gpt2"])
    spec = InterventionSpec(target="fc_in", layer=layer, rank=1)
    edits = expand([spec], mt)
    assert [e.ref.layer for e in edits] == expected
    assert all(e.ref.type == "fc_in" for e in edits)


def test_layer_range_selecting_nothing_is_an_error(models):
    mt = ModelTargets.of(models["llama"])
    with pytest.raises(InterventionError, match="selects no layer of 3") as exc:
        expand([InterventionSpec(target="fc_in", layer="5:", rank=1)], mt)
    assert exc.value.loc == (0, "layer")


def test_unknown_architecture_lists_supported_types_and_explains_registration():
    model = nn.Module()
    model.config = types.SimpleNamespace(model_type="falcon")
    with pytest.raises(TargetError) as exc:
        arch_spec_for(model)
    message = str(exc.value)
    assert "'falcon'" in message
    for mt in ("llama", "mistral", "qwen2", "gpt2", "gptj", "gpt_neox", "opt", "phi", "bert", "roberta"):
        assert mt in supported_model_types()
        assert mt in message
    assert "register_architecture" in message
    assert "ArchSpec" in message
    assert exc.value.field == "model"


def test_a_type_the_architecture_lacks_names_the_types_it_has(models):
    mt = ModelTargets.of(models["gptj"])
    with pytest.raises(TargetError) as exc:
        mt.resolve("fc_up", 0)
    message = str(exc.value)
    assert "'gptj'" in message and "'fc_up'" in message
    for t in ("fc_in", "fc_out", "q_proj", "k_proj", "v_proj", "out_proj"):
        assert t in message
    # through a profile, the error is located at the spec's target field
    with pytest.raises(InterventionError, match="its types are") as exc2:
        expand([InterventionSpec(target="fc_up", layer=0, rank=1)], mt)
    assert exc2.value.loc == (0, "target")


def test_unknown_target_names_types_and_groups(models):
    mt = ModelTargets.of(models["llama"])
    with pytest.raises(TargetError, match=r"allowed: types .*fc_in.* or groups .*mlp"):
        mt.expand_types("ffn")


def _swapper(model: nn.Module) -> WeightSwapper:
    return WeightSwapper(model, svd_cache=SvdCache("test"))


@pytest.mark.parametrize("k", [1, 3, 17])
def test_gpt2_rank_applies_to_the_logical_out_by_in_matrix(k):
    model = make_tiny_model("gpt2")
    param = model.get_parameter("transformer.h.1.mlp.c_fc.weight")
    base = param.detach().clone()
    assert tuple(base.shape) == (H, 4 * H)  # Conv1D stores in x out
    _swapper(model).apply([{"target": "fc_in", "layer": 1, "rank": k}])
    logical = param.detach().T
    assert tuple(logical.shape) == (4 * H, H)
    assert torch.linalg.matrix_rank(logical).item() == k
    U, S, Vh = torch.linalg.svd(base.T.double(), full_matrices=False)
    torch.testing.assert_close(logical.double(), (U[:, :k] * S[:k]) @ Vh[:k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_random_basis_projects_the_input_side_of_the_logical_matrix(arch):
    """W' = W Q Q^T acts on the *input* space: W' == W @ P_rowspace(W') (an output-side projection fails this)."""
    model = make_tiny_model(arch)
    mt = ModelTargets.of(model)
    ref = mt.ref("fc_in", 0)
    param = model.get_parameter(ref.param_name)
    w = read_matrix(param, ref).double().clone()
    _swapper(model).apply([{"kind": "random_basis", "target": "fc_in", "layer": 0, "rank": 4}])
    w_new = read_matrix(param, ref).double()
    assert torch.linalg.matrix_rank(w_new.float()).item() == 4
    row_basis = torch.linalg.svd(w_new, full_matrices=False).Vh[:4]  # the 4-dim row space of W'
    proj = row_basis.T @ row_basis
    torch.testing.assert_close(w @ proj, w_new, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(FUSED))
@pytest.mark.parametrize("part", ["q_proj", "k_proj", "v_proj"])
def test_fused_slice_edits_only_its_rows(arch, part):
    model = make_tiny_model(arch)
    mt = ModelTargets.of(model)
    ref = mt.ref(part, 1)
    param = model.get_parameter(ref.param_name)
    full_before = (param.detach().T if ref.transposed else param.detach()).clone()
    assert full_before.shape[0] == 3 * H
    others = sorted(set(range(3 * H)) - set(ref.rows))
    assert len(ref.rows) == H and len(others) == 2 * H
    _swapper(model).apply([{"target": part, "layer": 1, "rank": 2}])
    full_after = param.detach().T if ref.transposed else param.detach()
    assert torch.equal(full_after[others], full_before[others])  # bit-identical
    assert not torch.equal(full_after[list(ref.rows)], full_before[list(ref.rows)])
    assert torch.linalg.matrix_rank(full_after[list(ref.rows)]).item() == 2


def test_fused_q_k_v_slices_partition_the_fused_rows(models):
    for arch in sorted(FUSED):
        mt = ModelTargets.of(models[arch])
        rows = [set(mt.ref(t, 0).rows) for t in ("q_proj", "k_proj", "v_proj")]
        assert set().union(*rows) == set(range(3 * H))
        assert sum(len(r) for r in rows) == 3 * H


def _attention_output(model: nn.Module, module_name: str, ids: torch.Tensor) -> torch.Tensor:
    captured = {}

    def hook(module, args, output):
        captured["out"] = output[0] if isinstance(output, tuple) else output

    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return captured["out"]


@pytest.mark.parametrize("arch", sorted(FUSED))
def test_fused_slices_are_the_projections_the_model_uses(arch):
    """Zeroing the v slice makes the attention output input-independent (V = bias only); zeroing the
    q and k slices makes the attention pattern input-independent. Wrong rows would break both."""
    g = torch.Generator().manual_seed(1)
    ids_a, ids_b = torch.randint(3, 200, (1, 7), generator=g), torch.randint(3, 200, (1, 7), generator=g)
    attn = {"gpt2": "transformer.h.0.attn", "gpt_neox": "gpt_neox.layers.0.attention"}[arch]

    model = make_tiny_model(arch)
    base_out = _attention_output(model, attn, ids_a)
    assert not torch.allclose(base_out[0, 0], base_out[0, -1])
    _swapper(model).apply([{"kind": "zero", "target": "v_proj", "layer": 0}])
    out_a, out_b = _attention_output(model, attn, ids_a), _attention_output(model, attn, ids_b)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_a[0], out_a[0, :1].expand_as(out_a[0]), rtol=1e-5, atol=1e-5)

    model = make_tiny_model(arch)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        before_a = model(ids_a, output_attentions=True).attentions[0]
        before_b = model(ids_b, output_attentions=True).attentions[0]
    assert not torch.allclose(before_a, before_b, atol=1e-3)
    _swapper(model).apply([{"kind": "zero", "target": "q_proj", "layer": 0},
                           {"kind": "zero", "target": "k_proj", "layer": 0}])
    with torch.no_grad():
        att_a = model(ids_a, output_attentions=True).attentions[0]
        att_b = model(ids_b, output_attentions=True).attentions[0]
    torch.testing.assert_close(att_a, att_b, rtol=1e-5, atol=1e-6)


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registration tests work on copies of the registries, so nothing leaks into other tests."""
    monkeypatch.setattr(targets_mod, "_REGISTRY", dict(targets_mod._REGISTRY))
    monkeypatch.setattr(targets_mod, "_BY_MODEL_TYPE", dict(targets_mod._BY_MODEL_TYPE))


def test_register_architecture_refuses_collisions(isolated_registry):
    with pytest.raises(ValueError, match="'llama' is already registered"):
        register_architecture(ArchSpec("llama", ("my_llama",), ("layers",), {"fc_in": TypeSlot("mlp.gate_proj")}))
    with pytest.raises(ValueError, match=r"\['gpt2'\] already registered by 'gpt2'"):
        register_architecture(ArchSpec("gpt2_clone", ("gpt2",), ("h",), {"fc_in": TypeSlot("mlp.c_fc")}))
    with pytest.raises(ValueError, match="unknown LASER types"):
        register_architecture(ArchSpec("bad", ("bad",), ("layers",), {"ffn_in": TypeSlot("mlp.x")}))
    assert "my_llama" not in supported_model_types()
    assert "gpt2_clone" not in targets_mod._REGISTRY


def test_registering_an_unknown_architecture_makes_it_editable(isolated_registry):
    model = make_tiny_model("llama")
    model.config.model_type = "custom_llm"
    with pytest.raises(TargetError, match="register_architecture"):
        describe(model)
    register_architecture(ArchSpec("custom", ("custom_llm",), ("nope", "layers"), {
        "fc_in": TypeSlot("mlp.up_proj"), "fc_out": TypeSlot("mlp.down_proj")}))
    d = describe(model)
    assert d.architecture == "custom" and d.num_layers == 3
    assert d.types["fc_in"].module == "model.layers.{layer}.mlp.up_proj"
    assert d.groups["mlp"] == ["fc_in", "fc_out"] and d.groups["attn"] == []
    # replace=True is the explicit way to override
    register_architecture(ArchSpec("custom", ("custom_llm",), ("layers",), {"fc_in": TypeSlot("mlp.gate_proj")}),
                          replace=True)
    assert describe(model).types["fc_in"].module == "model.layers.{layer}.mlp.gate_proj"


def test_no_layer_list_is_an_error_naming_the_paths(isolated_registry):
    model = make_tiny_model("llama")
    spec = ArchSpec("wrong", ("wrong",), ("blocks", "decoder.blocks"), {"fc_in": TypeSlot("mlp.gate_proj")})
    with pytest.raises(TargetError, match=r"none of the layer paths \('blocks', 'decoder.blocks'\)"):
        ModelTargets.of(model, spec)


def test_types_tuple_and_group_all_agree():
    assert GROUPS["all"] == TYPES
    assert set(GROUPS["mlp"]) | set(GROUPS["attn"]) == set(TYPES)
