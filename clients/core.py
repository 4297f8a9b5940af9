"""What the sync and async clients share: settings and keys, one request description (:class:`Call`), the retry
policy (tenacity: Retry-After first, else exponential backoff with jitter), transport errors, answer parsing and
Server-Sent Events decoding (httpx-sse).

Keys: ``api_key`` (or ``LASER_API_KEY``) is sent on inference routes and ``admin_api_key`` (or
``LASER_ADMIN_API_KEY``) on admin routes; either one stands in for the other when only one is given (the admin key
passes inference routes too). A 429 (queue full) or a 503 with Retry-After (model loading) is retried up to
``max_retries`` times.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, TypeAdapter
from tenacity import RetryCallState, retry_if_result, stop_after_attempt

from clients.errors import (
    LaserConnectionError,
    LaserError,
    LaserTimeoutError,
    StreamError,
    error_from_response,
    parse_retry_after,
)
from laser_protocol.inference import GenerateStreamEvent

T = TypeVar("T")
Scope = Literal["admin", "inference", "open"]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
RETRY_STATUSES = frozenset({429, 503})
UNSET: Any = object()


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request, independent of the I/O model: what to send and how to read the answer."""

    method: str
    path: str
    scope: Scope
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    timeout: Any = field(default=UNSET)  # float | httpx.Timeout | None; UNSET: the client's
    accept: frozenset[int] = frozenset()  # error statuses parsed as results (``/ready``'s 503)


def as_model(cls: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    """Parse an answer into the protocol model ``cls`` (unknown fields of a newer server are ignored)."""
    return lambda r: cls.model_validate_json(r.content)


def as_list(cls: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    """Parse a ``{"data": [...]}`` listing into a list of ``cls``."""
    adapter = TypeAdapter(list[cls])  # type: ignore[valid-type]
    return lambda r: adapter.validate_python(r.json()["data"])


def seg(value: str) -> str:
    """A path segment, percent-encoded (names are validated by the server; '/' cannot sneak in)."""
    return quote(str(value), safe="")


def compact(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def generate_params(prompt: str | None, prompts: Sequence[str] | None, max_new_tokens: int | None,
                    temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None,
                    stop: str | Sequence[str] | None) -> dict[str, Any]:
    if (prompt is None) == (prompts is None):
        raise ValueError("give exactly one of prompt or prompts")
    return compact(prompt=prompt, prompts=list(prompts) if prompts is not None else None,
                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                   stop=stop if isinstance(stop, str) or stop is None else list(stop))


def score_params(context: str | None, continuations: Sequence[str] | None, text: str | None,
                 normalize: bool) -> dict[str, Any]:
    return compact(context=context, continuations=list(continuations) if continuations is not None else None,
                   text=text, normalize=normalize or None)


def generate_event(data: str) -> GenerateStreamEvent | None:
    """One generate SSE payload; None at ``[DONE]``; a server-side failure raises :class:`StreamError`."""
    if data.strip() == "[DONE]":
        return None
    payload = json.loads(data)
    if "error" in payload and "profile" not in payload:
        raise StreamError(str(payload["error"]))
    return GenerateStreamEvent.model_validate(payload)


class ClientBase:
    """Settings, keys, request building, retry policy and answer parsing: everything but the I/O."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, admin_api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT, max_retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 30.0, headers: Mapping[str, str] | None = None) -> None:
        self.base_url = (base_url or os.environ.get("LASER_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("LASER_API_KEY") or None
        self.admin_api_key = (admin_api_key if admin_api_key is not None
                              else os.environ.get("LASER_ADMIN_API_KEY") or None)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.headers = {"User-Agent": "laser-serve-client", **(headers or {})}

    def _key(self, scope: Scope) -> str | None:
        if scope == "admin":
            return self.admin_api_key or self.api_key
        return self.api_key or self.admin_api_key

    def _request(self, http: httpx.Client | httpx.AsyncClient, call: Call[Any], stream: bool = False) -> httpx.Request:
        headers = {}
        key = self._key(call.scope)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if stream:
            headers["Accept"] = "text/event-stream"
        timeout = self.timeout if call.timeout is UNSET else call.timeout
        return http.build_request(call.method, call.path, json=call.json, params=call.params, headers=headers,
                                  timeout=timeout)

    # -- retries (tenacity) ----------------------------------------------------------------------

    @staticmethod
    def _retryable(call: Call[Any], response: httpx.Response) -> bool:
        """A 429, or a 503 that says when to come back (without Retry-After the engine stopped: retrying will not
        help); never a status the call accepts as a result."""
        status = response.status_code
        if status not in RETRY_STATUSES or status in call.accept:
            return False
        return status == 429 or parse_retry_after(response.headers.get("retry-after")) is not None

    def _wait(self, state: RetryCallState) -> float:
        """The server's Retry-After, else exponential backoff with jitter (``backoff * 2**n``, capped)."""
        response: httpx.Response = state.outcome.result()  # type: ignore[union-attr]
        after = parse_retry_after(response.headers.get("retry-after"))
        if after is not None:
            return after
        return min(self.max_backoff, self.backoff * 2 ** (state.attempt_number - 1)) * (0.5 + random.random() / 2)

    def _retry_policy(self, call: Call[Any]) -> dict[str, Any]:
        """Arguments of tenacity's ``Retrying`` / ``AsyncRetrying`` for ``call``: retry retryable answers up to
        ``max_retries`` times; after the last one the answer itself is returned (and raised as a typed error)."""
        return dict(stop=stop_after_attempt(self.max_retries + 1),
                    retry=retry_if_result(lambda r: self._retryable(call, r)), wait=self._wait,
                    retry_error_callback=lambda state: state.outcome.result())  # type: ignore[union-attr]

    # -- answers ---------------------------------------------------------------------------------

    @staticmethod
    def _transport_error(exc: httpx.HTTPError, request: httpx.Request) -> LaserError:
        if isinstance(exc, httpx.TimeoutException):
            return LaserTimeoutError(f"{request.method} {request.url} timed out ({type(exc).__name__})")
        return LaserConnectionError(f"cannot reach laser-serve at {request.url.scheme}://{request.url.netloc.decode()}"
                                    f": {exc or type(exc).__name__}")

    @staticmethod
    def _is_failure(call: Call[Any], response: httpx.Response) -> bool:
        return response.is_error and response.status_code not in call.accept

    @staticmethod
    def _result(call: Call[T], response: httpx.Response) -> T:
        if ClientBase._is_failure(call, response):
            raise error_from_response(response)
        return call.parse(response)
