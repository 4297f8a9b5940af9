"""Snapshots of an edited profile (on the swapper's owner thread) and the folders written from them (any thread).
See :mod:`laser_ops.export` for the two forms and the two phases."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

import laser_ops
from laser_ops.interventions import InterventionSpec, MatrixEdit, edit_kind, parse_profile
from laser_ops.svd import Decomposition
from laser_ops.swap import ProfileLike, WeightSwapper, profile_signature
from laser_ops.targets import TargetRef, read_matrix
from laser_ops.export.laser_loader import FACTORS_FILE
from laser_ops.export.report import ExportMode, ExportReport, MatrixRow

logger = logging.getLogger(__name__)

PROFILE_FILE = "laser_profile.json"
LOADER_FILE = "laser_loader.py"
FORMAT = "laser-serve-export"
FORMAT_VERSION = 1
FACTORABLE_KINDS: tuple[str, ...] = ("laser", "laser_mp")
"""Edit kinds whose result is exactly a rank-k product of the cached SVD factors."""

#: Source of the ``laser_loader.py`` written into factored exports (a real module of this package, so it is
#: linted and tested like the rest; it needs only torch, safetensors and transformers).
LOADER_SOURCE = (Path(__file__).with_name(LOADER_FILE)).read_text(encoding="utf-8")


# --- public API --------------------------------------------------------------------------------


@dataclass
class ExportSnapshot:
    """Everything an export writes, taken at one moment: see the module docstring."""

    mode: ExportMode
    model: nn.Module
    state: dict[str, torch.Tensor]  # the state dict to save (edited entries replaced; factored ones omitted)
    rows: list[MatrixRow]
    notes: list[str]
    specs: list[InterventionSpec]
    fingerprint: str
    architecture: str
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    factor_entries: list[dict[str, Any]] = field(default_factory=list)


def export_dense(
    model: nn.Module,
    tokenizer: Any,
    swapper: WeightSwapper,
    specs: ProfileLike,
    out_dir: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    fingerprint: str | None = None,
    max_shard_size: str | int = "5GB",
) -> ExportReport:
    """Write the model with ``specs`` applied as a standard Hugging Face folder.

    ``fingerprint`` defaults to the swapper's SVD cache fingerprint (the base model's). Raises
    ``FileExistsError`` for a non-empty ``out_dir`` unless ``overwrite``; an invalid profile
    raises :class:`~laser_ops.interventions.InterventionError` before anything is written.
    """
    _check_target(Path(out_dir), overwrite)
    return write_export(snapshot_dense(model, swapper, specs, fingerprint=fingerprint), out_dir, tokenizer=tokenizer,
                        metadata=metadata, overwrite=overwrite, max_shard_size=max_shard_size)


def export_factored(
    model: nn.Module,
    tokenizer: Any,
    swapper: WeightSwapper,
    specs: ProfileLike,
    out_dir: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    fingerprint: str | None = None,
    factor_dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "5GB",
) -> ExportReport:
    """Write the remainder of the weights, the rank-k factors of each low-rank edit, and a loader.

    Only ``laser`` and ``laser_mp`` edits of whole (non-fused) matrices are factored, and only
    when the factors are smaller than the dense matrix; every other edited matrix is stored
    dense in ``model.safetensors`` with a note in its row. Factors are kept in ``factor_dtype``
    (float32 by default: the loader then reproduces the live weights exactly, since it runs the
    same product the swapper ran). Load the folder with ``laser_loader.load(folder)``.
    """
    _check_target(Path(out_dir), overwrite)
    snapshot = snapshot_factored(model, swapper, specs, fingerprint=fingerprint, factor_dtype=factor_dtype)
    return write_export(snapshot, out_dir, tokenizer=tokenizer, metadata=metadata, overwrite=overwrite,
                        max_shard_size=max_shard_size)


def snapshot_dense(model: nn.Module, swapper: WeightSwapper, specs: ProfileLike, *,
                   fingerprint: str | None = None) -> ExportSnapshot:
    """The dense export of ``specs`` (owner thread; writes nothing into the model)."""
    parsed, edits = _plan(model, swapper, specs)
    params = dict(model.named_parameters(remove_duplicate=False))
    rows = [_dense_row(e, params[e.ref.param_name], None) for e in edits]
    state = _state_with(model, swapper.materialize(parsed))
    return ExportSnapshot("dense", model, state, rows, [], parsed, fingerprint or swapper.svd_cache.fingerprint,
                          swapper.targets.spec.name)


def snapshot_factored(model: nn.Module, swapper: WeightSwapper, specs: ProfileLike, *,
                      fingerprint: str | None = None, factor_dtype: torch.dtype = torch.float32) -> ExportSnapshot:
    """The factored export of ``specs`` (owner thread; writes nothing into the model)."""
    parsed, edits = _plan(model, swapper, specs)
    params = dict(model.named_parameters(remove_duplicate=False))
    aliases = _aliases(model)
    edited = swapper.materialize(parsed)
    by_param: dict[str, list[MatrixEdit]] = {}
    for e in edits:
        by_param.setdefault(e.ref.param_name, []).append(e)

    rows: list[MatrixRow] = []
    notes: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    omit: set[str] = set()
    for name, group in by_param.items():
        param = params[name]
        reason = _unfactorable_reason(group)
        if reason is not None:
            rows.extend(_dense_row(e, param, None, reason) for e in group)
            continue
        edit = group[0]
        A, B, k = _factors(swapper, edit, factor_dtype)
        dense = _nbytes(edit.ref.shape, param.dtype)
        factored = (A.numel() + B.numel()) * A.element_size()
        if factored >= dense:
            rows.append(_dense_row(edit, param, k, f"rank-{k} factors ({factored} B) are not smaller than the "
                                                   f"dense matrix ({dense} B); stored dense"))
            continue
        served = read_matrix(edited[name], edit.ref).to("cpu", torch.float32)
        product = (A.to(torch.float32) @ B.to(torch.float32)).to(param.dtype).to(torch.float32)
        tol = max(1e-5, 4 * torch.finfo(param.dtype).eps) * max(1.0, served.abs().max().item())
        diff = (product.cpu() - served).abs().max().item()
        if diff > tol:
            rows.append(_dense_row(edit, param, k, f"factor product differs from the edited weights by {diff:.3g} "
                                                   f"(tolerance {tol:.3g}); stored dense"))
            continue
        i = len(entries)
        tensors[f"{i}.A"] = A.contiguous()
        tensors[f"{i}.B"] = B.contiguous()
        names = aliases.get(name, [name])
        omit.update(names)
        entries.append({
            "a": f"{i}.A", "b": f"{i}.B", "params": names, "type": edit.ref.type, "layer": edit.ref.layer,
            "shape": list(edit.ref.shape), "k": k, "transposed": edit.ref.transposed,
            "kind": edit.spec.kind, "dtype": str(param.dtype).removeprefix("torch."),
        })
        rows.append(MatrixRow(name, edit.ref.type, edit.ref.layer, edit.spec.kind, edit.ref.shape, k,
                              "factored", dense, factored, dense - factored))
    state = {n: t for n, t in _state_with(model, edited).items() if n not in omit}
    if not entries:
        notes.append("no matrix was factored; laser_factors.safetensors is empty and the folder also "
                     "loads with plain from_pretrained")
    rows.sort(key=lambda r: (r.layer, r.type))
    return ExportSnapshot("factored", model, state, rows, notes, parsed, fingerprint or swapper.svd_cache.fingerprint,
                          swapper.targets.spec.name, tensors, entries)


def write_export(snapshot: ExportSnapshot, out_dir: str | os.PathLike[str], *, tokenizer: Any = None,
                 metadata: Mapping[str, Any] | None = None, overwrite: bool = False,
                 max_shard_size: str | int = "5GB") -> ExportReport:
    """Write a snapshot's files (any thread; the unedited parameters it references must not change meanwhile)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    with _staging(out, overwrite) as tmp:
        snapshot.model.save_pretrained(tmp, state_dict=snapshot.state, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if snapshot.mode == "factored":
            save_file({k: v.cpu() for k, v in snapshot.factors.items()}, str(tmp / FACTORS_FILE), metadata={
                "format": FORMAT, "format_version": str(FORMAT_VERSION),
                "laser_factors": json.dumps(snapshot.factor_entries)})
            (tmp / LOADER_FILE).write_text(LOADER_SOURCE)
        report = _finish(tmp, out, snapshot, metadata)
    report.seconds = time.perf_counter() - t0
    logger.info("exported %s profile %s to %s (%d bytes, %d saved)", snapshot.mode, report.profile_signature, out,
                report.bytes, report.saved_bytes)
    return report


# --- helpers -----------------------------------------------------------------------------------


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse an existing target before any work (``_staging`` checks again when writing)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")


def _state_with(model: nn.Module, edited: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict with ``edited`` parameters (and every tied name of them) replaced."""
    aliases = _aliases(model)
    state = dict(model.state_dict())
    for name, tensor in edited.items():
        for alias in aliases.get(name, [name]):
            if alias in state:
                state[alias] = tensor
    return state


def _plan(model: nn.Module, swapper: WeightSwapper,
          specs: ProfileLike) -> tuple[list[InterventionSpec], list[MatrixEdit]]:
    if swapper.model is not model:
        raise ValueError("swapper.model is not the model being exported")
    parsed = parse_profile(specs)
    return parsed, swapper.plan(parsed)  # raises InterventionError before any write


def _nbytes(shape: tuple[int, int], dtype: torch.dtype) -> int:
    return shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()


def _dense_row(edit: MatrixEdit, param: torch.Tensor, k: int | None, note: str | None = None) -> MatrixRow:
    dense = _nbytes(edit.ref.shape, param.dtype)
    return MatrixRow(edit.ref.param_name, edit.ref.type, edit.ref.layer, edit.spec.kind, edit.ref.shape, k,
                     "dense", dense, dense, 0, note)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name of the same tensor (tied weights share one parameter)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def _unfactorable_reason(group: list[MatrixEdit]) -> str | None:
    if len(group) > 1 or group[0].ref.rows is not None:
        return (f"fused slice of {group[0].ref.param_name}: the parameter holds other projections, "
                "so it is stored dense")
    kind = group[0].spec.kind
    if kind not in FACTORABLE_KINDS:
        return f"kind {kind!r} is not a top-k low-rank edit (factorable: {', '.join(FACTORABLE_KINDS)}); stored dense"
    return None


def _factors(swapper: WeightSwapper, edit: MatrixEdit, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The rank-k factors the swapper's own edit kind uses: A = U_k * S_k (m x k), B = Vh_k (k x n).

    The edit kind is run with a decomposition provider that records what it was given, so ``k``
    and the factors are exactly those behind the live weights (same cache, same SVD method).
    """
    ref: TargetRef = edit.ref
    # The base matrix, whatever profile is live now (the swapper keeps originals of edited params).
    w = swapper.original_matrix(ref).to(torch.float32)
    seen: list[Decomposition] = []

    def provider(min_rank: int | None, complete: bool) -> Decomposition:
        exact = complete or swapper.svd_method == "exact"
        dec = swapper.svd_cache.get(ref.key, w, min_rank=min_rank, complete=exact)
        seen.append(dec)
        return dec

    result = edit_kind(edit.spec.kind).apply(edit.spec, w, provider, ref)
    if result.k is None or not seen:
        raise RuntimeError(f"edit kind {edit.spec.kind!r} did not report a rank for {ref.param_name}")
    dec, k = seen[-1], result.k
    A = (dec.U[:, :k] * dec.S[:k]).to(dtype)
    B = dec.Vh[:k].to(dtype)
    return A, B, k


@contextmanager
def _staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder; moved to ``out`` by :func:`_finish`, removed on failure."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful move


def _finish(tmp: Path, out: Path, snapshot: ExportSnapshot, metadata: Mapping[str, Any] | None) -> ExportReport:
    mode, rows, specs = snapshot.mode, snapshot.rows, snapshot.specs
    dense = sum(r.dense_bytes for r in rows)
    stored = sum(r.stored_bytes for r in rows)
    notes = snapshot.notes + sorted({r.note for r in rows if r.note})
    report = ExportReport(
        path=str(out), mode=mode, files={}, bytes=0, dense_bytes=dense, factored_bytes=stored,
        saved_bytes=dense - stored, rows=rows, notes=notes, profile_signature=profile_signature(specs),
        fingerprint=snapshot.fingerprint)
    config = getattr(snapshot.model, "config", None)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "laser_serve_version": laser_ops.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_model": {
            "fingerprint": report.fingerprint,
            "model_type": getattr(config, "model_type", None),
            "name_or_path": getattr(config, "_name_or_path", None),
            "architecture": snapshot.architecture,
        },
        "profile": [s.model_dump(mode="json", exclude_none=True) for s in specs],
        "profile_signature": report.profile_signature,
        "load": ("from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(folder)"
                 if mode == "dense" else
                 "import importlib.util, os; spec = importlib.util.spec_from_file_location('laser_loader', "
                 "os.path.join(folder, 'laser_loader.py')); m = importlib.util.module_from_spec(spec); "
                 "spec.loader.exec_module(m); model = m.load(folder)"),
        "metadata": dict(metadata or {}),
        "report": {k: v for k, v in report.to_dict().items() if k not in ("path", "files", "bytes", "seconds")},
    }
    (tmp / PROFILE_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    if out.exists():
        shutil.rmtree(out)  # empty, or overwrite=True (checked in _staging)
    os.replace(tmp, out)
    report.files = files
    report.bytes = sum(files.values())
    return report
