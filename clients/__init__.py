"""Python client and ``laser`` CLI of laser-serve.

    from clients import LaserClient, AsyncLaserClient, NotFoundError

The client needs only httpx and pydantic; the CLI (``clients.cli``) adds typer and rich.
"""

from clients.client import AsyncLaserClient, LaserClient
from clients.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    LaserConnectionError,
    LaserError,
    LaserTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    RequestCancelledError,
    ServerError,
    ServiceUnavailableError,
    StreamError,
    UnprocessableError,
)

__all__ = [
    "APIError", "AsyncLaserClient", "AuthenticationError", "BadRequestError", "ConflictError", "LaserClient",
    "LaserConnectionError", "LaserError", "LaserTimeoutError", "NotFoundError", "PayloadTooLargeError",
    "PermissionDeniedError", "RateLimitError", "RequestCancelledError", "ServerError", "ServiceUnavailableError",
    "StreamError", "UnprocessableError",
]
