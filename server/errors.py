"""Exception -> HTTP mapping. Expected failures get a clear 4xx naming the field; nothing leaks a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from laser_ops.interventions import InterventionError
from server.engine import EngineOverloaded, EngineStopped, RequestCancelled, UnknownProfile
from server.store.database import StoreUnavailableError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An expected failure with its HTTP status; ``loc`` names the offending field (FastAPI style)."""

    def __init__(self, status: int, message: str, loc: tuple[str | int, ...] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.loc = loc
        self.headers = headers


def error_body(message: str, loc: tuple[str | int, ...] | None = None, kind: str = "value_error") -> dict:
    if loc is None:
        return {"detail": message}
    return {"detail": [{"loc": list(loc), "msg": message, "type": kind}]}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.loc), exc.status, headers=exc.headers)

    @app.exception_handler(InterventionError)
    async def _intervention(request: Request, exc: InterventionError) -> JSONResponse:
        loc = ("body", "interventions", *exc.loc) if exc.loc else ("body", "interventions")
        return JSONResponse(error_body(str(exc), loc), 422)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse({"detail": exc.errors(include_url=False, include_context=False)}, 422)

    @app.exception_handler(UnknownProfile)
    async def _unknown_profile(request: Request, exc: UnknownProfile) -> JSONResponse:
        return JSONResponse(error_body(f"unknown profile {exc.args[0]!r}", ("body", "profile")), 404)

    @app.exception_handler(EngineOverloaded)
    async def _overloaded(request: Request, exc: EngineOverloaded) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), 429, headers={"Retry-After": str(int(exc.retry_after))})

    @app.exception_handler(EngineStopped)
    async def _stopped(request: Request, exc: EngineStopped) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), 503)

    @app.exception_handler(StoreUnavailableError)
    async def _store_unavailable(request: Request, exc: StoreUnavailableError) -> JSONResponse:
        logger.warning("%s", exc)
        return JSONResponse(error_body(str(exc)), 503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestCancelled)
    async def _cancelled(request: Request, exc: RequestCancelled) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), 499)
