"""How every route reads a request: authenticate first (when its scope needs a key), then the body.

FastAPI reads and parses the body before it runs dependencies, so an unauthenticated request with a broken
body would learn about its JSON before hearing it has no key; :class:`ApiRoute` checks the key first. It also
answers every body that cannot be read as JSON (syntax, not UTF-8, nested too deeply) with one documented
400 naming the problem, where FastAPI answers 422 for some and a bare 400 for others.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from server.errors import ApiError
from server.security import authenticate, route_scope


def _unreadable(cause: BaseException | None) -> str:
    if isinstance(cause, RecursionError):
        return "the request body is nested too deeply to parse"
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 (byte {cause.start})"
    return "the request body could not be parsed as JSON"


class ApiRoute(APIRoute):
    """Authenticate before reading the body; unparsable bodies answer 400 with ``type: json_invalid``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        scope = route_scope(self)

        async def app(request: Request) -> Response:
            if scope is not None:
                authenticate(request, scope)
            try:
                return await handler(request)
            except RequestValidationError as exc:
                errors = exc.errors()
                if errors and errors[0].get("type") == "json_invalid":
                    e = errors[0]
                    detail = (e.get("ctx") or {}).get("error", "")
                    raise ApiError(400, f"the request body is not valid JSON: {detail}".rstrip(": "),
                                   tuple(e.get("loc", ("body",))), kind="json_invalid") from None
                raise
            except HTTPException as exc:
                if exc.status_code == 400 and exc.__cause__ is not None:
                    raise ApiError(400, _unreadable(exc.__cause__), ("body",), kind="json_invalid") from None
                raise

        return app
