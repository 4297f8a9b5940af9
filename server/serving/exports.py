"""Export logic: write a profile as a Hugging Face folder under ``<data_dir>/exports/<name>/`` and serve its files.

No path ever comes from a request. The export's name is checked against a strict pattern by the protocol
models and only then becomes one folder name under the exports root; a download looks the requested file
name up in the folder's own listing (a scan of what the export wrote) and serves the path found there,
so ``..``, absolute names and links lead nowhere.

The engine's owner thread only takes a snapshot (the edited tensors, built without writing into the model);
a worker thread writes the files while weight-writing tasks are held back, so serving goes on; a manifest with each file's size and SHA-256 is written beside the
folder (``exports/.reports/<name>.json``; dot-names are never valid export names) so that clients can
verify their downloads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import torch

from laser_ops.export import PROFILE_FILE, ExportReport, ExportSnapshot, snapshot_dense, snapshot_factored, write_export
from laser_ops.interventions import InterventionError
from laser_ops.targets import TargetError
from server.errors import ApiError
from laser_protocol.exports import (
    ExportCreate,
    ExportDeleted,
    ExportFile,
    ExportList,
    ExportMatrix,
    ExportPublic,
    ExportSummary,
)
from server.state import Services
from server.store import RESERVED_PROFILES

logger = logging.getLogger(__name__)

REPORTS_DIR = ".reports"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def exports_root(services: Services) -> Path:
    return services.settings.data_dir / "exports"


def _folder(services: Services, name: str) -> Path:
    """The folder of a (pattern-checked) export name; 404 if there is none."""
    root = exports_root(services)
    folder = root / name
    if name.startswith(".") or folder.parent != root or not folder.is_dir() or folder.is_symlink():
        raise ApiError(404, f"unknown export {name!r}", ("path", "name"))
    return folder


def _scan(folder: Path) -> dict[str, Path]:
    """Relative POSIX name -> path of every regular file the export holds (links skipped)."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_path(services: Services, name: str) -> Path:
    return exports_root(services) / REPORTS_DIR / f"{name}.json"


def _url(name: str, file: str) -> str:
    return f"/v1/exports/{quote(name)}/files/{quote(file)}"


def _public(services: Services, name: str) -> ExportPublic:
    """The export as the API shows it: the manifest's figures, the folder's actual files."""
    folder = _folder(services, name)
    files = _scan(folder)
    manifest: dict = {}
    try:
        manifest = json.loads(_manifest_path(services, name).read_text())
    except (OSError, ValueError):
        try:  # written by hand or before manifests: laser_profile.json still tells the mode
            info = json.loads((folder / PROFILE_FILE).read_text())
            manifest = {"mode": info.get("mode", "dense"), "load": info.get("load", ""),
                        "profile": (info.get("metadata") or {}).get("profile")}
        except (OSError, ValueError):
            manifest = {}
    digests = {f["name"]: f for f in manifest.get("files", [])}
    listed = []
    for rel, path in files.items():
        size = path.stat().st_size
        known = digests.get(rel)
        sha = known.get("sha256") if known and known.get("bytes") == size else None
        listed.append(ExportFile(name=rel, bytes=size, sha256=sha, url=_url(name, rel)))
    fields = {k: v for k, v in manifest.items() if k in ExportPublic.model_fields and k not in ("name", "files", "bytes")}
    fields.setdefault("mode", "dense")
    return ExportPublic(name=name, files=listed, bytes=sum(f.bytes for f in listed), **fields)


def _write_manifest(services: Services, public: ExportPublic) -> None:
    path = _manifest_path(services, public.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(public.model_dump_json(indent=2))
    tmp.replace(path)


def _from_report(name: str, profile: str, report: ExportReport, digests: dict[str, str],
                 load: str) -> ExportPublic:
    files = [ExportFile(name=rel, bytes=size, sha256=digests.get(rel), url=_url(name, rel))
             for rel, size in sorted(report.files.items())]
    matrices = [ExportMatrix(param_name=r.param_name, type=r.type, layer=r.layer, kind=r.kind, shape=r.shape, k=r.k,
                             stored=r.stored, dense_bytes=r.dense_bytes, stored_bytes=r.stored_bytes,
                             saved_bytes=r.saved_bytes, note=r.note) for r in report.rows]
    return ExportPublic(name=name, profile=profile, mode=report.mode, bytes=report.bytes,
                        saved_bytes=report.saved_bytes, created_at=time.time(), files=files,
                        dense_bytes=report.dense_bytes, factored_bytes=report.factored_bytes, matrices=matrices,
                        notes=report.notes, profile_signature=report.profile_signature,
                        fingerprint=report.fingerprint, seconds=report.seconds, load=load)


async def export_profile(services: Services, profile: str, body: ExportCreate) -> ExportPublic:
    """Write ``profile`` under ``exports/<name>/``: the engine thread takes a snapshot of the tensors, a worker
    thread writes the files. 404 unknown profile, 409 the export exists (without ``overwrite``), 422 the profile
    no longer fits the model."""
    if profile in RESERVED_PROFILES:
        specs, description = [], "The unedited model."
    else:
        stored = services.profiles.get(profile)
        if stored is None:
            raise ApiError(404, f"unknown profile {profile!r}", ("path", "name"))
        specs, description = list(stored.interventions), stored.description
    name = body.name or f"{profile}-{body.mode}"
    root = exports_root(services)
    out = root / name
    identity = services.engine.info.identity
    metadata = {"profile": profile, "description": description, "export_name": name,
                "model_id": identity.model_id}

    def snapshot(swapper, _scorer) -> ExportSnapshot:  # engine thread: tensors only, no file I/O
        if body.mode == "dense":
            return snapshot_dense(swapper.model, swapper, specs, fingerprint=identity.fingerprint)
        return snapshot_factored(swapper.model, swapper, specs, fingerprint=identity.fingerprint,
                                 factor_dtype=_DTYPES[body.factor_dtype])

    async with services.export_lock:
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise ApiError(409, f"export {name!r} exists and is not a folder", ("body", "name"))
        if out.exists() and not body.overwrite:  # answered at once, not after a turn on the engine
            raise ApiError(409, f"export {name!r} already exists; pass overwrite=true to replace it",
                           ("body", "name"))
        await services.decomposer.prepare(specs)  # SVDs off the owner thread first
        try:
            # The snapshot references the live base weights: hold back weight-writing tasks (sweep steps)
            # until the files are written; serving goes on meanwhile (it never writes weights).
            async with services.engine.weights_held():
                snap = await services.engine.run_task(snapshot)
                report = await asyncio.to_thread(write_export, snap, out, metadata=metadata,
                                                 tokenizer=services.engine.info.tokenizer, overwrite=body.overwrite)
        except FileExistsError:
            raise ApiError(409, f"export {name!r} already exists; pass overwrite=true to replace it",
                           ("body", "name")) from None
        except (InterventionError, TargetError) as e:
            raise ApiError(422, f"profile {profile!r} cannot be exported: {e}", ("path", "name")) from None
        files = _scan(out)
        digests = await asyncio.to_thread(lambda: {rel: _sha256(p) for rel, p in files.items()})
        load = ""
        try:
            load = json.loads((out / PROFILE_FILE).read_text()).get("load", "")
        except (OSError, ValueError):
            pass
        public = _from_report(name, profile, report, digests, load)
        await asyncio.to_thread(_write_manifest, services, public)
    logger.info("exported profile %s as %s (%s, %d bytes)", profile, name, body.mode, public.bytes)
    return public


def list_exports(services: Services) -> ExportList:
    root = exports_root(services)
    out = []
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir() or folder.is_symlink():
                continue  # manifests and staging folders (.<name>.tmp-*) are dot-names
            p = _public(services, folder.name)
            out.append(ExportSummary(name=p.name, profile=p.profile, mode=p.mode, bytes=p.bytes,
                                     saved_bytes=p.saved_bytes, created_at=p.created_at))
    return ExportList(data=out)


def get_export(services: Services, name: str) -> ExportPublic:
    return _public(services, name)


def file_path(services: Services, name: str, file: str) -> Path:
    """The path of ``file`` as listed by the export itself; 404 for anything it does not list."""
    path = _scan(_folder(services, name)).get(file)
    if path is None:
        raise ApiError(404, f"export {name!r} has no file {file!r}", ("path", "file"))
    return path


async def delete_export(services: Services, name: str) -> ExportDeleted:
    async with services.export_lock:
        folder = _folder(services, name)
        await asyncio.to_thread(shutil.rmtree, folder)
        _manifest_path(services, name).unlink(missing_ok=True)
    return ExportDeleted(name=name)
