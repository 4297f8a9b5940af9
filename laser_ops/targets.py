"""Where each LASER target matrix lives, per architecture.

Every place LASER may edit is a :class:`TargetRef`: one logical ``(out x in)`` matrix, possibly a
row-slice of a fused parameter (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) and possibly
stored transposed (GPT-2 ``Conv1D`` keeps ``in x out``). Architectures register an
:class:`ArchSpec` by name in a registry that refuses collisions; an unknown model can be served
by registering a spec with explicit module names (see :func:`register_architecture`).

Fused q/k/v: laser-serve edits the slice of the fused matrix that holds the requested
projection (q, k or v), so ``q_proj`` works on GPT-2 and GPT-NeoX exactly as on Llama.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from laser_protocol.interventions import GROUPS, TYPES

logger = logging.getLogger(__name__)



class TargetError(ValueError):
    """A target that cannot be resolved on this model; ``field`` names the offending spec field."""

    def __init__(self, message: str, field: str = "target") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class FusedSlice:
    """Which rows of a fused projection hold one of q/k/v.

    ``part`` is 0, 1, 2 for q, k, v. ``interleaved`` means the rows are laid out per head as
    ``[q_h, k_h, v_h]`` (GPT-NeoX); otherwise the three blocks are contiguous (GPT-2).
    """

    part: int
    interleaved: bool = False


@dataclass(frozen=True)
class TypeSlot:
    """One LASER type inside a layer: the module path relative to the layer and an optional fused slice."""

    module: str
    fused: FusedSlice | None = None


@dataclass(frozen=True)
class ArchSpec:
    """How to find LASER targets in one architecture family."""

    name: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]  # candidate paths of the layer ModuleList, relative to model.base_model
    types: dict[str, TypeSlot]
    num_heads_attr: str = "num_attention_heads"


@dataclass(frozen=True)
class TargetRef:
    """One editable logical matrix: ``shape`` is (out, in) whatever the storage orientation."""

    type: str
    layer: int
    module_name: str
    param_name: str
    shape: tuple[int, int]
    transposed: bool = False
    rows: tuple[int, ...] | None = None  # row indices of the logical matrix when it is a fused slice

    @property
    def key(self) -> str:
        """Stable identity of the matrix (used for caches and duplicate detection)."""
        return f"{self.param_name}" if self.rows is None else f"{self.param_name}[{self.type}]"

    def row_index(self, device: torch.device | None = None) -> torch.Tensor | None:
        if self.rows is None:
            return None
        return torch.tensor(self.rows, dtype=torch.long, device=device)


_REGISTRY: dict[str, ArchSpec] = {}
_BY_MODEL_TYPE: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec, *, replace: bool = False) -> ArchSpec:
    """Register an architecture. Refuses a name or model_type that is already taken unless ``replace``.

    Use this for a model laser-serve does not know: give the layer list path (relative to
    ``model.base_model``) and, per LASER type, the module path inside one layer, e.g.
    ``ArchSpec("falcon", ("falcon",), ("h",), {"fc_in": TypeSlot("mlp.dense_h_to_4h"),
    "fc_out": TypeSlot("mlp.dense_4h_to_h")})``.
    """
    unknown = set(spec.types) - set(TYPES)
    if unknown:
        raise ValueError(f"ArchSpec {spec.name!r} uses unknown LASER types {sorted(unknown)}; allowed: {TYPES}")
    if not replace:
        if spec.name in _REGISTRY:
            raise ValueError(f"architecture {spec.name!r} is already registered")
        taken = [t for t in spec.model_types if t in _BY_MODEL_TYPE]
        if taken:
            raise ValueError(f"model_type(s) {taken} already registered by {_BY_MODEL_TYPE[taken[0]].name!r}")
    _REGISTRY[spec.name] = spec
    for mt in spec.model_types:
        _BY_MODEL_TYPE[mt] = spec
    return spec


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


_LLAMA = {
    "fc_in": TypeSlot("mlp.gate_proj"),
    "fc_up": TypeSlot("mlp.up_proj"),
    "fc_out": TypeSlot("mlp.down_proj"),
    "q_proj": TypeSlot("self_attn.q_proj"),
    "k_proj": TypeSlot("self_attn.k_proj"),
    "v_proj": TypeSlot("self_attn.v_proj"),
    "out_proj": TypeSlot("self_attn.o_proj"),
}
register_architecture(ArchSpec("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo"), ("layers",), _LLAMA))
register_architecture(ArchSpec("gpt2", ("gpt2",), ("h",), {
    "fc_in": TypeSlot("mlp.c_fc"),
    "fc_out": TypeSlot("mlp.c_proj"),
    "q_proj": TypeSlot("attn.c_attn", FusedSlice(0)),
    "k_proj": TypeSlot("attn.c_attn", FusedSlice(1)),
    "v_proj": TypeSlot("attn.c_attn", FusedSlice(2)),
    "out_proj": TypeSlot("attn.c_proj"),
}))
register_architecture(ArchSpec("gptj", ("gptj",), ("h",), {
    "fc_in": TypeSlot("mlp.fc_in"),
    "fc_out": TypeSlot("mlp.fc_out"),
    "q_proj": TypeSlot("attn.q_proj"),
    "k_proj": TypeSlot("attn.k_proj"),
    "v_proj": TypeSlot("attn.v_proj"),
    "out_proj": TypeSlot("attn.out_proj"),
}))
register_architecture(ArchSpec("gpt_neox", ("gpt_neox",), ("layers",), {
    "fc_in": TypeSlot("mlp.dense_h_to_4h"),
    "fc_out": TypeSlot("mlp.dense_4h_to_h"),
    "q_proj": TypeSlot("attention.query_key_value", FusedSlice(0, interleaved=True)),
    "k_proj": TypeSlot("attention.query_key_value", FusedSlice(1, interleaved=True)),
    "v_proj": TypeSlot("attention.query_key_value", FusedSlice(2, interleaved=True)),
    "out_proj": TypeSlot("attention.dense"),
}))
register_architecture(ArchSpec("opt", ("opt",), ("decoder.layers",), {
    "fc_in": TypeSlot("fc1"),
    "fc_out": TypeSlot("fc2"),
    "q_proj": TypeSlot("self_attn.q_proj"),
    "k_proj": TypeSlot("self_attn.k_proj"),
    "v_proj": TypeSlot("self_attn.v_proj"),
    "out_proj": TypeSlot("self_attn.out_proj"),
}))
register_architecture(ArchSpec("phi", ("phi",), ("layers",), {
    "fc_in": TypeSlot("mlp.fc1"),
    "fc_out": TypeSlot("mlp.fc2"),
    "q_proj": TypeSlot("self_attn.q_proj"),
    "k_proj": TypeSlot("self_attn.k_proj"),
    "v_proj": TypeSlot("self_attn.v_proj"),
    "out_proj": TypeSlot("self_attn.dense"),
}))
register_architecture(ArchSpec("bert", ("bert", "roberta"), ("encoder.layer",), {
    "fc_in": TypeSlot("intermediate.dense"),
    "fc_out": TypeSlot("output.dense"),
    "q_proj": TypeSlot("attention.self.query"),
    "k_proj": TypeSlot("attention.self.key"),
    "v_proj": TypeSlot("attention.self.value"),
    "out_proj": TypeSlot("attention.output.dense"),
}))


def arch_spec_for(model: nn.Module) -> ArchSpec:
    """The registered spec for this model, or an error listing the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = _BY_MODEL_TYPE.get(str(model_type))
    if spec is None:
        raise TargetError(
            f"unsupported architecture {model_type!r}; supported model_types: {', '.join(supported_model_types())}. "
            "To edit another architecture, register its module names with "
            "laser_ops.targets.register_architecture(ArchSpec(name, (model_type,), (layers_path,), "
            "{'fc_in': TypeSlot('mlp.up'), ...})), or pass an ArchSpec JSON file to the server (--arch-spec).",
            field="model",
        )
    return spec


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@dataclass
class ModelTargets:
    """All LASER targets of one model, resolved once (module lookups are not free)."""

    model: nn.Module
    spec: ArchSpec
    layer_prefix: str
    num_layers: int
    _param_names: dict[int, str] = field(default_factory=dict, repr=False)
    _refs: dict[tuple[str, int], TargetRef] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, model: nn.Module, spec: ArchSpec | None = None) -> ModelTargets:
        spec = spec or arch_spec_for(model)
        base = getattr(model, "base_model", model)
        base_prefix = next((n for n, m in model.named_modules() if m is base), "")
        for path in spec.layers:
            try:
                layers = base.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(layers, nn.ModuleList):
                prefix = f"{base_prefix}.{path}" if base_prefix else path
                names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
                return cls(model, spec, prefix, len(layers), names)
        raise TargetError(f"{spec.name}: none of the layer paths {spec.layers} is a ModuleList on this model", field="model")

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(t for t in TYPES if t in self.spec.types)

    def expand_types(self, target: str) -> tuple[str, ...]:
        """A type or a group name -> the types this architecture has."""
        if target in GROUPS:
            found = tuple(t for t in GROUPS[target] if t in self.spec.types)
            if not found:
                raise TargetError(f"architecture {self.spec.name!r} has no type of group {target!r}; "
                                  f"its types are {list(self.types)}")
            return found
        if target not in TYPES:
            raise TargetError(
                f"unknown target {target!r}; allowed: types {list(TYPES)} or groups {list(GROUPS)}")
        if target not in self.spec.types:
            raise TargetError(
                f"architecture {self.spec.name!r} has no {target!r}; its types are {list(self.types)}")
        return (target,)

    def normalize_layers(self, layers: int | Iterable[int]) -> list[int]:
        """0-based layer indexes; negatives count from the end. Errors name the allowed range."""
        items = [layers] if isinstance(layers, int) else list(layers)
        out: list[int] = []
        n = self.num_layers
        for i in items:
            if not -n <= int(i) < n:
                raise TargetError(f"layer {i} out of range: allowed {-n}..{n - 1} ({n} layers)", field="layer")
            j = int(i) % n
            if j not in out:
                out.append(j)
        return out

    def ref(self, type_: str, layer: int) -> TargetRef:
        slot = self.spec.types.get(type_)
        if slot is None:
            raise TargetError(f"architecture {self.spec.name!r} has no {type_!r}; its types are {list(self.types)}")
        (layer,) = self.normalize_layers(layer)
        cached = self._refs.get((type_, layer))
        if cached is not None:  # every apply re-expands its profile: resolve each matrix once
            return cached
        module_name = f"{self.layer_prefix}.{layer}.{slot.module}"
        module = self.model.get_submodule(module_name)
        weight = module.weight
        transposed = _is_conv1d(module)
        out_dim, in_dim = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        rows = None
        if slot.fused is not None:
            rows = self._fused_rows(out_dim, slot.fused)
            out_dim = len(rows)
        param_name = self._param_names.get(id(weight), f"{module_name}.weight")
        ref = TargetRef(type_, layer, module_name, param_name, (int(out_dim), int(in_dim)), transposed, rows)
        self._refs[(type_, layer)] = ref
        return ref

    def _fused_rows(self, fused_out: int, fused: FusedSlice) -> tuple[int, ...]:
        block = fused_out // 3
        if not fused.interleaved:
            return tuple(range(fused.part * block, (fused.part + 1) * block))
        heads = int(getattr(self.model.config, self.spec.num_heads_attr))
        head_size = block // heads
        return tuple(
            h * 3 * head_size + fused.part * head_size + i for h in range(heads) for i in range(head_size)
        )

    def resolve(self, target: str, layers: int | Iterable[int]) -> list[TargetRef]:
        return [self.ref(t, layer) for layer in self.normalize_layers(layers) for t in self.expand_types(target)]

    def all_refs(self) -> list[TargetRef]:
        return self.resolve("all", range(self.num_layers))

    def describe(self) -> ModelDescription:
        types = {}
        for t in self.types:
            r = self.ref(t, 0)
            module_template = r.module_name.replace(f"{self.layer_prefix}.0.", f"{self.layer_prefix}.{{layer}}.", 1)
            types[t] = TypeDescription(
                module=module_template, shape=r.shape,
                fused=r.rows is not None, stored_transposed=r.transposed)
        return ModelDescription(
            architecture=self.spec.name,
            model_type=str(self.model.config.model_type),
            num_layers=self.num_layers,
            types=types,
            groups={g: [t for t in ts if t in self.spec.types] for g, ts in GROUPS.items()},
        )


@dataclass(frozen=True)
class TypeDescription:
    module: str
    shape: tuple[int, int]
    fused: bool
    stored_transposed: bool


@dataclass(frozen=True)
class ModelDescription:
    architecture: str
    model_type: str
    num_layers: int
    types: dict[str, TypeDescription]
    groups: dict[str, list[str]]


def describe(model: nn.Module) -> ModelDescription:
    """Layer count and each LASER type's module (``{layer}`` placeholder) and logical (out, in) shape."""
    return ModelTargets.of(model).describe()


# --- reading and writing the logical matrix --------------------------------------------------


def read_matrix(param: torch.Tensor, ref: TargetRef) -> torch.Tensor:
    """The logical (out x in) matrix of ``ref`` as a view/copy of ``param`` (never modifies it)."""
    w = param.detach()
    if ref.transposed:
        w = w.t()
    if ref.rows is not None:
        w = w.index_select(0, ref.row_index(w.device))
    return w


def write_matrix(full: torch.Tensor, ref: TargetRef, logical: torch.Tensor) -> None:
    """Write a logical (out x in) matrix into ``full`` (a tensor shaped like the stored parameter)."""
    view = full.t() if ref.transposed else full
    if ref.rows is None:
        view.copy_(logical)
    else:
        view.index_copy_(0, ref.row_index(view.device), logical.to(view.dtype))
