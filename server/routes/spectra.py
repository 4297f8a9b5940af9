"""Route: the singular-value spectrum of one base matrix (data-free diagnostics; inference key to read)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from laser_ops.targets import TYPES
from server.deps import ServicesDep
from laser_protocol.spectra import MatrixSpectrum
from server.routing import ApiRoute
from server.security import InferenceAuth
from server.serving import spectra as serving

LaserType = Literal[TYPES]  # type: ignore[valid-type]

router = APIRouter(prefix="/v1/spectrum", tags=["diagnostics"], dependencies=[InferenceAuth], route_class=ApiRoute)


@router.get("/{type}/{layer}", response_model=MatrixSpectrum,
            responses={422: {"description": "Unknown type, layer out of range or k out of 1..min(m, n); the error "
                                            "names the field."}})
async def spectrum(type_: Annotated[LaserType, Path(alias="type",
                                                     description="LASER type, e.g. fc_in (see /info).")],
                   layer: Annotated[int, Path(description="0-based layer; negative counts from the end.")],
                   services: ServicesDep,
                   k: Annotated[int | None, Query(description="Also report retained energy and Frobenius error of "
                                                              "the top-k truncation.")] = None) -> MatrixSpectrum:
    """Singular values of one base matrix with its Marchenko-Pastur threshold, effective and stable rank."""
    return await serving.spectrum(services, type_, layer, k)
