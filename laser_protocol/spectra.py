"""Protocol model of ``GET /v1/spectrum/{type}/{layer}``: one base matrix's singular values and diagnostics."""

from __future__ import annotations

from pydantic import BaseModel, Field


class MatrixSpectrum(BaseModel):
    """Singular values of one base (unedited) matrix with the data-free diagnostics of ``laser_ops.spectral``."""

    type: str = Field(..., description="LASER type (fc_in, q_proj, ...).")
    layer: int = Field(..., description="0-based layer (a negative request is resolved from the end).")
    param_name: str = Field(..., description="Parameter holding the matrix.")
    shape: list[int] = Field(..., min_length=2, max_length=2, description="Logical (out, in) shape.")
    singular_values: list[float] = Field(..., description="All min(out, in) singular values, descending.")
    sigma_max: float = Field(..., description="Largest singular value.")
    sigma_min: float = Field(..., description="Smallest singular value.")
    effective_rank: float = Field(..., description="Roy-Vetterli effective rank exp(H(S / sum S)).")
    stable_rank: float = Field(..., description="||W||_F^2 / ||W||_2^2.")
    mp_threshold: float = Field(..., description="Marchenko-Pastur threshold (laserRMT's IQR estimate): what "
                                                 "laser_mp keeps is above it.")
    mp_rank: int = Field(..., description="Singular values above the Marchenko-Pastur threshold.")
    snr: float | None = Field(None, description="Sum of singular values above the threshold over those below "
                                                "(null when none is below).")
    k: int | None = Field(None, description="The rank asked for with ?k=, if any.")
    retained_energy: float | None = Field(None, description="Share of sum(S^2) the top k keep (with k).")
    frobenius_error: float | None = Field(None, description="||W - W_k||_F (with k).")
    relative_frobenius_error: float | None = Field(None, description="||W - W_k||_F / ||W||_F (with k).")
