"""Protocol models of the export routes: ``POST /v1/profiles/{name}/export`` and ``/v1/exports``.

An export is a folder the server writes under ``<data_dir>/exports/<export name>/``; the request
names only the profile, the mode and (optionally) the export's name, never a path.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from laser_protocol.validation import RequestModel

EXPORT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$"

ExportMode = Literal["dense", "factored"]


class ExportCreate(RequestModel):
    """Body of ``POST /v1/profiles/{name}/export`` (every field optional: ``{}`` is a dense export)."""

    mode: ExportMode = Field("dense", description="'dense': a standard Hugging Face folder that plain "
                                                  "transformers loads; 'factored': each low-rank edited matrix "
                                                  "as its two rank-k factors plus laser_loader.py.")
    name: str | None = Field(None, pattern=EXPORT_NAME_PATTERN, max_length=80,
                             description="Export name: 1-80 letters, digits, '.', '_' or '-', starting with a "
                                         "letter or digit; never a path. Default '<profile>-<mode>'.",
                             examples=["late-fc-in-dense"])
    overwrite: bool = Field(False, description="Replace an existing export of that name instead of 409.")
    factor_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Factored mode: dtype of the stored factors (float32 reproduces the live "
                               "weights exactly).")


class ExportFile(BaseModel):
    """One file of an export, downloadable from ``url``."""

    name: str = Field(..., description="Relative file name inside the export (as listed; never a path to send "
                                       "elsewhere).")
    bytes: int = Field(..., description="Size in bytes.")
    sha256: str | None = Field(None, description="Hex SHA-256 of the file (None if the export predates the "
                                                 "manifest).")
    url: str = Field(..., description="Download path on this server.")


class ExportMatrix(BaseModel):
    """One edited matrix: how the export stores it and what that costs."""

    param_name: str = Field(..., description="Parameter holding the matrix.")
    type: str = Field(..., description="LASER type (fc_in, q_proj, ...).")
    layer: int = Field(..., description="0-based layer.")
    kind: str = Field(..., description="Edit kind.")
    shape: tuple[int, int] = Field(..., description="Logical (out, in) shape.")
    k: int | None = Field(None, description="Rank kept (factored matrices).")
    stored: Literal["dense", "factored"] = Field(..., description="How the matrix is stored.")
    dense_bytes: int = Field(..., description="Bytes of the dense matrix at the model's dtype.")
    stored_bytes: int = Field(..., description="Bytes this export spends on it.")
    saved_bytes: int = Field(..., description="dense_bytes - stored_bytes.")
    note: str | None = Field(None, description="Why it is stored dense in a factored export.")


class ExportSummary(BaseModel):
    """An export in listings."""

    name: str = Field(..., description="Export name (what the /v1/exports/{name} routes take).")
    profile: str | None = Field(None, description="Profile that was exported.")
    mode: ExportMode = Field(..., description="dense or factored.")
    bytes: int = Field(..., description="Size of every file together.")
    saved_bytes: int = Field(0, description="Bytes the factored matrices save against their dense form.")
    created_at: float | None = Field(None, description="Unix time of the export.")


class ExportPublic(ExportSummary):
    """An export: its files (with download URLs) and the per-matrix report."""

    files: list[ExportFile] = Field(..., description="Every file, by name.")
    dense_bytes: int = Field(0, description="The edited matrices at the model's dtype.")
    factored_bytes: int = Field(0, description="What the export spends on those matrices.")
    matrices: list[ExportMatrix] = Field(default_factory=list, description="One entry per edited matrix.")
    notes: list[str] = Field(default_factory=list, description="Caveats (matrices kept dense, ...).")
    profile_signature: str = Field("", description="Hash of the exported interventions.")
    fingerprint: str = Field("", description="Fingerprint of the base model.")
    seconds: float = Field(0.0, description="Seconds the export took.")
    load: str = Field("", description="How to load the folder once downloaded.")


class ExportList(BaseModel):
    """Exports by name."""

    data: list[ExportSummary] = Field(..., description="Exports.")


class ExportDeleted(BaseModel):
    """Answer of ``DELETE /v1/exports/{name}``."""

    name: str = Field(..., description="The deleted export.")
    deleted: bool = Field(True, description="Always true (an unknown name answers 404).")
