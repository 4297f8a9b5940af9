"""The intervention spec: one edit (tau, l, rho) as users write it, in the paper's JSON form::

    {"kind": "laser", "target": "fc_in", "layer": 27, "rank_fraction": 0.01}

``kind`` defaults to ``laser``; ``target`` is a type or a group (``mlp``, ``attn``, ``all``); ``layer`` is an int, a
list, or a Python-style range string (``"20:30"``, ``"-5:"``, ``"all"``). A profile is a list of specs. This is
plain data (no torch): :mod:`laser_ops.interventions` turns specs into per-matrix edits of a loaded model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Tag, WithJsonSchema, field_validator, model_validator

from laser_protocol.validation import REQUEST_CONFIG, Int, IntRange

#: The LASER types: one weight matrix per layer each (where an architecture has it).
TYPES: tuple[str, ...] = ("fc_in", "fc_up", "fc_out", "q_proj", "k_proj", "v_proj", "out_proj")
#: Groups a spec's ``target`` may name instead of one type.
GROUPS: dict[str, tuple[str, ...]] = {
    "mlp": ("fc_in", "fc_up", "fc_out"),
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "all": TYPES,
}

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
            parse_layer_string(v, None)
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
            return parse_layer_string(self.layer, num_layers)
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


def parse_layer_string(text: str, num_layers: int | None) -> list[int]:
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


def parse_profile(items: Sequence[InterventionSpec | dict[str, Any]]) -> list[InterventionSpec]:
    """Specs from their JSON form (specs pass through)."""
    return [i if isinstance(i, InterventionSpec) else InterventionSpec.model_validate(i) for i in items]
