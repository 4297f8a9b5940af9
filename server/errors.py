"""Exception -> HTTP mapping. Expected failures get a clear 4xx naming the field; nothing leaks a traceback.

Every native error answers :class:`~laser_protocol.errors.ErrorBody` (``{"detail": [{"loc", "msg", "type"}]}``).
Validation errors never echo what JSON cannot carry back (NaN, infinities, lone surrogates, exception objects),
so refusing a bad value can never itself fail.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from laser_ops.interventions import InterventionError
from server.engine import EngineOverloaded, EngineStopped, RequestCancelled, UnknownProfile
from server.store.database import StoreUnavailableError
from laser_protocol.errors import ERROR_TYPES

logger = logging.getLogger(__name__)

Loc = tuple[str | int, ...]
#: Largest refused value (as JSON) a validation error echoes back.
MAX_ECHO_CHARS = 1000


class ApiError(Exception):
    """An expected failure with its HTTP status; ``loc`` names the offending field (FastAPI style)."""

    def __init__(self, status: int, message: str, loc: Loc | None = None,
                 headers: dict[str, str] | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.loc = loc
        self.headers = headers
        self.kind = kind or ERROR_TYPES.get(status, "error")


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _echoable(value: Any) -> bool:
    """True when ``value`` can be written back as (small) JSON, as the response encoder will."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except (TypeError, ValueError):  # UnicodeEncodeError is a ValueError
        return False
    return len(text) <= MAX_ECHO_CHARS


def error_item(message: str, loc: Sequence[Any] = (), kind: str = "value_error") -> dict[str, Any]:
    return {"loc": [p if isinstance(p, int) else printable(str(p)) for p in loc], "msg": printable(message),
            "type": kind}


def error_body(message: str, loc: Sequence[Any] | None = None, kind: str = "value_error") -> dict[str, Any]:
    return {"detail": [error_item(message, loc or (), kind)]}


def safe_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors as JSON-safe items: loc, msg, type, plus input and ctx only where echoable."""
    out = []
    for e in errors:
        item = error_item(str(e.get("msg", "")), e.get("loc", ()), str(e.get("type", "value_error")))
        if "input" in e and _echoable(e["input"]):
            item["input"] = e["input"]
        ctx = {k: v for k, v in (e.get("ctx") or {}).items() if _echoable(v)}
        if ctx:
            item["ctx"] = ctx
        out.append(item)
    return out


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (for ``Allow``), plus OPTIONS."""
    methods: set[str] = set()
    probe = {"type": "http", "path": request.scope["path"], "root_path": request.scope.get("root_path", ""),
             "method": request.method}
    for route in request.app.state.api_routes:
        match, _ = route.matches(dict(probe))
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods | {"OPTIONS"})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.loc, exc.kind), exc.status, headers=exc.headers)

    @app.exception_handler(InterventionError)
    async def _intervention(request: Request, exc: InterventionError) -> JSONResponse:
        loc = ("body", "interventions", *exc.loc) if exc.loc else ("body", "interventions")
        return JSONResponse(error_body(str(exc), loc), 422)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": safe_errors(exc.errors())}, 422)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError) -> JSONResponse:
        return JSONResponse({"detail": safe_errors(exc.errors(include_url=False))}, 422)

    @app.exception_handler(UnknownProfile)
    async def _unknown_profile(request: Request, exc: UnknownProfile) -> JSONResponse:
        return JSONResponse(error_body(f"unknown profile {exc.args[0]!r}", ("body", "profile"), "not_found"), 404)

    @app.exception_handler(EngineOverloaded)
    async def _overloaded(request: Request, exc: EngineOverloaded) -> JSONResponse:
        return JSONResponse(error_body(str(exc), kind="overloaded"), 429,
                            headers={"Retry-After": str(int(exc.retry_after))})

    @app.exception_handler(EngineStopped)
    async def _stopped(request: Request, exc: EngineStopped) -> JSONResponse:
        return JSONResponse(error_body(str(exc), kind="unavailable"), 503)

    @app.exception_handler(StoreUnavailableError)
    async def _store_unavailable(request: Request, exc: StoreUnavailableError) -> JSONResponse:
        logger.warning("%s", exc)
        return JSONResponse(error_body(str(exc), kind="unavailable"), 503, headers={"Retry-After": "1"})

    @app.exception_handler(RequestCancelled)
    async def _cancelled(request: Request, exc: RequestCancelled) -> JSONResponse:
        return JSONResponse(error_body(str(exc), kind="cancelled"), 499)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
            if request.method == "OPTIONS":  # what this resource supports, as RFC 9110 describes
                return Response(status_code=204, headers=headers)
            message = f"method {request.method} is not allowed here; allowed: {headers['Allow']}"
        elif exc.status_code == 404:
            message = f"no route {request.url.path!r}; see /docs for the API"
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(message, kind=ERROR_TYPES.get(exc.status_code, "error")), exc.status_code,
                            headers=headers or None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(f"internal error ({type(exc).__name__})", kind="internal_error"), 500)
