"""Health, readiness, info and Prometheus metrics (open: no key needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import laser_ops
from server.deps import ServicesDep
from laser_protocol.system import Health, Info, LaserTypeInfo, Readiness
from server.routing import ApiRoute

router = APIRouter(tags=["system"], route_class=ApiRoute)


@router.get("/health", response_model=Health)
async def health() -> Health:
    """Liveness: the process answers HTTP."""
    return Health()


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def ready(request: Request, response: Response) -> Readiness:
    """Readiness: the model is loaded and the stored profiles are restored."""
    if getattr(request.app.state, "services", None) is not None:
        return Readiness(ready=True)
    response.status_code = 503
    error = getattr(request.app.state, "startup_error", None)
    return Readiness(ready=False, detail=f"load failed: {error}" if error else "loading model")


@router.get("/info", response_model=Info)
async def info(services: ServicesDep) -> Info:
    """The loaded model, its LASER targets (module names and shapes), dtype, device and version."""
    d, lm = services.engine.info.description, services.engine.info.identity
    return Info(
        model_id=lm.model_id, source=lm.source, fingerprint=lm.fingerprint, architecture=d.architecture,
        model_type=d.model_type, num_layers=d.num_layers,
        laser_types={t: LaserTypeInfo(module=v.module, shape=v.shape, fused=v.fused,
                                      stored_transposed=v.stored_transposed) for t, v in d.types.items()},
        groups=d.groups, dtype=lm.dtype, device=lm.device,
        version=laser_ops.__version__, active_profile=services.engine.active_profile,
        profiles=len(services.profiles.list()), default_profile=services.settings.default_profile,
    )


@router.get("/metrics", response_class=Response, responses={200: {
    "description": "Prometheus text exposition format (requests, latency, tokens, queue; per-profile labels).",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics (per-profile labels)."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
