"""Intervention kinds and the per-matrix edits a profile expands to.

The spec users write (:class:`InterventionSpec`, the paper's (tau, l, rho) as JSON) is plain data in
:mod:`laser_protocol.interventions` and re-exported here; :func:`expand` turns a profile (a list of specs) into one
:class:`MatrixEdit` per matrix of a loaded model and refuses two edits on the same matrix.

Each kind is an :class:`EditKind` registered by name (collisions refused); it knows how to turn
the original matrix (and its cached SVD) into the edited one, and, where one exists, its factored
form (:meth:`EditKind.factors`): the edited matrix as ``W`` minus or replaced by a rank-k product
``L @ R``, which serving applies per row without writing any weight.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from laser_ops.spectral import mp_rank
from laser_ops.svd import Decomposition
from laser_ops.targets import ModelTargets, TargetError, TargetRef
from laser_protocol.interventions import (
    GROUPS,
    LAYER_STRING_PATTERN,
    MAX_SEED,
    TYPES,
    EditKindName,
    InterventionError,
    InterventionSpec,
    LayerSpec,
    parse_layer_string,
    parse_profile,
)

__all__ = ["GROUPS", "LAYER_STRING_PATTERN", "MAX_SEED", "TYPES", "DecompositionProvider", "EditKind",
           "EditKindName", "EditResult", "Factors", "InterventionError", "InterventionSpec", "LayerSpec",
           "MatrixEdit", "edit_kind", "expand", "parse_layer_string", "parse_profile", "rank_for",
           "register_edit_kind"]

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
