"""Build the FastAPI app: settings, start-up/shutdown, middleware, routers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import laser_ops
from laser_ops.loading import LoadedModel
from server.config import Settings
from server.errors import error_body, install_error_handlers
from server.metrics import Metrics
from server.openapi import install_openapi
from server.routes import datasets, exports, inference, jobs, openai, profiles, spectra, system, ui
from server.serving.jobs import service as jobs_serving
from server.serving import profiles as profiles_serving
from server.state import build_services

logger = logging.getLogger(__name__)

ROUTERS = [system.router, profiles.router, spectra.router, inference.router, openai.router, datasets.router,
           jobs.router, exports.router]


def _include_feature_routers(app: FastAPI) -> None:
    """Routers of each feature; a feature module exposes ``router`` (and optionally ``on_startup``)."""
    for router in ROUTERS:
        app.include_router(router)


def _operation_id(route: APIRoute) -> str:
    """OpenAPI operationIds are the route functions' names (stable, and what the schema's links name)."""
    return route.name


class _BodyTooLarge(BaseException):
    """Raised from ``receive`` (BaseException: body parsers must not turn it into a 400)."""


class RequestMetricsMiddleware:
    """Counts requests by route template, status and profile; times them end to end; caps body size.

    Pure ASGI (not ``BaseHTTPMiddleware``): it passes ``receive`` through untouched, so
    ``request.is_disconnected()`` works in routes, and the end-to-end time covers streamed bodies.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        app_state = scope["app"].state
        settings: Settings = app_state.settings
        limit = settings.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            app_state.metrics.requests.labels("unmatched", scope["method"], "413", "").inc()
            await self._too_large(scope, receive, send, f"request body of {int(length)} bytes exceeds "
                                                       f"max_body_bytes ({limit})")
            return
        start = time.perf_counter()
        status = [500]
        started = [False]
        recorded = [False]
        received = [0]

        def record() -> None:
            """Count the request once: before its last byte leaves, so a client that reads /metrics right
            after its answer sees it counted (state is published before the result is handed back)."""
            if recorded[0]:
                return
            recorded[0] = True
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            profile = scope.get("state", {}).get("profile", "")
            m: Metrics = app_state.metrics
            m.requests.labels(template, scope["method"], str(status[0]), profile).inc()
            if template not in ("/metrics", "/health", "/ready"):
                m.request_seconds.labels(template, profile).observe(time.perf_counter() - start)

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started[0] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if started[0]:
                raise
            status[0] = 413
            await self._too_large(scope, receive, send, f"request body exceeds max_body_bytes ({limit})")
        finally:
            record()  # a response that never finished (client gone, error) is counted here

    @staticmethod
    async def _too_large(scope: Scope, receive: Receive, send: Send, message: str) -> None:
        await JSONResponse(error_body(message, ("body",), "too_large"), 413)(scope, receive, send)


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
        generate_unique_id_function=_operation_id,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.services = None
    app.state.startup_error = None
    app.state.startup_hooks = [profiles_serving.startup, jobs_serving.startup]
    app.state.shutdown_hooks = [profiles_serving.shutdown, jobs_serving.shutdown]
    app.add_middleware(RequestMetricsMiddleware)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    _include_feature_routers(app)
    ui.mount(app)
    app.state.api_routes = [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]
    install_error_handlers(app)
    install_openapi(app, settings)
    return app
