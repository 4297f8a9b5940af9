"""Profiles served per row: each row of a batch gets its own profile's output, no weight is written.

The model keeps its base weights live. A profile is compiled once into :class:`RowEdit` objects, one
per edited matrix: for a LASER edit (and ``laser_mp``, ``random_basis``, ``keep_bottom``, ``zero``)
the cached factors of the edited matrix, so the rows of that profile compute

    replace:   y = ((x · Rᵀ) · Lᵀ) + b          (W_k = L·R, e.g. L = U_k·S_k, R = V_kᵀ)
    subtract:  y = W·x + b − (x · Rᵀ) · Lᵀ       (keep_bottom: W − W_k)

on only the modules the profile changes; kinds with no low-rank form (``prune_magnitude``), and ranks
so high that factors cost more than the matrix, carry the dense edited matrix instead. A forward hook
on each edited module (:class:`RowRouter`) overwrites the base output of exactly the rows tagged with
that profile; rows of other profiles and base rows are untouched. Any number of profiles share one
copy of the base weights and one batch.

Fused q/k/v slices (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) edit only their output features;
GPT-2 ``Conv1D`` and models that flatten (batch, seq) before a module (OPT) are handled.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from laser_ops.interventions import InterventionError, MatrixEdit, edit_kind
from laser_ops.swap import ProfileLike, WeightSwapper, profile_signature

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowEdit:
    """How the rows of one profile compute (part of) one module's output."""

    out_index: torch.Tensor | None  # output features this edit owns (a fused slice); None: all of them
    mode: Literal["replace", "subtract"]
    left: torch.Tensor | None = None  # (out, k)
    right: torch.Tensor | None = None  # (k, in)
    dense: torch.Tensor | None = None  # (out, in): the edited matrix itself, when factors do not pay
    bias: torch.Tensor | None = None  # (out,) the module's bias over ``out_index`` (replace mode)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.left, self.right, self.dense, self.bias)
                   if t is not None)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The edit's term for inputs ``x`` (..., in): ``L·R·x`` or ``W_edit·x``."""
        if self.dense is not None:
            return F.linear(x, self.dense)
        assert self.left is not None and self.right is not None
        if self.right.shape[0] == 0:
            return x.new_zeros((*x.shape[:-1], self.left.shape[0]))
        return F.linear(F.linear(x, self.right), self.left)

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The module output for inputs ``x`` given its base output ``out`` (updated in place where it can be)."""
        y = self.product(x).to(out.dtype)
        if self.mode == "replace":
            if self.bias is not None:
                y = y + self.bias
            if self.out_index is None:
                return y
            out[..., self.out_index] = y
            return out
        if self.out_index is None:
            return out.sub_(y)
        out[..., self.out_index] -= y
        return out


@dataclass
class CompiledProfile:
    """A profile ready to serve: its edits by module name, and a content hash of what it does."""

    key: str
    edits: dict[str, list[RowEdit]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for edits in self.edits.values() for e in edits)

    @property
    def empty(self) -> bool:
        return not self.edits


def _module_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, torch.Tensor) else None


def compile_profile(swapper: WeightSwapper, specs: ProfileLike, key: str) -> CompiledProfile:
    """Turn ``specs`` into per-row edits. Safe off the owner thread: it reads base matrices with
    :meth:`WeightSwapper.original_copy` and decomposes them on the SVD cache's device.

    A factored edit is used when ``k·(out + in) < out·in``; otherwise the dense edited matrix is
    cheaper to apply. Raises :class:`InterventionError` for an invalid profile (before anything is kept).
    """
    model = swapper.model
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    compiled = CompiledProfile(key)
    for edit in swapper.plan(specs):
        compiled.edits.setdefault(edit.ref.module_name, []).append(
            _compile_edit(swapper, edit, model.get_submodule(edit.ref.module_name), device, dtype))
    return compiled


def _compile_edit(swapper: WeightSwapper, edit: MatrixEdit, module: nn.Module, device: torch.device,
                  dtype: torch.dtype) -> RowEdit:
    ref = edit.ref
    if not isinstance(module, nn.Linear) and type(module).__name__ != "Conv1D":
        raise InterventionError(f"{ref.module_name} is a {type(module).__name__}; per-row profiles need Linear "
                                "or Conv1D modules", (edit.index, "target"))
    w = swapper.original_copy(ref, swapper.svd_cache.device)
    kind = edit_kind(edit.spec.kind)

    def provider(min_rank: int | None, complete: bool) -> Any:
        exact = complete or swapper.svd_method == "exact"
        return swapper.svd_cache.get(ref.key, w, min_rank=min_rank, complete=exact)

    factors = kind.factors(edit.spec, w, provider, ref)
    out_index = ref.row_index(device)
    bias = _module_bias(module)
    if bias is not None and out_index is not None:
        bias = bias.index_select(0, out_index)
    m, n = ref.shape
    if factors is not None and factors.rank * (m + n) < m * n:
        left, right, mode = factors.left, factors.right, factors.mode
        _check_finite(edit, left, right)
        return RowEdit(out_index, mode, left=left.to(device, dtype), right=right.to(device, dtype),
                       bias=bias if mode == "replace" else None)
    dense = factors.matrix(w) if factors is not None else kind.apply(edit.spec, w, provider, ref).matrix
    _check_finite(edit, dense)
    return RowEdit(out_index, "replace", dense=dense.to(device, dtype), bias=bias)


def _check_finite(edit: MatrixEdit, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise InterventionError(f"interventions[{edit.index}] produced non-finite values in "
                                    f"{edit.ref.param_name}", (edit.index,))


def profile_hash(specs: ProfileLike) -> str:
    """Short content hash of a profile's interventions (order-independent): names the weights that served."""
    return hashlib.sha256(profile_signature(specs).encode()).hexdigest()[:12]


class RowRouter:
    """Forward hooks that give each row of a forward pass its own profile's output.

    :meth:`add` registers a compiled profile (hooks go on the modules it edits); inside
    :meth:`route` (one forward pass, row tags in batch order) each hooked module rewrites the output
    rows of tags that have edits there. Outside :meth:`route` the hooks do nothing, so other work on
    the model (sweeps, swaps, exports) sees the plain model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._profiles: dict[Hashable, CompiledProfile] = {}
        self._by_module: dict[str, dict[Hashable, list[RowEdit]]] = {}
        self._handles: dict[str, Any] = {}
        self._rows: dict[Hashable, torch.Tensor] | None = None
        self._n_rows = 0
        self._flat: dict[tuple[Hashable, int], torch.Tensor] = {}

    # -- profiles ---------------------------------------------------------------------------------

    def __contains__(self, tag: Hashable) -> bool:
        return tag in self._profiles

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._profiles.values())

    def tags(self) -> list[Hashable]:
        return list(self._profiles)

    def add(self, tag: Hashable, profile: CompiledProfile) -> None:
        self.remove(tag)
        self._profiles[tag] = profile
        for module_name, edits in profile.edits.items():
            self._by_module.setdefault(module_name, {})[tag] = edits
            if module_name not in self._handles:
                module = self.model.get_submodule(module_name)
                self._handles[module_name] = module.register_forward_hook(
                    lambda mod, args, out, _name=module_name: self._hook(_name, args, out))

    def remove(self, tag: Hashable) -> None:
        profile = self._profiles.pop(tag, None)
        if profile is None:
            return
        for module_name in profile.edits:
            per_tag = self._by_module.get(module_name, {})
            per_tag.pop(tag, None)
            if not per_tag:
                self._by_module.pop(module_name, None)
                handle = self._handles.pop(module_name, None)
                if handle is not None:
                    handle.remove()

    def close(self) -> None:
        for tag in list(self._profiles):
            self.remove(tag)

    # -- routing ----------------------------------------------------------------------------------

    @contextmanager
    def route(self, tags: Sequence[Hashable]) -> Iterator[None]:
        """Row ``i`` of the forward passes inside the block belongs to ``tags[i]``."""
        device = next(self.model.parameters()).device
        positions: dict[Hashable, list[int]] = {}
        for i, tag in enumerate(tags):
            if tag in self._profiles and not self._profiles[tag].empty:
                positions.setdefault(tag, []).append(i)
        self._rows = {tag: torch.tensor(rows, dtype=torch.long, device=device) for tag, rows in positions.items()}
        self._n_rows = len(tags)
        self._flat = {}
        try:
            yield
        finally:
            self._rows = None

    def _indices(self, tag: Hashable, leading: int) -> torch.Tensor | None:
        """Indices along dim 0 of a module input: batch rows, or the row-major tokens of those rows when a
        model flattens (batch, seq) into one dimension before the module (OPT does)."""
        assert self._rows is not None
        rows = self._rows.get(tag)
        if rows is None or leading == self._n_rows:
            return rows
        if self._n_rows == 0 or leading % self._n_rows:
            raise RuntimeError(f"cannot map {leading} leading positions onto {self._n_rows} rows")
        seq = leading // self._n_rows
        key = (tag, seq)
        if key not in self._flat:
            self._flat[key] = (rows[:, None] * seq + torch.arange(seq, device=rows.device)).reshape(-1)
        return self._flat[key]

    def _hook(self, module_name: str, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        if not self._rows:
            return None
        x = args[0]
        for tag, edits in self._by_module.get(module_name, {}).items():
            rows = self._indices(tag, x.shape[0])
            if rows is None:
                continue
            sub_x, sub_out = x.index_select(0, rows), out.index_select(0, rows)  # copies: safe to edit
            for edit in edits:
                sub_out = edit.apply(sub_x, sub_out)
            out.index_copy_(0, rows, sub_out)
        return out
