"""Reversible weight swaps: apply a profile to the live model and restore the base bit for bit.

State lives in one place, ``WeightSwapper.applied`` (parameter name -> signature of the edits now
live in it); "is base" is derived from it being empty. Originals of every touched parameter are
cloned to CPU the first time they are touched; restoring copies them back, so ``revert()`` is
exact in any dtype (unlike merge/unmerge by subtraction).

Edited tensors are materialised once per (parameter, edits) and kept in an LRU bounded in bytes;
applying a cached profile is a tensor copy, never an SVD. Switching from profile A to B writes only
the parameters whose signatures differ. Everything a new apply needs is built and checked for
non-finite values *before* the first write, so a failed apply leaves the model as it was.

Thread-safety contract: a ``WeightSwapper`` is NOT thread-safe. Exactly one owner thread may call
``apply``/``revert``/``applied_profile`` and must also be the only thread running forward passes
on the model (a forward pass concurrent with a swap sees a mix of weights). The server's engine
thread is that owner; other threads submit work to it. The one exception is
:meth:`WeightSwapper.original_copy`, which any thread may call (it reads under a lock that swaps
hold while they write), so decompositions can be computed off the owner thread.

``bytes_written`` counts every byte copied into the model's parameters, so a caller can prove that
some work (serving factored profiles, say) wrote none.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from laser_ops.interventions import InterventionError, InterventionSpec, MatrixEdit, edit_kind, expand, parse_profile
from laser_ops.spectral import SpectrumReport, spectrum_report
from laser_ops.svd import Decomposition, SvdCache
from laser_ops.targets import ModelTargets, TargetRef, read_matrix, write_matrix

logger = logging.getLogger(__name__)

ProfileLike = Sequence[InterventionSpec | dict[str, Any]]


@dataclass(frozen=True)
class SwapStats:
    """What one apply did (the server exports these as metrics)."""

    written: int  # parameters copied into the model
    materialized: int  # edited tensors built (cache misses)
    svds: int  # decompositions computed
    seconds: float


@dataclass(frozen=True)
class EditReport:
    """Dry-run figures for one edited matrix."""

    index: int
    type: str
    layer: int
    param_name: str
    shape: tuple[int, int]
    kind: str
    k: int | None
    retained_energy: float | None
    frobenius_error: float
    relative_frobenius_error: float


@dataclass(frozen=True)
class DecompositionJob:
    """One SVD that applying or dry-running a profile would compute, with a CPU copy of the original matrix.

    The copy makes the job independent of the live model: :meth:`run` is safe on any thread while the owner
    thread keeps swapping and serving, and the cache it fills is then hit by the owner's apply or dry run.
    """

    key: str
    matrix: torch.Tensor  # the logical original matrix, float32, on CPU

    def run(self, cache: SvdCache) -> None:
        cache.get(self.key, self.matrix.to(cache.device), complete=True)


@dataclass
class _Prepared:
    signatures: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    reports: list[EditReport] = field(default_factory=list)
    materialized: int = 0


def _all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()``, fast: a finite sum proves it (NaN and inf propagate through a sum);
    only a non-finite sum (a real NaN/inf, or finite values summing past the dtype's range) pays for the
    elementwise check, which costs ~30x more than the sum and more than the rest of a materialisation."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def profile_signature(specs: ProfileLike) -> str:
    """Content hash of a profile (order-independent)."""
    keys = sorted(s.model_dump_json() for s in parse_profile(specs))
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


class WeightSwapper:
    """Owns reversible edits of one model. See the module docstring for the threading contract."""

    def __init__(
        self,
        model: nn.Module,
        *,
        svd_cache: SvdCache,
        max_cache_bytes: int = 1 << 30,
        targets: ModelTargets | None = None,
        cache_device: str | torch.device = "cpu",
        svd_method: str = "exact",
    ) -> None:
        self.model = model
        self.targets = targets or ModelTargets.of(model)
        self.svd_cache = svd_cache
        self.max_cache_bytes = max_cache_bytes
        self.cache_device = torch.device(cache_device)
        self.svd_method = svd_method
        self._params: dict[str, nn.Parameter] = dict(model.named_parameters(remove_duplicate=False))
        self._originals: dict[str, torch.Tensor] = {}
        self._edited: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._edited_bytes = 0
        self.applied: dict[str, str] = {}  # param name -> signature live in the model (the one source of truth)
        self.current: list[InterventionSpec] = []  # the specs that produced ``applied``
        self.bytes_written = 0  # bytes copied into model parameters, ever (apply, revert, rollback)
        self._write_lock = threading.RLock()  # held while parameters or ``_originals`` change

    # -- state ---------------------------------------------------------------------------------

    @property
    def is_base(self) -> bool:
        return not self.applied

    @property
    def cached_bytes(self) -> int:
        """Bytes held by materialised edited tensors (originals not included)."""
        return self._edited_bytes

    @property
    def originals_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._originals.values())

    # -- planning --------------------------------------------------------------------------------

    def plan(self, specs: ProfileLike) -> list[MatrixEdit]:
        """Validate a profile against this model and expand it to per-matrix edits."""
        return expand(parse_profile(specs), self.targets)

    def missing_decompositions(self, specs: ProfileLike) -> list[DecompositionJob]:
        """The decompositions ``specs`` need that the SVD cache does not hold, as jobs any thread may run.

        Call on the owner thread (it reads the live weights, which only that thread may swap); it only copies
        matrices, so it is quick. Dry runs need the complete SVD of every matrix whose kind uses one, and so
        does ``apply`` (exact method), so those are what is asked for.
        """
        jobs: dict[str, DecompositionJob] = {}
        for edit in self.plan(specs):
            if not (edit_kind(edit.spec.kind).needs_svd or edit.spec.energy is not None):
                continue
            key = edit.ref.key
            if key in jobs or self.svd_cache.has(key, complete=True):
                continue
            jobs[key] = DecompositionJob(key, self.original_matrix(edit.ref).to("cpu", torch.float32, copy=True))
        return list(jobs.values())

    def original_matrix(self, ref: TargetRef) -> torch.Tensor:
        """The base (unedited) logical matrix of ``ref``: the live parameter while it is unedited, else the CPU copy."""
        name = ref.param_name
        source = self._originals[name] if name in self.applied else self._params[name]
        return read_matrix(source, ref)

    def original_copy(self, ref: TargetRef, device: str | torch.device = "cpu") -> torch.Tensor:
        """A float32 copy of the base logical matrix of ``ref`` on ``device``; safe from any thread."""
        with self._write_lock:
            return self.original_matrix(ref).to(device=device, dtype=torch.float32, copy=True)

    def _materialize_param(self, name: str, edits: list[MatrixEdit], prepared: _Prepared, report: bool) -> torch.Tensor:
        param = self._params[name]
        # Work where the model lives (a GPU decomposes and reconstructs far faster than the CPU copy would).
        source = self._originals[name] if name in self.applied else param.detach()
        full = source.to(param.device, torch.float32, copy=True)
        for edit in edits:
            w = self.original_matrix(edit.ref).to(param.device, torch.float32)
            kind = edit_kind(edit.spec.kind)

            def provider(min_rank: int | None, complete: bool, _ref: TargetRef = edit.ref, _w: torch.Tensor = w):
                exact = complete or self.svd_method == "exact"
                return self.svd_cache.get(_ref.key, _w, min_rank=min_rank, complete=exact)

            result = kind.apply(edit.spec, w, provider, edit.ref)
            new = result.matrix.to(full.device, torch.float32)
            if not _all_finite(new):
                raise InterventionError(
                    f"interventions[{edit.index}] produced non-finite values in {edit.ref.param_name}; "
                    "the model was left unchanged", (edit.index,))
            write_matrix(full, edit.ref, new)
            if report:
                S = self.svd_cache.get(edit.ref.key, w, complete=True).S if kind.needs_svd else None
                prepared.reports.append(self._report(edit, w, new.to(w.device), result.k, S))
        out = full.to(device=self.cache_device, dtype=param.dtype)
        if out.dtype != torch.float32 and out.is_floating_point() and not _all_finite(out):
            # finite in float32 is not enough: a value past the dtype's range becomes inf (fp16: > 65504)
            indexes = sorted({e.index for e in edits})
            raise InterventionError(
                f"interventions{indexes} overflow {param.dtype} in {name} (non-finite after conversion); "
                "the model was left unchanged", (indexes[0],))
        return out

    @staticmethod
    def _report(edit: MatrixEdit, w: torch.Tensor, new: torch.Tensor, k: int | None,
                S: torch.Tensor | None) -> EditReport:
        diff = torch.linalg.matrix_norm(w.double() - new.double()).item()
        base = torch.linalg.matrix_norm(w.double()).item()
        retained = None
        if k is not None and S is not None and edit.spec.kind in ("laser", "laser_mp", "keep_bottom"):
            s2 = S.double() ** 2
            kept = s2[:k].sum() if edit.spec.kind != "keep_bottom" else s2[len(s2) - k:].sum()
            retained = (kept / s2.sum()).item()
        return EditReport(edit.index, edit.ref.type, edit.ref.layer, edit.ref.param_name, edit.ref.shape,
                          edit.spec.kind, k, retained, diff, diff / base if base > 0 else 0.0)

    def _prepare(self, specs: ProfileLike, *, report: bool = False, use_cache: bool = True) -> _Prepared:
        edits = self.plan(specs)
        by_param: dict[str, list[MatrixEdit]] = {}
        for e in edits:
            by_param.setdefault(e.ref.param_name, []).append(e)
        prepared = _Prepared()
        for name, group in by_param.items():
            group.sort(key=lambda e: e.ref.key)
            sig = "+".join(e.key for e in group)
            prepared.signatures[name] = sig
            cached = self._edited.get((name, sig)) if use_cache and not report else None
            if cached is not None:
                self._edited.move_to_end((name, sig))
                prepared.tensors[name] = cached
                continue
            prepared.tensors[name] = self._materialize_param(name, group, prepared, report)
            prepared.materialized += 1
        return prepared

    def dry_run(self, specs: ProfileLike) -> list[EditReport]:
        """Per-matrix k, retained energy and Frobenius error, without touching the model."""
        return self._prepare(specs, report=True, use_cache=False).reports

    def factors(self, ref: TargetRef) -> Decomposition:
        """The complete SVD of the base matrix ``ref`` from the shared cache (per-row ranks slice it)."""
        return self.svd_cache.get(ref.key, self.original_matrix(ref).to(torch.float32), complete=True)

    def singular_values(self, type_: str, layer: int) -> torch.Tensor:
        """All singular values of one base matrix, descending (from the SVD cache, decomposed once)."""
        ref = self.targets.ref(type_, layer)
        return self.svd_cache.get(ref.key, self.original_matrix(ref).to(torch.float32), complete=True).S

    def spectrum(self, type_: str, layer: int, k: int | None = None) -> SpectrumReport:
        """Data-free diagnostics of one base matrix (uses the SVD cache)."""
        return spectrum_report(self.singular_values(type_, layer), self.targets.ref(type_, layer).shape, k)

    # -- applying --------------------------------------------------------------------------------

    def apply(self, specs: ProfileLike) -> SwapStats:
        """Make the model hold exactly ``specs`` (base weights everywhere else)."""
        t0 = time.perf_counter()
        svds0 = self.svd_cache.computed
        prepared = self._prepare(specs)  # may raise: nothing has been written yet
        for name in prepared.signatures:
            if name not in self._originals:
                with self._write_lock:
                    self._originals[name] = self._params[name].detach().to("cpu", copy=True)
        writes = [(n, prepared.signatures[n], prepared.tensors[n]) for n in prepared.signatures
                  if self.applied.get(n) != prepared.signatures[n]]
        restores = [n for n in self.applied if n not in prepared.signatures]
        previous = dict(self.applied)
        done: list[str] = []
        with self._write_lock:
            try:
                with torch.no_grad():
                    for name in restores:
                        self._write(name, self._originals[name])
                        done.append(name)
                    for name, _sig, tensor in writes:
                        self._write(name, tensor)
                        done.append(name)
            except BaseException:
                logger.exception("swap failed after %d writes; restoring the previous state", len(done))
                self._restore(previous, done)
                raise
            for name in restores:
                del self.applied[name]
            for name, sig, _tensor in writes:
                self.applied[name] = sig
        for name, sig, tensor in writes:  # after marking them live, so the LRU cannot evict them
            self._remember(name, sig, tensor)
        self.current = parse_profile(specs)
        stats = SwapStats(len(writes) + len(restores), prepared.materialized,
                          self.svd_cache.computed - svds0, time.perf_counter() - t0)
        logger.debug("applied profile: %s", stats)
        return stats

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        param = self._params[name]
        param.copy_(tensor)
        self.bytes_written += param.numel() * param.element_size()

    def _restore(self, previous: dict[str, str], names: list[str]) -> None:
        with torch.no_grad():
            for name in names:
                sig = previous.get(name)
                tensor = self._originals[name] if sig is None else self._edited.get((name, sig))
                if tensor is None:  # cannot happen: live signatures are pinned in the LRU
                    raise RuntimeError(f"lost the tensor for live edit {name}; model state is undefined")
                self._write(name, tensor)

    def revert(self) -> SwapStats:
        """Restore the base model bit for bit."""
        return self.apply([])

    def _remember(self, name: str, sig: str, tensor: torch.Tensor) -> None:
        key = (name, sig)
        if key in self._edited:
            self._edited.move_to_end(key)
            return
        self._edited[key] = tensor
        self._edited_bytes += tensor.numel() * tensor.element_size()
        live = set(self.applied.items())
        for old in list(self._edited):
            if self._edited_bytes <= self.max_cache_bytes:
                break
            if old in live:  # never evict what is in the model: rollback needs it
                continue
            evicted = self._edited.pop(old)
            self._edited_bytes -= evicted.numel() * evicted.element_size()

    def materialize(self, specs: ProfileLike) -> dict[str, torch.Tensor]:
        """The parameters that differ between the live model and the base with ``specs`` applied, without
        writing any: the edited tensors of ``specs``, and the originals of whatever else is live now.

        Built like ``apply`` builds them (same cache, same checks) and kept in the LRU. Owner thread only.
        """
        prepared = self._prepare(specs)
        for name, sig in prepared.signatures.items():
            self._remember(name, sig, prepared.tensors[name])
        out = dict(prepared.tensors)
        for name in self.applied:
            if name not in out:
                out[name] = self._originals[name]
        return out

    def warm(self, specs: ProfileLike) -> int:
        """Materialise a profile into the cache without applying it; returns tensors built."""
        prepared = self._prepare(specs)
        for name, sig in prepared.signatures.items():
            self._remember(name, sig, prepared.tensors[name])
        return prepared.materialized

    @contextmanager
    def applied_profile(self, specs: ProfileLike) -> Iterator[SwapStats]:
        """Apply ``specs`` for the duration of the block; the previous state comes back in ``finally``."""
        previous = self.current
        stats = self.apply(specs)
        try:
            yield stats
        finally:
            self.apply(previous)
