"""Routes: export a profile as a Hugging Face folder on the server, list exports, download their files.

Every route needs the admin key: an export is the whole model's weights. Downloads go file by file
(``FileResponse``: Content-Length, HTTP ranges, resumable, verifiable against the listing's SHA-256).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import FileResponse

from server.deps import ServicesDep
from laser_protocol.exports import EXPORT_NAME_PATTERN, ExportCreate, ExportDeleted, ExportList, ExportPublic
from laser_protocol.profiles import PROFILE_NAME_PATTERN
from server.openapi import link
from server.routing import ApiRoute
from server.security import AdminAuth
from server.serving import exports as serving

router = APIRouter(tags=["exports"], dependencies=[AdminAuth], route_class=ApiRoute)

ProfilePath = Annotated[str, Path(pattern=PROFILE_NAME_PATTERN, max_length=64, description="Profile name.")]
ExportPath = Annotated[str, Path(pattern=EXPORT_NAME_PATTERN, max_length=80, description="Export name.")]
_NOT_FOUND = {404: {"description": "Unknown export (or file)."}}


def _export_links(at: str) -> dict[str, object]:
    """From an export (``at``: the JSON pointer of the export object in the response) to its routes."""
    name = {"name": f"$response.body#{at}/name"}
    return {"GetExport": link("get_export", "Read the export.", parameters=name),
            "DownloadFile": link("download_file", "Download the export's first file.",
                                 parameters={**name, "file": f"$response.body#{at}/files/0/name"}),
            "DeleteExport": link("delete_export", "Delete the export.", parameters=name)}


@router.post("/v1/profiles/{name}/export", status_code=201, response_model=ExportPublic,
             responses={201: {"links": _export_links("")},
                        404: {"description": "Unknown profile."},
                        409: {"description": "The export exists; send overwrite=true."},
                        422: {"description": "Invalid request, or the profile cannot be applied to this model."}})
async def export_profile(name: ProfilePath, request: Request, services: ServicesDep,
                         body: ExportCreate | None = None) -> ExportPublic:
    """Write the profile as a Hugging Face folder (dense or factored) under the server's exports."""
    export = await serving.export_profile(services, name, body or ExportCreate())
    request.state.profile = name  # only once the profile is known: a 404's raw name never becomes a label
    return export


@router.get("/v1/exports", response_model=ExportList, responses={200: {"links": {
    "GetExport": link("get_export", "Read the first export.", parameters={"name": "$response.body#/data/0/name"}),
    "DeleteExport": link("delete_export", "Delete the first export.",
                         parameters={"name": "$response.body#/data/0/name"})}}})
async def list_exports(services: ServicesDep) -> ExportList:
    """List exports by name."""
    return serving.list_exports(services)


@router.get("/v1/exports/{name}", response_model=ExportPublic,
            responses={200: {"links": _export_links("")}, **_NOT_FOUND})
async def get_export(name: ExportPath, services: ServicesDep) -> ExportPublic:
    """One export: files (size, SHA-256, download URL) and the per-matrix report."""
    return serving.get_export(services, name)


@router.get("/v1/exports/{name}/files/{file:path}", response_class=FileResponse,
            responses={200: {"description": "The file's bytes (Content-Length and HTTP ranges supported; check "
                                            "against the SHA-256 the export lists).",
                             "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}}},
                       **_NOT_FOUND})
async def download_file(name: ExportPath, file: str, services: ServicesDep) -> FileResponse:
    """Download one file of an export (only names the export itself lists)."""
    path = serving.file_path(services, name, file)
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.delete("/v1/exports/{name}", response_model=ExportDeleted, responses=_NOT_FOUND)
async def delete_export(name: ExportPath, services: ServicesDep) -> ExportDeleted:
    """Delete an export and its files."""
    return await serving.delete_export(services, name)
