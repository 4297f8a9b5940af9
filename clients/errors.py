"""Typed exceptions of the client.

Every HTTP error answer becomes an :class:`APIError` subclass chosen by status, carrying the server's
message, the status, the raw ``detail`` and (for validation errors) the per-field ``errors``. The
server answers two shapes: the native ``{"detail": "..." | [{"loc", "msg", "type"}]}`` and OpenAI's
``{"error": {"message", "type", "param", "code"}}`` (``/v1/models``); both are understood.
"""

from __future__ import annotations

from typing import Any

import httpx


class LaserError(Exception):
    """Base of every error the client raises."""


class LaserConnectionError(LaserError):
    """The server could not be reached (refused, DNS, reset)."""


class LaserTimeoutError(LaserError):
    """A request (or :meth:`wait`) ran past its timeout."""


class StreamError(LaserError):
    """A stream failed after it started (the server reported the error in-band)."""


class APIError(LaserError):
    """An HTTP error answer. ``message`` is the server's own words; ``status`` its status code."""

    status: int = 0

    def __init__(self, message: str, *, status: int, detail: Any = None, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, method: str = "", url: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}
        self.method = method
        self.url = url

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"

    @property
    def loc(self) -> list[Any] | None:
        """Location of the first offending field (``['body', 'name']``), when the server named one."""
        return self.errors[0].get("loc") if self.errors else None


class BadRequestError(APIError):
    status = 400


class AuthenticationError(APIError):
    """401: no key, or an unknown key."""

    status = 401


class PermissionDeniedError(APIError):
    """403: a valid key without the needed scope (the inference key on an admin route)."""

    status = 403


class NotFoundError(APIError):
    status = 404


class ConflictError(APIError):
    """409: the name exists, is reserved, or the object is in the wrong state."""

    status = 409


class PayloadTooLargeError(APIError):
    status = 413


class UnprocessableError(APIError):
    """422: the request was understood but is invalid; ``errors`` names each field."""

    status = 422


class RateLimitError(APIError):
    """429: the server's queue is full; ``retry_after`` is its Retry-After in seconds."""

    status = 429

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))


class RequestCancelledError(APIError):
    status = 499


class ServiceUnavailableError(APIError):
    """503: the model is still loading, failed to load, or the engine stopped."""

    status = 503


class ServerError(APIError):
    """Any other 5xx."""


_BY_STATUS: dict[int, type[APIError]] = {c.status: c for c in (
    BadRequestError, AuthenticationError, PermissionDeniedError, NotFoundError, ConflictError, PayloadTooLargeError,
    UnprocessableError, RateLimitError, RequestCancelledError, ServiceUnavailableError)}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds; HTTP dates are not sent by laser-serve)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = [str(p) for p in e.get("loc") or []]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def error_from_response(response: httpx.Response) -> APIError:
    """The typed error for an error answer (its body must have been read)."""
    status = response.status_code
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    errors: list[dict[str, Any]] = []
    detail: Any = body
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list):
            errors = [e for e in detail if isinstance(e, dict)]
            message = _describe(errors) or str(detail)
        else:
            message = str(detail)
    elif isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"]
        message = str(detail.get("message", ""))
        if detail.get("param"):
            errors = [{"loc": ["body", *str(detail["param"]).split(".")], "msg": message,
                       "type": detail.get("type")}]
    else:
        message = response.text.strip()[:500] or response.reason_phrase or "error"
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    request = response.request if response._request is not None else None  # noqa: SLF001 - mock transports
    return cls(message, status=status, detail=detail, errors=errors, headers=dict(response.headers),
               method=request.method if request else "", url=str(request.url) if request else "")
