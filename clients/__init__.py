"""Python client and ``laser`` CLI of laser-serve.

    from clients import LaserClient, AsyncLaserClient, NotFoundError

The client needs httpx, httpx-sse, tenacity and the protocol models (pydantic, no torch); the CLI (``clients.cli``)
adds typer and rich. ``pip install ./clients`` installs it alone (the ``laser-serve-client`` distribution).
"""

from clients.aio import AsyncLaserClient
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
from clients.sync import LaserClient

__all__ = [
    "APIError", "AsyncLaserClient", "AuthenticationError", "BadRequestError", "ConflictError", "LaserClient",
    "LaserConnectionError", "LaserError", "LaserTimeoutError", "NotFoundError", "PayloadTooLargeError",
    "PermissionDeniedError", "RateLimitError", "RequestCancelledError", "ServerError", "ServiceUnavailableError",
    "StreamError", "UnprocessableError",
]
