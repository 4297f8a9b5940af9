"""Build the FastAPI app: settings, start-up/shutdown, middleware, routers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

import laser_ops
from laser_ops.loading import LoadedModel
from server.config import Settings
from server.errors import error_body, install_error_handlers
from server.metrics import Metrics
from server.routes import inference, openai, profiles, system
from server.state import build_services

logger = logging.getLogger(__name__)

ROUTERS = [system.router, profiles.router, inference.router, openai.router]


def _include_feature_routers(app: FastAPI) -> None:
    """Routers of each feature; a feature module exposes ``router`` (and optionally ``on_startup``)."""
    for router in ROUTERS:
        app.include_router(router)


class RequestMetricsMiddleware(BaseHTTPMiddleware):
    """Counts requests by route template, status and profile; times them end to end; caps body size."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        settings: Settings = request.app.state.settings
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            from fastapi.responses import JSONResponse

            return JSONResponse(error_body(f"request body of {length} bytes exceeds max_body_bytes "
                                           f"({settings.max_body_bytes})"), 413)
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        profile = getattr(request.state, "profile", "")
        m: Metrics = request.app.state.metrics
        m.requests.labels(template, request.method, str(response.status_code), profile).inc()
        if template not in ("/metrics", "/health", "/ready"):
            m.request_seconds.labels(template, profile).observe(time.perf_counter() - start)
        return response


def create_app(settings: Settings | None = None, *, loaded: LoadedModel | None = None,
               load_in_background: bool | None = None) -> FastAPI:
    """The app. ``loaded`` injects an already-loaded model (tests); otherwise it loads ``settings.model``.

    With ``load_in_background`` (default when no model is injected) /health answers at once and
    /ready turns true when the model is loaded; other routes answer 503 until then.
    """
    settings = settings or Settings()
    metrics = Metrics()
    background = load_in_background if load_in_background is not None else loaded is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def start() -> None:
            try:
                services = await asyncio.to_thread(build_services, settings, metrics, loaded)
                for hook in app.state.startup_hooks:
                    await hook(app, services)
                app.state.services = services
            except Exception as exc:
                logger.exception("start-up failed")
                app.state.startup_error = f"{type(exc).__name__}: {exc}"
                if not background:
                    raise

        task = asyncio.create_task(start())
        if not background:
            await task
        try:
            yield
        finally:
            if not task.done():
                task.cancel()
            for hook in app.state.shutdown_hooks:
                await hook(app)
            services = getattr(app.state, "services", None)
            if services is not None:
                services.close()

    app = FastAPI(
        title="laser-serve",
        version=laser_ops.__version__,
        summary="Serve LASER (layer-selective rank reduction) edit profiles of one transformer.",
        description="Named edit profiles applied by reversible weight swaps; generate, score and A/B "
                    "compare per profile; OpenAI-compatible API; validation sweeps as background jobs.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.services = None
    app.state.startup_error = None
    app.state.startup_hooks = []
    app.state.shutdown_hooks = []
    app.add_middleware(RequestMetricsMiddleware)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    install_error_handlers(app)
    _include_feature_routers(app)
    return app
