"""Typed, validated interventions and the per-matrix edits they expand to.

The JSON form is the paper's (tau, l, rho)::

    {"kind": "laser", "target": "fc_in", "layer": 27, "rank_fraction": 0.01}

``kind`` defaults to ``laser``; ``target`` is a type or a group (``mlp``, ``attn``, ``all``);
``layer`` is an int, a list, or a Python-style range string (``"20:30"``, ``"-5:"``, ``"all"``).
A profile is a list of specs; :func:`expand` turns it into one :class:`MatrixEdit` per matrix and
refuses two edits on the same matrix.

Each kind is an :class:`EditKind` registered by name (collisions refused); it knows how to turn
the original matrix (and its cached SVD) into the edited one, and, where one exists, its factored
form (:meth:`EditKind.factors`): the edited matrix as ``W`` minus or replaced by a rank-k product
``L @ R``, which serving applies per row without writing any weight.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, Tag, WithJsonSchema, field_validator, model_validator

from laser_ops.spectral import mp_rank
from laser_ops.svd import Decomposition
from laser_ops.targets import GROUPS, TYPES, ModelTargets, TargetError, TargetRef
from laser_ops.validation import REQUEST_CONFIG, Int, IntRange

EditKindName = Literal["laser", "laser_mp", "keep_bottom", "random_basis", "prune_magnitude", "zero"]
_RANKED = ("laser", "keep_bottom", "random_basis")


class InterventionError(ValueError):
    """An intervention that cannot be applied; ``loc`` is the JSON path of the offending field."""

    def __init__(self, message: str, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.loc = loc


#: Layer range strings: an int, Python slice syntax ``start:stop[:step]`` (step not 0), or ``all``.
LAYER_STRING_PATTERN = r"^(?:all|-?[0-9]{1,9}|-?[0-9]{0,9}:-?[0-9]{0,9}(?::(?:-?0{0,8}[1-9][0-9]{0,8})?)?)$"
_LAYER_STRING = re.compile(LAYER_STRING_PATTERN)
#: Seeds are signed 64-bit non-negative integers (what JSON clients and SQLite carry exactly).
MAX_SEED = 2**63 - 1

LayerSpec = Annotated[
    Int | Annotated[list[Int], Field(min_length=1, max_length=4096), Tag("list[int]")]
    | Annotated[str, WithJsonSchema({"type": "string", "pattern": LAYER_STRING_PATTERN}), Tag("str")],
    Field(description="0-based layer: an int (negative counts from the end), a non-empty list of ints, "
                      "a range string 'start:stop[:step]' (Python slice, e.g. '-5:'), or 'all'."),
]

_KNOB_TYPES = {"rank_fraction": "number", "rank": "integer", "energy": "number", "sparsity": "number"}


def _kind_alternative(kinds: Sequence[str], knob: str | None, *, kind_required: bool) -> dict[str, Any]:
    """One allowed combination of kind and knob: the knob given, every other knob absent or null."""
    props: dict[str, Any] = {"kind": {"enum": list(kinds)}}
    props.update({f: ({"type": t} if f == knob else {"type": "null"}) for f, t in _KNOB_TYPES.items()})
    required = ([knob] if knob else []) + (["kind"] if kind_required else [])
    return {"properties": props, "required": required}


#: The cross-field rule of :meth:`InterventionSpec._check_kind_fields`, in the JSON schema.
_KIND_RULES = {"anyOf": [
    *(_kind_alternative(_RANKED, knob, kind_required=False) for knob in ("rank_fraction", "rank", "energy")),
    _kind_alternative(("laser_mp", "zero"), None, kind_required=True),
    _kind_alternative(("prune_magnitude",), "sparsity", kind_required=True),
]}


class InterventionSpec(BaseModel):
    """One intervention (tau, l, rho) as users write it."""

    model_config = ConfigDict(**REQUEST_CONFIG, frozen=True, json_schema_extra=_KIND_RULES)

    kind: EditKindName = Field("laser", description=(
        "laser: keep the top-k singular components. laser_mp: k from the Marchenko-Pastur threshold "
        "(no data). keep_bottom: keep only what laser at the same rank discards (W - W_k). random_basis: "
        "project onto a seeded random rank-k subspace (control). prune_magnitude: zero the smallest-|w| "
        "fraction. zero: drop the matrix."))
    target: str = Field(..., description=f"LASER type {list(TYPES)} or group {list(GROUPS)}.",
                        json_schema_extra={"enum": [*TYPES, *GROUPS]})
    layer: LayerSpec
    rank_fraction: float | None = Field(None, gt=0, le=1, description=(
        "rho in (0, 1]: k = max(1, floor(rho * min(m, n))). For laser, keep_bottom, random_basis."))
    rank: IntRange(ge=1) | None = Field(None, description="Absolute rank k >= 1 (at most min(m, n) of each "
                                                          "matrix).")
    energy: float | None = Field(None, gt=0, le=1, description=(
        "Smallest k keeping this fraction of the sum of squared singular values, in (0, 1]."))
    sparsity: float | None = Field(None, ge=0, lt=1, description=(
        "prune_magnitude only: fraction of entries (smallest |w|) set to zero, in [0, 1)."))
    seed: Int = Field(0, ge=0, le=MAX_SEED, description="random_basis only: seed of the random subspace.")

    @field_validator("target")
    @classmethod
    def _check_target(cls, v: str) -> str:
        if v not in TYPES and v not in GROUPS:
            raise ValueError(f"target must be one of the types {list(TYPES)} or groups {list(GROUPS)}, "
                             f"got {v!r}")
        return v

    @field_validator("layer")
    @classmethod
    def _check_layer(cls, v: int | list[int] | str) -> int | list[int] | str:
        if isinstance(v, str):
            _parse_layer_string(v, None)
        return v

    @model_validator(mode="after")
    def _check_kind_fields(self) -> InterventionSpec:
        given = [f for f in ("rank_fraction", "rank", "energy") if getattr(self, f) is not None]
        if self.kind in _RANKED:
            if len(given) != 1:
                raise ValueError(f"kind {self.kind!r} needs exactly one of rank_fraction (0, 1], rank (>= 1) "
                                 f"or energy (0, 1]; got {given or 'none'}")
        elif given:
            raise ValueError(f"kind {self.kind!r} takes no {given[0]}")
        if self.kind == "prune_magnitude":
            if self.sparsity is None:
                raise ValueError("kind 'prune_magnitude' needs sparsity in [0, 1)")
        elif self.sparsity is not None:
            raise ValueError(f"sparsity only applies to kind 'prune_magnitude', not {self.kind!r}")
        return self

    def layers(self, num_layers: int) -> list[int]:
        """Concrete 0-based layers for a model with ``num_layers`` layers."""
        if isinstance(self.layer, str):
            return _parse_layer_string(self.layer, num_layers)
        items = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        if not items:
            raise InterventionError("layer list is empty", ("layer",))
        return items

    def edit_key(self) -> str:
        """What the edit does to one matrix, independent of where (used as a cache key)."""
        params = {k: v for k, v in self.model_dump(exclude={"target", "layer"}).items() if v is not None}
        if self.kind != "random_basis":
            params.pop("seed", None)
        return json.dumps(params, sort_keys=True)


def _parse_layer_string(text: str, num_layers: int | None) -> list[int]:
    if not _LAYER_STRING.fullmatch(text):
        raise ValueError(f"layer string {text!r} must be an int, 'start:stop[:step]' or 'all' (step not 0)")
    if text == "all":
        return list(range(num_layers)) if num_layers is not None else []
    parts = text.split(":")
    if len(parts) == 1:
        return [int(parts[0])]
    nums = [int(p) if p else None for p in parts]
    if num_layers is None:
        return []
    layers = list(range(num_layers))[slice(*nums)]
    if not layers:
        raise InterventionError(f"layer range {text!r} selects no layer of {num_layers}", ("layer",))
    return layers


# --- edit kinds --------------------------------------------------------------------------------

DecompositionProvider = Callable[[int | None, bool], Decomposition]
"""(min_rank, complete) -> the cached decomposition of the matrix being edited."""


@dataclass(frozen=True)
class EditResult:
    matrix: torch.Tensor
    k: int | None  # rank kept (None where rank is not the knob)


@dataclass(frozen=True)
class Factors:
    """An edited matrix in factored form: ``replace`` gives ``L @ R``, ``subtract`` gives ``W - L @ R``.

    ``left`` is (out, k) and ``right`` (k, in), float32; k may be 0 (``zero`` replaces ``W`` by nothing).
    Applying it to inputs costs k*(out + in) per row instead of out*in.
    """

    left: torch.Tensor
    right: torch.Tensor
    mode: Literal["replace", "subtract"]

    @property
    def rank(self) -> int:
        return int(self.right.shape[0])

    def matrix(self, w: torch.Tensor) -> torch.Tensor:
        """The dense edited matrix (float32)."""
        product = self.left @ self.right
        return product if self.mode == "replace" else w.to(torch.float32) - product


class EditKind(ABC):
    """What to override: :meth:`apply`. Registered by name with :func:`register_edit_kind`."""

    name: ClassVar[str]
    needs_svd: ClassVar[bool] = True

    @abstractmethod
    def apply(self, spec: InterventionSpec, w: torch.Tensor, svd: DecompositionProvider, ref: TargetRef) -> EditResult:
        """Return the edited logical matrix (float32, same shape as ``w``); never modify ``w``."""

    def factors(self, spec: InterventionSpec, w: torch.Tensor, svd: DecompositionProvider,
                ref: TargetRef) -> Factors | None:
        """The edit as :class:`Factors` (the same matrix :meth:`apply` builds), or None if it has no
        low-rank form (then it is served as a dense matrix)."""
        return None


_KINDS: dict[str, EditKind] = {}


def register_edit_kind(cls: type[EditKind]) -> type[EditKind]:
    if cls.name in _KINDS:
        raise ValueError(f"edit kind {cls.name!r} is already registered")
    _KINDS[cls.name] = cls()
    return cls


def edit_kind(name: str) -> EditKind:
    return _KINDS[name]


def rank_for(spec: InterventionSpec, shape: tuple[int, int], S: Callable[[], torch.Tensor]) -> int:
    """k for a ranked spec on an (m, n) matrix; errors name the field and the allowed range."""
    r = min(shape)
    if spec.rank is not None:
        if spec.rank > r:
            raise InterventionError(f"rank {spec.rank} out of range 1..{r} for a {shape[0]}x{shape[1]} matrix",
                                    ("rank",))
        return spec.rank
    if spec.rank_fraction is not None:
        # The epsilon keeps an exact product exact: 0.7 * 30 is 20.999999999999996 in floating point.
        return max(1, math.floor(spec.rank_fraction * r + 1e-9))
    assert spec.energy is not None
    s2 = S().double() ** 2
    cum = torch.cumsum(s2, 0) / s2.sum()
    return min(r, int(torch.searchsorted(cum, torch.tensor(spec.energy, dtype=cum.dtype) - 1e-12).item()) + 1)


def _top_factors(dec: Decomposition, k: int, mode: Literal["replace", "subtract"]) -> Factors:
    return Factors((dec.U[:, :k] * dec.S[:k]).to(torch.float32), dec.Vh[:k].to(torch.float32).contiguous(), mode)


@register_edit_kind
class LaserTopK(EditKind):
    name = "laser"

    def apply(self, spec, w, svd, ref):
        if spec.energy is not None:
            k = rank_for(spec, ref.shape, lambda: svd(None, True).S)
            return EditResult(svd(None, True).top(k), k)
        k = rank_for(spec, ref.shape, lambda: torch.empty(0))
        # Small ranks of large matrices may use a randomized decomposition (see SvdCache.get).
        return EditResult(svd(k, False).top(k), k)

    def factors(self, spec, w, svd, ref):
        if spec.energy is not None:
            dec = svd(None, True)
            k = rank_for(spec, ref.shape, lambda: dec.S)
        else:
            k = rank_for(spec, ref.shape, lambda: torch.empty(0))
            dec = svd(k, False)
        return _top_factors(dec, k, "replace")


@register_edit_kind
class LaserMarchenkoPastur(EditKind):
    name = "laser_mp"

    def apply(self, spec, w, svd, ref):
        dec = svd(None, True)
        k = max(1, mp_rank(dec.S, ref.shape))
        return EditResult(dec.top(k), k)

    def factors(self, spec, w, svd, ref):
        dec = svd(None, True)
        return _top_factors(dec, max(1, mp_rank(dec.S, ref.shape)), "replace")


@register_edit_kind
class KeepBottom(EditKind):
    name = "keep_bottom"

    def apply(self, spec, w, svd, ref):
        dec = svd(None, True)
        k = rank_for(spec, ref.shape, lambda: dec.S)
        return EditResult(dec.bottom(k), min(ref.shape) - k)

    def factors(self, spec, w, svd, ref):
        # W - W_k: the full matrix minus the components LASER at the same rank would keep.
        dec = svd(None, True)
        return _top_factors(dec, rank_for(spec, ref.shape, lambda: dec.S), "subtract")


@register_edit_kind
class RandomBasis(EditKind):
    name = "random_basis"
    needs_svd = False

    def apply(self, spec, w, svd, ref):
        f = self.factors(spec, w, svd, ref)
        return EditResult(f.left @ f.right, f.rank)

    def factors(self, spec, w, svd, ref):
        # W Q Q^T for a seeded random orthonormal Q (in x k): factors (W Q, Q^T).
        k = rank_for(spec, ref.shape, lambda: svd(None, True).S)
        g = torch.Generator(device="cpu").manual_seed(spec.seed ^ zlib.crc32(ref.key.encode()))
        q, _ = torch.linalg.qr(torch.randn(ref.shape[1], k, generator=g, dtype=torch.float64))
        q = q.to(torch.float32).to(w.device)
        return Factors(w.to(torch.float32) @ q, q.t().contiguous(), "replace")


@register_edit_kind
class PruneMagnitude(EditKind):
    name = "prune_magnitude"
    needs_svd = False

    def apply(self, spec, w, svd, ref):
        assert spec.sparsity is not None
        flat = w.to(torch.float32).flatten()
        n_keep = flat.numel() - math.floor(spec.sparsity * flat.numel())
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[torch.topk(flat.abs(), n_keep, sorted=False).indices] = True
        return EditResult((flat * mask).view_as(w), None)


@register_edit_kind
class Zero(EditKind):
    name = "zero"
    needs_svd = False

    def apply(self, spec, w, svd, ref):
        return EditResult(torch.zeros_like(w, dtype=torch.float32), 0)

    def factors(self, spec, w, svd, ref):
        m, n = ref.shape
        return Factors(w.new_zeros((m, 0), dtype=torch.float32), w.new_zeros((0, n), dtype=torch.float32), "replace")


# --- expansion ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixEdit:
    """One spec applied to one matrix; ``index`` is the spec's position in its profile."""

    ref: TargetRef
    spec: InterventionSpec
    index: int

    @property
    def key(self) -> str:
        return f"{self.ref.key}|{self.spec.edit_key()}"


def parse_profile(items: Sequence[InterventionSpec | dict[str, Any]]) -> list[InterventionSpec]:
    return [i if isinstance(i, InterventionSpec) else InterventionSpec.model_validate(i) for i in items]


def expand(specs: Sequence[InterventionSpec], targets: ModelTargets) -> list[MatrixEdit]:
    """One :class:`MatrixEdit` per matrix; errors carry the JSON location (``interventions[i].field``)."""
    edits: list[MatrixEdit] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        try:
            layers = spec.layers(targets.num_layers)
            refs = targets.resolve(spec.target, layers)
        except TargetError as e:
            raise InterventionError(str(e), (i, e.field)) from None
        except InterventionError as e:
            raise InterventionError(str(e), (i, *e.loc)) from None
        for ref in refs:
            if spec.rank is not None and spec.rank > min(ref.shape):
                raise InterventionError(
                    f"rank {spec.rank} out of range 1..{min(ref.shape)} for {ref.type} "
                    f"({ref.shape[0]}x{ref.shape[1]}) at layer {ref.layer}", (i, "rank"))
            if ref.key in seen:
                raise InterventionError(
                    f"{ref.type} at layer {ref.layer} ({ref.param_name}) is edited twice: by interventions[{seen[ref.key]}] "
                    f"and interventions[{i}]; give each matrix at most one edit", (i, "target"))
            seen[ref.key] = i
            edits.append(MatrixEdit(ref, spec, i))
    return edits
